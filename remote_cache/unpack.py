"""Extract OCI layer tars into a fresh staging directory, safely and fast, then swap it into place.

Safety: every header is validated before anything is written. Refused with
:class:`~remote_cache.errors.UnsafeArchive` (naming the member): absolute paths, any ``..``
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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from .errors import ImageFormatError, IntegrityError, UnsafeArchive
from .oci import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD

__all__ = [
    "ExtractStats",
    "Extractor",
    "discard_dir",
    "replace_dir",
    "staging_dir",
]

_READ = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DIR_FDS = 256

_K_FILE, _K_DIR, _K_SYMLINK = 0, 1, 2


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
        if kind == "zstd":
            self._zd = zstandard.ZstdDecompressor().decompressobj()
        elif kind == "gzip":
            self._zd = zlib.decompressobj(31)
        self.kind = kind
        self._pending = b""
        self._eof = False

    def _raw_read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except OSError as exc:
            raise IntegrityError(f"could not read layer data: {exc}") from exc

    def _next_compressed(self) -> bytes:
        if self._head:
            data = self._head + self._raw_read(_READ)
            self._head = b""
            return data
        return self._raw_read(_READ)

    def read(self) -> bytes:
        """Next chunk of uncompressed bytes; b"" at the end of a complete stream."""
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
                if self.kind == "zstd" and self._zd.eof:
                    self._eof = True
                    return b""
                if self.kind == "gzip" and self._zd.eof:
                    self._eof = True
                    return b""
                raise IntegrityError(f"{self.kind} layer stream is truncated (ended mid-frame)")
            try:
                out: bytes = self._zd.decompress(comp)
            except (zstandard.ZstdError, zlib.error) as exc:
                raise IntegrityError(f"{self.kind} layer stream is corrupt: {exc}") from exc
            if self._zd.eof:
                rest = self._zd.unused_data
                if rest:
                    # Another concatenated frame/member follows.
                    if self.kind == "zstd":
                        self._zd = zstandard.ZstdDecompressor().decompressobj()
                    else:
                        self._zd = zlib.decompressobj(31)
                    self._pending = rest
            if out:
                return out
        return b""


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


class _Reader:
    """Exact-size reads over a _Source, keeping a buffer."""

    def __init__(self, src: _Source) -> None:
        self._src = src
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _fill(self) -> bool:
        chunk = self._src.read()
        if not chunk:
            return False
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    def read_exact(self, n: int, what: str) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise IntegrityError(f"layer tar is truncated (ended inside {what})")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def at_eof(self) -> bool:
        return len(self._buf) - self._pos == 0 and not self._fill()

    def copy_to(self, fd: int, n: int, what: str) -> None:
        """Write the next ``n`` bytes to ``fd`` (``fd < 0``: skip them)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise IntegrityError(f"layer tar is truncated (ended inside {what})")
                continue
            take = min(avail, n)
            if fd >= 0:
                view = memoryview(self._buf)[self._pos : self._pos + take]
                while view:
                    w = os.write(fd, view)
                    view = view[w:]
            self._pos += take
            self.offset += take
            n -= take

    def drain(self) -> None:
        """Consume the rest of the stream (checks that the compressed stream is complete)."""
        self._buf, self._pos = b"", 0
        while self._src.read():
            pass


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


def _clean(raw: bytes, member: str, *, allow_root: bool) -> str:
    """Validate and normalise a member path: relative, no ``..``, no empty result."""
    name = os.fsdecode(raw)
    if name.startswith("/"):
        raise UnsafeArchive(f"archive member {member!r} has an absolute path; refusing to extract")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {member!r} has a '..' path component; refusing to extract")
    if not parts and not allow_root:
        raise UnsafeArchive(f"archive member {member!r} names the root directory; refusing")
    return "/".join(parts)


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
        self._fds: dict[str, int] = {"": self._root_fd}
        self._kinds: dict[str, tuple[int, int]] = {}  # path -> (kind, layer index)
        self._dirmeta: dict[str, tuple[int, int, int, int]] = {}  # path -> mode, uid, gid, mtime
        self._root_meta: tuple[int, int, int, int] | None = None
        self._layer = -1
        self._seen: dict[str, int] = {}
        self.stats = ExtractStats()

    # -- directory descriptors --------------------------------------------------------------

    def _dirfd(self, rel: str, member: str) -> int:
        """An fd for directory ``rel``, creating missing directories; refuses symlinks on the way."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        parent, _, base = rel.rpartition("/")
        pfd = self._dirfd(parent, member)
        kind = self._kinds.get(rel)
        if kind is not None and kind[0] != _K_DIR:
            what = "a symlink" if kind[0] == _K_SYMLINK else "a file"
            raise UnsafeArchive(f"archive member {member!r} goes through {what} ({rel!r}); refusing")
        try:
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=pfd)
            self._kinds[rel] = (_K_DIR, self._layer)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(
                    f"archive member {member!r} goes through a non-directory ({rel!r}); refusing"
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
        self._fds = {"": self._root_fd}

    def _forget(self, path: str) -> None:
        """Drop bookkeeping for ``path`` and everything under it (after removing it)."""
        prefix = path + "/"
        for table in (self._kinds, self._dirmeta):
            for k in [k for k in table if k == path or k.startswith(prefix)]:
                del table[k]
        self._close_fds()

    def _remove(self, pfd: int, base: str, path: str) -> None:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(path)
            return
        if stat.S_ISDIR(st.st_mode):
            _make_writable_tree(pfd, base)
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)
        self._forget(path)

    # -- layers ------------------------------------------------------------------------------

    def add_layer(self, fileobj: BinaryIO, media_type: str = OCI_LAYER_ZSTD) -> None:
        """Extract one layer (tar, tar+gzip or tar+zstd; detected by magic bytes too)."""
        self._layer += 1
        self._seen = {}
        self.stats.layers += 1
        reader = _Reader(_Source(fileobj, media_type))
        try:
            self._extract(reader)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                raise UnsafeArchive(
                    f"layer {self._layer} collides with what earlier members created: {exc}"
                ) from exc
            raise

    def _extract(self, r: _Reader) -> None:
        gpax: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        first = True
        while True:
            if first and r.at_eof():
                raise ImageFormatError("layer is empty, not a tar archive")
            hdr = r.read_exact(512, "a header")
            if hdr.count(0) == 512:
                # End of archive (one or two zero blocks); the rest must be padding.
                r.drain()
                return
            try:
                stored = _num(hdr[148:156], "?")
            except IntegrityError:
                stored = -1
            actual = sum(hdr) - sum(hdr[148:156]) + 256
            if stored != actual:
                if first:
                    raise ImageFormatError("layer is not a tar archive (bad header checksum)")
                raise IntegrityError(f"corrupt tar header at offset {r.offset - 512} (bad checksum)")
            first = False
            typ = hdr[156:157]
            name_b = _cstr(hdr[0:100])
            if hdr[257:263] == b"ustar\0" and hdr[345] != 0:
                name_b = _cstr(hdr[345:500]) + b"/" + name_b
            member = os.fsdecode(name_b)
            size = _num(hdr[124:136], member)
            if typ in (b"x", b"g", b"L", b"K"):
                if size > 64 << 20:
                    raise ImageFormatError(f"oversized tar metadata entry ({size} bytes) near {member!r}")
                data = r.read_exact(size, "a PAX header")
                r.read_exact(-size % 512, "padding")
                if typ == b"x":
                    pax = _parse_pax(data, member)
                elif typ == b"g":
                    gpax.update(_parse_pax(data, member))
                elif typ == b"L":
                    longname = _cstr(data)
                else:
                    longlink = _cstr(data)
                continue
            meta = {**gpax, **pax} if gpax else pax
            link_b = _cstr(hdr[157:257])
            if longname is not None:
                name_b = longname
            if longlink is not None:
                link_b = longlink
            if "path" in meta:
                name_b = meta["path"]
            if "linkpath" in meta:
                link_b = meta["linkpath"]
            member = os.fsdecode(name_b)
            if "size" in meta:
                size = int(meta["size"])
            mode = _num(hdr[100:108], member) & 0o7777
            uid = int(meta["uid"]) if "uid" in meta else _num(hdr[108:116], member)
            gid = int(meta["gid"]) if "gid" in meta else _num(hdr[116:124], member)
            if "mtime" in meta:
                mtime_ns = _pax_time_ns(meta["mtime"], member)
            else:
                mtime_ns = _num(hdr[136:148], member) * 1_000_000_000
            pax, longname, longlink = {}, None, None
            if size < 0:
                raise IntegrityError(f"tar member {member!r} has a negative size")
            self._member(r, typ, name_b, member, link_b, size, mode, uid, gid, mtime_ns)

    def _member(
        self,
        r: _Reader,
        typ: bytes,
        name_b: bytes,
        member: str,
        link_b: bytes,
        size: int,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
    ) -> None:
        if typ in (b"3", b"4"):
            raise UnsafeArchive(f"archive member {member!r} is a device file; refusing to extract")
        if typ == b"6":
            raise UnsafeArchive(f"archive member {member!r} is a FIFO; refusing to extract")
        if typ not in (b"0", b"\0", b"7", b"1", b"2", b"5"):
            raise ImageFormatError(f"archive member {member!r} has unsupported tar type {typ!r}")
        path = _clean(name_b, member, allow_root=typ == b"5")
        if typ == b"5" and not path:
            self._root_meta = (mode, uid, gid, mtime_ns)
            r.copy_to(-1, size, member)
            r.read_exact(-size % 512, "padding")
            return
        kind = _K_DIR if typ == b"5" else _K_SYMLINK if typ == b"2" else _K_FILE
        prev = self._seen.get(path)
        if prev is not None and not (prev == kind == _K_DIR):
            raise UnsafeArchive(f"archive member {member!r} appears twice in one layer; refusing")
        self._seen[path] = kind
        parent, _, base = path.rpartition("/")
        pfd = self._dirfd(parent, member)

        # OCI whiteouts.
        if base.startswith(".wh."):
            self.stats.whiteouts += 1
            if base == ".wh..wh..opq":
                self._opaque(parent, pfd)
            else:
                victim = base[4:]
                vpath = f"{parent}/{victim}" if parent else victim
                if victim in ("", ".", ".."):
                    raise UnsafeArchive(f"archive member {member!r} is a malformed whiteout")
                existing = self._kinds.get(vpath)
                if existing is not None and existing[1] < self._layer:
                    self._remove(pfd, victim, vpath)
            r.copy_to(-1, size, member)
            r.read_exact(-size % 512, "padding")
            return

        existing = self._kinds.get(path)
        if existing is not None and not (existing[0] == kind == _K_DIR):
            self._remove(pfd, base, path)
            pfd = self._dirfd(parent, member)
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
            r.copy_to(-1, size, member)
            r.read_exact(-size % 512, "padding")
            return

        if typ == b"2":
            os.symlink(link_b, base, dir_fd=pfd)
            if self._owner:
                os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            self._kinds[path] = (_K_SYMLINK, self._layer)
            self.stats.symlinks += 1
            r.copy_to(-1, size, member)
            r.read_exact(-size % 512, "padding")
            return

        if typ == b"1":
            if link_b.startswith(b"/"):
                raise UnsafeArchive(f"hard link {member!r} points to an absolute path; refusing")
            target = _clean(link_b, member, allow_root=True)
            tkind = self._kinds.get(target)
            if tkind is None:
                raise UnsafeArchive(
                    f"hard link {member!r} points to {os.fsdecode(link_b)!r}, which the archive "
                    "did not create before it; refusing"
                )
            if tkind[0] == _K_DIR:
                raise UnsafeArchive(f"hard link {member!r} points to a directory; refusing")
            tparent, _, tbase = target.rpartition("/")
            tfd = self._dirfd(tparent, member)
            pfd = self._dirfd(parent, member)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            self._kinds[path] = (tkind[0], self._layer)
            self.stats.hardlinks += 1
            r.copy_to(-1, size, member)
            r.read_exact(-size % 512, "padding")
            return

        fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            r.copy_to(fd, size, member)
            if self._owner:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode & self._mode_mask)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        self._kinds[path] = (_K_FILE, self._layer)
        self.stats.files += 1
        self.stats.bytes += size
        r.read_exact(-size % 512, "padding")

    def _opaque(self, parent: str, pfd: int) -> None:
        prefix = parent + "/" if parent else ""
        lower = [
            k
            for k, (_kind, layer) in self._kinds.items()
            if layer < self._layer and k.startswith(prefix) and "/" not in k[len(prefix) :]
        ]
        for k in lower:
            fd = self._dirfd(parent, k)
            self._remove(fd, k[len(prefix) :], k)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self) -> ExtractStats:
        """Apply directory modes, owners and mtimes (deepest first); close descriptors."""
        try:
            for path in sorted(self._dirmeta, key=lambda p: p.count("/"), reverse=True):
                mode, uid, gid, mtime_ns = self._dirmeta[path]
                parent, _, base = path.rpartition("/")
                pfd = self._dirfd(parent, path)
                fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._apply_dir(fd, mode, uid, gid, mtime_ns)
                finally:
                    os.close(fd)
            # Implicitly created directories (no entry of their own) get 0755.
            for path, (kind, _layer) in self._kinds.items():
                if kind == _K_DIR and path not in self._dirmeta:
                    parent, _, base = path.rpartition("/")
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
