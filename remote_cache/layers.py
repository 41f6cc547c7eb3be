"""Scan a directory tree and split it into layers by a deterministic, content-defined rule.

The split rule, so that a small change in a big tree re-uploads only one or two layers:

1. Walk the tree depth-first, each directory's entries sorted by their name's bytes, so every
   directory comes right before its children and a subtree (an npm package) is contiguous.
   The root itself gets no entry.
2. Give each regular file ``units = 1 + size // UNIT_BYTES`` and hash its *path* (not its
   content) with BLAKE2b. A file is a *natural cut point* when ``hash % CUT_MODULUS < units``:
   about one cut per ``CUT_MODULUS`` files in a tree of small files, about one per
   ``CUT_MODULUS * UNIT_BYTES`` bytes in a tree of big ones. Cut points depend only on the file
   itself, so they survive edits elsewhere and the layers resynchronise after a change.
3. A tree of ``MIN_LAYER_BYTES`` or more puts every directory entry in a first layer of its
   own (``DIRS_APART``): adding or removing a file changes its directory's mtime, and that
   should cost re-uploading a small layer, not a big one.
4. Cut after a file when it is a natural cut point and the layer holds at least
   ``MIN_LAYER_BYTES``, or when the layer holds at least ``MAX_LAYER_BYTES`` whatever the hash
   says. A tree smaller than ``MIN_LAYER_BYTES`` is one layer (directories included). Measured on
   a 320 MB node_modules: 43 layers, and adding one 3 MB package changes 3 of them (1.7% of the
   compressed bytes). Halving the sizes doubles the layers for no smaller uploads, and every
   layer costs requests on both sides (the registry's share is most of it on a save).
5. Sizes count tar bytes (512-byte header plus data rounded up to 512).
6. Hard links: the first path of an inode (in walk order) carries the data; every later path
   becomes a hard-link entry placed at the end of the *first path's* layer (tar requires the
   link target earlier in the same archive). Its parent directories may then be created by
   that layer before their own entries arrive in a later layer; the extractor allows it.

Sockets cannot be archived and are skipped with a warning in :class:`TreeStats`. Device files
and FIFOs are refused (:class:`~remote_cache.errors.UnsafeArchive`): a cache has no business
holding them and the extractor refuses them too.
"""

from __future__ import annotations

import hashlib
import os
import stat
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnsafeArchive

__all__ = [
    "CUT_MODULUS",
    "KIND_DIR",
    "KIND_FILE",
    "KIND_HARDLINK",
    "KIND_SYMLINK",
    "MAX_LAYER_BYTES",
    "MIN_LAYER_BYTES",
    "UNIT_BYTES",
    "Entry",
    "LayerPlan",
    "TreeIdentity",
    "TreeScan",
    "TreeStats",
    "scan_tree",
    "split_entries",
    "tree_identity",
]

KIND_FILE = 0
KIND_DIR = 1
KIND_SYMLINK = 2
KIND_HARDLINK = 3

#: Bytes a layer must hold before a natural cut point may end it.
MIN_LAYER_BYTES = 2 << 20
#: A layer is cut after the file that brings it to this many bytes, cut point or not.
MAX_LAYER_BYTES = 16 << 20
#: One natural cut per this many "units" on average (a unit is a small file or UNIT_BYTES of data).
CUT_MODULUS = 256
UNIT_BYTES = 64 << 10
#: Put every directory entry in a first layer of its own (trees of MIN_LAYER_BYTES or more).
DIRS_APART = True


class Entry:
    """One tree member as it will be archived: relative path, kind and the stat fields tar keeps."""

    __slots__ = ("ctime_ns", "gid", "ino", "kind", "linkname", "mode", "mtime", "path", "size", "uid")

    def __init__(
        self,
        path: str,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime: int,
        linkname: str = "",
        ino: int = 0,
        ctime_ns: int = 0,
    ) -> None:
        self.path = path  # relative, "/"-separated, str with surrogateescape for odd bytes
        self.kind = kind
        self.mode = mode  # permission bits incl. setuid/setgid/sticky
        self.uid = uid
        self.gid = gid
        self.size = size  # data bytes (0 unless KIND_FILE)
        self.mtime = mtime  # whole seconds
        self.linkname = linkname  # symlink target, or first path of a hard-linked inode
        # Not archived: local evidence that a file is unchanged (see remote_cache.state).
        self.ino = ino
        self.ctime_ns = ctime_ns

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, kind={self.kind}, size={self.size})"


@dataclass
class TreeStats:
    """What a scan found: counts, data bytes, and anything that had to be skipped (with why)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayerPlan:
    """The entries of one layer, in archive order, and their tar size (without the end blocks)."""

    index: int
    entries: tuple[Entry, ...]
    tar_bytes: int


@dataclass(frozen=True)
class TreeIdentity:
    """Every entry's name, inode, ctime, mode, size and mtime, in walk order, digested; and the
    ctimes (to tell whether any was still fresh).

    Any change to an inode (data, mode, owner, times, links) moves its ctime, and adding,
    removing or renaming an entry moves its directory's: equal identities mean an unchanged
    tree, provided no ctime was still fresh when the walk began (see remote_cache.state). Mode,
    size and mtime are there for filesystems whose ctimes are coarse.
    """

    digest: str
    ctimes: array[int]


@dataclass(frozen=True)
class TreeScan:
    """A scanned tree: its root, the layer plans in order, the stats and its identity."""

    root: Path
    layers: tuple[LayerPlan, ...]
    stats: TreeStats
    identity: TreeIdentity | None = None


def _tar_size(e: Entry) -> int:
    return 512 + ((e.size + 511) & ~511)


def _walk_sorted(root: str, stats: TreeStats, *, plan: bool = True) -> tuple[list[Entry], TreeIdentity]:
    """Pre-order walk: each directory's entry, then its subtree, siblings in byte order.

    Also the tree's identity; ``plan=False`` computes only that (no entries, no checks).
    """
    out: list[Entry] = []
    first_path: dict[tuple[int, int], str] = {}
    top = os.lstat(root)
    names: list[str] = []
    inodes = array("Q", (top.st_dev, top.st_ino))
    ctimes = array("q", (top.st_ctime_ns,))
    facts = array("q")

    def visit(rel: str, full: str) -> None:
        with os.scandir(full) as it:
            children = sorted(it, key=lambda d: os.fsencode(d.name))
        names.append("\0/")  # a directory's entries start
        for d in children:
            st = d.stat(follow_symlinks=False)
            names.append(d.name)
            inodes.append(st.st_ino)
            ctimes.append(st.st_ctime_ns)
            m = st.st_mode
            facts.extend((m, st.st_size, st.st_mtime_ns))
            if not plan:
                if stat.S_ISDIR(m):
                    visit("", d.path)
                continue
            path = f"{rel}/{d.name}" if rel else d.name
            perm = stat.S_IMODE(m)
            mtime = int(st.st_mtime)
            if stat.S_ISREG(m):
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    first = first_path.get(key)
                    if first is not None:
                        out.append(Entry(path, KIND_HARDLINK, perm, st.st_uid, st.st_gid, 0, mtime, first))
                        stats.hardlinks += 1
                        continue
                    first_path[key] = path
                out.append(
                    Entry(
                        path, KIND_FILE, perm, st.st_uid, st.st_gid, st.st_size, mtime, "",
                        st.st_ino, st.st_ctime_ns,
                    )
                )  # fmt: skip
                stats.files += 1
                stats.bytes += st.st_size
            elif stat.S_ISDIR(m):
                out.append(Entry(path, KIND_DIR, perm, st.st_uid, st.st_gid, 0, mtime))
                stats.dirs += 1
                visit(path, d.path)
            elif stat.S_ISLNK(m):
                target = os.readlink(d.path)
                out.append(Entry(path, KIND_SYMLINK, perm, st.st_uid, st.st_gid, 0, mtime, target))
                stats.symlinks += 1
            elif stat.S_ISSOCK(m):
                stats.skipped.append(f"{path}: socket (sockets cannot be archived)")
            else:
                raise UnsafeArchive(
                    f"{path!r} is a device file or FIFO; remove it from the cached directory "
                    "(a cache must hold only files, directories and links)"
                )
        names.append("\0\\")  # and end

    visit("", root)
    h = hashlib.sha256(b"remote-cache tree v2\0")
    names_b = "\0".join(names).encode("utf-8", "surrogateescape")
    for part in (names_b, inodes.tobytes(), ctimes.tobytes(), facts.tobytes()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return out, TreeIdentity("sha256:" + h.hexdigest(), ctimes)


def tree_identity(root: Path) -> TreeIdentity:
    """The identity :func:`scan_tree` would give ``root``, at a fraction of its cost."""
    return _walk_sorted(os.fspath(root), TreeStats(), plan=False)[1]


def _is_cut_point(e: Entry) -> bool:
    units = 1 + e.size // UNIT_BYTES
    h = int.from_bytes(
        hashlib.blake2b(os.fsencode(e.path), digest_size=8).digest(),
        "little",
    )
    return h % CUT_MODULUS < units


def split_entries(
    entries: list[Entry],
    *,
    min_bytes: int = MIN_LAYER_BYTES,
    max_bytes: int = MAX_LAYER_BYTES,
) -> list[LayerPlan]:
    """Cut walk-ordered entries into layers by the rule in this module's docstring."""
    groups: list[list[Entry]] = []
    sizes: list[int] = []
    layer_of_path: dict[str, int] = {}
    links: dict[int, list[Entry]] = {}
    cur: list[Entry] = []
    cur_size = 0
    if DIRS_APART and sum(_tar_size(e) for e in entries) >= min_bytes:
        # Directories first, in a layer of their own: adding or removing a file changes its
        # directory's mtime, and that should cost a tiny layer, not a big one.
        dirs = [e for e in entries if e.kind == KIND_DIR]
        groups.append(dirs)
        sizes.append(sum(_tar_size(e) for e in dirs))
        entries = [e for e in entries if e.kind != KIND_DIR]
    for e in entries:
        if e.kind == KIND_HARDLINK:
            idx = layer_of_path.get(e.linkname, len(groups))
            links.setdefault(idx, []).append(e)
            if idx == len(groups):
                cur_size += 512
            else:
                sizes[idx] += 512
            continue
        cur.append(e)
        cur_size += _tar_size(e)
        if e.kind == KIND_FILE:
            layer_of_path[e.path] = len(groups)
            if cur_size >= max_bytes or (cur_size >= min_bytes and _is_cut_point(e)):
                groups.append(cur)
                sizes.append(cur_size)
                cur, cur_size = [], 0
    if cur or not groups or len(groups) in links:
        groups.append(cur)
        sizes.append(cur_size)
    return [
        LayerPlan(index=i, entries=tuple(g + links.get(i, [])), tar_bytes=sizes[i])
        for i, g in enumerate(groups)
    ]


def scan_tree(
    root: Path,
    *,
    min_bytes: int = MIN_LAYER_BYTES,
    max_bytes: int = MAX_LAYER_BYTES,
) -> TreeScan:
    """Walk ``root`` (not following symlinks) and plan its layers; see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; nothing to pack")
    stats = TreeStats()
    entries, identity = _walk_sorted(os.fspath(root), stats)
    layers = split_entries(entries, min_bytes=min_bytes, max_bytes=max_bytes)
    return TreeScan(root=root, layers=tuple(layers), stats=stats, identity=identity)
