"""How much a ~1% addition re-uploads, over many additions: the distribution the benchmark's one
"+1 package" case is a single sample of, and the same for an addition scattered over the tree.

    .venv/bin/python bench/layer_sizing.py DIR [--samples 56] [--min-mib M --max-mib M]

Walks DIR once, then for each sampled top-level directory (of ``node_modules`` when DIR has
one) holding 0.4-2% of the tree, inserts a copy of it under a new name into the walk (in archive
order, as a real copy would land) and cuts both trees into layers with the save's rule
(:func:`remote_cache.archive.plan.split_members`, with the generation bounds a save would
write). Then, in as many draws, it adds ~1% of the tree as new files next to randomly chosen
files (copies of them under new random names, written after the save): how a hash-sharded
cache grows (Go's build cache, npm's ``_cacache``), every new entry in a directory its hash
picks. Reports the layer count and, over the samples, the share of the tree's tar bytes in
layers that changed. Tar bytes, not compressed bytes; nothing is packed or uploaded.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from remote_cache.archive.plan import (
    MAX_LAYER_BYTES,
    MIN_LAYER_BYTES,
    LayerPlan,
    settle_bounds,
    split_members,
)
from remote_cache.archive.tar import DIR, FILE, Member
from remote_cache.archive.walk import TreeStats, walk_tree

__all__ = ["Spread", "main", "reupload_spread", "summary"]


def _order(m: Member) -> tuple[bytes, ...]:
    return tuple(os.fsencode(part) for part in m.path.split("/"))


def _copied(members: list[Member], top: str, suffix: str) -> list[Member]:
    """``members`` plus a copy of directory ``top`` named ``top + suffix``, in archive order."""
    new = [
        Member(top + suffix + m.path[len(top) :], m.kind, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname)
        for m in members
        if m.path == top or m.path.startswith(top + "/")
    ]
    return sorted(members + new, key=_order)


def _key(plan: LayerPlan) -> tuple[tuple[str, int], ...]:
    """What makes a layer the same layer again: its members' paths and sizes."""
    return tuple((m.path, m.size) for m in plan.members)


@dataclass(frozen=True)
class Spread:
    """A tree's tar bytes, entries and layers, and the re-upload shares (%, sorted) of each kind
    of draw: a +1 directory copied in (empty when no directory fits), and +1% in new files
    scattered over the tree (empty for a tree without files)."""

    total: int
    entries: int
    layers: int
    directory: list[float]
    scattered: list[float]


def reupload_spread(
    root: Path,
    *,
    samples: int = 56,
    scattered: int = 20,
    seed: int = 7,
    min_bytes: int = MIN_LAYER_BYTES,
    max_bytes: int = MAX_LAYER_BYTES,
) -> Spread:
    """Walk ``root`` once and cut it as its save would, then draw up to ``samples`` +1
    directories and ``scattered`` +1% of new files (see the module docstring)."""
    members, _ = walk_tree(root, TreeStats())
    cut = _Cut(members, min_bytes, max_bytes)
    prefix = "node_modules/" if (root / "node_modules").is_dir() else ""
    return Spread(
        cut.total,
        len(members),
        cut.layers,
        _directory_draws(members, cut, prefix, samples, seed),
        _scattered_draws(members, cut, scattered, seed),
    )


def _directory_draws(members: list[Member], cut: _Cut, prefix: str, samples: int, seed: int) -> list[float]:
    """For each sampled top-level directory (under ``prefix``) holding 0.4-2% of the tree, a copy
    of it inserted under a new name: the share of tar bytes in layers that changed."""
    sizes: dict[str, int] = {}
    for m in members:
        if m.path.startswith(prefix) and m.path != prefix.rstrip("/"):
            top = prefix + m.path[len(prefix) :].split("/", 1)[0]
            sizes[top] = sizes.get(top, 0) + m.tar_size
    dirs = {m.path for m in members if m.kind == DIR}
    total = cut.total
    picks = [t for t, s in sorted(sizes.items()) if t in dirs and 0.004 * total <= s <= 0.02 * total]
    random.Random(seed).shuffle(picks)
    return sorted(cut.changed(_copied(members, top, "-sizing-copy")) for top in picks[:samples])


def _scattered_draws(
    members: list[Member], cut: _Cut, samples: int, seed: int, share: float = 0.01
) -> list[float]:
    """For each of ``samples`` draws of new files worth ``share`` of the tree's tar bytes, each
    beside a randomly chosen file and written after the save: the share of tar bytes in layers
    that changed."""
    files = [m for m in members if m.kind == FILE]
    if not files:
        return []
    rng = random.Random(seed)
    later = max(m.mtime for m in files) + 60  # written after the tree was saved
    shares = []
    for _ in range(samples):
        new: list[Member] = []
        added = 0
        while added < share * cut.total:
            m = rng.choice(files)
            name = f"{m.path.rpartition('/')[0]}/{rng.getrandbits(128):032x}-a".lstrip("/")
            new.append(Member(name, FILE, m.mode, m.uid, m.gid, m.size, later, m.linkname))
            added += m.tar_size
        shares.append(cut.changed(sorted(members + new, key=_order)))
    return sorted(shares)


class _Cut:
    """A tree's layers by the save's rule (at the generation bounds its save writes), and how
    much of a later tree's are not among them (cut at the bounds the next save would write)."""

    def __init__(self, members: list[Member], min_bytes: int, max_bytes: int) -> None:
        self._sizes = {"min_bytes": min_bytes, "max_bytes": max_bytes}
        self.total = sum(m.tar_size for m in members)
        self._bounds = settle_bounds(members)
        before = split_members(members, bounds=self._bounds, **self._sizes)
        self.layers = len(before)
        self._known = {_key(plan) for plan in before}

    def changed(self, members: list[Member]) -> float:
        """The share (%) of ``members``' tar bytes in layers that are not the tree's."""
        after = split_members(members, bounds=settle_bounds(members, self._bounds), **self._sizes)
        changed = sum(p.tar_bytes for p in after if _key(p) not in self._known)
        return 100 * changed / sum(m.tar_size for m in members)


def summary(shares: list[float]) -> str:
    """``median 3.4%, mean 4.6%, 90th percentile 11.1%, max 11.1%`` of the shares."""
    p90 = shares[min(len(shares) - 1, int(0.9 * len(shares)))]
    return (
        f"median {statistics.median(shares):.1f}%, mean {statistics.mean(shares):.1f}%, "
        f"90th percentile {p90:.1f}%, max {shares[-1]:.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--samples", type=int, default=56)
    parser.add_argument("--seed", type=int, default=7)
    # The save's own sizes unless told otherwise.
    parser.add_argument("--min-mib", type=float, default=MIN_LAYER_BYTES / (1 << 20))
    parser.add_argument("--max-mib", type=float, default=MAX_LAYER_BYTES / (1 << 20))
    args = parser.parse_args()
    spread = reupload_spread(
        args.dir,
        samples=args.samples,
        seed=args.seed,
        min_bytes=int(args.min_mib * (1 << 20)),
        max_bytes=int(args.max_mib * (1 << 20)),
    )
    print(f"tree: {spread.total / 1e6:.1f} MB of tar in {spread.entries} entries, {spread.layers} layers")
    if spread.directory:
        print(f"+1 directory ({len(spread.directory)} samples): re-upload {summary(spread.directory)}")
    else:
        print("no top-level directory holds 0.4-2% of the tree")
    if spread.scattered:
        shares = spread.scattered
        print(f"+1% in new files scattered ({len(shares)} samples): re-upload {summary(shares)}")


if __name__ == "__main__":
    main()
