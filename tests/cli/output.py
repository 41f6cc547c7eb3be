"""Running the console script and reading what it printed (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CLI", "Run", "clean_env", "empty_user_dirs", "is_user_setting", "json_line",
    "no_traceback", "warnings",
]  # fmt: skip

CLI = Path(sys.executable).parent / "remote-cache"

Run = Callable[..., subprocess.CompletedProcess[str]]


#: Where a user's own settings reach a run: credentials, their files, certificates, state.
_USER_SETTINGS = ("REMOTE_CACHE_", "DOCKER_", "AWS_", "AZURE_", "GOOGLE_", "XDG_", "REGISTRY_AUTH_FILE")


def is_user_setting(name: str) -> bool:
    """Whether environment variable ``name`` brings the user's own settings in (or a proxy: the
    tests' servers are local; the proxy tests set their own)."""
    return name.startswith(_USER_SETTINGS) or name.lower().endswith("_proxy")


def empty_user_dirs(root: Path) -> dict[str, str]:
    """``HOME``, ``DOCKER_CONFIG`` and ``XDG_RUNTIME_DIR`` as empty directories under ``root``:
    every place credentials or certificates are looked for (docker's and the containers tools'
    auth files, ``~/.config/containers/certs.d``, ``~/.aws``) holds none."""
    dirs = {"HOME": root / "home", "DOCKER_CONFIG": root / "docker-config", "XDG_RUNTIME_DIR": root / "run"}
    for directory in dirs.values():
        directory.mkdir(exist_ok=True)
    return {name: str(directory) for name, directory in dirs.items()}


def clean_env(tmp_path: Path, pycache: Path) -> dict[str, str]:
    """An environment for the console script with none of the user's settings
    (:func:`is_user_setting`) and empty user directories under ``tmp_path``
    (:func:`empty_user_dirs`)."""
    env = {k: v for k, v in os.environ.items() if not is_user_setting(k) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(empty_user_dirs(tmp_path))
    env.update(
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
