"""The CLI tests' fixtures: the console script run for real, in a clean environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cli.output import CLI, Run


@pytest.fixture(scope="session")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the subprocesses keep bytecode: without it every CLI run recompiles all its imports."""
    return tmp_path_factory.mktemp("pycache")


@pytest.fixture
def cli(tmp_path: Path, pycache: Path) -> Run:
    """Run the console script in ``tmp_path`` with a clean environment: no credentials, and every
    place credentials or certificates are looked for (docker's and the containers tools' auth
    files, ``~/.config/containers/certs.d``) is an empty directory of this test's own."""
    docker_config = tmp_path / "docker-config"
    home = tmp_path / "home"
    runtime_dir = tmp_path / "run"
    for directory in (docker_config, home, runtime_dir):
        directory.mkdir()
    skip = (
        "REMOTE_CACHE_", "DOCKER_", "AWS_", "AZURE_", "GOOGLE_", "XDG_", "REGISTRY_AUTH_FILE",
        "PYTHONDONTWRITEBYTECODE",
    )  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    base.update(
        DOCKER_CONFIG=str(docker_config),
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime_dir),
        PYTHONPYCACHEPREFIX=str(pycache),
        REMOTE_CACHE_STATE_DIR=str(tmp_path / "state"),  # never the user's own state
        # No progress lines (stderr is piped, as in CI): tests read the summary and the errors.
        # The progress tests set their own interval.
        REMOTE_CACHE_PROGRESS_INTERVAL="0",
    )

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
