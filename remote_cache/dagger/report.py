"""How the glue reports: one line per import or export, warnings that fail open, deadlines."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager

import anyio

from ..errors import RemoteCacheError

__all__ = ["deadline", "fail_open", "report"]


def deadline(seconds: int) -> AbstractContextManager[anyio.CancelScope]:
    """``anyio.fail_after(seconds)`` (TimeoutError when it expires); 0 or less means no limit."""
    return anyio.fail_after(seconds if seconds > 0 else None)


def report(line: str) -> None:
    """One line on the function's stderr (what ``dagger call`` shows)."""
    print(f"remote-cache: {line}", file=sys.stderr, flush=True)


def fail_open(what: str, exc: Exception, *, strict: bool, then: str) -> None:
    """Raise when ``strict``; else warn in one line (``what``, ``then``: what happens instead)."""
    if strict:
        raise RemoteCacheError(f"remote-cache: {what}: {exc}") from exc
    text = str(exc).strip()
    report(f"warning: {what}, {then}: {text.splitlines()[0] if text else type(exc).__name__}")
