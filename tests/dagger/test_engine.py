"""The README walk-through against a real Dagger engine and a real registry.

Needs the ``dagger`` CLI (v0.21.8) with a reachable engine, and a registry that both the engine
and the modules' containers can reach (``localhost`` is neither: use the host's LAN address,
``host.docker.internal``, or a public one)::

    REMOTE_CACHE_E2E_REGISTRY=ttl.sh pytest tests/dagger/test_engine.py
    # or a local registry:2 over plain HTTP (the engine must list it as insecure):
    docker run -d -p 5000:5000 registry:2
    REMOTE_CACHE_E2E_REGISTRY=192.168.1.10:5000 REMOTE_CACHE_E2E_PLAIN_HTTP=1 pytest ...
    # with credentials: REMOTE_CACHE_E2E_USERNAME=me REMOTE_CACHE_E2E_PASSWORD=token

Steps: a fresh repository misses; priming saves; after pruning the engine's whole local cache
(volumes included) the message comes back from the registry; priming again replaces it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "example"
DAGGER = shutil.which("dagger")
REGISTRY = os.environ.get("REMOTE_CACHE_E2E_REGISTRY", "")

pytestmark = [
    pytest.mark.skipif(
        DAGGER is None,
        reason="no Dagger engine reachable: the `dagger` CLI is not on PATH (install dagger v0.21.8 "
        "and Docker to run the end-to-end walk-through)",
    ),
    pytest.mark.skipif(
        not REGISTRY,
        reason="set REMOTE_CACHE_E2E_REGISTRY to a registry the engine can reach (e.g. ttl.sh or "
        "HOST:5000 of a registry:2); see this file's docstring",
    ),
]

TIMEOUT = 900  # first runs pull the Python runtime and build three modules


def dagger_call(*args: str) -> str:
    """``dagger call -m example <constructor flags> ARGS``; stdout, or a failure with stderr."""
    assert DAGGER is not None
    flags = ["--registry", REGISTRY, "--repo", REPO, "--cache-key", KEY]
    if os.environ.get("REMOTE_CACHE_E2E_PLAIN_HTTP"):
        flags.append("--plain-http")
    env = dict(os.environ)
    if os.environ.get("REMOTE_CACHE_E2E_USERNAME"):
        flags += ["--username", os.environ["REMOTE_CACHE_E2E_USERNAME"]]
        # The CLI reads the secret from the environment itself: it never appears in argv.
        flags += ["--password", "env://REMOTE_CACHE_E2E_PASSWORD"]
    proc = subprocess.run(
        [DAGGER, "--progress=plain", "call", "-m", str(EXAMPLE), *flags, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"dagger call {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.strip()


def prune_engine() -> None:
    """Drop every local cache entry not in use, cache volumes included: a fresh runner's state."""
    assert DAGGER is not None
    subprocess.run(
        [DAGGER, "-m", "core", "function", "call", "engine", "local-cache", "prune"],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )


# One repository per run: entries of earlier runs (or other people on ttl.sh) cannot interfere.
REPO = f"remote-cache-e2e/{secrets.token_hex(6)}"
# On ttl.sh the tag is the entry's lifetime; elsewhere any key works.
KEY = "1h" if REGISTRY == "ttl.sh" else "e2e-walkthrough"


def test_walkthrough_miss_prime_prune_hit() -> None:
    assert dagger_call("check-cache") == "CACHE MISS"

    first = f"hello {secrets.token_hex(4)}"
    assert first in dagger_call("prime-cache", "--msg", first)
    assert dagger_call("check-cache") == first  # warm engine: the volume itself

    prune_engine()
    assert dagger_call("check-cache") == first  # cold engine: restored from the registry

    # A changed volume is saved again and wins on the next cold start.
    second = f"bye {secrets.token_hex(4)}"
    dagger_call("prime-cache", "--msg", second)
    prune_engine()
    assert dagger_call("check-cache") == second
