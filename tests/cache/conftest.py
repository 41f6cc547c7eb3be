"""Fixtures of the cache tests: where to store (a layout or the real registry), small layers."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import remote_cache.archive.plan as layers_mod
import remote_cache.cache.save as save_mod
from remote_cache.oci.reference import Reference, parse_reference


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
