"""What a save or restore tells about its progress, for a bar or log lines to show."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """``start(total)`` once, with the bytes to go (None when unknown), then ``advance(n)`` as
    they go: a restore counts compressed bytes downloaded, a save the tree's (tar) bytes packed and
    uploaded, found present or reused."""

    def start(self, total: int | None) -> None: ...

    def advance(self, nbytes: int) -> None: ...
