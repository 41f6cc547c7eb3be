"""Fixtures shared by the core tests: where to store, small layers, a per-test state dir."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import remote_cache.layers as layers_mod
import remote_cache.save as save_mod
from remote_cache.reference import Reference, parse_reference


@pytest.fixture(params=["layout", "registry"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Reference:
    """A layout directory or a fresh repository on the real registry."""
    if request.param == "layout":
        return parse_reference(f"oci:{tmp_path / 'layout'}")
    registry = request.getfixturevalue("registry")
    return parse_reference(f"{registry.host}/{request.getfixturevalue('repo_name')}")


@pytest.fixture
def small_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut trees into many small layers on save, so multi-layer paths run on small test trees."""
    small = functools.partial(layers_mod.scan_tree, min_bytes=32 << 10, max_bytes=128 << 10)
    monkeypatch.setattr(save_mod, "scan_tree", small)


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own machine-local state directory."""
    path = tmp_path / "state"
    monkeypatch.setenv("REMOTE_CACHE_STATE_DIR", str(path))
    return path
