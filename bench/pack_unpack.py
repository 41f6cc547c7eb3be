"""Micro-benchmark: our pack/unpack vs ``tar | zstd -T0 -3`` and ``zstd -d | tar -x``, side by side.

Usage: python bench/pack_unpack.py CORPUS_DIR [--rounds N] [--work DIR]
(build a corpus with ``make-corpus.sh``; put it and --work on tmpfs). Not a test.
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

from remote_cache.layers import scan_tree
from remote_cache.pack import PackedLayer, pack_tree
from remote_cache.unpack import Extractor, discard_dir


def _time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
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

    def our_unpack() -> None:
        out = work / "our-out"
        out.mkdir()
        ex = Extractor(out)
        for layer in layers:
            data = layer.data if isinstance(layer.data, bytes) else layer.data.read_bytes()
            ex.add_layer(io.BytesIO(data), layer.media_type)
        ex.finish()

    res: dict[str, list[float]] = {k: [] for k in ("raw_pack", "our_pack", "raw_unpack", "our_unpack")}
    try:
        for _ in range(args.rounds):
            res["raw_pack"].append(_time(raw_pack))
            res["our_pack"].append(_time(our_pack))
            res["raw_unpack"].append(_time(raw_unpack))
            shutil.rmtree(work / "raw-out")
            res["our_unpack"].append(_time(our_unpack))
            discard_dir(work / "our-out")
        med = {k: statistics.median(v) for k, v in res.items()}
        total = sum(layer.size for layer in layers)
        raw_mib = raw_blob.stat().st_size / 2**20
        print(f"layers: {len(layers)}, compressed {total / 2**20:.1f} MiB (raw {raw_mib:.1f})")
        for k, v in med.items():
            print(f"{k:11s} median {v:.3f}s  runs {[round(x, 3) for x in res[k]]}")
        print(f"pack ratio   {med['our_pack'] / med['raw_pack']:.2f}x")
        print(f"unpack ratio {med['our_unpack'] / med['raw_unpack']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
