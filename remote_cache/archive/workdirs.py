"""Work directories that say whether their run is alive, so the next run can clean up after a kill.

A restore stages next to (or inside) its target and a save spools packed layers in the temporary
directory; a run killed with SIGKILL, or by a CI runner's timeout, leaves them behind, hundreds of
megabytes each. Each work directory holds a ``lock`` file its process keeps an exclusive
``flock`` on: the kernel drops it when the process dies, however it dies, and PID reuse or PID
namespaces cannot fool it. :func:`sweep_dead` removes the work directories nobody holds (after
``recover`` has had its say, e.g. to finish an interrupted swap), holding the dead run's lock
meanwhile so that two sweepers never act on one, and only those this user made as work
directories are (0700, ours): a look-alike that came in some other way is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .swap import JOURNAL, discard_dir

__all__ = ["IN_PLACE_PREFIX", "WorkDir", "is_in_place_work", "sweep_dead"]

_LOCK = "lock"
#: Name prefix of a restore's work directory inside an in-place target: never part of the tree
#: (a save leaves such entries out, a restore never brings them in).
IN_PLACE_PREFIX = ".remote-cache-restore-"


def is_in_place_work(name: str) -> bool:
    """Whether ``name`` is named as a restore's work directory inside an in-place target."""
    return name.startswith(IN_PLACE_PREFIX)


class WorkDir:
    """A fresh private (0700) directory ``parent/PREFIX<random>``, locked while this object lives."""

    def __init__(self, parent: Path, prefix: str) -> None:
        #: Directories made for it (the missing ones above ``parent`` and ``parent``), deepest
        #: first: close() removes those left empty, so a failed restore leaves no new parents.
        self._made = [p for p in (parent, *parent.parents) if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self.path = parent / f"{prefix}{secrets.token_hex(6)}"
        self.path.mkdir(mode=0o700)
        self._fd: int | None = None
        try:
            # Locked before it gets its name: a sweeper never sees an unlocked ``lock`` of a live run.
            pending = self.path / f"{_LOCK}.new"
            self._fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.rename(pending, self.path / _LOCK)
        except BaseException:
            self.close()  # without its lock no sweep would ever claim it (a full disk, say)
            raise

    def close(self) -> None:
        """Remove the directory and release the lock; idempotent. The lock file goes last and is
        released whatever happens: a directory that cannot be removed whole (a mount inside it)
        keeps it, and the next run's sweep claims it. So does one holding the journal of a swap
        that failed half-way: the next run finishes it (:func:`~.swap.finish_swap`)."""
        try:
            if os.path.lexists(self.path / JOURNAL):
                return
            _discard(self.path)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        for made in self._made:
            try:
                os.rmdir(made)
            except OSError:
                break  # not empty (the restored target is there), or not ours to remove
        self._made = []


def _discard(path: Path) -> None:
    """Remove a work directory, its lock last: one killed half-way keeps it, and the next sweep
    claims it (a lock gone first, in listing order, left the rest to no one)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            if name != _LOCK:
                discard_dir(path / name)
    discard_dir(path)


#: A work directory whose lock is still unnamed this long after its last change belongs to a run
#: killed while making it (naming the lock takes microseconds), or to a removal killed between
#: the lock and the directory.
_NAMING_SECONDS = 60


def _claim(path: Path) -> int | None:
    """The locked ``lock`` (a minute old, ``lock.new`` or a new lock: :func:`_old_lock`) fd of
    ``path`` when it is a dead run's work directory (ours: 0700, our uid, with a lock nobody
    holds); else None (a live run, or not a work directory of ours)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            return None
        try:
            fd = os.open(path / _LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            # A run killed before naming its lock (it locked it first) -- or one being made now,
            # between creating ``lock.new`` and locking it: only an old directory is dead.
            if time.time() - st.st_mtime < _NAMING_SECONDS:
                return None
            fd = _old_lock(path)
    except OSError:
        return None  # not ours, or still being created: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _old_lock(path: Path) -> int:
    """The unnamed ``lock.new`` of an old work directory; with neither (a removal killed after the
    lock went), a new ``lock`` that only one sweeper can make."""
    try:
        return os.open(path / f"{_LOCK}.new", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path / _LOCK, flags, 0o600)


def sweep_dead(parent: Path, prefix: str, recover: Callable[[Path], None] | None = None) -> list[Path]:
    """Remove ``parent``'s work directories named ``PREFIX…`` whose run is dead; the removed paths.

    ``recover(path)`` runs first on each (it may finish what the dead run was doing). A directory
    that cannot be removed (permissions) is left alone: it is a leftover, not a failure of ours.
    """
    removed: list[Path] = []
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        return removed
    for name in names:
        path = parent / name
        fd = _claim(path)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                if recover is not None:
                    recover(path)
                _discard(path)
                removed.append(path)
        finally:
            os.close(fd)
    return removed
