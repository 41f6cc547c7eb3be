"""Where a restore may write, decided before anything is downloaded.

A target that is a symlink to a directory is restored into what it points to (``~/.npm ->
/cache``). An existing directory that cannot be renamed — a mount point (a Docker ``-v`` volume,
a tmpfs), the current directory, or one whose parent is not writable — is restored *in place*:
staged inside itself and its entries swapped (:func:`~.swap.swap_entries`). Any other target is
staged next to itself and exchanged atomically -- or, where renaming it fails with EXDEV (a
directory from a lower layer of an overlayfs: a cache baked into a container's image), its
entries are swapped as in place. What cannot work is refused with the reason: a file, a
directory we cannot write, a non-empty current directory unless asked (``force``), a directory
with something mounted inside it (removing the old tree would empty the mount), and for a user
other than root an in-place target with a top-level entry it cannot move out. Leftovers of runs
that died are cleaned first (:mod:`.workdirs`), finishing a journaled swap; a swap that cannot be
finished (or another user's, which cannot be looked into) is UnfinishedSwap for every restore
and save of the target until one can.

Restores into one target at once: each holds an exclusive ``flock`` on the target directory
while it cleans leftovers, makes an in-place work directory and swaps (:func:`locked`), so two
swaps never interleave, and a target holding another run's in-place work directory has its
entries swapped instead of being exchanged whole (which would discard that run's work). The
target ends as one restore's tree or the other's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from msgspec import Struct

from ..errors import UnfinishedSwap, UnsuitableTarget, os_reason
from .mounts import filesystem_type, is_mount_point, mounts_below
from .swap import JOURNAL, discard_dir, finish_swap, owner_refused, replace_dir, sibling_stem, swap_entries
from .workdirs import IN_PLACE_PREFIX, WorkDir, is_in_place_work, sweep_dead

__all__ = [
    "IN_PLACE_PREFIX",
    "RestoreTarget",
    "clean_leftovers",
    "finish_dead_swaps",
    "holds_restore_work",
    "locked",
    "nearest_existing",
    "plan_target",
    "swap_in",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class RestoreTarget(Struct, frozen=True):
    """Where to restore: ``path`` (symlinks resolved), and where the work directory goes."""

    path: Path
    in_place: bool

    @property
    def work_parent(self) -> Path:
        """The directory that holds the work directory: the target itself, or its parent."""
        return self.path if self.in_place else self.path.parent

    @property
    def work_prefix(self) -> str:
        return IN_PLACE_PREFIX if self.in_place else _beside_prefix(self.path)


def _beside_prefix(path: Path) -> str:
    """Name prefix of a restore's work directory next to (not in) the target ``path``."""
    return f".{sibling_stem(path.name)}.remote-cache-"


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _cwd() -> Path | None:
    """The resolved current directory; None when it has been removed (its path is gone)."""
    try:
        return Path(os.getcwd()).resolve()
    except FileNotFoundError:
        return None


def plan_target(path: Path, *, force: bool = False) -> RestoreTarget:
    """How ``path`` will be restored into; UnsuitableTarget (with the fix) when it cannot be."""
    given = Path(path)
    cwd = _cwd()
    if cwd is None and not given.is_absolute():
        raise UnsuitableTarget(
            f"cannot restore into {given}: the current directory no longer exists (another process "
            "removed or replaced it, e.g. a restore of the same target); change into it again"
        )
    resolved = Path(os.path.realpath(given))
    try:
        os.stat(resolved)  # realpath leaves a looping link (the target's or a parent's) unresolved
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            loop = f"{given} leads through symlinks that loop: point it at a directory"
            raise UnsuitableTarget(loop) from None
    if resolved.exists() and not resolved.is_dir():
        raise UnsuitableTarget(f"{given} is not a directory: remove it or restore somewhere else")
    if not resolved.exists():
        ancestor = nearest_existing(resolved.parent)
        if not ancestor.is_dir():
            raise UnsuitableTarget(f"cannot create {given}: {ancestor} is not a directory")
        if not _writable(ancestor):
            raise UnsuitableTarget(f"cannot create {given}: {ancestor} is not writable")
        return RestoreTarget(resolved, in_place=False)
    is_cwd = cwd is not None and resolved == cwd
    mounted = mounts_below(resolved)
    if mounted:  # removing the old tree would empty what is mounted there, not unmount it
        raise UnsuitableTarget(
            f"cannot restore into {given}: {os.fsdecode(mounted[0])} is mounted inside it, and a "
            "restore replaces everything in the directory; unmount it, or restore somewhere else"
        )
    in_place = is_cwd or is_mount_point(resolved) or not _writable(resolved.parent)
    if not _writable(resolved) and (in_place or not os.listdir(resolved)):
        raise UnsuitableTarget(f"cannot write into {given}: check its permissions")
    if in_place:
        _check_movable(resolved)
    if is_cwd and not force and any(not is_in_place_work(n) for n in os.listdir(resolved)):
        raise UnsuitableTarget(
            f"{given} is the current directory and not empty: a restore replaces everything in it; "
            "pass --force to do that"
        )
    return RestoreTarget(resolved, in_place=in_place)


@contextlib.contextmanager
def locked(target: RestoreTarget, *, wait: bool = True) -> Iterator[None]:
    """Hold the target directory's exclusive lock (nothing to hold while it does not exist);
    ``wait=False``: BlockingIOError at once when another process holds it.

    The lock is on the directory found at the path *after* locking: a restore that exchanged it
    meanwhile put a new directory there, which is locked instead.
    """
    while True:
        try:
            fd = os.open(target.path, _DIR_FLAGS)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.stat(target.path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def clean_leftovers(target: RestoreTarget) -> list[Path]:
    """Remove the work directories of dead runs at this target (finishing their journaled swaps)."""
    with locked(target):
        removed = sweep_dead(target.path.parent, _beside_prefix(target.path), recover=_finisher(target))
        if target.path.is_dir():
            removed += _sweep_in_place(target)
    return removed


def finish_dead_swaps(path: Path) -> Literal["none", "finished", "busy"]:
    """Finish, at the directory ``path``, the swaps of restores killed in place (their entries
    half moved), as the next restore would: a save then reads one tree, not a mix of two.

    Only where a restore's work is (the directory's lock is left alone otherwise: ``flock DIR
    CMD`` is a common way to guard a cache): "none" when there is none, "finished" once the dead
    ones are done, "busy", having done nothing, while another process holds that lock (a live
    restore swapping): try again.
    """
    if not holds_restore_work(path):
        return "none"
    target = RestoreTarget(Path(os.path.realpath(path)), in_place=True)
    try:
        with locked(target, wait=False):
            _sweep_in_place(target)
    except BlockingIOError:
        return "busy"
    return "finished"


def _sweep_in_place(target: RestoreTarget) -> list[Path]:
    """Remove the dead runs' work directories inside the target, finishing their swaps first
    (the caller holds the target's lock). Another user's cannot be looked into: its run may have
    died half-way through a swap, leaving a mix only that user can finish, so UnfinishedSwap."""
    removed = sweep_dead(target.path, IN_PLACE_PREFIX, recover=_finisher(target))
    for name in os.listdir(target.path):
        if not is_in_place_work(name):
            continue
        try:
            if (owner := os.lstat(target.path / name).st_uid) == os.geteuid():
                continue
            os.lstat(target.path / name / JOURNAL)
        except FileNotFoundError:
            continue  # gone (its run ended), or not swapping: it downloads, or died before
        except OSError:
            pass  # cannot be looked into: it may be swapping
        raise UnfinishedSwap(
            f"{target.path} holds the work of a restore by another user (uid {owner}, {name}) that "
            "may be half-way through replacing its entries; let it finish, or run the restore "
            "again as that user"
        )
    return removed


def swap_in(
    target: RestoreTarget,
    staging: Path,
    work: Path,
    then: Callable[[bool], object] | None = None,
    *,
    keep_root: bool = True,
    root_mode: int | None = None,
) -> None:
    """Put the finished ``staging`` tree at the target: its entries swapped in (in place, while
    another run works inside the target, or where overlayfs cannot rename the directory: it
    stays as it is), else the directory
    exchanged whole and, with ``keep_root``, given the mode (and, as root, owner) of the one it
    replaces — an entry holds no member for its root: like ``tar -x`` into it, the directory stays
    as it was; a new one is as ``mkdir`` makes it. Then call ``then(whole)`` under the same lock
    (what the swap must be followed by before another run's swap): ``whole`` when the staging
    directory itself became the target, not its entries moved into the directory there.
    ``root_mode``: the mode the staged root gets once exchanged in (one it could not move with)."""
    for name in os.listdir(staging):
        if is_in_place_work(name):  # an archive's copy of a work directory is no tree
            discard_dir(staging / name)
    with locked(target):
        # A swap another run journaled and could not finish goes first: finished after ours, it
        # would put part of its tree over ours.
        if target.path.is_dir():
            _sweep_in_place(target)
        whole = False
        if target.in_place:
            _swap_entries(staging, target, work, remove_old=_on_overlay(target.path))
        elif holds_restore_work(target.path):
            _swap_into_unmovable(staging, target, remove_old=_on_overlay(target.path))
        else:
            whole = _exchange_whole(staging, target, keep_root=keep_root, root_mode=root_mode)
        if then is not None:
            then(whole)


def _exchange_whole(staging: Path, target: RestoreTarget, *, keep_root: bool, root_mode: int | None) -> bool:
    """Exchange the target directory for ``staging`` and give it, with ``keep_root``, the
    replaced one's mode and owner, else ``root_mode`` if any; where overlayfs cannot rename the
    directory (EXDEV), swap its entries instead. Whether the directory was exchanged whole."""
    # Read under the lock, just before the exchange: what the directory is now.
    kept = _stat_or_none(target.path) if keep_root else None
    try:
        replace_dir(staging, target.path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _swap_into_unmovable(staging, target, remove_old=True)  # (the directory stays)
        return False
    if kept is not None:
        _give_root(target.path, kept)
    elif root_mode is not None:
        os.chmod(target.path, root_mode)
    return True


def _give_root(path: Path, kept: os.stat_result) -> None:
    """Give directory ``path`` the mode and, as root, the owner of ``kept``. Root without
    CAP_CHOWN, or in a user namespace without that id: the directory stays ours (as for any other
    user), its mode still given."""
    if os.geteuid() == 0:
        try:
            os.chown(path, kept.st_uid, kept.st_gid)
        except OSError as exc:
            if not owner_refused(exc):
                raise
    os.chmod(path, stat.S_IMODE(kept.st_mode))


def _on_overlay(path: Path) -> bool:
    """Whether ``path`` is on overlayfs, where old entries are removed where they are: a directory
    from a lower layer cannot be moved, and moving a file would copy its data up first."""
    return filesystem_type(path) == "overlay"


def _swap_into_unmovable(staging: Path, target: RestoreTarget, *, remove_old: bool) -> None:
    """Swap ``staging``'s entries into a target directory that is not to be exchanged whole:
    one overlayfs without ``redirect_dir`` (Docker's overlay2) cannot rename (EXDEV: a directory
    from a lower layer, a cache baked into a container's image), or one holding another run's
    work. Staging moves into an in-place work directory first, where the journal goes (where a
    save and the next restore look), as for any in-place swap."""
    work = WorkDir(target.path, IN_PLACE_PREFIX)
    try:
        os.rename(staging, work.path / "new")
        _swap_entries(work.path / "new", target, work.path, remove_old=remove_old)
    finally:
        work.close()  # (kept while its journal says the swap is unfinished)


def _swap_entries(staging: Path, target: RestoreTarget, work: Path, *, remove_old: bool) -> None:
    """The entry swap, after the checks that can refuse it with nothing changed yet."""
    if remove_old:
        _check_removable(target.path)
    else:
        _check_movable(target.path)
    try:
        swap_entries(staging, target.path, work, keep=is_in_place_work, remove_old=remove_old)
    except OSError as exc:
        if not os.path.lexists(work / JOURNAL):
            raise  # before the journal: nothing changed
        # Never undone: the next run finishes it once the cause is gone (see _finisher).
        raise _unfinished(target, exc) from exc


def _check_removable(path: Path) -> None:
    """As a user other than root, refuse (UnsuitableTarget) a target whose entries are to be
    removed where they are with a directory below it neither ours (to make writable) nor
    writable: the swap would fail half-way. (Work directories are no entries; what vanishes or
    cannot be read meanwhile is left to the removal itself.)"""
    if os.geteuid() == 0:
        return
    for parent, dirs, _ in os.walk(path):
        if parent == os.fspath(path):
            dirs[:] = [d for d in dirs if not is_in_place_work(d)]
        for name in dirs:
            d = Path(parent, name)
            with contextlib.suppress(FileNotFoundError):
                _refuse_unless(path, d, os.lstat(d), os.R_OK | os.W_OK | os.X_OK)


def _check_movable(path: Path) -> None:
    """As a user other than root, refuse (UnsuitableTarget) a target whose top-level entries an
    in-place swap cannot move out: a directory not writable (rename to another parent updates
    its ``..``), or one of another user's entries in a sticky directory not ours."""
    if os.geteuid() == 0:
        return
    top = os.stat(path)
    for name in os.listdir(path):
        entry = path / name
        if is_in_place_work(name):
            continue
        st = os.lstat(entry)
        if top.st_mode & stat.S_ISVTX and os.geteuid() not in (st.st_uid, top.st_uid):
            _refuse(path, entry, st, "is another user's, in a sticky directory not this user's")
        _refuse_unless(path, entry, st, os.W_OK)


def _refuse_unless(target: Path, d: Path, st: os.stat_result, mode: int) -> None:
    """Refuse unless ``d`` (``st`` its lstat) is no directory (a symlink to one never matters),
    or is ours, or allows ``mode``."""
    if stat.S_ISDIR(st.st_mode) and st.st_uid != os.geteuid() and not os.access(d, mode):
        _refuse(target, d, st, "is not writable by this user")


def _refuse(target: Path, entry: Path, st: os.stat_result, why: str) -> None:
    raise UnsuitableTarget(
        f"cannot restore into {target} as uid {os.geteuid()}: {entry} (owner uid {st.st_uid}) {why}, "
        "and a restore replaces everything in the directory; give it to this user, or restore "
        "somewhere else"
    )


def _unfinished(target: RestoreTarget, exc: OSError) -> UnfinishedSwap:
    reason = os_reason(exc)
    if exc.filename is not None:
        reason += f": {exc.filename}"
    return UnfinishedSwap(
        f"a restore into {target.path} stopped half-way through replacing its entries ({reason}); "
        "it holds part of the old tree and part of the new one. Fix that and run the restore again "
        f"(it finishes the replacement first), or remove {target.path}"
    )


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # none there yet
        return None


def holds_restore_work(path: Path) -> bool:
    """Whether directory ``path`` holds an in-place restore's work (a live or a dead one's)."""
    try:
        return any(is_in_place_work(name) for name in os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return False


def _finisher(target: RestoreTarget) -> Callable[[Path], None]:
    def finish(work: Path) -> None:
        if (work / JOURNAL).exists():
            try:
                finish_swap(work, target.path)
            except OSError as exc:  # not swallowed by the sweep: the target is a mix until then
                raise _unfinished(target, exc) from exc

    return finish
