"""How the CLI shows a transfer's progress: a bar on a terminal, log lines in CI.

On a terminal, a rich bar (total, rate and time left when the total is known) appears once the
transfer has lasted :data:`SHOW_AFTER` seconds, and goes when it ends: the summary line replaces
it. Off a terminal (a CI log), a first line says what starts and how much, then a line every
``REMOTE_CACHE_PROGRESS_INTERVAL`` seconds (default 5; 0: none) gives bytes, total, percent and
rate, as actions/cache does. ``--quiet`` shows neither.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TextIO

from ..units import format_bytes, format_rate

# rich is imported only when a bar is actually drawn (see _start_bar): most runs never draw one.
if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["INTERVAL_ENV", "SHOW_AFTER", "TransferProgress"]

#: Seconds a transfer must last before a progress bar is drawn.
SHOW_AFTER = 1.0
#: The environment variable with the seconds between progress lines off a terminal.
INTERVAL_ENV = "REMOTE_CACHE_PROGRESS_INTERVAL"
_DEFAULT_INTERVAL = 5.0

Mode = Literal["bar", "lines", "off"]


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, _DEFAULT_INTERVAL)))
    except ValueError:
        return _DEFAULT_INTERVAL


class TransferProgress:
    """The core's :class:`~remote_cache.cache.progress.Progress`, shown as a bar or as lines.

    Use it as a context manager around the transfer; ``mode`` None picks a bar on a terminal and
    lines elsewhere.
    """

    def __init__(
        self,
        description: str,
        *,
        mode: Mode | None = None,
        stream: TextIO | None = None,
        show_after: float = SHOW_AFTER,
        interval: float | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.mode: Mode = mode if mode is not None else ("bar" if self._stream.isatty() else "lines")
        self.total: int | None = None
        self.done = 0
        self._description = description
        self._show_after = show_after
        self._interval = _interval() if interval is None else interval
        self._started = time.monotonic()
        self._next_line = 0.0
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

    def start(self, total: int | None) -> None:
        """The transfer begins, with ``total`` bytes to go (None when unknown)."""
        self.total = total
        self._started = time.monotonic()
        if self.mode == "lines" and self._interval > 0:
            amount = f", {format_bytes(total)} to go" if total is not None else ""
            self._line(f"{self._description}: started{amount}")
            self._next_line = self._started + self._interval

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more moved: update the bar, or print a line when one is due."""
        self.done += nbytes
        now = time.monotonic()
        if self.mode == "lines":
            if self._interval > 0 and self._next_line and now >= self._next_line:
                self._line(self._status(now))
                self._next_line = now + self._interval
            return
        if self.mode != "bar":
            return
        if self._progress is None:
            if now - self._started < self._show_after:
                return
            self._start_bar()
        assert self._progress is not None and self._task is not None
        self._progress.update(self._task, completed=self.done, total=self.total)

    def _status(self, now: float) -> str:
        rate = format_rate(self.done, now - self._started)
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            amount = f"{format_bytes(self.done)} of {format_bytes(self.total)} ({percent}%)"
        else:
            amount = format_bytes(self.done)
        return f"{self._description}: {amount}, {rate}"

    def _line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(file=self._stream, stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
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
