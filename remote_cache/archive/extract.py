"""Extract layer tars, in order, into a fresh staging directory: safely and fast.

Safety: every header is validated before anything is written. Refused with
:class:`~remote_cache.errors.UnsafeArchive` (naming the member): absolute paths (a directory
member named ``/`` is the root, like ``./``: it only carries the root's metadata), any ``..``
component, paths through a symlink or a non-directory, hard links to a missing, absolute,
escaping or directory target, device files, FIFOs, and a path repeated within one layer as a
different type. All writes go through directory file descriptors opened with ``O_NOFOLLOW``
from the staging root down, and files are created with ``O_EXCL | O_NOFOLLOW``, so nothing can
be written outside the staging directory even if the checks had a hole.

Metadata: modes are kept exactly, except that setuid/setgid/sticky bits are dropped unless we
run as root that may give owners (a restored cache should not grow privileges for whoever restores
it); numeric uid/gid are applied only as such root (without CAP_CHOWN, or in a user namespace
without those ids, the files are ours, with one warning); mtimes are set on files, symlinks and
(last, deepest first) directories. Directories are created owner-writable and get their real mode
at ``finish()``.
Holes: tar records none, so a file's runs of zeros (whole aligned 4 KiB blocks, 32 KiB or more)
are left as holes (:mod:`.sparse`), as ``cp --sparse=always`` does: a sparse file stays sparse.

Layers apply in order with OCI whiteouts (``.wh.NAME`` removes NAME from lower layers,
``.wh..wh..opq`` empties a directory of lower-layer content). Corrupt or truncated streams raise
:class:`~remote_cache.errors.IntegrityError`; something that is not a tar at all raises
:class:`~remote_cache.errors.ImageFormatError`.

Speed: a background thread decompresses (:mod:`.decompress`) while this one writes. Headers are
decoded with one ``struct`` unpack (:mod:`.tar`), paths stay bytes, file data goes straight from
the decompressed chunk to the file (:mod:`.reader`), files are created with their final mode when
the umask allows (no ``fchmod``) and ``fchown`` is skipped when the owner already matches. Every
check above still runs, in the one writing thread, in archive order.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from msgspec import Struct

from ..errors import ImageFormatError, UnsafeArchive
from .decompress import EndOfLayers, Feeder
from .reader import LayerReader
from .swap import owner_refused, remove_tree_at
from .tar import DIR, FILE, MAX_DEPTH, REGULAR_TYPES, SYMLINK, WHITEOUT_PREFIX, HeaderDecoder, display

log = logging.getLogger("remote_cache")

__all__ = ["ExtractStats", "Extractor"]

_WHITEOUT = WHITEOUT_PREFIX.encode()
_OPAQUE = _WHITEOUT + _WHITEOUT + b".opq"  # .wh..wh..opq: the directory hides all lower content
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DIR_FDS = 256
_S_IFREG = stat.S_IFREG
_Meta = tuple[int, int, int, int]  # mode, uid, gid, mtime (ns)


class ExtractStats(Struct):
    """What an extraction wrote."""

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0
    #: Sums over the file, directory and symlink members of the modes (type and permission bits)
    #: and the mtimes (ns) their headers give: what a walk of the tree must find again, whatever
    #: the filesystem or the kernel made of them (``remote_cache.cache.evidence``). A member a
    #: later layer replaced counts too: such a restore vouches for no whole tree.
    modes: int = 0
    mtimes_ns: int = 0
    #: Whether every member got the mode bits and owner its header gives (not so when a user
    #: other than root extracts root's files, or set-ID and sticky bits).
    exact: bool = True


def _clean(raw: bytes, member: bytes, *, allow_root: bool) -> bytes:
    """Validate and normalise a member path: relative, no ``..``, no empty result, at most
    MAX_DEPTH components."""
    if raw[:1] != b"/":
        n = raw.rstrip(b"/")
        # Fast path: no component starts with "." (so none is "." or ".."), no empty ones.
        if n and n[:1] != b"." and b"/." not in n and b"//" not in n:
            return _shallow(n, member)
    elif allow_root and not raw.strip(b"/"):
        return b""  # "/" as a directory member is the root (umoci insert writes one), like "./"
    else:
        raise UnsafeArchive(f"archive member {display(member)!r} has an absolute path; refusing to extract")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UnsafeArchive(
            f"archive member {display(member)!r} has a '..' path component; refusing to extract"
        )
    if not parts and not allow_root:
        raise UnsafeArchive(f"archive member {display(member)!r} names the root directory; refusing")
    return _shallow(b"/".join(parts), member)


def _shallow(path: bytes, member: bytes) -> bytes:
    """``path``, unless it nests deeper than a save would walk (see MAX_DEPTH)."""
    if path.count(b"/") >= MAX_DEPTH:
        raise UnsafeArchive(
            f"archive member {_shortened(member)!r} is more than {MAX_DEPTH} levels deep; refusing"
        )
    return path


def _shortened(name: bytes) -> str:
    """A member's name for a message, its first 120 characters when it is longer."""
    shown = display(name)
    return shown if len(shown) <= 120 else shown[:120] + "..."


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


class Extractor:
    """Apply layers, in order, to a fresh staging directory ``dest``; call finish() at the end."""

    def __init__(self, dest: Path, *, preserve_owner: bool | None = None) -> None:
        self.dest = Path(dest)
        self._is_root = os.geteuid() == 0
        self._owner = self._is_root if preserve_owner is None else preserve_owner
        self._mode_mask = 0o7777 if self._is_root else 0o777
        self._root_fd = os.open(self.dest, _DIR_FLAGS)
        self._stopped: BaseException | None = None
        # New members get our euid and, since dest's group is our egid and the directories we
        # make inherit it (setgid or grpid mounts) or take the egid, our egid: chown to exactly
        # these ids is a no-op and is skipped. Otherwise always chown.
        st = os.fstat(self._root_fd)
        ids = (os.geteuid(), os.getegid())
        self._new_ids: tuple[int, int] | None = ids if st.st_gid == ids[1] else None
        # Modes the umask leaves intact can be given to open() directly (no fchmod). A default
        # ACL replaces the umask (and only ever narrows the mode): then always fchmod.
        umask = _umask()
        self._keep_bits = 0 if umask is None or _has_default_acl(self._root_fd) else 0o777 & ~umask
        # A root the layers give no member (ours never do) ends as mkdir makes a directory, but
        # always writable by its owner: a directory is moved to another parent only by one who
        # may write it (a restore exchanges it into place, then gives it the replaced one's mode).
        self._root_mode = 0o777 & ~(0o022 if umask is None else umask) | stat.S_IRWXU
        self._fds: dict[bytes, int] = {b"": self._root_fd}
        self._kinds: dict[bytes, tuple[int, int]] = {}  # path -> (kind, layer index)
        self._tree: dict[bytes, set[bytes]] | None = None  # see _index
        self._dirmeta: dict[bytes, _Meta] = {}
        self._root_meta: _Meta | None = None
        #: The mode the root gets once in place (see :meth:`finish`), or None.
        self.root_mode_in_place: int | None = None
        self._layer = -1
        self._seen: dict[bytes, int] = {}
        self._nums: dict[bytes, int] = {}  # header number field -> value (see HeaderDecoder)
        self.stats = ExtractStats()
        #: Per layer, the directories (paths from the root; b"" is the root) it wrote regular
        #: files into: a restore records their inodes (``remote_cache.cache.evidence``).
        self.file_parents: list[set[bytes]] = []
        self._parents: set[bytes] = set()
        #: Layers (by index) something of which a later layer replaced or removed: the tree no
        #: longer holds all they wrote, whatever their listing says.
        self.rewritten: set[int] = set()

    @property
    def root_given(self) -> bool:
        """Whether the layers held a member for the root (``./``), whose mode and times it got."""
        return self._root_meta is not None

    @property
    def layers_begun(self) -> int:
        """How many layers extraction has begun: the failing one's number (from 1) after an error."""
        return self._layer + 1

    # -- directory descriptors --------------------------------------------------------------

    def _dirfd(self, rel: bytes, member: bytes) -> int:
        """An fd for directory ``rel``, creating missing directories; refuses symlinks on the way."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        parent, _, base = rel.rpartition(b"/")
        pfd = self._dirfd(parent, member)
        kind = self._kinds.get(rel)
        if kind is not None and kind[0] != DIR:
            what = "a symlink" if kind[0] == SYMLINK else "a file"
            raise UnsafeArchive(
                f"archive member {display(member)!r} goes through {what} ({display(rel)!r}); refusing"
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
            self._record(rel, DIR)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(
                    f"archive member {display(member)!r} goes through a non-directory ({display(rel)!r}); "
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

    # -- what is where ----------------------------------------------------------------------

    def _record(self, path: bytes, kind: int) -> None:
        """``path`` is now a ``kind``, written by the current layer."""
        self._kinds[path] = (kind, self._layer)
        if self._tree is not None:
            self._tree.setdefault(path.rpartition(b"/")[0], set()).add(path)

    def _index(self) -> dict[bytes, set[bytes]]:
        """Directory path -> the recorded paths directly in it: built when first needed (a
        whiteout, a replaced member; most restores need neither), kept up to date from then on,
        so that finding what is under a path costs that subtree, not the whole tree."""
        if self._tree is None:
            tree: dict[bytes, set[bytes]] = {}
            for p in self._kinds:
                tree.setdefault(p.rpartition(b"/")[0], set()).add(p)
            self._tree = tree
        return self._tree

    def _subtree(self, path: bytes) -> list[bytes]:
        """The recorded paths under ``path`` (not itself), each directory before its contents."""
        recorded = self._kinds.get(path)
        if recorded is not None and recorded[0] != DIR:
            return []  # a file or link: nothing under it, and no index to build
        tree = self._index()
        out: list[bytes] = []
        stack = [path]
        while stack:
            for child in tree.get(stack.pop(), ()):
                out.append(child)
                stack.append(child)
        return out

    def _forget(self, path: bytes) -> None:
        """Drop bookkeeping for ``path`` and everything under it (after removing it)."""
        gone = [path, *self._subtree(path)]
        tree = self._tree  # (built by _subtree when path was a directory)
        for p in gone:
            recorded = self._kinds.pop(p, None)
            if recorded is not None and recorded[1] != self._layer:
                self.rewritten.add(recorded[1])
            self._dirmeta.pop(p, None)
            if tree is not None:
                tree.pop(p, None)
            fd = self._fds.pop(p, None)
            if fd is not None:
                os.close(fd)
        if tree is not None:
            tree.get(path.rpartition(b"/")[0], set()).discard(path)

    def _remove(self, pfd: int, base: bytes, path: bytes) -> None:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(path)
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree_at(pfd, os.fsdecode(base))
        else:
            os.unlink(base, dir_fd=pfd)
        self._forget(path)

    # -- layers ------------------------------------------------------------------------------

    def add_layer(self, fileobj: BinaryIO, compression: str | None = None) -> None:
        """Extract one layer: tar, tar+gzip or tar+zstd, told by its magic bytes.

        ``compression`` (``zstd``, ``gzip``, ``tar``) is what the layer is labelled as: a zstd or
        gzip label the bytes contradict is an ImageFormatError; ``tar`` and None trust the bytes.
        """
        self.add_layers([(fileobj, compression)])

    def add_layers(self, layers: Iterable[tuple[BinaryIO, str | None]]) -> None:
        """Extract several layers in order, decompressing the next while writing the current.

        Same result and checks as ``add_layer`` on each in turn, but faster: the background
        thread runs ahead across layer boundaries. ``layers`` is iterated, and its files read,
        in that thread, one after another. On failure this returns without waiting for a read
        that is blocked (a stalled download); the thread exits once that read returns.
        """
        feeder = Feeder(layers)
        try:
            while not isinstance(first := feeder.get(), EndOfLayers):
                self._layer += 1
                self._seen = {}
                self._parents = set()
                self.file_parents.append(self._parents)
                self.stats.layers += 1
                self._extract(LayerReader(feeder, first, lambda: self._stopped))
        except BaseException:
            feeder.stop()
            raise
        feeder.join()

    def _extract(self, r: LayerReader) -> None:
        decoder = HeaderDecoder(self._nums)
        name_b = b""
        try:
            while (header := decoder.next(r)) is not None:
                if self._stopped is not None:
                    raise self._stopped
                typ, name_b, link_b, size, mode, uid, gid, mtime_ns = header
                if typ in REGULAR_TYPES:
                    self._file(r, name_b, size, mode, uid, gid, mtime_ns)
                else:
                    self._member(r, typ, name_b, link_b, size, (mode, uid, gid, mtime_ns))
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                raise UnsafeArchive(
                    f"archive member {_shortened(name_b)!r} collides with what earlier members created: {exc}"
                ) from exc
            if exc.errno == errno.ENOSPC or not name_b:
                raise  # a full disk is told by the restore, which knows where and how much
            # The OS names at most the last path component, as bytes: name the member instead.
            raise type(exc)(
                exc.errno,
                f"{exc.strerror} (archive member {_shortened(name_b)!r}, layer {self.layers_begun})",
            ) from exc

    # -- members -----------------------------------------------------------------------------

    def _file(
        self, r: LayerReader, name_b: bytes, size: int, mode: int, uid: int, gid: int, mtime_ns: int
    ) -> None:
        """A regular file (or a whiteout): the hot path."""
        path = _clean(name_b, name_b, allow_root=False)
        if path in self._seen:
            raise UnsafeArchive(f"archive member {display(name_b)!r} appears twice in one layer; refusing")
        self._seen[path] = FILE
        parent, _, base = path.rpartition(b"/")
        pfd = self._fds.get(parent)
        if pfd is None:
            pfd = self._dirfd(parent, name_b)
        if base.startswith(_WHITEOUT):
            self._whiteout(r, name_b, parent, base, size)
            return
        self._parents.add(parent)
        if path in self._kinds:
            self._remove(pfd, base, path)  # (the parent's descriptor stays open)
        stats = self.stats  # (_given, inlined: the hot path; once not exact, nothing to test)
        if stats.exact and (mode & ~self._mode_mask or (not self._owner and (uid, gid) != self._new_ids)):
            stats.exact = False
        stats.modes += _S_IFREG | mode
        stats.mtimes_ns += mtime_ns
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
                try:
                    os.fchown(fd, uid, gid)
                except OSError as exc:
                    self._cannot_chown(exc)
                    mode &= self._mode_mask  # (no set-ID bits on a file of ours)
            if chmod:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        self._kinds[path] = (FILE, self._layer)  # _record, inlined: the hot path
        if self._tree is not None:
            self._tree.setdefault(parent, set()).add(path)
        stats.files += 1
        stats.bytes += size

    def _whiteout(self, r: LayerReader, name_b: bytes, parent: bytes, base: bytes, size: int) -> None:
        self.stats.whiteouts += 1
        if base == _OPAQUE:
            self._hide_lower(parent, opaque=True)
        else:
            victim = base[len(_WHITEOUT) :]
            if victim in (b"", b".", b".."):
                raise UnsafeArchive(f"archive member {display(name_b)!r} is a malformed whiteout")
            self._hide_lower(parent + b"/" + victim if parent else victim, opaque=False)
        r.data(-1, size, name_b)

    def _hide_lower(self, path: bytes, *, opaque: bool) -> None:
        """Remove what lower layers put under ``path`` (and at it, unless ``opaque``: the marker of
        an opaque directory), keeping what this layer wrote. A whiteout applies to lower layers
        only, wherever it stands among its layer's members (OCI image spec, "Whiteouts")."""
        layer = self._layer
        own = None if opaque else self._kinds.get(path)
        if not opaque and (own is None or (own[0] != DIR and own[1] == layer)):
            return  # nothing there, or what this layer wrote
        # This layer's entries under path stay, and so do the directories leading to them.
        keep: set[bytes] = set()
        for p in self._subtree(path):
            if self._kinds[p][1] == layer:
                while p != path and p not in keep:
                    keep.add(p)
                    p = p.rpartition(b"/")[0]
        if own is not None and own[1] < layer and not keep:
            self._remove_path(path)  # all of it from lower layers: one removal
            return
        tree = self._index()
        pending = [path]
        while pending:
            for child in list(tree.get(pending.pop(), ())):
                if child not in keep:
                    self._remove_path(child)
                elif self._kinds[child][0] == DIR:
                    pending.append(child)

    def _remove_path(self, path: bytes) -> None:
        parent, _, base = path.rpartition(b"/")
        self._remove(self._dirfd(parent, path), base, path)

    def _member(
        self, r: LayerReader, typ: bytes, name_b: bytes, link_b: bytes, size: int, meta: _Meta
    ) -> None:
        """Anything but a regular file: a directory, a symlink or a hard link (or a refusal)."""
        if typ in (b"3", b"4"):
            raise UnsafeArchive(f"archive member {display(name_b)!r} is a device file; refusing to extract")
        if typ == b"6":
            raise UnsafeArchive(f"archive member {display(name_b)!r} is a FIFO; refusing to extract")
        if typ not in (b"2", b"1", b"5"):
            raise ImageFormatError(f"archive member {display(name_b)!r} has unsupported tar type {typ!r}")
        path = _clean(name_b, name_b, allow_root=typ == b"5")
        if typ == b"5" and not path:
            self._root_meta = meta
            r.data(-1, size, name_b)
            return
        kind = DIR if typ == b"5" else SYMLINK if typ == b"2" else FILE
        prev = self._seen.get(path)
        if prev is not None and not (prev == kind == DIR):
            raise UnsafeArchive(f"archive member {display(name_b)!r} appears twice in one layer; refusing")
        self._seen[path] = kind
        parent, _, base = path.rpartition(b"/")
        pfd = self._dirfd(parent, name_b)
        if base.startswith(_WHITEOUT):
            self._whiteout(r, name_b, parent, base, size)
            return
        existing = self._kinds.get(path)
        if existing is not None and not (existing[0] == kind == DIR):
            self._remove(pfd, base, path)
            existing = None
        if kind == DIR:
            self._directory(name_b, path, base, pfd, existing is None, meta)
        elif typ == b"2":
            self._symlink(path, base, link_b, pfd, meta)
        else:
            self._hardlink(name_b, path, base, link_b, parent)
        r.data(-1, size, name_b)

    def _directory(self, name_b: bytes, path: bytes, base: bytes, pfd: int, new: bool, meta: _Meta) -> None:
        if new:
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafeArchive(
                        f"archive member {display(name_b)!r} collides with a non-directory"
                    ) from None
        self._record(path, DIR)
        self._dirmeta[path] = meta
        self._given(stat.S_IFDIR | meta[0], *meta[1:])
        self.stats.dirs += 1

    def _symlink(self, path: bytes, base: bytes, link_b: bytes, pfd: int, meta: _Meta) -> None:
        _mode, uid, gid, mtime_ns = meta
        if not link_b:
            raise ImageFormatError(
                f"symlink {display(path)!r} has an empty target, which Linux does not allow"
            )
        os.symlink(link_b, base, dir_fd=pfd)
        self._given(stat.S_IFLNK | 0o777, uid, gid, mtime_ns)  # (its own bits are 0777 on Linux)
        if self._owner and (uid, gid) != self._new_ids:
            try:
                os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                self._cannot_chown(exc)
        os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self._record(path, SYMLINK)
        self.stats.symlinks += 1

    def _hardlink(self, name_b: bytes, path: bytes, base: bytes, link_b: bytes, parent: bytes) -> None:
        member = display(name_b)
        if link_b.startswith(b"/"):
            raise UnsafeArchive(f"hard link {member!r} points to an absolute path; refusing")
        if b".." in link_b.split(b"/"):  # (told here: _clean would blame the link's own name)
            raise UnsafeArchive(
                f"hard link {member!r} points to {display(link_b)!r} (a '..' component); refusing"
            )
        target = _clean(link_b, name_b, allow_root=True)
        tkind = self._kinds.get(target)
        if tkind is None:
            raise UnsafeArchive(
                f"hard link {member!r} points to {display(link_b)!r}, which the archive did not create "
                "before it; refusing"
            )
        if tkind[0] == DIR:
            raise UnsafeArchive(f"hard link {member!r} points to a directory; refusing")
        tparent, _, tbase = target.rpartition(b"/")
        tfd = self._dirfd(tparent, name_b)
        pfd = self._dirfd(parent, name_b)
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self._record(path, tkind[0])
        self.stats.hardlinks += 1

    def stop(self, reason: BaseException) -> None:
        """Make the extraction raise ``reason`` before its next chunk (from another thread: a
        cancel that must not wait for what was already downloaded and decompressed)."""
        self._stopped = reason

    def _cannot_chown(self, exc: OSError) -> None:
        """Root that may not give owners (:func:`~.swap.owner_refused`) restores as any other user
        does: the files are its own from here on,
        without set-ID or sticky bits, with one warning, and the tree is no exact copy."""
        if not owner_refused(exc):
            raise exc
        self._owner = False
        self._mode_mask = 0o777  # as tar does: no set-ID or sticky bits without the owner
        self.stats.exact = False
        log.warning(
            "cannot give restored files the owners the entry holds (%s): they are this user's, as "
            "in a restore by a user other than root (no CAP_CHOWN, or a user namespace without "
            "those ids)",
            exc.strerror,
        )

    def _given(self, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        """Count the mode (with its type) and mtime a member's header gives, and note one whose
        mode bits or owner this extraction cannot give (see :class:`ExtractStats`)."""
        stats = self.stats
        if stat.S_IMODE(mode) & ~self._mode_mask or (not self._owner and (uid, gid) != self._new_ids):
            stats.exact = False
        stats.modes += mode
        stats.mtimes_ns += mtime_ns

    # -- finishing ---------------------------------------------------------------------------

    def finish(self) -> ExtractStats:
        """Apply directory modes, owners and mtimes (deepest first); close descriptors."""
        try:
            for path in sorted(self._dirmeta, key=lambda p: p.count(b"/"), reverse=True):
                parent, _, base = path.rpartition(b"/")
                fd = os.open(base, _DIR_FLAGS, dir_fd=self._dirfd(parent, path))
                try:
                    self._apply_dir(fd, *self._dirmeta[path])
                finally:
                    os.close(fd)
            # Implicitly created directories (no member of their own) get 0755.
            for path, (kind, _layer) in self._kinds.items():
                if kind == DIR and path not in self._dirmeta:
                    parent, _, base = path.rpartition(b"/")
                    os.chmod(base, 0o755, dir_fd=self._dirfd(parent, path), follow_symlinks=False)
            if self._root_meta is not None:
                # The staged root stays its owner's to read, search and write until it is in place:
                # a directory moves to another parent only while writable (rename updates its
                # ".."), and a swap of its entries must see them. A root member that says otherwise
                # (another tool's "./", mode 555 or 444) gets its mode once in place (restore's
                # swap), or no one but root could restore it.
                mode, *rest = self._root_meta
                staged = mode | stat.S_IRWXU
                self._apply_dir(self._root_fd, staged, *rest)
                if mode != staged:
                    self.root_mode_in_place = mode & self._mode_mask  # (as the chown left the mask)
            else:
                os.fchmod(self._root_fd, self._root_mode)
        finally:
            self.close()
        return self.stats

    def _apply_dir(self, fd: int, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        if self._owner:
            try:
                os.fchown(fd, uid, gid)
            except OSError as exc:
                self._cannot_chown(exc)
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
