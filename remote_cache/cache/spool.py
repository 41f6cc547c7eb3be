"""Spool files that one task writes (a download) while another reads them (the extraction).

A restore downloads each layer into a spool file and extracts it from that same file as it
grows, so extraction starts with the first bytes and never waits for a whole layer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import causes

__all__ = ["Aborted", "GrowingFile", "caused_by_abort"]


class GrowingFile:
    """A read-only file object over a spool file another task is still writing.

    ``read`` blocks (in the extraction thread) until data arrives, the writer finishes, or fails;
    EOF is only reported once the download completed and was verified, so an extractor can never
    "finish" a truncated or corrupted layer.
    """

    def __init__(self, path: Path) -> None:
        #: The spool file.
        self.path = path
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._cond = threading.Condition()
        self._written = 0
        self._read = 0
        self._done = False
        self._error: BaseException | None = None

    # writer side (event loop thread)
    def wrote(self, n: int) -> None:
        with self._cond:
            self._written += n
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    def outcome(self) -> BaseException | None:
        """Wait until the writer finished; its error, or None (a worker thread's call)."""
        with self._cond:
            self._cond.wait_for(lambda: self._done)
            return self._error

    # reader side (extraction thread)
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._cond:
            while True:
                if self._error is not None:
                    raise Aborted() from self._error
                available = self._written - self._read
                if available > 0 or self._done:
                    break
                self._cond.wait()
        if available == 0:
            return b""
        want = available if size is None or size < 0 else min(size, available)
        data = self._fh.read(want)
        self._read += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()


def caused_by_abort(exc: BaseException) -> bool:
    return any(isinstance(cause, Aborted) for cause in causes(exc))


class Aborted(Exception):
    """The download feeding an extraction failed; the real error is raised by the downloader."""
