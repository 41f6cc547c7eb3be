"""Run part of a test as another user: what root may do, ``nobody`` may not (read a 000 file)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["as_nobody_in", "give_to_nobody", "reachable_dir"]


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A scratch directory uid 65534 can reach (pytest's tmp_path is under root's 0700
    directory), removed after the block; the test is skipped where it cannot become that user."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    base = Path(tempfile.mkdtemp(prefix="rc-nobody-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody_in(cwd: Path, action: Callable[[], None]) -> str:
    """Run ``action`` in a forked child that works in ``cwd`` as uid/gid 65534; its error, or ''."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        os.close(read)
        try:
            os.chdir(cwd)  # before dropping privileges: the test's tmp_path is root's 0700
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            action()
        except BaseException as exc:
            os.write(write, f"{type(exc).__name__}: {exc}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        error = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if not error and status:  # killed, or left without a word: not a clean run either
        error = f"the child ended with wait status {status}"
    return error


def give_to_nobody(tree: Path, *dirs: Path) -> None:
    """Make uid/gid 65534 the owner of ``tree`` and everything in it, and of each of ``dirs``."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), 65534, 65534, follow_symlinks=False)
    for path in dirs:
        os.chown(path, 65534, 65534)
