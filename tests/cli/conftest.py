"""The CLI tests' fixtures: the console script run for real, in a clean environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli.output import CLI, Run, clean_env


@pytest.fixture(scope="session")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the subprocesses keep bytecode: without it every CLI run recompiles all its imports."""
    return tmp_path_factory.mktemp("pycache")


@pytest.fixture
def cli(tmp_path: Path, pycache: Path) -> Run:
    """Run the console script in ``tmp_path`` with a clean environment (see :func:`clean_env`)."""
    base = clean_env(tmp_path, pycache)

    def run(
        *args: str, stdin: str = "", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CLI), *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**base, **(env or {})},
            timeout=120,
            check=False,
        )

    return run
