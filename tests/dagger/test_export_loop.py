"""The Dagger data path, closed without an engine.

``Registry.export`` and ``Registry.import_`` run in a venv installed from remote-backend's upload
set alone (as the runtime installs it), their engine calls answered by a tree on disk
(``offline/engine_stub.py``: the export writes the tree where the function asks, the helper's
``OWNERS`` exec runs under BusyBox), against the real test registry. What the export stores is
read back by skopeo and umoci, and by the core; a 1% change is saved again and the bytes the
registry received are counted; the image the engine's ``from`` would pull is that same tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache.restore import restore
from remote_cache.keys import tag_for_key
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.registry import RegistryStore
from tests.dagger.offline.runtime import LoadedModule
from tests.dagger.offline.session import SCHEMA_FILE
from tests.registry_server import RegistryServer
from tests.trees import assert_same_tree

PROBE = Path(__file__).resolve().parent / "offline" / "export_probe.py"
BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(
    BUSYBOX is None or shutil.which("skopeo") is None or shutil.which("umoci") is None,
    reason="busybox, skopeo and umoci (Debian packages) are needed",
)
KEY = "npm-linux-v1"


def probe(loaded: LoadedModule, work: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run export_probe.py in the module's venv; its stderr (the module's report) is returned too."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "in.json").write_text(json.dumps({"busybox": BUSYBOX, **spec}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    proc = subprocess.run(
        [str(loaded.python), str(PROBE), str(SCHEMA_FILE), str(work / "in.json"), str(work / "out.json")],
        cwd=work,
        env=env | loaded.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout}\n{proc.stderr}"
    out: dict[str, Any] = json.loads((work / "out.json").read_text())
    out["stderr"] = proc.stderr
    return out


def stored_bytes(server: RegistryServer) -> int:
    """Bytes of every blob the registry holds: what it received, counted at the server."""
    blobs = server.storage_root / "docker" / "registry" / "v2" / "blobs"
    return sum(p.stat().st_size for p in blobs.rglob("data"))


def volume(root: Path, packages: int, files: int, size: int, *, seed: int) -> None:
    """npm-like packages of incompressible files; as root, one package owned by uid 1000."""
    import random

    rng = random.Random(seed)
    for p in range(packages):
        pkg = root / f"pkg-{seed}-{p:03d}"
        pkg.mkdir(parents=True)
        for f in range(files):
            (pkg / f"file{f}.js").write_bytes(rng.randbytes(size))
            os.utime(pkg / f"file{f}.js", (499_162_500, 499_162_500))  # npm's fixed 1985 mtime
    if os.geteuid() == 0 and seed == 0:
        shutil.chown(root / "pkg-0-001", 1000, 1000)
        shutil.chown(root / "pkg-0-001" / "file0.js", 1000, 1000)


def owners(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_uid, p.lstat().st_gid) for p in root.rglob("*")}


def umoci_rootfs(work: Path, image: str) -> Path:
    """``skopeo copy`` (one platform, recompressed to gzip for Debian's umoci) + ``umoci unpack``."""
    layout, bundle = work / "oci", work / "bundle"
    work.mkdir(parents=True, exist_ok=True)
    for argv in (
        ["skopeo", "copy", "--src-tls-verify=false", "--override-arch", "amd64", "--dest-compress",
         "--dest-compress-format", "gzip", image, f"oci:{layout}:t"],
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle)],
    ):  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{argv[0]}: {proc.stderr}"
    return bundle / "rootfs"


async def restored(server: RegistryServer, repo: str, target: Path) -> str:
    store = RegistryStore.from_reference(parse_reference(f"{server.host}/{repo}"))
    try:
        result = await restore(store, KEY, target)
    finally:
        await store.aclose()
    return result.digest


async def test_export_runs_the_core_in_the_module_and_a_small_change_uploads_little(
    loaded_module: Callable[[str], tuple[LoadedModule, dict[str, Any]]],
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
) -> None:
    loaded, _ = loaded_module("remote-backend")
    tree = tmp_path / "volume"
    volume(tree, packages=40, files=40, size=24_000, seed=0)  # ~38 MB in 1,600 files
    spec = {"address": registry.host, "repo": repo_name, "key": KEY, "tree": str(tree)}

    before = stored_bytes(registry)
    first = probe(loaded, tmp_path / "run1", {"op": "export", **spec})
    cold = stored_bytes(registry) - before
    assert "save saved npm-linux-v1" in first["stderr"] and len(first["exported_to"]) == 1
    assert not any("publish" in q for q in first["queries"]), "export published through the engine"
    assert cold > 35_000_000

    digest = await restored(registry, repo_name, tmp_path / "back")
    assert_same_tree(tree, tmp_path / "back")
    assert owners(tmp_path / "back") == owners(tree)
    image = f"docker://{registry.host}/{repo_name}:{tag_for_key(KEY)}"
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", image],
                                    capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert {m["platform"]["architecture"] for m in raw["manifests"]} == {"amd64", "arm64"}
    assert_same_tree(tree, umoci_rootfs(tmp_path / "skopeo1", image))

    volume(tree / "new-package", packages=1, files=16, size=24_000, seed=1)  # +1%
    before = stored_bytes(registry)
    second = probe(loaded, tmp_path / "run2", {"op": "export", **spec})
    small = stored_bytes(registry) - before
    print(f"\ncold export stored {cold} bytes; after a 1% change {small} ({small / cold:.1%})")
    assert "save saved npm-linux-v1" in second["stderr"]
    assert small < 0.15 * cold, (small, cold)

    pulled = probe(loaded, tmp_path / "run3", {"op": "import", **spec})
    new_digest = await restored(registry, repo_name, tmp_path / "back2")
    assert new_digest != digest
    assert pulled["from"] == [f"{registry.host}/{repo_name}@{new_digest}"]
    assert_same_tree(tree, umoci_rootfs(tmp_path / "skopeo2", f"docker://{pulled['from'][0]}"))
    print(f"the engine would pull {pulled['from'][0]}: its root is the tree", file=sys.stderr)
