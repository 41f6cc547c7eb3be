"""Walk a directory tree in archive order: its members, what had to be skipped, and its identity.

The walk is depth-first, each directory's entries sorted by their name's bytes, so every
directory comes right before its children and a subtree (an npm package) is contiguous. The root
itself gets no member. Hard links: the first path of an inode (in walk order) carries the data,
every later path becomes a hard-link member naming it.

Special files (FIFOs, sockets, devices) cannot be archived (the extractor refuses them too): they
are left out and listed in :class:`TreeStats`, so that a save can name them and still succeed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from array import array
from collections.abc import Iterable
from operator import attrgetter
from pathlib import Path

from msgspec import Struct, field

from ..errors import TreeChanged, TreeTooDeep
from .tar import DIR, FILE, HARDLINK, MAX_DEPTH, SYMLINK, WHITEOUT_PREFIX, Member
from .workdirs import is_in_place_work

__all__ = [
    "IdentityPart",
    "Special",
    "TreeIdentity",
    "TreeSplit",
    "TreeStats",
    "identity_of",
    "split_tree",
    "tree_identity",
    "walk_part",
    "walk_tree",
]


class Special(Struct, frozen=True):
    """A special file the walk left out: its path (from the root) and what it is."""

    path: str
    #: ``fifo``, ``socket``, ``char device`` or ``block device``.
    kind: str


#: File types a walk archives (as FILE, DIR or SYMLINK members); any other is a special file.
_ARCHIVED = frozenset((stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK))
#: What an entry named like an OCI whiteout is called where it is left out: every OCI extractor
#: (ours too) would take it for one, drop it and delete what earlier layers put at its name.
_WHITEOUT_KIND = "named like an OCI whiteout"
#: The least name above every name starting with WHITEOUT_PREFIX (its last character, ".", + 1).
_AFTER_WHITEOUTS = WHITEOUT_PREFIX[:-1] + "/"


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"  # none other on Linux; a door or whiteout elsewhere


class TreeStats(Struct):
    """What a walk found: counts, data bytes, and the special files it left out."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped: list[Special] = field(default_factory=list)


class TreeIdentity(Struct, frozen=True):
    """Every entry's name, inode, ctime, mode, size and mtime, in walk order, digested; and the
    ctimes (to tell whether any was still fresh).

    Any change to an inode (data, mode, owner, times, links) moves its ctime, and adding,
    removing or renaming an entry moves its directory's: equal identities mean an unchanged
    tree, provided no ctime was still fresh when the walk began (see
    ``remote_cache.cache.evidence``). Mode, size and mtime are there for filesystems whose ctimes
    are coarse. A special file, never archived, counts by name, inode and mode only: a FIFO's
    times move with every write through it, which changes nothing a save would store.
    """

    digest: str
    ctimes: array[int]
    #: The names in the root directory, in walk order (the first ctime is the root's own).
    top: tuple[str, ...]
    #: Per entry below the root, in walk order: mode, size, mtime's seconds and nanoseconds.
    facts: array[int]


_BY_NAME = attrgetter("name")
_UTF8_NAMES = sys.getfilesystemencoding() == "utf-8"


def _by_name_bytes(d: os.DirEntry[str]) -> bytes:
    return os.fsencode(d.name)


def _sorted_by_name_bytes(entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """``entries`` in the order of their names' bytes. UTF-8 keeps code point order, so names that
    encode strictly (no surrogate-escaped bytes) sort as strings, without a key call per entry."""
    if _UTF8_NAMES:
        try:
            "".join(d.name for d in entries).encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return sorted(entries, key=_BY_NAME)
    return sorted(entries, key=_by_name_bytes)


#: Bytes a path may have, with its terminating NUL (Linux's PATH_MAX): longer ones fail (ENAMETOOLONG).
_PATH_MAX = 4096
#: Bytes a character of a name may take in the filesystem's encoding (UTF-8; an undecodable byte
#: comes back as one).
_MAX_CHAR_BYTES = 4


def _listed(full: str, rel: str) -> list[tuple[os.DirEntry[str], os.stat_result]]:
    """The entries of directory ``full`` (``rel`` from the root) in name-bytes order, each with
    its ``lstat``; at the root, without an in-place restore's work directory.

    The directory is opened once and its entries are looked at relative to it (``fstatat``): a
    stat by full path resolves every component again, ~20% of an identity walk on tmpfs. All
    are looked at before the walk goes into any of them, so one descriptor is open at a time.
    Only what the walk keeps is looked at: past the depth limit nothing, and never a restore's
    work directory (it may go at any moment). In a directory whose entries' paths may be too
    long for the system, they are looked at by full path, as packing opens them, so that such a
    path fails the walk, before anything is uploaded.
    """
    fd = _open_listed(full, rel)
    try:
        try:
            with os.scandir(fd) as it:
                children = _sorted_by_name_bytes(list(it))
        except OSError as exc:  # given a descriptor, it names no path
            exc.filename = full
            raise
        if children and rel.count("/") + 1 >= MAX_DEPTH:
            raise TreeTooDeep(f"{rel}/{children[0].name}", MAX_DEPTH)
        if not rel:
            children = [d for d in children if not is_in_place_work(d.name)]
        # (From the names themselves: FUSE, CIFS and others take names longer than 255 bytes.)
        longest = max((len(d.name) for d in children), default=0) * _MAX_CHAR_BYTES
        if len(os.fsencode(full)) + 1 + longest >= _PATH_MAX:
            return [(d, os.lstat(os.path.join(full, d.name))) for d in children]
        try:
            return [(d, d.stat(follow_symlinks=False)) for d in children]
        except FileNotFoundError as exc:  # gone since it was listed
            raise TreeChanged(os.path.join(full, exc.filename), "it was removed") from None
        except OSError as exc:  # it names the entry alone: name the whole path
            exc.filename = os.path.join(full, exc.filename)
            raise
    finally:
        os.close(fd)


def _open_listed(full: str, rel: str) -> int:
    """Directory ``full`` opened to list it; one its parent listed may have gone since (a
    tree that changes while it is saved: TreeChanged, as for a file)."""
    try:
        return os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        if not rel:
            raise
        how = "it was removed" if isinstance(exc, FileNotFoundError) else "it was replaced"
        raise TreeChanged(full, how) from None


_Listing = list[tuple[os.DirEntry[str], os.stat_result]]


class _Walk:
    """One walk: members (unless only the identity is wanted), stats and the identity's parts
    (from the root's own inode and ctime, given ``root_st``, the root's ``lstat``)."""

    def __init__(self, root: str, stats: TreeStats, plan: bool, root_st: os.stat_result | None) -> None:
        self.stats = stats
        self.plan = plan
        self.members: list[Member] = []
        self.first_path: dict[tuple[int, int], str] = {}
        self.names: list[str] = []
        self.inodes = array("Q", () if root_st is None else (root_st.st_dev, root_st.st_ino))
        self.ctimes = array("q", () if root_st is None else (root_st.st_ctime_ns,))
        self.facts = array("q")
        self.top: tuple[str, ...] = ()

    def visit(self, rel: str, full: str, children: _Listing | None = None) -> None:
        """Walk directory ``full`` (``rel`` from the root; its entries ``children`` when already
        listed) and everything under it."""
        if children is None:
            children = _listed(full, rel)
        if not rel:
            self.top = tuple(d.name for d, _ in children)
        names, inodes, ctimes, facts = self.names, self.inodes, self.ctimes, self.facts
        names.append("\0/")  # a directory's entries start
        for d, st in children:
            mode = st.st_mode
            names.append(d.name)
            inodes.append(st.st_ino)
            whiteout = WHITEOUT_PREFIX <= d.name < _AFTER_WHITEOUTS  # startswith, without a call
            if whiteout or stat.S_IFMT(mode) not in _ARCHIVED:  # left out: its times do not count
                ctimes.append(0)
                facts.extend((mode, 0, 0, 0))
                kind = _WHITEOUT_KIND if whiteout else _special_kind(mode)
                self.stats.skipped.append(Special(f"{rel}/{d.name}" if rel else d.name, kind))
                continue
            ctimes.append(st.st_ctime_ns)
            # Seconds and nanoseconds apart: a date after 2262 or before 1678 (ext4 keeps them) is
            # more nanoseconds than a signed 64-bit integer holds.
            facts.extend((mode, st.st_size, *divmod(st.st_mtime_ns, 1_000_000_000)))
            if self.plan:
                self._member(f"{rel}/{d.name}" if rel else d.name, full, d.name, st)
            elif stat.S_ISDIR(mode):
                self.descend(f"{rel}/{d.name}" if rel else d.name, os.path.join(full, d.name))
        names.append("\0\\")  # and end

    def descend(self, rel: str, full: str) -> None:
        """Walk the directory below an entry (see :class:`_Spliced`)."""
        self.visit(rel, full)

    def _member(self, path: str, parent: str, name: str, st: os.stat_result) -> None:
        """Add the member for a regular file, directory or symlink ``name`` in directory ``parent``
        (walking into a directory; a file's full path is not needed, so not made: the hot path)."""
        m, stats = st.st_mode, self.stats
        # The second the mtime falls in (int(st_mtime) rounds through a float: .999999999 up,
        # and toward zero before 1970).
        perm, mtime = stat.S_IMODE(m), st.st_mtime_ns // 1_000_000_000
        if stat.S_ISREG(m):
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = self.first_path.get(key)
                if first is not None:
                    self.members.append(Member(path, HARDLINK, perm, st.st_uid, st.st_gid, 0, mtime, first))
                    stats.hardlinks += 1
                    return
                self.first_path[key] = path
            self.members.append(
                Member(
                    path,
                    FILE,
                    perm,
                    st.st_uid,
                    st.st_gid,
                    st.st_size,
                    mtime,
                    "",
                    st.st_ino,
                    st.st_ctime_ns,
                    st.st_mtime_ns,
                )
            )
            stats.files += 1
            stats.bytes += st.st_size
        elif stat.S_ISDIR(m):
            # (The inode: whether a restored file is still in the directory it was written into.)
            self.members.append(Member(path, DIR, perm, st.st_uid, st.st_gid, 0, mtime, "", st.st_ino))
            stats.dirs += 1
            self.visit(path, os.path.join(parent, name))
        else:
            target = os.readlink(os.path.join(parent, name))
            self.members.append(Member(path, SYMLINK, perm, st.st_uid, st.st_gid, 0, mtime, target))
            stats.symlinks += 1

    def part(self, rel: str) -> IdentityPart:
        """What this walk found, as the part of a split walk's identity below ``rel``."""
        return IdentityPart(rel, self.names, self.inodes, self.ctimes, self.facts, self.stats.skipped)

    def identity(self) -> TreeIdentity:
        h = hashlib.sha256(b"remote-cache tree v3\0")
        names_b = "\0".join(self.names).encode("utf-8", "surrogateescape")
        for part in (names_b, self.inodes.tobytes(), self.ctimes.tobytes(), self.facts.tobytes()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return TreeIdentity("sha256:" + h.hexdigest(), self.ctimes, self.top, self.facts)


def walk_tree(root: Path, stats: TreeStats) -> tuple[list[Member], TreeIdentity]:
    """The members of the tree at ``root`` in archive order (counted into ``stats``), and its identity."""
    walk = _Walk(os.fspath(root), stats, plan=True, root_st=os.lstat(root))
    walk.visit("", os.fspath(root))
    return walk.members, walk.identity()


def tree_identity(root: Path, stats: TreeStats | None = None) -> TreeIdentity:
    """The identity :func:`walk_tree` would give ``root``, at a fraction of its cost (no members).

    Only ``stats.skipped`` is filled in (the special files), when ``stats`` is given.
    """
    split = split_tree(root, parts=1)
    return identity_of(split, [walk_part(split, rel) for rel in split.parts], stats)


# -- The identity walk in parts -------------------------------------------------------------
# A tree split into subtrees (whole directories below a few listed ahead) that other processes can
# walk, their parts then spliced back in walk order: the same identity as one walk, which is
# what one walk does too (tree_identity), so that there is only one way to make it.


class TreeSplit(Struct, frozen=True):
    """A tree split for walking: its root's ``lstat``, the directories listed ahead (by path
    from the root, ``""`` the root) and the subtrees below them left to walk, in walk order."""

    root: str
    root_st: os.stat_result
    listed: dict[str, _Listing]
    parts: list[str]


class IdentityPart(Struct, frozen=True):
    """The identity's parts from the walk of the directory at ``rel`` and all below it."""

    rel: str
    names: list[str]
    inodes: array[int]
    ctimes: array[int]
    facts: array[int]
    skipped: list[Special]


#: Levels below the root a split lists ahead, at most.
_SPLIT_LEVELS = 8


def split_tree(root: Path, parts: int) -> TreeSplit:
    """``root`` looked at (raises OSError, or TreeTooDeep) and split into at least ``parts``
    subtrees where it can be: directories are listed ahead a level at a time (the root, then
    all the directories in it, ...) while there are fewer."""
    path = os.fspath(root)
    root_st = os.lstat(path)
    listed = {"": _listed(path, "")}
    subtrees = _directories(listed[""], "")
    for _ in range(_SPLIT_LEVELS):
        if not subtrees or len(subtrees) >= parts:
            break
        for rel in subtrees:
            listed[rel] = _listed(os.path.join(path, rel), rel)
        subtrees = [sub for rel in subtrees for sub in _directories(listed[rel], rel)]
    return TreeSplit(path, root_st, listed, subtrees)


def _directories(children: _Listing, rel: str) -> list[str]:
    """The paths of the directories among ``children`` (of the directory at ``rel``) that a walk
    goes into: not those named like a whiteout (left out)."""
    return [
        f"{rel}/{d.name}" if rel else d.name
        for d, st in children
        if stat.S_ISDIR(st.st_mode) and not WHITEOUT_PREFIX <= d.name < _AFTER_WHITEOUTS
    ]


def walk_part(split: TreeSplit, rel: str) -> IdentityPart:
    """Walk the subtree ``rel`` of ``split`` (one of its ``parts``) for the identity."""
    walk = _Walk(split.root, TreeStats(), plan=False, root_st=None)
    walk.visit(rel, os.path.join(split.root, rel))
    return walk.part(rel)


def identity_of(
    split: TreeSplit, parts: Iterable[IdentityPart], stats: TreeStats | None = None
) -> TreeIdentity:
    """The identity of the tree ``split`` from every one of its ``parts`` walked (KeyError when
    one is missing); the special files go into ``stats``."""
    spliced = _Spliced(split, {part.rel: part for part in parts}, TreeStats() if stats is None else stats)
    spliced.visit("", split.root, split.listed[""])
    return spliced.identity()


class _Spliced(_Walk):
    """A walk of a split tree's listed directories that splices in its parts where they go."""

    def __init__(self, split: TreeSplit, parts: dict[str, IdentityPart], stats: TreeStats) -> None:
        super().__init__(split.root, stats, plan=False, root_st=split.root_st)
        self.listed, self.parts = split.listed, parts

    def descend(self, rel: str, full: str) -> None:
        children = self.listed.get(rel)
        if children is not None:
            self.visit(rel, full, children)
            return
        part = self.parts[rel]
        self.names += part.names
        self.inodes += part.inodes
        self.ctimes += part.ctimes
        self.facts += part.facts
        self.stats.skipped += part.skipped
