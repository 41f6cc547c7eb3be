"""Real mounts for tests: a tmpfs (a small or separate filesystem: full disks, mount points), a bind
mount, an overlayfs (a container's root filesystem), an ext4 keeping whole-second times, a FUSE
filesystem with names longer than 255 bytes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.skips import unavailable

__all__ = ["bind", "ext4", "long_names", "overlay", "overlay_upper", "tmpfs", "whole_seconds"]


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
def overlay(lower: Path, point: Path, *upper_options: str) -> Iterator[Path]:
    """An overlayfs on ``point`` (made here) over the read-only ``lower`` directory, as a
    container sees its image, with its upper and work directories beside ``point`` (on a tmpfs
    mounted with ``upper_options`` when given, e.g. ``"nr_inodes=100"``); mounted with the
    kernel's defaults (no ``redirect_dir`` unless the kernel was built with it, as Docker's
    overlay2 mounts it: a directory from ``lower`` then cannot be renamed, EXDEV)."""
    with contextlib.ExitStack() as stack:
        layers = overlay_upper(point)
        if upper_options:
            stack.enter_context(tmpfs(layers, *upper_options))
        else:
            layers.mkdir()
        upper, work = layers / "upper", layers / "work"
        for directory in (point, upper, work):
            directory.mkdir()
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        with _mounted(["-t", "overlay", "-o", options, "overlay"], point, "an overlayfs"):
            yield point


def overlay_upper(point: Path) -> Path:
    """The directory holding the upper and work directories of :func:`overlay` at ``point``."""
    return point.with_name(point.name + ".layers")


@contextlib.contextmanager
def ext4(point: Path, inode_size: int = 256, size: int = 16 << 20) -> Iterator[Path]:
    """An ext4 (a disk's filesystem, whatever the tests' own directory is on), ``size`` bytes in a
    file beside ``point`` (made here), loop-mounted there until the end of the block."""
    image = point.with_name(point.name + ".img")
    with open(image, "wb") as out:
        out.truncate(size)
    made = ["mkfs.ext4", "-q", "-F", "-I", str(inode_size), str(image)]
    done = subprocess.run(made, capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"cannot make an ext4 image here: {done.stderr.strip()}", fix="install e2fsprogs")
    point.mkdir()
    with _mounted(["-o", "loop", str(image)], point, "a loop device"):
        yield point


def whole_seconds(point: Path) -> contextlib.AbstractContextManager[Path]:
    """An :func:`ext4` with 128-byte inodes: no room for nanoseconds, whole-second ctimes and mtimes."""
    return ext4(point, inode_size=128)


@contextlib.contextmanager
def long_names(point: Path, depth: int) -> Iterator[Path]:
    """The FUSE filesystem of ``tests/fuse_long_names.py`` (``depth`` directories named ``d`` * 200,
    the deepest holding a file named ``n`` * 500) mounted on ``point`` (made here) until the end of
    the block; it needs ``/dev/fuse``, root, libfuse2 and fusepy."""
    point.mkdir()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fuse_long_names.py")), str(point), str(depth)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(point):
            if server.poll() is not None or time.monotonic() > deadline:
                why = (
                    server.stderr.read()
                    if server.poll() is not None and server.stderr
                    else "no mount in 10 s"
                )
                unavailable(
                    f"cannot mount a FUSE filesystem here: {why.strip()}", fix="run .ci/setup as root"
                )
            time.sleep(0.02)
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def _mounted(args: list[str], point: Path, what: str) -> Iterator[None]:
    done = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"cannot mount {what} here: {done.stderr.strip()}", fix="run the tests as root")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
