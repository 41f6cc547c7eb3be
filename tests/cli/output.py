"""Running the console script and reading what it printed (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CLI", "Run", "clean_env", "json_line", "no_traceback", "warnings"]

CLI = Path(sys.executable).parent / "remote-cache"

Run = Callable[..., subprocess.CompletedProcess[str]]


#: Where a user's own settings reach a run: credentials, their files, certificates, state.
USER_SETTINGS = ("REMOTE_CACHE_", "DOCKER_", "AWS_", "AZURE_", "GOOGLE_", "XDG_", "REGISTRY_AUTH_FILE")


def is_user_setting(name: str) -> bool:
    """Whether environment variable ``name`` brings the user's own settings in (or a proxy: the
    tests' servers are local; the proxy tests set their own)."""
    return name.startswith(USER_SETTINGS) or name.lower().endswith("_proxy")


def clean_env(tmp_path: Path, pycache: Path) -> dict[str, str]:
    """An environment for the console script with no credentials, where every place credentials or
    certificates are looked for (docker's and the containers tools' auth files,
    ``~/.config/containers/certs.d``) is an empty directory under ``tmp_path``."""
    docker_config = tmp_path / "docker-config"
    home = tmp_path / "home"
    runtime_dir = tmp_path / "run"
    for directory in (docker_config, home, runtime_dir):
        directory.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not is_user_setting(k) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        DOCKER_CONFIG=str(docker_config),
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime_dir),
        PYTHONPYCACHEPREFIX=str(pycache),
        REMOTE_CACHE_STATE_DIR=str(tmp_path / "state"),  # never the user's own state
        # No progress lines (stderr is piped, as in CI): tests read the summary and the errors.
        # The progress tests set their own interval.
        REMOTE_CACHE_PROGRESS_INTERVAL="0",
    )
    return env


def json_line(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got {proc.stdout!r} ({proc.stderr!r})"
    data: dict[str, Any] = json.loads(lines[0])
    return data


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def warnings(stderr: str) -> list[str]:
    """The warning lines the console script printed."""
    return [line for line in stderr.splitlines() if line.startswith("remote-cache: warning: ")]
