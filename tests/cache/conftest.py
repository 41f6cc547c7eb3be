"""Fixtures of the cache tests: where to store (a layout, the real registry, a bucket, a container)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote_cache.oci.reference import Reference, parse_reference
from tests.object_servers import new_bucket, object_env


@pytest.fixture(params=["layout", "registry", "s3", "azure"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Reference:
    """A layout directory, a fresh repository on the real registry, or a fresh bucket (moto) or
    container (Azurite) reached through the environment as AWS and Azure tools are."""
    if request.param == "layout":
        return parse_reference(f"oci:{tmp_path / 'layout'}")
    if request.param in ("s3", "azure"):
        server = request.getfixturevalue("moto" if request.param == "s3" else "azurite")
        for name, value in object_env(server).items():
            monkeypatch.setenv(name, value)
        scheme = "s3" if request.param == "s3" else "az"
        return parse_reference(f"{scheme}://{new_bucket(server)}/ci/cache")
    registry = request.getfixturevalue("registry")
    return parse_reference(f"{registry.host}/{request.getfixturevalue('repo_name')}")
