"""What Linux's /proc says of a process: its children and its state (for tests of forked children)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["children", "process_state"]


def children(pid: int) -> list[int]:
    """The processes ``pid`` forked that have not been reaped (none once ``pid`` is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (``R``, ``S``, ``T`` stopped, ``Z``...), ``-`` once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "-"
