"""``ruff check`` and ``ruff format --check`` over the whole checkout (config: pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"ruff {' '.join(argv)}:\n{proc.stdout}{proc.stderr}"
