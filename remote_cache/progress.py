"""Human-facing output helpers for the CLI: sizes, durations, and a delayed rich progress bar.

The bar only appears when stderr is a terminal and the transfer has lasted more than a moment
(:data:`SHOW_AFTER` seconds), so quick operations and CI logs get just the one-line summary.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

# rich is imported only when a bar is actually drawn (see _start_bar): most runs never draw one.
if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "SHOW_AFTER",
    "TransferProgress",
    "format_bytes",
    "format_rate",
    "parse_duration",
    "parse_size",
]

#: Seconds a transfer must last before a progress bar is drawn.
SHOW_AFTER = 1.0

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """Bytes in a human size: ``500M``, ``2G``, ``1.5GiB`` (binary) or ``2GB``, ``10kB`` (decimal).

    A bare letter (``K M G T P``) or ``KiB``-style suffix means powers of 1024, as in docker and
    ``du -h``; ``KB``/``MB``/``GB`` mean powers of 1000; a plain number is bytes.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write e.g. 500M, 2G, 1.5GiB or 2GB")
    number, prefix, suffix = match.group(1), match.group(2).lower(), match.group(3).lower()
    if not prefix and suffix not in ("", "b"):
        raise ValueError(f"{text!r} is not a size: write e.g. 500M, 2G, 1.5GiB or 2GB")
    base = 1000 if suffix == "b" and prefix else 1024
    return int(float(number) * base ** _POWERS[prefix])


def parse_duration(text: str) -> timedelta:
    """A duration such as ``0s``, ``30m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30m, 12h, 7d or 2w (s/m/h/d/w)")
    return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def format_bytes(count: float) -> str:
    """``123.4 MB`` style (decimal units, like rich's transfer columns)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_rate(count: float, seconds: float) -> str:
    """Throughput as ``58.8 MB/s`` (``-`` when the time is too short to mean anything)."""
    if seconds <= 0.0005:
        return "- MB/s"
    return f"{format_bytes(count / seconds)}/s"


class TransferProgress:
    """A progress callback ``(nbytes)`` that draws a rich bar on stderr once a transfer lasts.

    The core calls it with each increment of bytes moved. Use it as a context manager around the
    transfer. A disabled instance (not a terminal, ``--quiet``) only counts.
    """

    def __init__(
        self,
        description: str,
        *,
        enabled: bool | None = None,
        total: int | None = None,
        stream: TextIO | None = None,
        show_after: float = SHOW_AFTER,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = 0
        self._description = description
        self._show_after = show_after
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> TransferProgress:
        self._started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __call__(self, nbytes: int) -> None:
        """Record ``nbytes`` more bytes moved; start drawing once the transfer is worth a bar."""
        self.done += nbytes
        if not self.enabled:
            return
        if self._progress is None:
            if time.monotonic() - self._started < self._show_after:
                return
            self._start_bar()
        assert self._progress is not None and self._task is not None
        self._progress.update(self._task, completed=self.done, total=self.total)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        console = Console(file=self._stream, stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=self.total, completed=self.done)

    def close(self) -> None:
        """Remove the bar (it is transient: the summary line replaces it)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
