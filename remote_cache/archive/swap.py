"""The swap of a staging directory into place, and removing trees whatever their modes.

A restore extracts into a private (0700) staging directory on the target's filesystem and swaps
it in only when everything was extracted and verified. Next to an ordinary target,
``renameat2(RENAME_EXCHANGE)`` exchanges the two atomically where Linux offers it
(:func:`replace_dir`). A target that cannot be renamed — a mount point, the current directory, a
directory whose parent is not writable — keeps its inode: its entries are swapped instead
(:func:`swap_entries`; also one overlayfs cannot rename, see :mod:`.target`), under a journal
written once the staging is complete, so that a run killed half-way is finished by the next
(:func:`finish_swap`): the target ends as the old tree or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import os_reason

log = logging.getLogger("remote_cache")

__all__ = [
    "JOURNAL",
    "discard_dir",
    "finish_swap",
    "owner_refused",
    "remove_tree_at",
    "replace_dir",
    "sibling_stem",
    "swap_entries",
]

#: Longest name (bytes) used as it is in the names of its siblings: NAME_MAX is 255, and a
#: sibling adds up to 27 (".", ".remote-cache-", 12 hex digits).
_STEM_BYTES = 200

#: The swap journal's name in a work directory: the entries to move out and in.
JOURNAL = "swap.json"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2


def discard_dir(path: Path) -> None:
    """Remove a staging (or old) directory, read-only subdirectories included; missing is fine."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    remove_tree_at(None, os.fspath(path))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where Linux offers it."""
    import ctypes  # here: most restores never exchange (a new target is renamed into place)

    try:
        # The process's own symbols include the C library's: no search for it (find_library runs
        # ldconfig in a subprocess).
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)


def sibling_stem(name: str) -> str:
    """``name`` as the part of a sibling's name that says whose it is (``.NAME.old-…``): itself,
    or when that would make the sibling's name too long, its start and a hash of the whole."""
    raw = os.fsencode(name)
    if len(raw) <= _STEM_BYTES:
        return name
    return os.fsdecode(raw[:64]) + "~" + hashlib.sha256(raw).hexdigest()[:16]


def replace_dir(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` directory at ``target``, replacing what was there.

    With an existing target the two are exchanged atomically (renameat2) where possible, else
    the target is renamed aside, staging renamed in, and on failure the old one put back. The
    old contents are then removed. A failure before the swap leaves ``target`` untouched.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; remove it or pick another path")
    old = target.parent / f".{sibling_stem(target.name)}.old-{secrets.token_hex(6)}"
    if _exchange(staging, target):
        _discard_old(staging, old)  # staging now holds the old contents
        return
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    _discard_old(old)


def owner_refused(exc: OSError) -> bool:
    """Whether a chown failed because root may not give that owner here: a user namespace whose
    map lacks the id (EINVAL), no CAP_CHOWN (EPERM)."""
    return exc.errno in (errno.EPERM, errno.EINVAL)


def _discard_old(path: Path, aside: Path | None = None) -> None:
    """Remove the replaced tree at ``path``; where that fails (a user other than root meeting
    another user's directory in it) the new tree is in place all the same: the old one is left
    there (moved to ``aside`` first, when given), named in a warning, not failing the restore."""
    try:
        discard_dir(path)
    except OSError as exc:
        if aside is not None:
            _move(path, aside)  # out of the work directory, which goes
        else:
            aside = path
        log.warning(
            "the new tree is in place, but the old one could not be removed (%s): it is left at %s; "
            "remove it as its owner",
            os_reason(exc),
            aside,
        )


def _make_writable_tree(pfd: int | None, base: str) -> None:
    """Give directories under ``base`` owner rwx, so that a non-root rmtree can remove read-only trees."""
    if os.geteuid() == 0:
        return
    # Best effort: a directory another user owns cannot be changed, but may not need to be
    # (0777); rmtree reports what really cannot be removed.
    try:
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
    except PermissionError:  # no read or search permission (mode 000): give it first
        try:
            os.chmod(base, 0o700, dir_fd=pfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except OSError:
            return
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o700)
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _make_writable_tree(fd, name)
    finally:
        os.close(fd)


def remove_tree_at(pfd: int | None, name: str) -> None:
    """Remove directory ``name`` under directory ``pfd`` (None: a path) and everything in it,
    read-only parts included."""
    _make_writable_tree(pfd, name)
    shutil.rmtree(name, dir_fd=pfd)


def swap_entries(
    staging: Path, target: Path, work: Path, *, keep: Callable[[str], bool], remove_old: bool = False
) -> None:
    """Replace ``target``'s entries by ``staging``'s, keeping ``target`` itself (its inode).

    ``work`` (on the target's filesystem) receives the journal and, in ``old/``, the entries moved
    out -- or with ``remove_old`` none: they are removed where they are (on overlayfs a directory
    from a lower layer cannot be renamed, and renaming a file copies its data up first); entries
    of ``target`` for which ``keep(name)`` is true (work directories) stay. ``target`` itself
    keeps its mode, owner and times (they were copied from ``staging``: an in-place target not
    ours to chmod failed the restore after the swap). See :func:`finish_swap`.
    """
    journal = {
        "staging": os.path.relpath(staging, work),
        "old": sorted(n for n in os.listdir(target) if not keep(n)),
        "new": sorted(os.listdir(staging)),
        "remove_old": remove_old,
    }
    (work / "old").mkdir(exist_ok=True)
    pending = work / f"{JOURNAL}.new"
    with open(pending, "w") as out:
        json.dump(journal, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(pending, work / JOURNAL)  # from here on the swap is finished, never undone
    finish_swap(work, target)


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` into another directory. A directory moves to another parent only if its
    mover may write it (its ``..`` changes), its owner too: one of ours without that bit (a Go
    module cache's 0555) gets it for the move (a kill right then leaves it writable)."""
    try:
        os.rename(src, dst)
    except PermissionError:
        st = os.lstat(src)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            raise
        os.chmod(src, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        os.rename(src, dst)
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def _there(path: Path) -> bool:
    """Whether ``path`` exists (not followed); any error but "no such entry" is raised:
    ``os.path.lexists`` says False for a directory it may not search, and a swap that took a
    staged tree it could not look into for an empty one moved nothing in and said it had."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def finish_swap(work: Path, target: Path) -> None:
    """Carry out (or finish, after a kill) the swap journaled in ``work``; every step is idempotent.

    An entry in both lists is moved out only while its new version is still in staging: once that
    has moved in, the name in ``target`` is the new one.
    """
    journal = json.loads((work / JOURNAL).read_text())
    staging, old = work / journal["staging"], work / "old"
    new_names = set(journal["new"])
    remove = journal.get("remove_old") is True  # (journals of earlier versions: False)
    for name in journal["old"]:
        if not _there(target / name) or _there(old / name):
            continue
        if name in new_names and not _there(staging / name):
            continue  # moved in already: this is the new one
        if not remove:
            try:
                _move(target / name, old / name)
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # overlayfs without redirect_dir: a directory from a lower layer cannot move
        discard_dir(target / name)  # a kill half-way leaves part of it: removed on the next run
    for name in journal["new"]:
        if _there(staging / name):
            _move(staging / name, target / name)
    os.unlink(work / JOURNAL)  # finished: the work directory may go (see WorkDir.close)
