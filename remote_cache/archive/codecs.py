"""The compressions a layer can be packed with, and the levels each takes."""

from __future__ import annotations

from typing import Literal, cast

__all__ = ["LEVELS", "Compression", "check_compression", "check_level"]

Compression = Literal["zstd", "gzip"]

#: The levels each compression takes (zstd's negative "fast" levels are not offered).
LEVELS: dict[str, range] = {"zstd": range(1, 23), "gzip": range(1, 10)}


def check_compression(name: str) -> Compression:
    """``name`` when it is a compression (a key of :data:`LEVELS`); ValueError otherwise."""
    if name not in LEVELS:
        raise ValueError(f"compression must be {' or '.join(map(repr, LEVELS))}, not {name!r}")
    return cast(Compression, name)


def check_level(compression: str, level: int | None) -> int | None:
    """``level`` when ``compression`` takes it (None: the codec's default); ValueError otherwise."""
    levels = LEVELS[compression]
    if level is not None and level not in levels:
        raise ValueError(f"{compression} levels are {levels.start} to {levels.stop - 1}, not {level}")
    return level
