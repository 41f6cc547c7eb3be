"""Helpers of the backend tests: a small volume with odd owners, and the engine stand-ins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.dagger.offline.engine_stub import exec_stdout_answer, export_answer
from tests.dagger.offline.session import OfflineSession

__all__ = ["engine_stub", "owners_of", "volume_tree"]


def volume_tree(root: Path) -> Path:
    """A small volume: packages, a link, and (as root) files owned by someone else."""
    for i in range(30):
        pkg = root / f"pkg{i % 5}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / f"f{i}.js").write_bytes(os.urandom(1000 + i))
    (root / "link").symlink_to("pkg0/f0.js")
    if os.geteuid() == 0:
        os.chown(root / "pkg1", 1000, 1000)
        os.chown(root / "pkg1" / "f1.js", 1000, 1000)
    return root


def owners_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_uid, p.lstat().st_gid) for p in sorted(root.rglob("*"))}


def engine_stub(offline: OfflineSession, tree: Path) -> list[str]:
    """Answer the export's engine calls from ``tree`` (tests/dagger/offline/engine_stub.py)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (Debian: apt-get install busybox)")
    exported: list[str] = []
    offline.answers["Directory.export"] = export_answer(tree, exported)
    offline.answers["Container.stdout"] = exec_stdout_answer(busybox, tree)
    return exported
