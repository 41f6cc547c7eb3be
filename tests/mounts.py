"""A real tmpfs for tests that need a small or separate filesystem (full disks, mount points)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.skips import unavailable

__all__ = ["tmpfs"]


@contextlib.contextmanager
def tmpfs(point: Path, *options: str) -> Iterator[Path]:
    """A real tmpfs mounted on ``point`` (made here) until the end of the block, with mount's
    ``options`` (e.g. ``"size=1m"``). Root can mount here; elsewhere the test says why it cannot
    run (and fails under ``.ci/run``, see :func:`tests.skips.unavailable`)."""
    point.mkdir()
    flags = ["-o", ",".join(options)] if options else []
    done = subprocess.run(
        ["mount", "-t", "tmpfs", *flags, "tmpfs", str(point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}", fix="run the tests as root")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
