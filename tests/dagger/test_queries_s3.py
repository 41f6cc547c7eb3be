"""The S3 backend's functions, run in-process against the offline session and a real S3 (moto).

The core does the transfers for real; the engine's side is played by the stand-ins of
``tests/dagger/offline/engine_stub.py``: an export writes the volume where the function asks,
``currentModule.workdir`` is copied when resolved (owners become 0:0, as ``host.directory``
makes them), and the helper's exec runs under BusyBox.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dagger import dag

from remote_cache.dagger import scripts
from remote_cache.errors import MISS_MARKER, RemoteCacheError
from tests.dagger.backends import engine_stub, owners_of, volume_tree
from tests.dagger.offline.engine_stub import WorkdirSnapshots, run_directory
from tests.dagger.offline.rules import exec_problem, subpath_problem, workdir_path_problem
from tests.dagger.offline.session import OfflineSession, Step
from tests.object_servers import ObjectServer, new_bucket, object_env
from tests.trees import assert_same_tree

HELPER_PREFIX = "alpine:3.22.2@sha256:4b7ce0"


def _secrets(offline: OfflineSession, server: ObjectServer) -> dict[str, Any]:
    """The server's key pair as Secrets, answered to the module by the session (as the engine
    answers ``plaintext`` to the module holding them)."""
    env = object_env(server)
    values = {"key-id": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}

    def plaintext(args: dict[str, Any], chain: tuple[Step, ...]) -> str:
        return str(next(s.args["plaintext"] for s in chain if s.name == "setSecret"))

    offline.answers["Secret.plaintext"] = plaintext
    return {
        "access_key_id": dag.set_secret("key-id", values["key-id"]),
        "secret_access_key": dag.set_secret("secret", values["secret"]),
    }


async def _bucket(module: Any, offline: OfflineSession, server: ObjectServer, **kw: Any) -> Any:
    main = module.RemoteBackend()
    return main.s3(
        bucket=kw.pop("bucket", None) or new_bucket(server),
        prefix="team/ci",
        endpoint=server.endpoint,
        region="us-east-1",
        **_secrets(offline, server),
        **kw,
    )


def _module_queries(offline: OfflineSession) -> list[str]:
    return [r.text for r in offline.recorded if "setSecret" not in r.text]  # not the test's own


async def test_s3_export_saves_with_the_core_and_import_hands_the_tree_back_with_its_owners(
    offline: OfflineSession,
    backend_module: Any,
    moto: ObjectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """export: the volume copied into the function's container, saved by the core. import: the
    core restores into a fresh directory under the working directory, the engine snapshots it
    (``currentModule.workdir``, synced before the files go), and the helper's PUT_OWNERS puts
    the owners back on the mounted snapshot, whose whole content is what is returned."""
    monkeypatch.chdir(tmp_path)  # the runtime workdir
    tree = volume_tree(tmp_path / "volume")
    (tree / "pkg2" / "f2.js").chmod(0o4755)
    for path in [*tree.rglob("*"), tree]:  # old times everywhere, so the import's own would show
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    exported = engine_stub(offline, tree)
    s3 = await _bucket(backend_module, offline, moto)
    await s3.export("npm-v1", dag.directory())
    assert len(exported) == 1 and not Path(exported[0]).exists()
    assert "save saved npm-v1" in capsys.readouterr().err

    snapshots = WorkdirSnapshots(offline, tmp_path / "engine")
    got = await s3.import_("npm-v1")
    assert "import key='npm-v1': restore hit npm-v1" in capsys.readouterr().err
    assert len(snapshots.paths) == 2  # the tree and the owner lists
    assert all(not (tmp_path / p).exists() for p in snapshots.paths), "the restored files are removed"
    assert [p.split("/")[0] for p in snapshots.paths] == [snapshots.paths[0].split("/")[0]] * 2
    chain = offline.chain_of(await got.id())
    assert [s.name for s in chain][:2] == ["container", "from"]
    assert str(chain[1].args["address"]).startswith(HELPER_PREFIX)
    execs = [s for s in chain if s.name == "withExec"]
    assert [list(s.args["args"])[:3] for s in execs] == [["sh", "-c", scripts.PUT_OWNERS]]
    assert subpath_problem(offline, chain) is None
    assert workdir_path_problem(offline) is None and exec_problem(offline) is None

    busybox = shutil.which("busybox")
    assert busybox is not None  # engine_stub skipped otherwise
    back = run_directory(snapshots, chain, busybox, tmp_path / "run")
    assert_same_tree(tree, back, dir_and_link_times=False)  # the engine's import sets those
    assert owners_of(back) == owners_of(tree), "owners are kept through the import"
    assert (back / "pkg2" / "f2.js").stat().st_mode & 0o7777 == 0o4755
    secret = object_env(moto)["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in q for q in _module_queries(offline)), "a secret leaked into a query"


async def test_s3_import_of_a_root_owned_tree_needs_no_helper_and_a_missing_key_is_a_miss(
    offline: OfflineSession,
    backend_module: Any,
    moto: ObjectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "volume"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_text("hello")
    engine_stub(offline, tree)
    s3 = await _bucket(backend_module, offline, moto)
    await s3.export("k", dag.directory())
    snapshots = WorkdirSnapshots(offline, tmp_path / "engine")
    got = await s3.import_("k")
    chain = offline.chain_of(await got.id())
    assert [s.name for s in chain] == ["currentModule", "workdir"], "a root-owned tree is returned as is"
    assert len(snapshots.paths) == 1
    assert workdir_path_problem(offline) is None
    with pytest.raises(Exception, match=MISS_MARKER):
        await s3.import_("absent")


async def test_s3_resolve_immutable_and_housekeeping(
    offline: OfflineSession,
    backend_module: Any,
    moto: ObjectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    exported = engine_stub(offline, volume_tree(tmp_path / "volume"))
    bucket = new_bucket(moto)
    s3 = await _bucket(backend_module, offline, moto, bucket=bucket, immutable=True)
    for key in ("npm-main-a", "npm-main-b", "go-a"):
        await s3.export(key, dag.directory())
    await s3.export("npm-main-a", dag.directory())
    assert len(exported) == 3, "an immutable bucket neither copies nor overwrites an existing key"
    assert "the cache is immutable, kept it" in capsys.readouterr().err

    assert await s3.resolve("npm-main-a", ["npm-"]) == "npm-main-a"
    assert await s3.resolve("npm-feature", ["npm-main-"]) == "npm-main-b"
    assert await s3.resolve("pip", ["pip-"]) == ""
    lines = [json.loads(x) for x in (await s3.entries(prefix="npm-", json_=True)).splitlines()]
    assert sorted(e["key"] for e in lines) == ["npm-main-a", "npm-main-b"]
    assert (await s3.entries()).splitlines()[0].split() == ["KEY", "CREATED", "SIZE", "FILES", "TAG"]

    kept = await s3.remove("go-a")
    assert kept.startswith("removed go-a") and "freed 0 blobs" in kept  # within the grace period
    done = await s3.prune(keep=0, prefix="npm-", grace="0s")
    assert done.startswith("removed 2 entries") and "freed" in done and "freed 0 blobs" not in done
    assert "no entries" in await s3.entries()
    with pytest.raises(Exception, match=MISS_MARKER):
        await s3.remove("go-a")
    with pytest.raises(RemoteCacheError, match="not a duration"):
        await s3.prune(older_than="1d", grace="soon")


async def test_workdir_rule_flags_a_path_outside_the_workdir(offline: OfflineSession) -> None:
    """The rule the import tests hold, shown failing: the engine refuses a workdir path that is
    absolute, empty or climbs out (``filepath.IsLocal``)."""
    await dag.current_module().workdir(".remote-cache-x/tree").id()
    assert workdir_path_problem(offline) is None
    for bad in ("/scratch/.remote-cache-x/tree", "../tree", "a/../../tree", ""):
        offline.recorded.clear()
        await dag.current_module().workdir(bad).id()
        assert "not a path inside the runtime workdir" in str(workdir_path_problem(offline)), bad


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"bucket": "Not_A_Bucket"}, "bucket"),
        ({"prefix": "a/../b"}, "prefix"),
        ({"endpoint": "http://minio.example:9000"}, "plain HTTP"),
        ({"sse": "des"}, "AES256"),
        ({"sse_kms_key_id": "k"}, "aws:kms"),
        ({"compression": "Uncompressed"}, "Zstd"),
        ({"access_key_id": "SECRET"}, "together"),
    ],
)
def test_s3_refuses_bad_arguments_at_once(backend_module: Any, kw: dict[str, Any], why: str) -> None:
    import dagger

    if "compression" in kw:
        kw["compression"] = dagger.ImageLayerCompression(kw["compression"])
    if "access_key_id" in kw:
        kw["access_key_id"] = dag.set_secret("id", "AKIAEXAMPLE")
    args: dict[str, Any] = {"bucket": "ci-caches", **kw}
    with pytest.raises(Exception, match=why):
        backend_module.RemoteBackend().s3(**args)
