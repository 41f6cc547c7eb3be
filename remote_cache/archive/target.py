"""Where a restore may write, decided before anything is downloaded.

A target that is a symlink to a directory is restored into what it points to (``~/.npm ->
/cache``). An existing directory that cannot be renamed — a mount point (a Docker ``-v`` volume,
a tmpfs), the current directory, or one whose parent is not writable — is restored *in place*:
staged inside itself and its entries swapped (:func:`~.swap.swap_entries`). Any other target is
staged next to itself and exchanged atomically. What cannot work is refused with the reason: a
file, a directory we cannot write, a non-empty current directory unless asked (``force``).
Leftovers of runs that died are cleaned first (:mod:`.workdirs`), finishing a journaled swap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsuitableTarget
from .swap import JOURNAL, finish_swap
from .workdirs import sweep_dead

__all__ = ["IN_PLACE_PREFIX", "RestoreTarget", "clean_leftovers", "plan_target"]

#: Name prefix of a work directory inside an in-place target (kept out of the target's entries).
IN_PLACE_PREFIX = ".remote-cache-restore-"


@dataclass(frozen=True)
class RestoreTarget:
    """Where to restore: ``path`` (symlinks resolved), and where the work directory goes."""

    path: Path
    in_place: bool

    @property
    def work_parent(self) -> Path:
        """The directory that holds the work directory: the target itself, or its parent."""
        return self.path if self.in_place else self.path.parent

    @property
    def work_prefix(self) -> str:
        return IN_PLACE_PREFIX if self.in_place else f".{self.path.name}.remote-cache-"


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def plan_target(path: Path, *, force: bool = False) -> RestoreTarget:
    """How ``path`` will be restored into; UnsuitableTarget (with the fix) when it cannot be."""
    given = Path(path)
    resolved = Path(os.path.realpath(given))
    if resolved.exists() and not resolved.is_dir():
        raise UnsuitableTarget(f"{given} is not a directory: remove it or restore somewhere else")
    if not resolved.exists():
        ancestor = _existing_ancestor(resolved)
        if not ancestor.is_dir():
            raise UnsuitableTarget(f"cannot create {given}: {ancestor} is not a directory")
        if not _writable(ancestor):
            raise UnsuitableTarget(f"cannot create {given}: {ancestor} is not writable")
        return RestoreTarget(resolved, in_place=False)
    is_cwd = resolved == Path.cwd().resolve()
    in_place = is_cwd or os.path.ismount(resolved) or not _writable(resolved.parent)
    if not _writable(resolved) and (in_place or not os.listdir(resolved)):
        raise UnsuitableTarget(f"cannot write into {given}: check its permissions")
    if is_cwd and not force and any(not n.startswith(IN_PLACE_PREFIX) for n in os.listdir(resolved)):
        raise UnsuitableTarget(
            f"{given} is the current directory and not empty: a restore replaces everything in it; "
            "pass --force to do that"
        )
    return RestoreTarget(resolved, in_place=in_place)


def clean_leftovers(target: RestoreTarget) -> list[Path]:
    """Remove the work directories of dead runs at this target (finishing their journaled swaps)."""
    removed = sweep_dead(target.path.parent, f".{target.path.name}.remote-cache-")
    if target.path.is_dir():
        removed += sweep_dead(target.path, IN_PLACE_PREFIX, recover=lambda work: _finish(work, target.path))
    return removed


def _finish(work: Path, target: Path) -> None:
    if (work / JOURNAL).exists():
        finish_swap(work, target)
