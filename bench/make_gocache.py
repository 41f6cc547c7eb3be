"""Build a Go-build-cache-shaped benchmark corpus: many small and mid-size files, half of them
incompressible, plus a few big blobs (the shape of ``~/.cache/go-build``).

    .venv/bin/python bench/make_gocache.py DIR [--files 10000] [--seed 1]

About 10,000 files whose sizes spread log-uniformly from 32 bytes to 128 KiB, in 256
two-hex-digit directories as Go names them; every other file random bytes, the rest text-like
(compressible); plus four 8 MiB blobs, two random and two text-like. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

__all__ = ["make_gocache"]

_WORDS = b"package func return import struct interface error string int byte go build cache action "


def _text(rng: random.Random, size: int) -> bytes:
    words = _WORDS.split()
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:size])


def make_gocache(root: Path, *, files: int = 10_000, seed: int = 1) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    low, high = math.log(32), math.log(128 << 10)
    for i in range(files):
        size = int(math.exp(rng.uniform(low, high)))
        name = f"{rng.getrandbits(128):032x}-{'a' if i % 3 else 'd'}"
        folder = root / name[:2]
        folder.mkdir(exist_ok=True)
        data = rng.randbytes(size) if i % 2 else _text(rng, size)
        (folder / name).write_bytes(data)
    for i in range(4):
        blob = root / f"big-{i}"
        blob.write_bytes(rng.randbytes(8 << 20) if i % 2 else _text(rng, 8 << 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    make_gocache(args.dir, files=args.files, seed=args.seed)


if __name__ == "__main__":
    main()
