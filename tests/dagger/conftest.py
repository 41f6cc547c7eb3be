"""Fixtures for the offline Dagger checks (see ``tests/dagger/offline``).

* ``offline``: an :class:`OfflineSession` installed on the SDK's shared connection for one test.
* ``module_dir(name)``: the directory of one of the project's modules; skips when not written yet.
* ``loaded_module(name)`` (session cache): that module installed from its upload set in its own venv
  and registered offline; each module is installed once per test session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dagger.offline.runtime import LoadedModule, install_module, register_module
from tests.dagger.offline.session import SCHEMA_FILE, OfflineSession, install, load_schema, uninstall

REPO_ROOT = Path(__file__).resolve().parents[2]

#: dagger.json name -> directory of the module, relative to the repository root.
MODULES = {"remote-cache": ".", "remote-backend": "remote_backend", "example": "example"}


@pytest.fixture(scope="session")
def schema() -> Any:
    """The pinned v0.21.8 schema, parsed once."""
    return load_schema(SCHEMA_FILE)


@pytest.fixture
def offline(schema: Any) -> Iterator[OfflineSession]:
    """An offline session on the SDK's shared connection (``dag``), detached after the test."""
    session = OfflineSession(schema)
    install(session)
    try:
        yield session
    finally:
        uninstall()


def find_module(name: str) -> Path:
    """The module's directory, or a skip when its dagger.json is not there (yet)."""
    path = REPO_ROOT / MODULES[name]
    if not (path / "dagger.json").is_file():
        pytest.skip(f"module {name} has no dagger.json at {MODULES[name]}/ yet")
    return path


@pytest.fixture(scope="session")
def loaded_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[LoadedModule, dict[str, Any]]]:
    """``load(name)``: install the module like the runtime and register it; cached per session."""
    cache: dict[str, tuple[LoadedModule, dict[str, Any]] | BaseException] = {}

    def load(name: str) -> tuple[LoadedModule, dict[str, Any]]:
        if name not in cache:
            module_dir = find_module(name)
            work = tmp_path_factory.mktemp(f"load-{name}")
            try:
                loaded = install_module(module_dir, work)
                cache[name] = (loaded, register_module(loaded, SCHEMA_FILE, work / "registered.json"))
            except BaseException as exc:  # remembered so that later tests fail fast, same reason
                cache[name] = exc
        got = cache[name]
        if isinstance(got, BaseException):
            raise got
        return got

    return load


@pytest.fixture
def backend_module() -> Iterator[Any]:
    """The remote-backend module's package, imported from its source as its runtime would."""
    src = REPO_ROOT / "remote_backend" / "src"
    sys.path.insert(0, str(src))
    try:
        import remote_backend

        yield remote_backend
    finally:
        sys.path.remove(str(src))
