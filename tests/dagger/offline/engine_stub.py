"""Answers for the offline session that do, on this machine, what the engine would do.

* :func:`export_answer`: ``Directory.export(path)`` writes a tree on disk to ``path`` the way the
  engine's filesync target does (``engine/client/filesync.go``: names, modes, mtimes and hard
  links kept; every entry owned by the receiving process).
* :func:`exec_stdout_answer`: ``Container.stdout`` of a ``withExec`` runs that exec's argv for
  real under BusyBox, with the path the directory was mounted at pointing to the tree on disk.

Both stand for one directory, the tree given, whatever the query's IDs say.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["exec_stdout_answer", "export_answer"]

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
                os.chown(Path(dirpath) / name, uid, gid, follow_symlinks=False)
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
