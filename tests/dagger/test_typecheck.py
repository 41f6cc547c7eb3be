"""``mypy --strict`` (config: the root pyproject) over the core, the glue and both other modules.

The Dagger glue is type-checked against ``dagger-io==0.21.8``. ``example`` calls bindings that
only exist inside an engine (``dag.remote_cache(...)``), so it is checked as written: it must
type-check without those bindings (e.g. behind a typed accessor), with zero errors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = {
    "remote_cache": ["remote_cache"],
    "remote_backend": ["remote_backend/src"],
    "example": ["example/src"],
}


def run_mypy(paths: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(REPO_ROOT / "pyproject.toml"),
            *paths,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_mypy_strict(target: str) -> None:
    paths = TARGETS[target]
    if not all((REPO_ROOT / p).exists() for p in paths):
        pytest.skip(f"{target} is not written yet")
    proc = run_mypy(paths, REPO_ROOT)
    assert proc.returncode == 0, f"mypy --strict {' '.join(paths)}:\n{proc.stdout}{proc.stderr}"
    assert "Success" in proc.stdout


def test_mypy_check_can_fail(tmp_path: Path) -> None:
    # A glue-like file misusing the SDK must be reported: the check above is not vacuous.
    (tmp_path / "bad_glue.py").write_text(
        textwrap.dedent(
            """\
            import dagger

            def mount(ctr: dagger.Container) -> dagger.Container:
                return ctr.with_mounted_cache("/cache", "not-a-cache-volume")
            """
        )
    )
    proc = run_mypy(["bad_glue.py"], tmp_path)
    assert proc.returncode != 0 and "arg-type" in proc.stdout, proc.stdout
