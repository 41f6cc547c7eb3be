"""Micro-benchmark: our pack/unpack vs ``tar | zstd -T0 -3`` and ``zstd -d | tar -x``, side by side.

Usage: python bench/pack_unpack.py CORPUS_DIR [--rounds N] [--work DIR] [--only pack|unpack]
(build a corpus with ``make-corpus.sh``; put it and --work on tmpfs). Not a test.

Each round runs every contender once, in turn, so a noisy machine hurts them alike; compare
the ratios of medians. ``our_unpack`` feeds all layers to ``Extractor.add_layers`` (next layer
decompressed while the current one is written); ``our_unpack_1`` calls ``add_layer`` per layer.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from remote_cache.archive.extract import Extractor
from remote_cache.archive.pack import PackedLayer, pack_tree
from remote_cache.archive.plan import scan_tree
from remote_cache.archive.swap import discard_dir


def _time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--only", choices=("pack", "unpack"), default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="bench-"))
    raw_blob = work / "raw.tar.zst"
    layers: list[PackedLayer] = []

    def raw_pack() -> None:
        subprocess.run(
            f"tar -C '{args.corpus}' -cf - . | zstd -T0 -3 -q -f -o '{raw_blob}'", shell=True, check=True
        )

    def raw_unpack() -> None:
        out = work / "raw-out"
        out.mkdir()
        subprocess.run(f"zstd -d -q -c '{raw_blob}' | tar -C '{out}' -xf -", shell=True, check=True)

    def our_pack() -> None:
        layers.clear()
        layers.extend(pack_tree(scan_tree(args.corpus)))

    def blobs() -> list[bytes]:
        return [x.data if isinstance(x.data, bytes) else x.data.read_bytes() for x in layers]

    def our_unpack() -> None:
        out = work / "our-out"
        out.mkdir()
        ex = Extractor(out)
        ex.add_layers((io.BytesIO(data), x.compression) for data, x in zip(blobs(), layers, strict=True))
        ex.finish()

    def our_unpack_1() -> None:
        out = work / "our-out"
        out.mkdir()
        ex = Extractor(out)
        for data, x in zip(blobs(), layers, strict=True):
            ex.add_layer(io.BytesIO(data), x.compression)
        ex.finish()

    def cleanup() -> None:
        shutil.rmtree(work / "raw-out", ignore_errors=True)
        discard_dir(work / "our-out")

    plan: dict[str, Callable[[], None]] = {}
    if args.only != "unpack":
        plan |= {"raw_pack": raw_pack, "our_pack": our_pack}
    if args.only != "pack":
        plan |= {"raw_unpack": raw_unpack, "our_unpack": our_unpack, "our_unpack_1": our_unpack_1}
    res: dict[str, list[float]] = {k: [] for k in plan}
    try:
        if args.only == "unpack":
            raw_pack()
            our_pack()
        for _ in range(args.rounds):
            for name, fn in plan.items():
                res[name].append(_time(fn))
                cleanup()
        med = {k: statistics.median(v) for k, v in res.items()}
        total = sum(layer.size for layer in layers)
        raw_mib = raw_blob.stat().st_size / 2**20
        print(f"layers: {len(layers)}, compressed {total / 2**20:.1f} MiB (raw {raw_mib:.1f})")
        for k, v in med.items():
            print(f"{k:12s} median {v:.3f}s  runs {[round(x, 3) for x in res[k]]}")
        if "raw_pack" in med:
            print(f"pack ratio     {med['our_pack'] / med['raw_pack']:.2f}x")
        if "raw_unpack" in med:
            print(f"unpack ratio   {med['our_unpack'] / med['raw_unpack']:.2f}x (add_layers)")
            print(f"unpack_1 ratio {med['our_unpack_1'] / med['raw_unpack']:.2f}x (add_layer per layer)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
