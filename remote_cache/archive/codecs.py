"""The compressions a layer can be packed with, and the levels each takes."""

from __future__ import annotations

from typing import Literal

__all__ = ["LEVELS", "Compression", "check_level"]

Compression = Literal["zstd", "gzip"]

#: The levels each compression takes (zstd's negative "fast" levels are not offered).
LEVELS: dict[str, range] = {"zstd": range(1, 23), "gzip": range(1, 10)}


def check_level(compression: str, level: int | None) -> int | None:
    """``level`` when ``compression`` takes it (None: the codec's default); ValueError otherwise."""
    levels = LEVELS[compression]
    if level is not None and level not in levels:
        raise ValueError(f"{compression} levels are {levels.start} to {levels.stop - 1}, not {level}")
    return level
