"""A delayed rich progress bar for the CLI's transfers.

The bar only appears when stderr is a terminal and the transfer has lasted more than a moment
(:data:`SHOW_AFTER` seconds), so quick operations and CI logs get just the one-line summary.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

# rich is imported only when a bar is actually drawn (see _start_bar): most runs never draw one.
if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["SHOW_AFTER", "TransferProgress"]

#: Seconds a transfer must last before a progress bar is drawn.
SHOW_AFTER = 1.0


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
