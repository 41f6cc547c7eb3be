"""A save's first walk, started in a child process as soon as the command line is read.

A save of a tree unchanged since its last save or restore here is, after the start-up, one walk
of the tree and one request (:func:`~.reuse.unchanged_tree`). The start-up (imports, the event
loop, opening the store) keeps one core busy and leaves the other idle: a child forked when the
command line is parsed walks the tree on that core meanwhile, and the save takes the walk
(:class:`Walked`) instead of walking. The tree is split into subtrees
(:func:`~remote_cache.archive.walk.split_tree`) dealt out in chunks through a pipe of tokens: the
child takes them one by one, and the save, once it wants the walk, takes those still left, so a
tree that outlasts the start-up is walked on both cores (a child that walked them all sends the
identity made, not its parts). Measured, an unchanged save after a restore beside the code before
(interleaved whole commands, 15-21 pairs): the Go-cache shape 127 -> 108 ms (its walk done before
the save wants it), a 322 MB node_modules 181 -> 143 ms (152 when the child walked it all alone).
A thread gains nothing (the walk and the imports both hold the GIL: 1.03-1.04x as long), and
``multiprocessing`` costs ~5 ms to import: the child is a plain ``fork`` writing to a pipe
(``marshal``: builtin, no import).

The walk is a snapshot taken at its time, its bound (:func:`~.evidence.clock_ns`) and the root's
identity read before it, as a walk in the save would be. The evidence the save compares it with
is read later, but it states facts about trees (this identity had that content; entries with
ctimes in that window were that restore), not about the time they are read, so the save reports
what the tree was when walked: the same as a walk done in the save just before a change landed.

Only a single-threaded process on Linux with two or more CPUs to use (:mod:`..cpus`) forks
(``fork`` copies no other thread, so none may hold a lock the child needs), and only where this
machine recorded a whole tree under the tag being saved (what the unchanged shortcut needs
first); any failure of the child means the save walks itself. The child writes nothing but its
pipe and ends with ``os._exit``; the save kills and reaps it once its parts are read or no longer
wanted (:meth:`PreWalk.close`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import marshal
import math
import os
import signal
import sys
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from msgspec import Struct

from ..archive.mounts import mounts_below
from ..archive.target import holds_restore_work
from ..archive.walk import (
    IdentityPart,
    Special,
    TreeIdentity,
    TreeSplit,
    TreeStats,
    identity_of,
    split_tree,
    tree_identity,
    walk_part,
)
from ..cpus import usable_cpus
from ..errors import RemoteCacheError, TreeChanged
from . import state
from .evidence import clock_ns, dir_id

__all__ = ["PreWalk", "Walked", "walk"]

log = logging.getLogger("remote_cache")

#: Signals a CLI stops on: blocked around the fork, a child's own default again.
_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: Bumped with any change to what the child sends: the parent reads only its own version.
_FORMAT = 3
#: Subtrees a split looks for (listing a level further while it has fewer: a save's tree is often
#: one directory, node_modules or _cacache, holding the rest): more would list whole trees ahead.
_PARTS = 8
#: The subtrees are dealt out in at most this many chunks (one token byte each).
_CHUNKS = 64
#: The pipe the child's parts go through holds this much (the most Linux lets any process ask).
_PIPE_BYTES = 1 << 20


class Walked(Struct, frozen=True):
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
    bound, root = clock_ns(), dir_id(path)
    stats = TreeStats()
    return _walked(path, tree_identity(path, stats), stats, root, bound)


def _walked(
    path: Path, identity: TreeIdentity, stats: TreeStats, root: tuple[int, int], bound: int
) -> Walked:
    mounts = mounts_below(path)  # (after the walk)
    return Walked(identity, root, None if mounts is None else tuple(mounts), tuple(stats.skipped), bound)


#: What the child answers: the identity it made from every part (it walked them all), with the
#: special files; or the parts it walked, when the save walked some too.
_Answer = tuple[TreeIdentity, list[Special]] | list[IdentityPart]


def _encode(split: TreeSplit, parts: list[IdentityPart]) -> bytes:
    if len(parts) == len(split.parts):  # all of them: made here, beside the save's start-up
        stats = TreeStats()
        identity = identity_of(split, parts, stats)
        return marshal.dumps(
            (
                _FORMAT,
                "whole",
                identity.digest,
                identity.ctimes.tobytes(),
                identity.top,
                identity.facts.tobytes(),
                _plain(stats.skipped),
            )
        )
    encoded = [
        (
            p.rel,
            p.names,
            p.inodes.tobytes(),
            p.ctimes.tobytes(),
            p.facts.tobytes(),
            _plain(p.skipped),
        )
        for p in parts
    ]
    return marshal.dumps((_FORMAT, "parts", encoded))


def _decode(data: bytes) -> _Answer | None:
    """The child's answer, or None for anything else (it failed, died half-way or sent nothing)."""
    try:
        fmt, kind, *fields = marshal.loads(data)
        if fmt != _FORMAT:
            return None
        if kind == "whole":
            digest, ctimes, top, facts, specials = fields
            identity = TreeIdentity(digest, array("q", ctimes), top, array("q", facts))
            return identity, _specials(specials)
        [parts] = fields
        return [
            IdentityPart(
                rel,
                names,
                array("Q", inodes),
                array("q", ctimes),
                array("q", facts),
                _specials(skipped),
            )
            for rel, names, inodes, ctimes, facts, skipped in parts
        ]
    except (EOFError, ValueError, TypeError):
        return None


def _plain(specials: list[Special]) -> list[tuple[str, str]]:
    return [(s.path, s.kind) for s in specials]


def _specials(plain: list[tuple[str, str]]) -> list[Special]:
    return [Special(path, kind) for path, kind in plain]


def _may_fork() -> bool:
    """Whether forking is safe here and can run beside the caller: Linux (a fork without exec
    elsewhere can break system libraries), one thread, two CPUs or more to use (a quota counts)."""
    return sys.platform == "linux" and threading.active_count() == 1 and usable_cpus() > 1


def _chunks(parts: list[str]) -> list[list[str]]:
    """``parts`` in at most _CHUNKS runs, in order."""
    size = max(1, math.ceil(len(parts) / _CHUNKS))
    return [parts[i : i + size] for i in range(0, len(parts), size)]


def _dealt(count: int) -> int:
    """A pipe holding one token byte per chunk, its writing end closed: its reading end."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, bytes(range(count)))  # (at most _CHUNKS bytes: the pipe holds them)
    finally:
        os.close(write_end)
    return read_end


def _walk_taken(
    split: TreeSplit, chunks: list[list[str]], tokens: int, go_on: Callable[[], bool]
) -> list[IdentityPart]:
    """Walk the chunks taken from the token pipe, one at a time, while there are some and
    ``go_on()`` says so (then closes ``tokens``)."""
    parts: list[IdentityPart] = []
    try:
        while go_on() and (token := os.read(tokens, 1)):
            parts += (walk_part(split, rel) for rel in chunks[token[0]])
    finally:
        os.close(tokens)
    return parts


def _child(split: TreeSplit, chunks: list[list[str]], tokens: int, out: int, parent: int) -> NoReturn:
    """The forked child: walk chunks while there are some and its parent lives, write their
    parts (nothing when a walk failed), exit."""
    try:
        # A signal to the process group kills the child outright (not a KeyboardInterrupt in the
        # parent's code); it holds none of the caller's streams, so none stays open after the
        # parent ends.
        for signum in _SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:  # (ignored by the caller's caller: stays so)
                signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            data = _encode(split, _walk_taken(split, chunks, tokens, lambda: os.getppid() == parent))
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


class _Started(Struct, frozen=True):
    """What the walk began with, in the parent: read before the fork."""

    bound: int
    root: tuple[int, int]
    split: TreeSplit
    chunks: list[list[str]]


class PreWalk:
    """The walk of ``path`` begun beside the start-up (:meth:`start`); :meth:`result` once.

    The two pipes' reading ends are handed over under a lock: to the worker thread that reads
    one (which closes it), or to :meth:`close`, never to both (a closed number can be reused)."""

    def __init__(self, path: Path, started: _Started, pid: int | None, tokens: int | None, parts: int | None):
        self.path = path
        self._started = started
        self._pid = pid
        self._fds = {"tokens": tokens, "parts": parts}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, path: Path, tag: str) -> PreWalk | None:
        """Begin walking ``path`` for a save under ``tag`` in a forked child; None where forking
        is not safe, or not worth it: unless this machine recorded a whole tree for ``tag``
        there, the save plans without walking first (and a fork costs the parent copied pages
        while the child lives: a save that packed node_modules took 1.015x as long with a child
        it killed); nor while a restore's work is in the directory (its swap may come after the
        walk: the save finishes or waits for it, then walks). A tree the split lists whole (a
        level at a time while it holds fewer than _PARTS directories) is walked here: listing it
        was the walk."""
        if not _may_fork():
            return None
        try:
            if not state.load(path).has_tree_for(tag) or holds_restore_work(path):
                return None
            bound, root, split = clock_ns(), dir_id(path), split_tree(path, _PARTS)
        except (OSError, RemoteCacheError):  # the save walks itself and says what is wrong
            return None
        started = _Started(bound, root, split, _chunks(split.parts))
        if not started.chunks:
            return cls(path, started, None, None, None)
        return cls._forked(path, started)

    @classmethod
    def _forked(cls, path: Path, started: _Started) -> PreWalk | None:
        # SIGINT and SIGTERM wait until each side is ready for them: a Ctrl-C during the fork
        # reaches the parent as a KeyboardInterrupt after it (not inside an at-fork hook, where it
        # was lost), once the PreWalk exists to kill the child.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (reads it: a signal here finds nothing made)
        fds: list[int] = []
        pre = None
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            fds.append(tokens := _dealt(len(started.chunks)))
            read_end, write_end = os.pipe()
            fds += (read_end, write_end)
            with contextlib.suppress(OSError):  # room for a small tree's parts: the child ends at once
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _child(started.split, started.chunks, tokens, write_end, parent)
            os.close(write_end)
            fds.remove(write_end)
            pre = cls(path, started, pid, tokens, read_end)
        except OSError:
            pass  # (no pipe or no fork: the save walks itself)
        finally:
            if pre is None:
                for fd in fds:
                    os.close(fd)
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            except BaseException:  # a signal held back during the fork
                if pre is not None:
                    pre.close()
                raise
        return pre

    async def result(self) -> Walked | None:
        """The walk: the chunks still left walked here, the child's parts read; None when the
        child failed or died, or this was already asked or closed (the caller walks itself
        then). Cancellable: the child is killed, and a walk here stops after its subtree."""
        import anyio.to_thread

        start = self._started
        stats = TreeStats()
        try:
            if not start.chunks and not self._closed:  # the split listed it all: that was the walk
                identity = identity_of(start.split, [], stats)
                return _walked(self.path, identity, stats, start.root, start.bound)
            # Abandoned on a cancel (then close() below kills the child, which ends the read).
            mine = await anyio.to_thread.run_sync(self._walk_share, abandon_on_cancel=True)
            if mine is None:
                return None  # (failed or closed: the save's own walk says what is wrong)
            theirs = _decode(await anyio.to_thread.run_sync(self._read_answer, abandon_on_cancel=True))
        finally:
            self.close()
        log.debug(
            "the save's first walk: %d of %d parts walked here, the rest by its child",
            len(mine),
            len(start.split.parts),
        )
        if theirs is None:
            return None
        if isinstance(theirs, list):
            try:
                identity = identity_of(start.split, [*theirs, *mine], stats)
            except KeyError:  # a part the child took but never sent
                return None
        elif mine:
            return None  # (cannot be: the child walked every part)
        else:
            identity, stats.skipped = theirs
        return _walked(self.path, identity, stats, start.root, start.bound)

    def _take(self, name: str) -> int | None:
        """Pipe ``name``'s reading end, if no one took it yet (then the taker closes it)."""
        with self._lock:
            fd, self._fds[name] = self._fds[name], None
            return fd

    def _walk_share(self) -> list[IdentityPart] | None:
        """(In a worker thread.) The chunks the child has not taken, walked; None when closed or failed."""
        tokens = self._take("tokens")
        if tokens is None:
            return None
        try:
            return _walk_taken(self._started.split, self._started.chunks, tokens, lambda: not self._closed)
        except (OSError, TreeChanged):  # the save walks itself, and says what is wrong
            return None

    def _read_answer(self) -> bytes:
        """(In a worker thread.) The child's answer; nothing when closed."""
        fd = self._take("parts")
        return b"" if fd is None else _read_all(fd)

    def close(self) -> None:
        """Kill the child if it still runs and reap it, stop a walk here after its subtree, and
        close what no thread took; nothing once done."""
        self._closed = True
        if self._pid is not None:
            # Ours until reaped, so the pid cannot name another process yet.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = None
        for name in self._fds:
            fd = self._take(name)
            if fd is not None:
                os.close(fd)
