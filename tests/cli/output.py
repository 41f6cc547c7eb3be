"""Running the console script and reading what it printed (shared by the CLI tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CLI", "Run", "json_line", "no_traceback"]

CLI = Path(sys.executable).parent / "remote-cache"

Run = Callable[..., subprocess.CompletedProcess[str]]


def json_line(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got {proc.stdout!r} ({proc.stderr!r})"
    data: dict[str, Any] = json.loads(lines[0])
    return data


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
