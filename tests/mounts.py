"""Real mounts for tests: a tmpfs (a small or separate filesystem: full disks, mount points), a bind mount."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.skips import unavailable

__all__ = ["bind", "tmpfs"]


@contextlib.contextmanager
def tmpfs(point: Path, *options: str) -> Iterator[Path]:
    """A real tmpfs mounted on ``point`` (made here) until the end of the block, with mount's
    ``options`` (e.g. ``"size=1m"``). Root can mount here; elsewhere the test says why it cannot
    run (and fails under ``.ci/run``, see :func:`tests.skips.unavailable`)."""
    point.mkdir()
    flags = ["-o", ",".join(options)] if options else []
    with _mounted(["-t", "tmpfs", *flags, "tmpfs"], point, "a tmpfs"):
        yield point


@contextlib.contextmanager
def bind(source: Path, point: Path) -> Iterator[Path]:
    """``source`` bind-mounted on ``point`` (an existing directory) until the end of the block."""
    with _mounted(["--bind", str(source)], point, "a bind mount"):
        yield point


@contextlib.contextmanager
def _mounted(args: list[str], point: Path, what: str) -> Iterator[None]:
    done = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"cannot mount {what} here: {done.stderr.strip()}", fix="run the tests as root")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
