"""Shared fixtures: real docker-registry servers on 127.0.0.1 (anonymous, basic, token auth).

Fixtures (see ``tests/registry_server.py`` for the objects they return):

* ``registry`` / ``auth_registry`` / ``token_registry`` (session): a :class:`RegistryServer`
  with ``.host`` ("127.0.0.1:PORT"), ``.url``, ``.username``/``.password`` (None when anonymous),
  ``.storage_root``, ``.blob_data_path(digest)`` and, for the token registry, ``.tokens_issued``.
* ``private_ca_registry`` / ``client_cert_registry`` / ``named_registry`` (session): anonymous
  registries under this machine's own (non-loopback) name: HTTPS with a certificate of their own
  test CA (``.ca``), the second also requiring a client certificate; the third plain HTTP.
* ``repo_name``: a fresh repository name per test, e.g. ``test/test-push-3f9a1c2b``.
* ``fault_proxy_factory``: ``factory(server) -> FaultProxy`` in front of a registry, closed after the test.
* ``forward_proxy_factory``: ``factory(port=0) -> ForwardProxy``, what HTTP_PROXY names, closed after
  the test.
* ``cli``: ``cli(*args, stdin="", env=None) -> CompletedProcess``, the console script run for real in
  ``tmp_path`` with a clean environment (``tests/cli/output.py``); ``pycache`` (session) keeps the
  bytecode of its runs.
* ``sparse_dir``: a directory where files can have holes (on an ext4 it mounts; ``"shm"`` by
  indirect parametrization: one on /dev/shm), or the test is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import remote_cache.archive.plan as layers_mod
import remote_cache.cache.save as save_mod
from tests.cli.output import CLI, Run, clean_env, empty_user_dirs, is_user_setting
from tests.forward_proxy import ForwardProxy
from tests.mounts import ext4
from tests.object_servers import (
    ObjectServer,
    azurite_available,
    moto_available,
    s3rver_available,
    start_azurite,
    start_moto,
    start_s3rver,
)
from tests.registry_server import FaultProxy, RegistryServer, machine_name, registry_available, start_registry
from tests.skips import unavailable
from tests.trees import holes_work

_SKIP_REASON = "/usr/bin/docker-registry (Debian package docker-registry) or openssl is not installed"


def _start(
    tmp_path_factory: pytest.TempPathFactory, label: str, auth: str, **options: object
) -> Iterator[RegistryServer]:
    if not registry_available():
        unavailable(_SKIP_REASON)
    workdir: Path = tmp_path_factory.mktemp(label)
    server = start_registry(workdir, auth=auth, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


#: Where the tests' files go when it is a tmpfs with this much room (a whole run peaks at ~3.2 GB).
_MEMORY_ROOT, _MEMORY_ROOM = "/dev/shm", 8 << 30


def pytest_configure(config: pytest.Config) -> None:
    # The tests' files (tmp_path) in memory where there is room: the suite ran 454 s on this
    # machine's disk and 382 s on a tmpfs (2 workers, 2 cores). Tests that need a disk's
    # filesystem (ext4) or another one mount it (tests/mounts.py). PYTEST_DEBUG_TEMPROOT, pytest's
    # own setting, is read when the first temporary directory is made, after this.
    if "PYTEST_DEBUG_TEMPROOT" not in os.environ and _has_room(_MEMORY_ROOT, _MEMORY_ROOM):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = _MEMORY_ROOT
    # A run a shell started in the background (``pytest &`` in a script, ``nohup``) inherits
    # SIGINT ignored, and so would every command the tests start (the CLI keeps an inherited
    # ignore, as it should): their Ctrl-C tests failed. Python's handler here, so the commands
    # start with the default disposition.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_room(path: str, room: int) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return os.access(path, os.W_OK) and st.f_bavail * st.f_frsize >= room


@pytest.fixture(autouse=True)
def no_user_credentials(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests see no credentials or certificates of the user running them, as the CLI
    tests' environment has it (:func:`tests.cli.output.clean_env`). Tests that need some set their own."""
    # The harness's own REMOTE_CACHE_ variables stay (REQUIRE_SERVERS, the state directory's).
    for name in [k for k in os.environ if is_user_setting(k) and not k.startswith("REMOTE_CACHE_")]:
        monkeypatch.delenv(name)
    for name in ("REMOTE_CACHE_USERNAME", "REMOTE_CACHE_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    # Beside tmp_path: tests may expect that one empty.
    for name, value in empty_user_dirs(tmp_path_factory.mktemp("user")).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own machine-local state directory (``REMOTE_CACHE_STATE_DIR``), never the user's."""
    path = tmp_path / "state"
    monkeypatch.setenv("REMOTE_CACHE_STATE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous docker-registry (push and pull without credentials)."""
    yield from _start(tmp_path_factory, "registry", "none")


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry with htpasswd (basic) auth; ``.username``/``.password`` are valid."""
    yield from _start(tmp_path_factory, "auth-registry", "htpasswd")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry with bearer-token auth; ``.tokens_issued`` counts issued tokens."""
    yield from _start(tmp_path_factory, "token-registry", "token")


def _named() -> tuple[str, str]:
    """This machine's own name and address: what the client does not take for loopback."""
    found = machine_name()
    if found is None:
        unavailable("this machine has no host name that resolves to an IPv4 address")
    assert found is not None
    return found


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous registry serving HTTPS on 127.0.0.1 with a certificate of its own test CA
    (``.ca``), which nothing here trusts unless told."""
    yield from _start(tmp_path_factory, "tls-registry", "none", tls=True)


@pytest.fixture(scope="session")
def private_ca_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous registry serving HTTPS under this machine's name, its certificate from ``.ca``."""
    yield from _start(tmp_path_factory, "private-ca-registry", "none", tls=True, name=_named())


@pytest.fixture(scope="session")
def client_cert_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Like ``private_ca_registry``, and requiring a client certificate (``.ca.directory / "client.crt"``)."""
    yield from _start(
        tmp_path_factory, "client-cert-registry", "none", tls=True, name=_named(), client_certificates=True
    )


@pytest.fixture(scope="session")
def named_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous plain-HTTP registry under this machine's name (so not taken for loopback)."""
    yield from _start(tmp_path_factory, "named-registry", "none", name=_named())


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses: ``test/<test name>-<random>``, valid per the spec."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40] or "t"
    return f"test/{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[[RegistryServer], FaultProxy]]:
    """Make fault-injecting proxies in front of registries; all are closed after the test."""
    proxies: list[FaultProxy] = []

    def make(server: RegistryServer) -> FaultProxy:
        proxy = FaultProxy(server.host)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def forward_proxy_factory() -> Iterator[Callable[..., ForwardProxy]]:
    """Make forward HTTP proxies (``make(port=0, tls=None)``, see :class:`ForwardProxy`); all are
    closed after the test."""
    proxies: list[ForwardProxy] = []

    def make(port: int = 0, tls: tuple[Path, Path] | None = None) -> ForwardProxy:
        proxy = ForwardProxy(port, tls)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


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


def _object_server(
    tmp_path_factory: pytest.TempPathFactory, available: bool, start: Callable[[Path], ObjectServer], why: str
) -> Iterator[ObjectServer]:
    if not available:
        unavailable(why)
    server = start(tmp_path_factory.mktemp("object-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectServer]:
    """moto_server: a faithful S3 (conditional writes answered 412, multipart), any credentials."""
    yield from _object_server(tmp_path_factory, moto_available(), start_moto, "moto[server] is not installed")


@pytest.fixture(scope="session")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectServer]:
    """s3rver: an S3 that ignores conditional writes and knows one access key (S3RVER/S3RVER)."""
    yield from _object_server(
        tmp_path_factory, s3rver_available(), start_s3rver, "s3rver (npm) is not installed"
    )


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectServer]:
    """Azurite's blob service, with its well-known development account."""
    yield from _object_server(
        tmp_path_factory, azurite_available(), start_azurite, "azurite (npm) is not installed"
    )


@pytest.fixture
def sparse_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory where files can have holes, or the test is skipped: on an ext4 (a disk's
    filesystem, whatever tmp_path is on) or, with ``@pytest.mark.parametrize("sparse_dir",
    ["disk", "shm"], indirect=True)``, also one on tmpfs (/dev/shm), removed after the test."""
    where = getattr(request, "param", "disk")
    assert where in ("disk", "shm"), where
    with contextlib.ExitStack() as stack:
        if where == "disk":
            base = stack.enter_context(ext4(tmp_path / "disk", size=512 << 20))
        elif Path("/dev/shm").is_dir():
            base = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="remote-cache-test-"))
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        else:
            pytest.skip("no /dev/shm here")
        if not holes_work(base):
            pytest.skip(f"the filesystem of {base} makes no holes")
        yield base


@pytest.fixture
def small_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut trees into many small layers on save, so multi-layer paths run on small test trees."""
    small = functools.partial(layers_mod.scan_tree, min_bytes=32 << 10, max_bytes=128 << 10)
    monkeypatch.setattr(save_mod, "scan_tree", small)
