"""Answers for the offline session that do, on this machine, what the engine would do.

* :func:`export_answer`: ``Directory.export(path)`` writes a tree on disk to ``path`` the way the
  engine's filesync target does (``engine/client/filesync.go``: names, modes, mtimes and hard
  links kept; every entry owned by the receiving process).
* :func:`exec_stdout_answer`: ``Container.stdout`` of a ``withExec`` runs that exec's argv for
  real under BusyBox, with the path the directory was mounted at pointing to the tree on disk.

Both stand for one directory, the tree given, whatever the query's IDs say. The other way in:

* :class:`WorkdirSnapshots`: ``currentModule.workdir(path)``, when resolved (an ID minted for
  it, as ``sync`` does), copies ``./path`` the way ``host.directory`` does
  (``engine/client/filesync.go`` ``normalizeLocalImportStat``: every entry uid/gid 0; modes kept;
  directories and symlinks get the import's time).
* :func:`run_directory`: a ``directory(path)`` of a container whose exec ran over mounted
  directories: the exec runs under BusyBox over copies of them, the copy at ``path`` is the answer.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["WorkdirSnapshots", "exec_stdout_answer", "export_answer", "run_directory"]

Answer = Callable[[dict[str, Any], tuple[Any, ...]], Any]


def export_answer(tree: Path, exported: list[str] | None = None) -> Answer:
    """``Directory.export``: copy ``tree`` to the path asked for; record the path in ``exported``."""

    def answer(args: dict[str, Any], chain: tuple[Any, ...]) -> str:
        dest = Path(str(args["path"]))
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", f"{tree}/.", str(dest)], check=True)
        uid, gid = os.getuid(), os.getgid()
        os.chown(dest, uid, gid)
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in dirnames + filenames:
                # The engine's order (internal/fsutil/diskwriter_unix.go, rewriteMetadata): Lchown,
                # then Chmod with the whole mode, so set-ID bits a chown clears come back.
                path = Path(dirpath) / name
                mode = path.lstat().st_mode
                os.chown(path, uid, gid, follow_symlinks=False)
                if not stat.S_ISLNK(mode):
                    os.chmod(path, stat.S_IMODE(mode))
        if exported is not None:
            exported.append(str(dest))
        return str(dest)

    return answer


def exec_stdout_answer(busybox: str, tree: Path) -> Answer:
    """``Container.stdout``: run the chain's last exec under BusyBox, its mounted directory = ``tree``."""

    def answer(args: dict[str, Any], chain: tuple[Any, ...]) -> str:
        execs = [s for s in chain if s.name == "withExec"]
        mounts = [s for s in chain if s.name == "withMountedDirectory"]
        assert execs and mounts, f"no exec over a mounted directory in {[s.name for s in chain]}"
        mount_path = str(mounts[-1].args["path"])
        argv = [str(tree) if a == mount_path else str(a) for a in execs[-1].args["args"]]
        assert argv[0] == "sh", argv
        proc = subprocess.run([busybox, *argv], check=True, capture_output=True, text=True)
        return proc.stdout

    return answer


def _owned_by_root(root: Path) -> None:
    """What the import's sender reports and its receiver applies (uid/gid 0, then the mode)."""
    os.chown(root, 0, 0)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            os.chown(path, 0, 0, follow_symlinks=False)
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode))


def _import_times(root: Path) -> None:
    """The engine's receiver keeps regular files' mtimes only: directories and symlinks get the
    time of the import (``engine/filesync/localfs.go``: no directory times put back, ``Symlink``
    sets none)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or path.is_dir():
                os.utime(path, follow_symlinks=False)


class WorkdirSnapshots:
    """The engine's copies of ``currentModule.workdir`` paths, taken when first resolved."""

    def __init__(self, session: Any, into: Path) -> None:
        self._session = session
        self._into = into
        self._copies: dict[str, Path] = {}
        #: The workdir paths resolved, in order.
        self.paths: list[str] = []
        session.on_mint.append(self._minted)

    def _minted(self, id_: str, chain: tuple[Any, ...]) -> None:
        if [s.name for s in chain] != ["currentModule", "workdir"] or str(chain) in self._copies:
            return
        path = str(chain[1].args["path"])
        copy = self._into / f"snapshot-{len(self._copies)}"
        copy.mkdir(parents=True)
        subprocess.run(["cp", "-a", f"{Path.cwd() / path}/.", str(copy)], check=True)
        _owned_by_root(copy)
        _import_times(copy)
        self._copies[str(chain)] = copy
        self.paths.append(path)

    def of(self, id_: str) -> Path:
        """The copy an ID of a resolved workdir stands for."""
        return self._copies[str(self._session.chain_of(id_))]


def run_directory(snapshots: WorkdirSnapshots, chain: tuple[Any, ...], busybox: str, work: Path) -> Path:
    """Run ``container().from(...).withMountedDirectory(...)*.withExec(...).directory(PATH)``:
    the exec under BusyBox over copies of the mounted snapshots; the copy mounted at PATH."""
    *steps, last = chain
    assert last.name == "directory", [s.name for s in chain]
    mounts: dict[str, Path] = {}
    work.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(s for s in steps if s.name == "withMountedDirectory"):
        copy = work / f"mount-{i}"
        subprocess.run(["cp", "-a", str(snapshots.of(str(step.args["source"]))), str(copy)], check=True)
        mounts[str(step.args["path"])] = copy
    for step in (s for s in steps if s.name == "withExec"):
        argv = [str(mounts.get(str(a), a)) for a in step.args["args"]]
        subprocess.run([busybox, *argv], check=True, capture_output=True, text=True)
    return mounts[str(last.args["path"])]
