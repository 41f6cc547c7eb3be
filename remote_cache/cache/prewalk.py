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

Only a single-threaded process on Linux with two or more CPUs forks (``fork`` copies no other
thread, so none may hold a lock the child needs), and only where this machine recorded a whole
tree under the tag being saved (what the unchanged shortcut needs first); any failure of the
child means the save walks itself. The child writes nothing but its pipe and ends with
``os._exit``; the save kills and reaps it once its parts are read or no longer wanted
(:meth:`PreWalk.close`).
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import math
import os
import signal
import sys
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..archive.mounts import mounts_below
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
from ..errors import RemoteCacheError
from . import state
from .evidence import clock_ns, dir_id

__all__ = ["PreWalk", "Walked", "walk"]

#: Bumped with any change to what the child sends: the parent reads only its own version.
_FORMAT = 3
#: Subtrees a split looks for (listing a level further while it has fewer: a save's tree is often
#: one directory, node_modules or _cacache, holding the rest): more would list whole trees ahead.
_PARTS = 8
#: The subtrees are dealt out in at most this many chunks (one token byte each).
_CHUNKS = 64
#: The pipe the child's parts go through holds this much (the most Linux lets any process ask).
_PIPE_BYTES = 1 << 20


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
        specials = [(s.path, s.kind) for s in stats.skipped]
        return marshal.dumps(
            (
                _FORMAT,
                "whole",
                identity.digest,
                identity.ctimes.tobytes(),
                identity.top,
                identity.facts.tobytes(),
                specials,
            )
        )
    encoded = [
        (
            p.rel,
            p.names,
            p.inodes.tobytes(),
            p.ctimes.tobytes(),
            p.facts.tobytes(),
            [(s.path, s.kind) for s in p.skipped],
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
            return identity, [Special(path, what) for path, what in specials]
        [parts] = fields
        return [
            IdentityPart(
                rel,
                names,
                array("Q", inodes),
                array("q", ctimes),
                array("q", facts),
                [Special(path, what) for path, what in skipped],
            )
            for rel, names, inodes, ctimes, facts, skipped in parts
        ]
    except (EOFError, ValueError, TypeError):
        return None


def _may_fork() -> bool:
    """Whether forking is safe here and can run beside the caller: Linux (a fork without exec
    elsewhere can break system libraries), one thread, two CPUs or more."""
    return sys.platform == "linux" and threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


def _chunks(parts: list[str]) -> list[list[str]]:
    """``parts`` in at most _CHUNKS runs, in order."""
    size = max(1, math.ceil(len(parts) / _CHUNKS))
    return [parts[i : i + size] for i in range(0, len(parts), size)]


def _taken(tokens: int) -> Iterator[int]:
    """The chunks this process takes from the token pipe, one at a time, until none is left."""
    while token := os.read(tokens, 1):
        yield token[0]


def _walk_taken(split: TreeSplit, chunks: list[list[str]], tokens: int) -> list[IdentityPart]:
    """Walk the chunks taken from ``tokens`` until none is left (then closes ``tokens``)."""
    try:
        return [walk_part(split, rel) for chunk in _taken(tokens) for rel in chunks[chunk]]
    finally:
        os.close(tokens)


def _child(split: TreeSplit, chunks: list[list[str]], tokens: int, out: int) -> NoReturn:
    """The forked child: walk chunks while there are some, write their parts (nothing when a
    walk failed), exit."""
    try:
        try:
            data = _encode(split, _walk_taken(split, chunks, tokens))
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


def _dealt(count: int) -> int:
    """A pipe holding one token byte per chunk, its writing end closed: its reading end."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, bytes(range(count)))  # (at most _CHUNKS bytes: the pipe holds them)
    finally:
        os.close(write_end)
    return read_end


@dataclass
class _Started:
    """What the walk began with, in the parent: read before the fork."""

    bound: int
    root: tuple[int, int]
    split: TreeSplit
    chunks: list[list[str]]


class PreWalk:
    """The walk of ``path`` begun in a child process (:meth:`start`); :meth:`result` once."""

    def __init__(self, path: Path, started: _Started, pid: int, tokens: int, parts: int) -> None:
        self.path = path
        self._started = started
        self._pid: int | None = pid
        self._tokens: int | None = tokens
        self._parts: int | None = parts

    @classmethod
    def start(cls, path: Path, tag: str) -> PreWalk | None:
        """Fork a child walking ``path`` for a save under ``tag``; None where forking is not safe,
        or not worth it: unless this machine recorded a whole tree for ``tag`` there, the save
        plans without walking first (and a fork costs the parent copied pages while the child
        lives: a save that packed node_modules took 1.015x as long with a child it killed)."""
        if not _may_fork():
            return None
        try:
            if not state.load(path).has_tree_for(tag):
                return None
            bound, root = clock_ns(), dir_id(path)
            split = split_tree(path, _PARTS)
        except (OSError, RemoteCacheError):  # the save walks itself and says what is wrong
            return None
        started = _Started(bound, root, split, _chunks(split.parts))
        tokens = _dealt(len(started.chunks))
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # room for a small tree's parts: the child ends at once
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        try:
            pid = os.fork()
        except OSError:
            for fd in (tokens, read_end, write_end):
                os.close(fd)
            return None
        if pid == 0:
            os.close(read_end)
            _child(split, started.chunks, tokens, write_end)
        os.close(write_end)
        return cls(path, started, pid, tokens, read_end)

    async def result(self) -> Walked | None:
        """The walk: the chunks still left walked here, the child's parts read; None when the
        child failed or died, or this was already asked or closed (the caller walks itself
        then). Cancellable: the child is killed (a walk here ends in its own time)."""
        import anyio.to_thread

        if self._tokens is None or self._parts is None:
            return None
        start = self._started
        tokens, self._tokens = self._tokens, None  # each thread closes the pipe it reads
        try:
            try:
                # Abandoned on a cancel (then close() below kills the child, which ends the read).
                mine = await anyio.to_thread.run_sync(
                    _walk_taken, start.split, start.chunks, tokens, abandon_on_cancel=True
                )
            except OSError:
                mine = None  # (the save's own walk says what is wrong)
            parts, self._parts = self._parts, None
            theirs = _decode(await anyio.to_thread.run_sync(_read_all, parts, abandon_on_cancel=True))
        finally:
            self.close()
        if mine is None or theirs is None:
            return None
        stats = TreeStats()
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

    def close(self) -> None:
        """Kill the child if it still runs and reap it; nothing once done."""
        if self._pid is not None:
            # Ours until reaped, so the pid cannot name another process yet.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = None
        for fd in (self._tokens, self._parts):
            if fd is not None:
                os.close(fd)
        self._tokens = self._parts = None
