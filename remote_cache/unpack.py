"""Extract OCI layer tars into a fresh staging directory, safely and fast, then swap it into place.

Safety: every header is validated before anything is written. Refused with
:class:`~remote_cache.errors.UnsafeArchive` (naming the member): absolute paths (a directory
entry named ``/`` is the root, like ``./``: it only carries the root's metadata), any ``..``
component, paths through a symlink or a non-directory, hard links to a missing, absolute,
escaping or directory target, device files, FIFOs, and a path repeated within one layer as a
different type. All writes go through directory file descriptors opened with ``O_NOFOLLOW``
from the staging root down, and files are created with ``O_EXCL | O_NOFOLLOW``, so nothing can
be written outside the staging directory even if the checks had a hole.

Metadata: modes are kept exactly, except that setuid/setgid/sticky bits are dropped unless we
run as root (a restored cache should not grow privileges for whoever restores it); numeric
uid/gid are applied only as root; mtimes are set on files, symlinks and (last, deepest first)
directories. Directories are created owner-writable and get their real mode at ``finish()``.

Layers apply in order with OCI whiteouts (``.wh.NAME`` removes NAME from lower layers,
``.wh..wh..opq`` empties a directory of lower-layer content). Corrupt or truncated streams raise
:class:`~remote_cache.errors.IntegrityError`; something that is not a tar at all raises
:class:`~remote_cache.errors.ImageFormatError`.

Speed: a background thread reads and decompresses the layer blobs into a small bounded queue of
chunks (zlib, and zstd through its stream reader, release the GIL), so decompression overlaps
the file writing as in ``zstd -d | tar -x``. The writing thread parses headers with one
``struct`` unpack, keeps paths as bytes, writes file data straight from the decompressed chunk,
creates files with their final mode when the umask allows (no ``fchmod``) and skips ``fchown``
when the owner already matches. Every check above still runs, in the one writing thread, in
archive order. ``Extractor.add_layers`` lets the decompressor run ahead into the next layer
too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import queue
import secrets
import shutil
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from .errors import ImageFormatError, IntegrityError, UnsafeArchive
from .frames import FrameCheck
from .oci import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD

__all__ = [
    "ExtractStats",
    "Extractor",
    "discard_dir",
    "replace_dir",
    "staging_dir",
]

_READ = 1 << 20  # plain tar: bytes per read
_READ_COMPRESSED = 256 << 10  # compressed input per decompress call (~1 MiB out for zstd)
_READ_FIRST = 16 << 10  # compressed input of a layer's first decompress call
_ZSTD_WRITE_SIZE = 2 << 20  # decompressed bytes per zstd read: one allocation per call, no joins
_ZSTD_FIRST = 128 << 10  # a layer's first zstd read: small, so writing starts soon
_QUEUE_CHUNKS = 16  # decompressed chunks buffered between the two threads
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DIR_FDS = 256

_K_FILE, _K_DIR, _K_SYMLINK = 0, 1, 2

# ustar header: name mode uid gid size mtime chksum typeflag linkname magic [version uname
# gname devmajor devminor] prefix [pad].
_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s82x155s12x")
_REGULAR = (b"0", b"\0", b"7")
_META_TYPES = (b"x", b"g", b"L", b"K")


@dataclass
class ExtractStats:
    """What an extraction wrote."""

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0


# --------------------------------------------------------------------------------------------
# Decompression: a pull-based source of uncompressed bytes.


class _Source:
    """Reads decompressed bytes from a layer blob; errors become IntegrityError."""

    def __init__(self, fileobj: BinaryIO, media_type: str) -> None:
        self._f = fileobj
        head = self._raw_read(4)
        self._head = head
        kind = _kind_of(media_type, head)
        self._zd: Any = None
        self._zr: Any = None
        self.kind = kind
        self._want = _READ_FIRST
        self._pending = b""
        self._eof = False
        if kind == "zstd":
            # stream_reader decompresses without the GIL (decompressobj holds it), so the
            # writing thread keeps running; FrameCheck catches what it would let through: a
            # stream cut inside a frame.
            self._frames = FrameCheck()
            self._zr = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, _Tap(self)), read_size=_READ_COMPRESSED, read_across_frames=True
            )
            self._out = _ZSTD_FIRST
        elif kind == "gzip":
            self._zd = zlib.decompressobj(31)

    def _raw_read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except OSError as exc:
            raise IntegrityError(f"could not read layer data: {exc}") from exc

    def _next_compressed(self) -> bytes:
        if self._zd is None:
            n = _READ
        else:
            # Start small so the writer gets its first chunk soon, then read bigger pieces.
            n = self._want
            self._want = min(n * 2, _READ_COMPRESSED)
        if self._head:
            data = self._head + self._raw_read(n)
            self._head = b""
            return data
        return self._raw_read(n)

    def _tap(self, n: int) -> bytes:
        """Compressed bytes for the zstd reader, followed through FrameCheck."""
        data = self._next_compressed()
        self._frames.feed(data)
        return data

    def _read_zstd(self) -> bytes:
        if self._eof:
            return b""
        try:
            out: bytes = self._zr.read(self._out)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd layer stream is corrupt: {exc}") from exc
        self._out = _ZSTD_WRITE_SIZE
        if not out:
            self._frames.finish()
            self._eof = True
        return out

    def read(self) -> bytes:
        """Next chunk of uncompressed bytes; b"" at the end of a complete stream."""
        if self._zr is not None:
            return self._read_zstd()
        while not self._eof:
            if self._pending:
                comp, self._pending = self._pending, b""
            else:
                comp = self._next_compressed()
            if self._zd is None:
                if not comp:
                    self._eof = True
                return comp
            if not comp:
                if self._zd.eof:
                    self._eof = True
                    return b""
                raise IntegrityError(f"{self.kind} layer stream is truncated (ended mid-member)")
            try:
                out: bytes = self._zd.decompress(comp)
            except zlib.error as exc:
                raise IntegrityError(f"{self.kind} layer stream is corrupt: {exc}") from exc
            if self._zd.eof:
                rest = self._zd.unused_data
                if rest:
                    # Another concatenated gzip member follows.
                    self._zd = zlib.decompressobj(31)
                    self._pending = rest
            if out:
                return out
        return b""


class _Tap:
    """The file object a zstd stream reader pulls compressed bytes from (see _Source)."""

    def __init__(self, source: _Source) -> None:
        self.read = source._tap


def _kind_of(media_type: str, head: bytes) -> str:
    if head.startswith(_ZSTD_MAGIC):
        magic = "zstd"
    elif head.startswith(_GZIP_MAGIC):
        magic = "gzip"
    else:
        magic = "tar"
    if media_type == OCI_LAYER_ZSTD and magic != "zstd":
        raise ImageFormatError(f"layer says {media_type} but is not zstd-compressed")
    if media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP) and magic != "gzip":
        raise ImageFormatError(f"layer says {media_type} but is not gzip-compressed")
    if media_type == OCI_LAYER_TAR and magic != "tar":
        # Some tools label compressed layers as plain tar; trust the magic bytes.
        return magic
    return magic


class _EndOfLayer:
    """Queue marker: the current layer's stream ended complete."""


class _EndOfLayers:
    """Queue marker: no more layers."""


_END = _EndOfLayer()
_DONE = _EndOfLayers()
_Item = bytes | _EndOfLayer | _EndOfLayers | BaseException


class _Feeder:
    """Decompresses layers, in order, in a background thread into a bounded queue of chunks.

    Only bytes travel to the writing thread; every check on them happens there. On failure
    the writer calls ``stop()`` and does not wait: the thread may be blocked reading a blob
    that is still downloading, and exits at its next read or queue put.
    """

    def __init__(self, layers: Iterable[tuple[BinaryIO, str]]) -> None:
        self._q: queue.Queue[_Item] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(iter(layers),), name="unpack-decompress", daemon=True
        )
        self._thread.start()

    def _put(self, item: _Item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, layers: Iterator[tuple[BinaryIO, str]]) -> None:
        try:
            for fileobj, media_type in layers:
                src = _Source(fileobj, media_type)
                while True:
                    chunk = src.read()
                    if not chunk:
                        break
                    if not self._put(chunk):
                        return
                if not self._put(_END):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the writing thread, which raises it
            self._put(exc)

    def get(self) -> _Item:
        """The next item, an exception the thread raised included."""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._stop.set()
        return item

    def stop(self) -> None:
        """Make the thread exit soon and drop what it buffered."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()

    def join(self) -> None:
        """Wait for the thread, which has put _DONE or failed."""
        self._thread.join()


class _Reader:
    """Exact-size reads over one layer's chunks from a _Feeder, without copying file data."""

    def __init__(self, feeder: _Feeder, first: _Item) -> None:
        self._feeder = feeder
        self._first: _Item | None = first
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._len = 0
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._ended = False

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _load(self) -> bool:
        """Replace the (fully consumed) buffer with the next chunk; False at the layer's end."""
        if self._ended:
            return False
        if self._first is not None:
            item, self._first = self._first, None
        else:
            item = self._feeder.get()
        if isinstance(item, BaseException):
            raise item
        if not isinstance(item, bytes):
            if isinstance(item, _EndOfLayers):  # cannot happen: the feeder puts _END first
                raise RuntimeError("layer stream ended without its end marker")
            self._ended = True
            return False
        self._base += self._len
        self._buf = item
        self._mv = memoryview(item)
        self._len = len(item)
        self._pos = 0
        return True

    def read_exact(self, n: int, what: str) -> bytes:
        p = self._pos
        e = p + n
        if e <= self._len:
            self._pos = e
            return self._buf[p:e]
        parts = [self._buf[p:]]
        got = self._len - p
        self._pos = self._len
        while got < n:
            if not self._load():
                raise IntegrityError(f"layer tar is truncated (ended inside {what})")
            take = min(n - got, self._len)
            parts.append(self._buf[:take])
            self._pos = take
            got += take
        return b"".join(parts)

    def at_eof(self) -> bool:
        return self._pos == self._len and not self._load()

    def data(self, fd: int, n: int, member: bytes) -> None:
        """Write the next ``n`` bytes to ``fd`` (``fd < 0``: skip them), then skip the padding."""
        pad = -n % 512
        p = self._pos
        e = p + n
        if e + pad <= self._len:
            if fd >= 0 and n:
                w = os.write(fd, self._mv[p:e])
                if w < n:
                    _write_all(fd, self._mv[p + w : e])
            self._pos = e + pad
            return
        while n:
            avail = self._len - self._pos
            if not avail:
                if not self._load():
                    raise IntegrityError(f"layer tar is truncated (ended inside {_show(member)})")
                continue
            take = min(avail, n)
            if fd >= 0:
                _write_all(fd, self._mv[self._pos : self._pos + take])
            self._pos += take
            n -= take
        if pad:
            self._skip_padding(pad)

    def _skip_padding(self, pad: int) -> None:
        # A stream may end exactly after the last member's data, unpadded (umoci 0.4 does);
        # the caller's next at_eof() then sees the end (see Extractor._extract). A stream that
        # ends inside the padding is truncated.
        if self._pos == self._len and not self._load():
            return
        self.read_exact(pad, "padding")

    def drain(self) -> None:
        """Consume the rest of the stream (checks that the compressed stream is complete)."""
        self._pos = self._len
        while self._load():
            self._pos = self._len


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        w = os.write(fd, view)
        view = view[w:]


# --------------------------------------------------------------------------------------------
# Tar header parsing.


def _num(field: bytes, member: str) -> int:
    if field and field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            n -= 1 << (8 * (len(field) - 1))
        return n
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise IntegrityError(f"tar header of {member!r} has a bad number field {field!r}") from exc


def _oct(field: bytes, name: bytes) -> int:
    """``_num`` with a fast path for the usual NUL/space-terminated octal."""
    try:
        return int(field.rstrip(b"\0 "), 8)
    except ValueError:
        return _num(field, os.fsdecode(name))


def _sum512(hdr: bytes) -> int:
    # Exact byte sum: adler32's low half is (1 + sum) mod 65521, and 256 bytes sum to < 65521.
    mv = memoryview(hdr)
    return (zlib.adler32(mv[:256]) & 0xFFFF) + (zlib.adler32(mv[256:]) & 0xFFFF) - 2


def _parse_pax(data: bytes, member: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError as exc:
            raise IntegrityError(f"malformed PAX header near {member!r}") from exc
        rec = data[sp + 1 : pos + length]
        if length <= 0 or sp < 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise IntegrityError(f"malformed PAX header near {member!r}")
        key, _, value = rec[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value
        pos += length
    return out


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _clean(raw: bytes, member: bytes, *, allow_root: bool) -> bytes:
    """Validate and normalise a member path: relative, no ``..``, no empty result."""
    if raw[:1] != b"/":
        n = raw.rstrip(b"/")
        # Fast path: no component starts with "." (so none is "." or ".."), no empty ones.
        if n and n[:1] != b"." and b"/." not in n and b"//" not in n:
            return n
    elif allow_root and not raw.strip(b"/"):
        return b""  # "/" as a directory entry is the root (umoci insert writes one), like "./"
    else:
        raise UnsafeArchive(f"archive member {_show(member)!r} has an absolute path; refusing to extract")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UnsafeArchive(
            f"archive member {_show(member)!r} has a '..' path component; refusing to extract"
        )
    if not parts and not allow_root:
        raise UnsafeArchive(f"archive member {_show(member)!r} names the root directory; refusing")
    return b"/".join(parts)


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def _umask() -> int | None:
    """The process umask, read without changing it (Linux); None when unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has_default_acl(fd: int) -> bool:
    """Whether directory ``fd`` has a default POSIX ACL (unsure counts as yes)."""
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError as exc:
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


# --------------------------------------------------------------------------------------------
# Extraction.


class Extractor:
    """Apply OCI layers, in order, to a fresh staging directory ``dest``; call finish() at the end."""

    def __init__(self, dest: Path, *, preserve_owner: bool | None = None) -> None:
        self.dest = Path(dest)
        self._is_root = os.geteuid() == 0
        self._owner = self._is_root if preserve_owner is None else preserve_owner
        self._mode_mask = 0o7777 if self._is_root else 0o777
        self._root_fd = os.open(self.dest, _DIR_FLAGS)
        # New entries get our euid and, since dest's group is our egid and the directories we
        # make inherit it (setgid or grpid mounts) or take the egid, our egid: chown to exactly
        # these ids is a no-op and is skipped. Otherwise always chown.
        st = os.fstat(self._root_fd)
        ids = (os.geteuid(), os.getegid())
        self._new_ids: tuple[int, int] | None = ids if st.st_gid == ids[1] else None
        # Modes the umask leaves intact can be given to open() directly (no fchmod). A default
        # ACL replaces the umask (and only ever narrows the mode): then always fchmod.
        umask = _umask()
        self._keep_bits = 0 if umask is None or _has_default_acl(self._root_fd) else 0o777 & ~umask
        self._fds: dict[bytes, int] = {b"": self._root_fd}
        self._kinds: dict[bytes, tuple[int, int]] = {}  # path -> (kind, layer index)
        self._dirmeta: dict[bytes, tuple[int, int, int, int]] = {}  # path -> mode, uid, gid, mtime
        self._root_meta: tuple[int, int, int, int] | None = None
        self._layer = -1
        self._seen: dict[bytes, int] = {}
        self._nums: dict[bytes, int] = {}  # header number field -> value (fields differ in width)
        self.stats = ExtractStats()

    # -- directory descriptors --------------------------------------------------------------

    def _dirfd(self, rel: bytes, member: bytes) -> int:
        """An fd for directory ``rel``, creating missing directories; refuses symlinks on the way."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        parent, _, base = rel.rpartition(b"/")
        pfd = self._dirfd(parent, member)
        kind = self._kinds.get(rel)
        if kind is not None and kind[0] != _K_DIR:
            what = "a symlink" if kind[0] == _K_SYMLINK else "a file"
            raise UnsafeArchive(
                f"archive member {_show(member)!r} goes through {what} ({_show(rel)!r}); refusing"
            )
        try:
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            if kind is None:
                # A directory dest already had: what is made in it may get its group or ACL.
                if os.fstat(fd).st_gid != os.getegid():
                    self._new_ids = None
                if _has_default_acl(fd):
                    self._keep_bits = 0
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=pfd)
            self._kinds[rel] = (_K_DIR, self._layer)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(
                    f"archive member {_show(member)!r} goes through a non-directory ({_show(rel)!r}); "
                    "refusing"
                ) from exc
            raise
        if len(self._fds) >= _MAX_DIR_FDS:
            self._close_fds()
        self._fds[rel] = fd
        return fd

    def _close_fds(self) -> None:
        for k, fd in list(self._fds.items()):
            if k:
                os.close(fd)
        self._fds = {b"": self._root_fd}

    def _forget(self, path: bytes) -> None:
        """Drop bookkeeping for ``path`` and everything under it (after removing it)."""
        prefix = path + b"/"
        for table in (self._kinds, self._dirmeta):
            for k in [k for k in table if k == path or k.startswith(prefix)]:
                del table[k]
        self._close_fds()

    def _remove(self, pfd: int, base: bytes, path: bytes) -> None:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(path)
            return
        if stat.S_ISDIR(st.st_mode):
            name = os.fsdecode(base)
            _make_writable_tree(pfd, name)
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)
        self._forget(path)

    # -- layers ------------------------------------------------------------------------------

    def add_layer(self, fileobj: BinaryIO, media_type: str = OCI_LAYER_ZSTD) -> None:
        """Extract one layer (tar, tar+gzip or tar+zstd; detected by magic bytes too)."""
        self.add_layers([(fileobj, media_type)])

    def add_layers(self, layers: Iterable[tuple[BinaryIO, str]]) -> None:
        """Extract several layers in order, decompressing the next while writing the current.

        Same result and checks as ``add_layer`` on each in turn, but faster: the background
        thread runs ahead across layer boundaries. ``layers`` is iterated, and its files read,
        in that thread, one after another. On failure this returns without waiting for a read
        that is blocked (a stalled download); the thread exits once that read returns.
        """
        feeder = _Feeder(layers)
        try:
            while True:
                first = feeder.get()
                if isinstance(first, _EndOfLayers):
                    break
                self._layer += 1
                self._seen = {}
                self.stats.layers += 1
                try:
                    self._extract(_Reader(feeder, first))
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                        raise UnsafeArchive(
                            f"layer {self._layer} collides with what earlier members created: {exc}"
                        ) from exc
                    raise
        except BaseException:
            feeder.stop()
            raise
        feeder.join()

    def _extract(self, r: _Reader) -> None:
        gpax: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        unpack = _HDR.unpack
        if r.at_eof():
            raise ImageFormatError("layer is empty, not a tar archive")
        first = True
        while True:
            if not first and r.at_eof():
                # The stream ended right after a member, without the two zero blocks. umoci
                # 0.4 writes layers like this and GNU tar and containerd accept them. A blob cut
                # short is still caught: compressed streams must end on a complete frame (see
                # _Decompressor), and restore checks every blob's digest before the swap.
                return
            hdr = r.read_exact(512, "a header")
            total = _sum512(hdr)
            if total == 0:
                # End of archive (one or two zero blocks); the rest must be padding.
                r.drain()
                return
            name_f, mode_f, uid_f, gid_f, size_f, mtime_f, chk_f, typ, link_f, magic, prefix_f = unpack(hdr)
            try:
                stored = int(chk_f.rstrip(b"\0 "), 8)
            except ValueError:
                try:
                    stored = _num(chk_f, "?")
                except IntegrityError:
                    stored = -1
            if stored != total - sum(chk_f) + 256:
                if first:
                    raise ImageFormatError("layer is not a tar archive (bad header checksum)")
                raise IntegrityError(f"corrupt tar header at offset {r.offset - 512} (bad checksum)")
            first = False
            name_b = name_f.partition(b"\0")[0]
            if magic == b"ustar\0" and prefix_f[0] != 0:
                name_b = prefix_f.partition(b"\0")[0] + b"/" + name_b
            size = _oct(size_f, name_b)
            if typ in _META_TYPES:
                if size > 64 << 20:
                    raise ImageFormatError(
                        f"oversized tar metadata entry ({size} bytes) near {_show(name_b)!r}"
                    )
                data = r.read_exact(size, "a PAX header")
                r.read_exact(-size % 512, "padding")
                if typ == b"x":
                    pax = _parse_pax(data, _show(name_b))
                elif typ == b"g":
                    gpax.update(_parse_pax(data, _show(name_b)))
                elif typ == b"L":
                    longname = _cstr(data)
                else:
                    longlink = _cstr(data)
                continue
            link_b = link_f.partition(b"\0")[0]
            if pax or gpax or longname is not None or longlink is not None:
                meta = {**gpax, **pax} if gpax else pax
                if longname is not None:
                    name_b = longname
                if longlink is not None:
                    link_b = longlink
                if "path" in meta:
                    name_b = meta["path"]
                if "linkpath" in meta:
                    link_b = meta["linkpath"]
                member = _show(name_b)
                if "size" in meta:
                    size = int(meta["size"])
                mode = _num(mode_f, member) & 0o7777
                uid = int(meta["uid"]) if "uid" in meta else _num(uid_f, member)
                gid = int(meta["gid"]) if "gid" in meta else _num(gid_f, member)
                if "mtime" in meta:
                    mtime_ns = _pax_time_ns(meta["mtime"], member)
                else:
                    mtime_ns = _num(mtime_f, member) * 1_000_000_000
                pax, longname, longlink = {}, None, None
                if size < 0:
                    raise IntegrityError(f"tar member {member!r} has a negative size")
            else:
                # Mode, ids and mtime repeat across members: parse each distinct field once
                # (a pure function of the field's bytes, so the cache changes nothing).
                nums = self._nums
                if len(nums) > 4096:
                    nums.clear()
                mode = nums.get(mode_f, -1)
                if mode < 0:
                    mode = nums[mode_f] = _oct(mode_f, name_b)
                mode &= 0o7777
                uid = nums.get(uid_f, -1)
                if uid < 0:
                    uid = nums[uid_f] = _oct(uid_f, name_b)
                gid = nums.get(gid_f, -1)
                if gid < 0:
                    gid = nums[gid_f] = _oct(gid_f, name_b)
                mtime = nums.get(mtime_f, -1)
                if mtime < 0:
                    mtime = nums[mtime_f] = _oct(mtime_f, name_b)
                mtime_ns = mtime * 1_000_000_000
                if size < 0:
                    raise IntegrityError(f"tar member {_show(name_b)!r} has a negative size")
            if typ in _REGULAR:
                self._file(r, name_b, size, mode, uid, gid, mtime_ns)
            else:
                self._member(r, typ, name_b, link_b, size, mode, uid, gid, mtime_ns)

    def _file(
        self, r: _Reader, name_b: bytes, size: int, mode: int, uid: int, gid: int, mtime_ns: int
    ) -> None:
        """A regular file (or a whiteout): the hot path of ``_member``."""
        path = _clean(name_b, name_b, allow_root=False)
        if path in self._seen:
            raise UnsafeArchive(f"archive member {_show(name_b)!r} appears twice in one layer; refusing")
        self._seen[path] = _K_FILE
        parent, _, base = path.rpartition(b"/")
        pfd = self._fds.get(parent)
        if pfd is None:
            pfd = self._dirfd(parent, name_b)
        if base.startswith(b".wh."):
            self._whiteout(r, name_b, parent, base, pfd, size)
            return
        if path in self._kinds:
            self._remove(pfd, base, path)
            pfd = self._dirfd(parent, name_b)
        mode &= self._mode_mask
        chown = self._owner and (uid, gid) != self._new_ids
        if mode & ~self._keep_bits:
            # Bits the umask would drop, or setuid/setgid/sticky (which chown would clear).
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
            chmod = True
        else:
            fd = os.open(base, _FILE_FLAGS, mode, dir_fd=pfd)
            chmod = False
        try:
            r.data(fd, size, name_b)
            if chown:
                os.fchown(fd, uid, gid)
            if chmod:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        self._kinds[path] = (_K_FILE, self._layer)
        self.stats.files += 1
        self.stats.bytes += size

    def _whiteout(self, r: _Reader, name_b: bytes, parent: bytes, base: bytes, pfd: int, size: int) -> None:
        self.stats.whiteouts += 1
        if base == b".wh..wh..opq":
            self._opaque(parent, pfd)
        else:
            victim = base[4:]
            vpath = parent + b"/" + victim if parent else victim
            if victim in (b"", b".", b".."):
                raise UnsafeArchive(f"archive member {_show(name_b)!r} is a malformed whiteout")
            existing = self._kinds.get(vpath)
            if existing is not None and existing[1] < self._layer:
                self._remove(pfd, victim, vpath)
        r.data(-1, size, name_b)

    def _member(
        self,
        r: _Reader,
        typ: bytes,
        name_b: bytes,
        link_b: bytes,
        size: int,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
    ) -> None:
        if typ in (b"3", b"4"):
            raise UnsafeArchive(f"archive member {_show(name_b)!r} is a device file; refusing to extract")
        if typ == b"6":
            raise UnsafeArchive(f"archive member {_show(name_b)!r} is a FIFO; refusing to extract")
        if typ not in (b"2", b"1", b"5"):
            raise ImageFormatError(f"archive member {_show(name_b)!r} has unsupported tar type {typ!r}")
        member = _show(name_b)
        path = _clean(name_b, name_b, allow_root=typ == b"5")
        if typ == b"5" and not path:
            self._root_meta = (mode, uid, gid, mtime_ns)
            r.data(-1, size, name_b)
            return
        kind = _K_DIR if typ == b"5" else _K_SYMLINK if typ == b"2" else _K_FILE
        prev = self._seen.get(path)
        if prev is not None and not (prev == kind == _K_DIR):
            raise UnsafeArchive(f"archive member {member!r} appears twice in one layer; refusing")
        self._seen[path] = kind
        parent, _, base = path.rpartition(b"/")
        pfd = self._dirfd(parent, name_b)

        # OCI whiteouts.
        if base.startswith(b".wh."):
            self._whiteout(r, name_b, parent, base, pfd, size)
            return

        existing = self._kinds.get(path)
        if existing is not None and not (existing[0] == kind == _K_DIR):
            self._remove(pfd, base, path)
            pfd = self._dirfd(parent, name_b)
            existing = None

        if kind == _K_DIR:
            if existing is None:
                try:
                    os.mkdir(base, 0o700, dir_fd=pfd)
                except FileExistsError:
                    st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        raise UnsafeArchive(
                            f"archive member {member!r} collides with a non-directory"
                        ) from None
            self._kinds[path] = (_K_DIR, self._layer)
            self._dirmeta[path] = (mode, uid, gid, mtime_ns)
            self.stats.dirs += 1
            r.data(-1, size, name_b)
            return

        if typ == b"2":
            os.symlink(link_b, base, dir_fd=pfd)
            if self._owner and (uid, gid) != self._new_ids:
                os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            self._kinds[path] = (_K_SYMLINK, self._layer)
            self.stats.symlinks += 1
            r.data(-1, size, name_b)
            return

        # Hard link.
        if link_b.startswith(b"/"):
            raise UnsafeArchive(f"hard link {member!r} points to an absolute path; refusing")
        target = _clean(link_b, name_b, allow_root=True)
        tkind = self._kinds.get(target)
        if tkind is None:
            raise UnsafeArchive(
                f"hard link {member!r} points to {_show(link_b)!r}, which the archive "
                "did not create before it; refusing"
            )
        if tkind[0] == _K_DIR:
            raise UnsafeArchive(f"hard link {member!r} points to a directory; refusing")
        tparent, _, tbase = target.rpartition(b"/")
        tfd = self._dirfd(tparent, name_b)
        pfd = self._dirfd(parent, name_b)
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self._kinds[path] = (tkind[0], self._layer)
        self.stats.hardlinks += 1
        r.data(-1, size, name_b)

    def _opaque(self, parent: bytes, pfd: int) -> None:
        prefix = parent + b"/" if parent else b""
        lower = [
            k
            for k, (_kind, layer) in self._kinds.items()
            if layer < self._layer and k.startswith(prefix) and b"/" not in k[len(prefix) :]
        ]
        for k in lower:
            fd = self._dirfd(parent, k)
            self._remove(fd, k[len(prefix) :], k)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self) -> ExtractStats:
        """Apply directory modes, owners and mtimes (deepest first); close descriptors."""
        try:
            for path in sorted(self._dirmeta, key=lambda p: p.count(b"/"), reverse=True):
                mode, uid, gid, mtime_ns = self._dirmeta[path]
                parent, _, base = path.rpartition(b"/")
                pfd = self._dirfd(parent, path)
                fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._apply_dir(fd, mode, uid, gid, mtime_ns)
                finally:
                    os.close(fd)
            # Implicitly created directories (no entry of their own) get 0755.
            for path, (kind, _layer) in self._kinds.items():
                if kind == _K_DIR and path not in self._dirmeta:
                    parent, _, base = path.rpartition(b"/")
                    os.chmod(base, 0o755, dir_fd=self._dirfd(parent, path), follow_symlinks=False)
            if self._root_meta is not None:
                self._apply_dir(self._root_fd, *self._root_meta)
            else:
                os.fchmod(self._root_fd, 0o755)
        finally:
            self.close()
        return self.stats

    def _apply_dir(self, fd: int, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        if self._owner:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode & self._mode_mask)
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def close(self) -> None:
        """Release directory descriptors (finish() does this)."""
        self._close_fds()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
            self._fds = {}

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._root_fd >= 0:
            self.close()


def _pax_time_ns(value: bytes, member: str) -> int:
    try:
        text = value.decode("ascii")
        sign = -1 if text.startswith("-") else 1
        whole, _, frac = text.lstrip("-").partition(".")
        return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError as exc:
        raise IntegrityError(f"bad PAX mtime {value!r} for {member!r}") from exc


def _make_writable_tree(pfd: int, base: str) -> None:
    """Give directories under ``base`` owner rwx so a non-root rmtree can remove read-only trees."""
    if os.geteuid() == 0:
        return
    fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
    try:
        os.fchmod(fd, 0o700)
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _make_writable_tree(fd, name)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Staging and swapping.


def staging_dir(target: Path) -> Path:
    """Create a fresh, private (0700) staging directory next to ``target`` (same filesystem)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.staging-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    return path


def discard_dir(path: Path) -> None:
    """Remove a staging (or old) directory, read-only subdirectories included; missing is fine."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    def fix(func: Callable[..., Any], p: str, _exc: Any) -> None:
        # A read-only parent blocks removal as non-root: open it up and retry once.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
        func(p)

    if os.geteuid() != 0:
        for dirpath, _dirs, _files in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, 0o700)
    shutil.rmtree(path, onerror=fix)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where Linux offers it."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` directory at ``target``, replacing what was there.

    With an existing target the two are exchanged atomically (renameat2) where possible, else
    the target is renamed aside, staging renamed in, and on failure the old one put back. The
    old contents are then removed. A failure before the swap leaves ``target`` untouched.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; remove it or pick another path")
    if _exchange(staging, target):
        discard_dir(staging)  # now holds the old contents
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    discard_dir(old)
