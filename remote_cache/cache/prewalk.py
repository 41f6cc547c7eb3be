"""A save's first walk, started in a child process as soon as the command line is read.

A save of a tree unchanged since its last save or restore here is, after the start-up, one walk
of the tree and one request (:func:`~.reuse.unchanged_tree`). The start-up (imports, the event
loop, opening the store) keeps one core busy and leaves the other idle: a child forked when the
command line is parsed walks the tree on that core meanwhile, and the save takes the child's
:class:`Walked` instead of walking. Measured (an unchanged save after a restore, interleaved
whole commands): the Go-cache shape 124 -> 106 ms, a 322 MB node_modules 179 -> 137 ms. A thread
gains nothing (the walk and the imports both hold the GIL: 1.03-1.04x as long), and
``multiprocessing`` costs ~5 ms to import, so the child is a plain ``fork`` writing its result to
a pipe (``marshal``: builtin, no import).

The child's walk is a snapshot taken at its time, with its bound (:func:`~.evidence.clock_ns`)
read before it, as a walk in the save would be. The evidence the save compares it with is read
later, but it states facts about trees (this identity had that content; entries with ctimes in
that window were that restore), not about the time they are read, so the save reports what the
tree was when walked: the same as a walk done in the save just before a change landed.

Only a single-threaded process on Linux with two or more CPUs forks (``fork`` copies no other
thread, so none may hold a lock the child needs); any failure of the child means the save walks
itself, as before. The child writes nothing but the pipe and ends with ``os._exit``; the save
kills and reaps it once its answer is read or no longer wanted (:meth:`PreWalk.close`).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import sys
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..archive.mounts import mounts_below
from ..archive.walk import Special, TreeIdentity, TreeStats, tree_identity
from .evidence import clock_ns, dir_id
from .state import state_path

__all__ = ["PreWalk", "Walked", "walk"]

#: Bumped with any change to what the child sends: the parent reads only its own version.
_FORMAT = 1


@dataclass(frozen=True)
class Walked:
    """A tree as the unchanged check needs it: its identity, its directory (device, inode) taken
    before the walk, what is mounted below it taken after (None: unknown) and the special files
    the walk left out; ``bound`` is :func:`~.evidence.clock_ns` read before the walk."""

    identity: TreeIdentity
    root: tuple[int, int]
    mounts: tuple[bytes, ...] | None
    skipped: tuple[Special, ...]
    bound: int


def walk(path: Path) -> Walked:
    """Walk ``path`` here (raises OSError, or TreeTooDeep)."""
    bound = clock_ns()
    root = dir_id(path)
    stats = TreeStats()
    identity = tree_identity(path, stats)
    mounts = mounts_below(path)
    return Walked(identity, root, None if mounts is None else tuple(mounts), tuple(stats.skipped), bound)


def _encode(walked: Walked) -> bytes:
    identity = walked.identity
    return marshal.dumps(
        (
            _FORMAT,
            identity.digest,
            identity.ctimes.tobytes(),
            identity.top,
            identity.facts.tobytes(),
            walked.root,
            walked.mounts,
            tuple((s.path, s.kind) for s in walked.skipped),
            walked.bound,
        )
    )


def _decode(data: bytes) -> Walked | None:
    """The child's walk, or None for anything else (it failed, died half-way or sent nothing)."""
    try:
        fmt, digest, ctimes, top, facts, root, mounts, skipped, bound = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if fmt != _FORMAT:
        return None
    identity = TreeIdentity(digest, array("q", ctimes), top, array("q", facts))
    return Walked(identity, root, mounts, tuple(Special(p, k) for p, k in skipped), bound)


def _may_fork() -> bool:
    """Whether forking is safe here and can run beside the caller: Linux (a fork without exec
    elsewhere can break system libraries), one thread, two CPUs or more."""
    return sys.platform == "linux" and threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


def _child(path: Path, out: int) -> NoReturn:
    """The forked child: walk, write the result (nothing when the walk failed), exit."""
    try:
        try:
            data = _encode(walk(path))
        except Exception:
            data = b""  # the save walks itself, and reports what is wrong
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
    finally:
        os._exit(0)  # no clean-up of the parent's: its buffers, atexit, work directories


def _read_all(fd: int) -> bytes:
    """Everything written to pipe ``fd`` until its writer ends (then closes ``fd``)."""
    parts = []
    try:
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


class PreWalk:
    """The walk of ``path`` running in a child process (:meth:`start`); :meth:`result` once."""

    def __init__(self, path: Path, pid: int, fd: int) -> None:
        self.path = path
        self._pid: int | None = pid
        self._fd: int | None = fd

    @classmethod
    def start(cls, path: Path) -> PreWalk | None:
        """Fork a child walking ``path``; None where forking is not safe, or not worth it: with no
        state file for ``path``, nothing on this machine can vouch for the tree, so no save
        walks before it plans (and a fork costs the parent ~6 ms of copied pages while the child
        lives, measured on node_modules)."""
        if not _may_fork():
            return None
        try:
            if not state_path(path).is_file():
                return None
        except OSError:
            return None
        read_end, write_end = os.pipe()  # (not inherited by anything the parent runs later)
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            return None
        if pid == 0:
            os.close(read_end)
            _child(path, write_end)
        os.close(write_end)
        return cls(path, pid, read_end)

    async def result(self) -> Walked | None:
        """The child's walk; None when it failed, died, or was already asked or closed (the
        caller walks itself then). Cancellable: the child is killed."""
        import anyio.to_thread

        if self._fd is None:
            return None
        fd, self._fd = self._fd, None  # the reading thread closes it
        try:
            # Abandoned on a cancel: close() below kills the child, which ends the read.
            data = await anyio.to_thread.run_sync(_read_all, fd, abandon_on_cancel=True)
        finally:
            self.close()
        return _decode(data)

    def close(self) -> None:
        """Kill the child if it still runs and reap it; nothing once done."""
        if self._pid is not None:
            # Ours until reaped, so the pid cannot name another process yet.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
