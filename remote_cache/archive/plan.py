"""Split a walked tree into layers by a deterministic, content-defined rule.

The rule, so that a small change in a big tree re-uploads only one or two layers:

1. Members come in walk order (:mod:`.walk`): each directory right before its children.
2. Give each regular file ``units = 1 + size // UNIT_BYTES`` and hash its *path* (not its
   content) with BLAKE2b. A file is a *natural cut point* when ``hash % CUT_MODULUS < units``
   (the odds halved while the layer holds under ``2 * MIN_LAYER_BYTES``, and raised by half
   once it holds more, see 4): about one cut per ``CUT_MODULUS`` files in a tree of small
   files, about one per ``CUT_MODULUS * UNIT_BYTES`` bytes in a tree of big ones. Cut points
   depend only on the file and the layer's size, so they survive edits elsewhere and the
   layers resynchronise after a change.
3. A tree of ``MIN_LAYER_BYTES`` or more puts every directory member in a first layer of its
   own: adding or removing a file changes its directory's mtime, and that should cost
   re-uploading a small layer, not a big one.
4. Cut after a file when it is a natural cut point and the layer holds at least
   ``MIN_LAYER_BYTES``, or when the layer holds at least ``MAX_LAYER_BYTES`` whatever the hash
   says. A tree smaller than ``MIN_LAYER_BYTES`` is one layer (directories included). The odds
   that change at ``2 * MIN_LAYER_BYTES`` make layer sizes less spread (as FastCDC's normalised
   chunking does): a change lands in the layer holding it, so a few long layers made most of
   the re-upload. Measured (``bench/layer_sizing.py``: a ~1% directory added, many draws) on
   three Go-build-cache-shaped trees of 10k files: 38-39 layers, a mean re-upload of 3.8-4.4%
   of the tree (constant odds: 35-36 layers, 4.5-5.6%, a tenth of the draws at 7-21%); on a
   320 MB node_modules 46 layers and 3.0% (43 and 2.8%). Halving the sizes doubles the layers
   for no smaller uploads, and every layer costs requests on both sides (the registry's share
   is most of it on a save).
5. Sizes count tar bytes (512-byte header plus data rounded up to 512).
6. Hard links go at the end of the layer of the *first path* of their inode (tar requires the
   link target earlier in the same archive). Their parent directories may then be created by
   that layer before their own members arrive in a later layer; the extractor allows it.
7. *Generations*: a tree of ``MIN_LAYER_BYTES`` or more is first split by mtime at the entry's
   generation bounds (:func:`settle_bounds`; the image carries them) and each generation, oldest
   first, is cut by rules 2-6 on its own, after the directories' layer. A save closes the newest
   generation at the tree's newest mtime, so files written after it (new cache entries, wherever
   their hash puts them) make a generation of their own and leave the older layers as they were:
   ~1% of new files scattered over a Go-build-cache-shaped tree changed layers holding 93% of it
   with one generation, 1% with two (``bench/layer_sizing.py``). Generations are merged, newest
   into the one before, while the newer is as big (a binary counter: a file is re-packed about
   log2(additions) times) or there are more than ``MAX_GENERATIONS``. Bounds are whole seconds,
   like the mtimes tar keeps; a file whose mtime is put back (npm's 1985) lands in the oldest,
   and one dated more than ``FUTURE_SLACK`` past the save's clock in a generation after the
   newest, which it does not close. Which bounds a save starts from: remote_cache.cache.save.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

from msgspec import Struct
from msgspec.structs import replace

from ..records import hiding
from .tar import DIR, FILE, HARDLINK, Member
from .walk import TreeIdentity, TreeStats, walk_tree

__all__ = [
    "CUT_MODULUS",
    "FUTURE_SLACK",
    "MAX_GENERATIONS",
    "MAX_LAYER_BYTES",
    "MIN_LAYER_BYTES",
    "UNIT_BYTES",
    "LayerPlan",
    "TreeScan",
    "scan_tree",
    "settle_bounds",
    "split_members",
]

#: Bytes a layer must hold before a natural cut point may end it.
MIN_LAYER_BYTES = 2 << 20
#: A layer is cut after the file that brings it to this many bytes, cut point or not.
MAX_LAYER_BYTES = 16 << 20
#: One natural cut per this many "units" on average (a unit is a small file or UNIT_BYTES of data).
CUT_MODULUS = 256
UNIT_BYTES = 64 << 10
#: At most this many generations (rule 7): the newest two are merged beyond it.
MAX_GENERATIONS = 8
#: A save closes its newest generation at the newest mtime up to this far past its clock: files
#: dated later (a year ahead, a bad archive's stamp) would otherwise hold every file written
#: until then in one generation; a clock that trails by less than this changes nothing.
FUTURE_SLACK = 24 * 3600


class LayerPlan(Struct, frozen=True):
    """The members of one layer, in archive order, and their tar size (without the end blocks)."""

    index: int
    members: tuple[Member, ...]
    tar_bytes: int


class TreeScan(Struct, frozen=True, dict=True):  # dict: a cached_property
    """A scanned tree: its root, the layer plans in order, the stats and its identity; the walked
    members and the sizes they were cut with, to cut them again at other generation bounds."""

    root: Path
    layers: tuple[LayerPlan, ...]
    stats: TreeStats
    identity: TreeIdentity | None = None
    members: tuple[Member, ...] = ()
    bounds: tuple[int, ...] = ()
    sizes: tuple[int, int] = (0, 0)

    __repr__, __rich_repr__ = hiding("sizes")

    @cached_property
    def _bytes_by_mtime(self) -> dict[int, int]:
        # Both what a save's bounds settle on and whether they cut the tree anew (one pass).
        return _bytes_by_mtime(self.members)

    def settle(self, base: Sequence[int] = (), *, clock: int | None = None) -> tuple[int, ...]:
        """:func:`settle_bounds` of the scanned members."""
        return _settled(self.members, self._bytes_by_mtime, base, clock)

    def cut(self, bounds: Sequence[int]) -> TreeScan:
        """The same tree cut at generation ``bounds`` (itself when they split it the same way)."""
        bounds = tuple(bounds)
        # Generations are ranges of the members' placing mtimes: two sets of bounds split the tree
        # alike when they separate the same neighbours among those mtimes, sorted.
        mtimes = sorted(self._bytes_by_mtime)
        if _splits(mtimes, bounds) == _splits(mtimes, self.bounds):
            return replace(self, bounds=bounds)
        layers = split_members(
            list(self.members), bounds=bounds, min_bytes=self.sizes[0], max_bytes=self.sizes[1]
        )
        return replace(self, layers=tuple(layers), bounds=bounds)


def _is_cut_point(e: Member, grown: bool) -> bool:
    """Whether ``e`` ends its layer (rule 2): ``grown`` when the layer is past its target size."""
    units = 1 + e.size // UNIT_BYTES
    h = int.from_bytes(hashlib.blake2b(os.fsencode(e.path), digest_size=8).digest(), "little")
    return 2 * (h % CUT_MODULUS) < (3 if grown else 1) * units


def split_members(
    members: list[Member],
    *,
    bounds: Sequence[int] = (),
    min_bytes: int = MIN_LAYER_BYTES,
    max_bytes: int = MAX_LAYER_BYTES,
) -> list[LayerPlan]:
    """Cut walk-ordered members into layers by the rule in this module's docstring."""
    if sum(e.tar_size for e in members) < min_bytes:
        groups = _cut(members, min_bytes, max_bytes) or [([], 0)]
    else:
        dirs = [e for e in members if e.kind == DIR]
        groups = [(dirs, sum(e.tar_size for e in dirs))]
        for generation in _generations(members, tuple(bounds)):
            groups += _cut(generation, min_bytes, max_bytes)
    return [LayerPlan(index=i, members=tuple(g), tar_bytes=size) for i, (g, size) in enumerate(groups)]


def _generations(members: Sequence[Member], bounds: tuple[int, ...]) -> list[list[Member]]:
    """The non-directory members of each non-empty generation (rule 7), oldest first, in walk order."""
    generations: list[list[Member]] = [[] for _ in range(len(bounds) + 1)]
    for e, mtime in _placing(members):
        generations[bisect_left(bounds, mtime)].append(e)
    return [g for g in generations if g]


def _placing(members: Sequence[Member]) -> Iterator[tuple[Member, int]]:
    """Each non-directory member with the mtime that places it in a generation: its own, or a hard
    link's target's (tar needs the target earlier in the same layer; their mtimes differ only if
    the inode's changed during the walk, which the packer then refuses as a changed tree)."""
    of_path: dict[str, int] = {}
    for e in members:
        if e.kind == DIR:
            continue
        mtime = of_path.get(e.linkname, e.mtime) if e.kind == HARDLINK else e.mtime
        if e.kind == FILE:
            of_path[e.path] = mtime
        yield e, mtime


def _bytes_by_mtime(members: Sequence[Member]) -> dict[int, int]:
    """The non-directory members' tar bytes by the mtime that places them (see :func:`_placing`)."""
    sizes: dict[int, int] = {}
    for e, mtime in _placing(members):
        sizes[mtime] = sizes.get(mtime, 0) + e.tar_size
    return sizes


def _splits(mtimes: Sequence[int], bounds: tuple[int, ...]) -> list[bool]:
    """For each pair of neighbours in sorted ``mtimes``: whether ``bounds`` put them apart."""
    generations = [bisect_left(bounds, mtime) for mtime in mtimes]
    return [a != b for a, b in itertools.pairwise(generations)]


def _cut(members: list[Member], min_bytes: int, max_bytes: int) -> list[tuple[list[Member], int]]:
    """Rules 2 and 4-6 over walk-ordered members: the layers' members and tar sizes."""
    groups: list[list[Member]] = []
    sizes: list[int] = []
    layer_of_path: dict[str, int] = {}
    links: dict[int, list[Member]] = {}
    cur: list[Member] = []
    cur_size = 0
    for e in members:
        if e.kind == HARDLINK:
            idx = layer_of_path.get(e.linkname, len(groups))
            links.setdefault(idx, []).append(e)
            if idx == len(groups):
                cur_size += 512
            else:
                sizes[idx] += 512
            continue
        cur.append(e)
        cur_size += e.tar_size
        if e.kind == FILE:
            layer_of_path[e.path] = len(groups)
            if cur_size >= max_bytes or (
                cur_size >= min_bytes and _is_cut_point(e, grown=cur_size >= 2 * min_bytes)
            ):
                groups.append(cur)
                sizes.append(cur_size)
                cur, cur_size = [], 0
    if cur or len(groups) in links:
        groups.append(cur)
        sizes.append(cur_size)
    return [(g + links.get(i, []), sizes[i]) for i, g in enumerate(groups)]


def settle_bounds(
    members: Sequence[Member], base: Sequence[int] = (), *, clock: int | None = None
) -> tuple[int, ...]:
    """The generation bounds a save of ``members`` writes, from those of the entry it follows
    (``base``, strictly increasing): the newest generation closed at the newest mtime not more
    than ``FUTURE_SLACK`` past ``clock`` (the save's, in seconds; files dated later stay in a
    generation after it), then generations merged by rule 7. The same members and the result
    give the result again."""
    return _settled(members, _bytes_by_mtime(members), base, clock)


def _settled(
    members: Sequence[Member], by_mtime: dict[int, int], base: Sequence[int], clock: int | None
) -> tuple[int, ...]:
    """:func:`settle_bounds`, given the members' tar bytes by placing mtime (``by_mtime``)."""
    future = None if clock is None else clock + FUTURE_SLACK
    dated = (e.mtime for e in members if e.kind != DIR)
    newest = max((m for m in dated if future is None or m <= future), default=None)
    if newest is None:
        return ()
    # Bounds at or after the newest mtime split nothing that is there: dropped, so that a file
    # once dated in the future (or a store's word) cannot hold every later file in one generation.
    bounds = [b for b in base if b < newest] + [newest]
    sizes = [0] * (len(bounds) + 1)
    for mtime, size in by_mtime.items():
        sizes[bisect_left(bounds, mtime)] += size
    sizes.pop()  # after the last bound: only files dated in the future, which merge with nothing
    while len(bounds) > 1 and (sizes[-1] >= sizes[-2] or len(bounds) > MAX_GENERATIONS):
        del bounds[-2]
        merged = sizes.pop()
        sizes[-1] += merged
    return tuple(bounds)


def scan_tree(root: Path, *, min_bytes: int = MIN_LAYER_BYTES, max_bytes: int = MAX_LAYER_BYTES) -> TreeScan:
    """Walk ``root`` (not following symlinks) and plan its layers as one generation; see the
    module docstring (:meth:`TreeScan.cut` cuts it at other bounds)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; nothing to pack")
    stats = TreeStats()
    members, identity = walk_tree(root, stats)
    layers = tuple(split_members(members, min_bytes=min_bytes, max_bytes=max_bytes))
    return TreeScan(root, layers, stats, identity, tuple(members), sizes=(min_bytes, max_bytes))
