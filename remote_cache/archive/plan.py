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
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .tar import DIR, FILE, HARDLINK, Member
from .walk import TreeIdentity, TreeStats, walk_tree

__all__ = [
    "CUT_MODULUS",
    "MAX_LAYER_BYTES",
    "MIN_LAYER_BYTES",
    "UNIT_BYTES",
    "LayerPlan",
    "TreeScan",
    "scan_tree",
    "split_members",
]

#: Bytes a layer must hold before a natural cut point may end it.
MIN_LAYER_BYTES = 2 << 20
#: A layer is cut after the file that brings it to this many bytes, cut point or not.
MAX_LAYER_BYTES = 16 << 20
#: One natural cut per this many "units" on average (a unit is a small file or UNIT_BYTES of data).
CUT_MODULUS = 256
UNIT_BYTES = 64 << 10


@dataclass(frozen=True)
class LayerPlan:
    """The members of one layer, in archive order, and their tar size (without the end blocks)."""

    index: int
    members: tuple[Member, ...]
    tar_bytes: int


@dataclass(frozen=True)
class TreeScan:
    """A scanned tree: its root, the layer plans in order, the stats and its identity."""

    root: Path
    layers: tuple[LayerPlan, ...]
    stats: TreeStats
    identity: TreeIdentity | None = None


def _is_cut_point(e: Member, grown: bool) -> bool:
    """Whether ``e`` ends its layer (rule 2): ``grown`` when the layer is past its target size."""
    units = 1 + e.size // UNIT_BYTES
    h = int.from_bytes(hashlib.blake2b(os.fsencode(e.path), digest_size=8).digest(), "little")
    return 2 * (h % CUT_MODULUS) < (3 if grown else 1) * units


def split_members(
    members: list[Member], *, min_bytes: int = MIN_LAYER_BYTES, max_bytes: int = MAX_LAYER_BYTES
) -> list[LayerPlan]:
    """Cut walk-ordered members into layers by the rule in this module's docstring."""
    groups: list[list[Member]] = []
    sizes: list[int] = []
    layer_of_path: dict[str, int] = {}
    links: dict[int, list[Member]] = {}
    cur: list[Member] = []
    cur_size = 0
    if sum(e.tar_size for e in members) >= min_bytes:
        dirs = [e for e in members if e.kind == DIR]
        groups.append(dirs)
        sizes.append(sum(e.tar_size for e in dirs))
        members = [e for e in members if e.kind != DIR]
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
    if cur or not groups or len(groups) in links:
        groups.append(cur)
        sizes.append(cur_size)
    return [
        LayerPlan(index=i, members=tuple(g + links.get(i, [])), tar_bytes=sizes[i])
        for i, g in enumerate(groups)
    ]


def scan_tree(root: Path, *, min_bytes: int = MIN_LAYER_BYTES, max_bytes: int = MAX_LAYER_BYTES) -> TreeScan:
    """Walk ``root`` (not following symlinks) and plan its layers; see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; nothing to pack")
    stats = TreeStats()
    members, identity = walk_tree(root, stats)
    layers = split_members(members, min_bytes=min_bytes, max_bytes=max_bytes)
    return TreeScan(root=root, layers=tuple(layers), stats=stats, identity=identity)
