"""Render the GraphQL each module function builds, validate it, and check what matters in it.

Each function's Python method runs in-process against the offline session (``offline``
fixture): every query it executes is validated against the pinned v0.21.8 schema (an invalid one
fails the test) and recorded; IDs expand back into the calls that built them. Canned answers
are few and listed in each test. A stand-in backend replaces the engine's interface binding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import dagger
import graphql
import pytest
from dagger import dag

from remote_cache.dagger import scripts
from remote_cache.errors import MISS_MARKER, RemoteCacheError
from tests.dagger.backends import engine_stub, owners_of, volume_tree
from tests.dagger.offline.rules import (
    auth_address_problem,
    exec_problem,
    handed_directories,
    nonce_problem,
    subpath_problem,
)
from tests.dagger.offline.session import OfflineSession, Step, query_error

REPO_ROOT = Path(__file__).resolve().parents[2]
HELPER_PREFIX = "alpine:3.22.2@sha256:4b7ce0"


@dataclass
class StandInBackend:
    """What the engine hands a function for a ``Backend`` argument: awaited resolve, lazy import,
    awaited export. ``resolves_to`` is the canned answer of resolve (None: the key itself, a hit);
    ``delay`` makes resolve and export slow (for timeouts). Calls are recorded."""

    resolves_to: str | None = None
    delay: float = 0.0
    resolved: list[tuple[str, list[str]]] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)
    exported: list[tuple[str, str]] = field(default_factory=list)

    async def resolve(self, key: str, restore_keys: list[str]) -> str:
        self.resolved.append((key, list(restore_keys)))
        await anyio.sleep(self.delay)
        return key if self.resolves_to is None else self.resolves_to

    def import_(self, key: str) -> dagger.Directory:
        self.imported.append(key)
        return dag.directory().with_new_file("stand-in-backend", key)

    async def export(self, key: str, dir: dagger.Directory) -> None:
        await anyio.sleep(self.delay)
        self.exported.append((key, await dir.id()))


def _default(session: OfflineSession, type_name: str, field_name: str, arg: str) -> Any:
    owner = session.schema.type_map[type_name]
    assert isinstance(owner, graphql.GraphQLObjectType)
    node = owner.fields[field_name].args[arg].ast_node
    assert node is not None and node.default_value is not None
    return graphql.value_from_ast_untyped(node.default_value)


def names(chain: tuple[Step, ...]) -> list[str]:
    return [s.name for s in chain]


def expand_arg(session: OfflineSession, value: Any) -> tuple[Step, ...]:
    return session.chain_of(str(value))


def exec_queries(session: OfflineSession) -> list[tuple[Step, ...]]:
    """The expanded chains of every recorded query that runs a command."""
    out = []
    for rec in session.recorded:
        chain = session.expand(rec.chain)
        if "withExec" in names(chain):
            out.append(chain)
    return out


def assert_helper_rootfs_before_exec(session: OfflineSession, chain: tuple[Step, ...]) -> None:
    """Every exec runs on the pinned helper image's rootfs, never in the user's image."""
    first_exec = names(chain).index("withExec")
    roots = [s for s in chain[:first_exec] if s.name == "withRootfs"]
    assert roots, f"an exec runs in the user's image: {names(chain)}"
    rootfs = expand_arg(session, roots[-1].args["directory"])
    assert names(rootfs)[:3] == ["container", "from", "rootfs"], rootfs
    assert str(rootfs[1].args["address"]).startswith(HELPER_PREFIX), rootfs[1]


def user_steps(chain: tuple[Step, ...]) -> list[Step]:
    """The steps after the user's own ``from``: what the function added to the container."""
    start = names(chain).index("from") + 1
    return list(chain[start:])


# -- RemoteCacheVolume.mount -----------------------------------------------------------------


def script_execs(session: OfflineSession, script: str) -> list[list[str]]:
    """The argv after ``sh -c SCRIPT sh`` of each distinct exec running ``script`` (an exec shows
    up in every query built on it, e.g. its stdout and its output directory's ID)."""
    found: list[list[str]] = []
    for chain in exec_queries(session):
        for step in chain:
            argv = step.args.get("args") if step.name == "withExec" else None
            if argv and argv[:3] == ["sh", "-c", script] and list(argv[4:]) not in found:
                found.append(list(argv[4:]))
    return found


def report_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("remote-cache: ")]


async def _mount(
    session: OfflineSession, backend: StandInBackend | None = None, **opts: Any
) -> tuple[tuple[Step, ...], StandInBackend]:
    from remote_cache.dagger.volume import RemoteCacheVolume

    backend = backend or StandInBackend()
    vol = RemoteCacheVolume(
        path="/root/.npm",
        key="npm-v1",
        volume=dag.cache_volume("npm"),
        backend=backend,
        **opts,
    )
    out = await vol.mount(dag.container().from_("node:22"))
    return session.chain_of(await out.id()), backend


async def test_mount_hit(offline: OfflineSession, capsys: pytest.CaptureFixture[str]) -> None:
    out, backend = await _mount(offline, sharing=dagger.CacheSharingMode.LOCKED, owner="1000:1000")
    assert backend.resolved == [("npm-v1", [])] and backend.imported == ["npm-v1"]
    state = scripts.state_file("npm-v1", "/root/.npm")
    assert script_execs(offline, scripts.SEED) == [[scripts.SRC_DIR, "/root/.npm", state, "record"]]
    assert [line.split(" in ")[0] for line in report_lines(capsys.readouterr().err)] == [
        "remote-cache: import key='npm-v1' path=/root/.npm: hit"
    ]
    added = user_steps(out)
    assert [s.name for s in added] == ["withMountedCache", "withMountedDirectory"], added
    cache = added[0]
    assert cache.args["path"] == "/root/.npm"
    assert cache.args["sharing"] == "LOCKED" and cache.args["owner"] == "1000:1000"
    assert names(expand_arg(offline, cache.args["cache"])) == ["cacheVolume"]
    assert expand_arg(offline, cache.args["cache"])[0].args["key"] == "npm"
    assert added[1].args["path"] == scripts.bookkeeping_dir("/root/.npm")
    assert not {"withLabel", "withEnvVariable", "withExec"} & set(names(out))

    execs = exec_queries(offline)
    assert execs, "mount restored nothing"
    assert exec_problem(offline) is None and nonce_problem(offline, scripts.NONCE_ENV) is None
    for chain in execs:
        assert_helper_rootfs_before_exec(offline, chain)
        # The helper sees the volume as the user mounted it (same sharing and owner).
        mounted = [s for s in chain if s.name == "withMountedCache" and s.args["path"] == "/root/.npm"]
        assert mounted and mounted[0].args["sharing"] == "LOCKED" and mounted[0].args["owner"] == "1000:1000"
    seeded = [
        c
        for c in execs
        if any(s.name == "withMountedDirectory" and s.args["path"] == scripts.SRC_DIR for s in c)
    ]
    assert seeded, "a hit must seed the volume from the imported directory"
    src = next(s for s in seeded[0] if s.name == "withMountedDirectory" and s.args["path"] == scripts.SRC_DIR)
    assert names(expand_arg(offline, src.args["source"]))[:2] == ["directory", "withNewFile"]


async def test_mount_fallback_seeds_from_the_restore_key_and_records_nothing(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = StandInBackend(resolves_to="npm-main-older")
    out, _ = await _mount(offline, backend, restore_keys=["npm-feature-", "npm-main-"])

    assert backend.resolved == [("npm-v1", ["npm-feature-", "npm-main-"])]
    assert backend.imported == ["npm-main-older"], "the matched entry, not the wanted key, is imported"
    state = scripts.state_file("npm-v1", "/root/.npm")  # the volume's own key: export saves there
    assert script_execs(offline, scripts.SEED) == [[scripts.SRC_DIR, "/root/.npm", state, "forget"]]
    seed = next(c for c in exec_queries(offline) if "withMountedDirectory" in names(c))
    src = next(s for s in seed if s.name == "withMountedDirectory" and s.args["path"] == scripts.SRC_DIR)
    imported = expand_arg(offline, src.args["source"])
    assert imported[-1].name == "withNewFile" and imported[-1].args["contents"] == "npm-main-older"
    # The bookkeeping still names the exact key.
    record = expand_arg(offline, user_steps(out)[-1].args["source"])
    assert json.loads(record[-1].args["contents"]) == {"key": "npm-v1", "path": "/root/.npm"}
    lines = report_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert lines[0].startswith(
        "remote-cache: import key='npm-v1' path=/root/.npm: fallback hit (from 'npm-main-older') in "
    )


async def test_mount_resolve_miss_imports_nothing(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = StandInBackend(resolves_to="")
    await _mount(offline, backend, restore_keys=["npm-"])
    assert backend.imported == []
    assert script_execs(offline, scripts.SEED) == []
    assert script_execs(offline, scripts.FORGET) == [[scripts.state_file("npm-v1", "/root/.npm")]]
    assert ": miss in " in report_lines(capsys.readouterr().err)[-1]


async def test_mount_times_out_open_or_strict(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = StandInBackend(delay=5)
    with anyio.fail_after(4):  # the mount's own 1s limit must fire first
        await _mount(offline, slow, timeout=1)
    assert slow.imported == [] and script_execs(offline, scripts.SEED) == []
    lines = report_lines(capsys.readouterr().err)
    assert "timed out after 1s" in lines[0] and "continuing without it" in lines[0]
    assert ": error in " in lines[-1]

    with pytest.raises(RemoteCacheError, match="timed out after 1s"):
        await _mount(offline, StandInBackend(delay=5), timeout=1, strict=True)


async def test_mount_miss_starts_cold(offline: OfflineSession) -> None:
    def missing(args: dict[str, Any], chain: tuple[Step, ...]) -> Any:
        if "withNewFile" in names(chain):  # the stand-in backend's import
            raise query_error(f"{MISS_MARKER} no entry for key 'npm-v1'", ["directory"])
        return "offline:sync"

    offline.answers["Directory.sync"] = missing
    out, _ = await _mount(offline)
    assert "sharing" not in user_steps(out)[0].args  # not chosen: the engine's default applies
    execs = exec_queries(offline)
    assert execs and all(
        not any(s.name == "withMountedDirectory" and s.args["path"] == scripts.SRC_DIR for s in c)
        for c in execs
    ), "a miss must not seed anything"
    for chain in execs:
        assert_helper_rootfs_before_exec(offline, chain)


# -- RemoteCache.export ----------------------------------------------------------------------


async def test_export_returns_the_container_unchanged(offline: OfflineSession) -> None:
    from remote_cache.dagger.main import RemoteCache

    backend = StandInBackend()
    bookkeeping = scripts.bookkeeping_dir("/root/.npm")
    offline.answers.update(
        {
            "Container.mounts": ["/root/.npm", bookkeeping],
            "File.contents": scripts.volume_record("npm-v1", "/root/.npm"),
            "Container.stdout": f"{scripts.STATUS_PREFIX} changed abc123 -\n",
        }
    )
    ctr = dag.container().from_("node:22").with_exec(["npm", "ci"])
    before = offline.chain_of(await ctr.id())
    cache = RemoteCache(backend=backend)
    out = await cache.export(ctr)
    after = offline.chain_of(await out.id())
    assert after == before, "export must return the caller's container as it was"
    assert not {"withLabel", "withEnvVariable"} & set(names(after))
    assert [k for k, _ in backend.exported] == ["npm-v1"]
    saved = expand_arg(offline, backend.exported[0][1])
    assert names(saved)[-1] == "directory" and saved[-1].args["path"] == scripts.OUT_DIR
    # The backend gets a mount's whole content, never a sub-path of the helper's root filesystem.
    assert subpath_problem(offline, saved) is None
    assert [(what, subpath_problem(offline, c)) for what, c in handed_directories(offline)] == [
        (what, None) for what, _ in handed_directories(offline)
    ]
    for chain in exec_queries(offline):
        if chain[: len(before)] == before and len(chain) > len(before):
            rest = chain[len(before) :]
            if "withExec" in names(rest):
                assert "withRootfs" in names(rest), "export runs a command in the user's image"


async def test_subpath_rule_flags_what_publish_would_ship_whole(offline: OfflineSession) -> None:
    """The rule behind the check above, shown failing: the directory the export handed its backend
    until this rule existed (an exec's output path on the helper's root filesystem) is flagged; a
    mounted directory's content, a root filesystem and a fresh directory are not."""
    run = ["sh", "-c", "cp -a /v/. /out/"]
    old = dag.container().from_("alpine").with_exec(run).directory("/out")
    mounted = dag.container().from_("alpine").with_mounted_directory("/out", dag.directory())
    new = mounted.with_exec(run).directory("/out")
    sub = dag.directory().with_new_file("a/b", "x").directory("a")
    chains = {name: offline.chain_of(await d.id()) for name, d in
              {"old": old, "new": new, "sub": sub, "fresh": dag.directory().with_new_file("f", "x"),
               "rootfs": dag.container().from_("alpine").rootfs()}.items()}  # fmt: skip
    assert "sub-path of the container's root filesystem" in str(subpath_problem(offline, chains["old"]))
    assert "sub-path of another directory" in str(subpath_problem(offline, chains["sub"]))
    assert [subpath_problem(offline, chains[k]) for k in ("new", "fresh", "rootfs")] == [None] * 3
    # handed_directories finds what a query hands over, here to withRootfs.
    await dag.container().with_rootfs(old).sync()
    handed = [(what, subpath_problem(offline, chain)) for what, chain in handed_directories(offline)]
    assert len(handed) == 1 and handed[0][0].startswith("Container.withRootfs") and handed[0][1]


async def test_exec_rule_flags_an_entrypoint_or_an_accepted_failure(offline: OfflineSession) -> None:
    """The rule the mount and export tests hold, shown failing: an exec that prepends the
    container's entrypoint (``withRootfs`` keeps the user's) or accepts a non-zero exit."""
    await dag.container().with_exec(["sh", "-c", "true"]).sync()
    assert exec_problem(offline) is None
    await dag.container().with_exec(["sh"], use_entrypoint=True).sync()
    assert "prepends the container's entrypoint" in str(exec_problem(offline))
    offline.recorded.clear()
    await dag.container().with_exec(["sh"], expect=dagger.ReturnType.ANY).sync()
    assert "does not fail on a non-zero exit" in str(exec_problem(offline))


async def test_nonce_rule_flags_a_helper_exec_the_engine_could_answer_from_its_cache(
    offline: OfflineSession,
) -> None:
    """The rule the mount and export tests hold, shown failing: a helper exec over a cache volume
    without the nonce set since its ``withRootfs`` (one set before it does not count)."""
    helper = dag.container().from_(scripts.HELPER_IMAGE).rootfs()
    user = dag.container().from_("node:22").with_mounted_cache("/c", dag.cache_volume("c"))
    await user.with_exec(["npm", "ci"]).sync()  # the user's own exec: not the rule's business
    await user.with_rootfs(helper).with_env_variable(scripts.NONCE_ENV, "1").with_exec(["ls"]).sync()
    assert nonce_problem(offline, scripts.NONCE_ENV) is None
    stale = user.with_env_variable(scripts.NONCE_ENV, "1").with_rootfs(helper)
    await stale.with_exec(["ls"]).sync()
    assert "may answer it from cache" in str(nonce_problem(offline, scripts.NONCE_ENV))


def _one_volume(session: OfflineSession, status: str = "changed abc123 -") -> dagger.Container:
    bookkeeping = scripts.bookkeeping_dir("/root/.npm")
    session.answers.update(
        {
            "Container.mounts": ["/root/.npm", bookkeeping],
            "File.contents": scripts.volume_record("npm-v1", "/root/.npm"),
            "Container.stdout": f"{scripts.STATUS_PREFIX} {status}\n",
        }
    )
    return dag.container().from_("node:22").with_exec(["npm", "ci"])


async def test_export_saves_and_records_the_listing(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from remote_cache.dagger.main import RemoteCache

    backend = StandInBackend()
    await RemoteCache(backend=backend, max_size="2GB").export(_one_volume(offline))
    state = scripts.state_file("npm-v1", "/root/.npm")
    assert [k for k, _ in backend.exported] == ["npm-v1"]
    # 2GB is decimal: 2e9 bytes = 1953125 KiB, handed to COPY_OUT for its `du -sk` check.
    assert script_execs(offline, scripts.COPY_OUT) == [["/root/.npm", scripts.OUT_DIR, state, "1953125"]]
    assert script_execs(offline, scripts.RECORD) == [["abc123", state]]
    assert exec_problem(offline) is None and nonce_problem(offline, scripts.NONCE_ENV) is None
    assert ": saved in " in report_lines(capsys.readouterr().err)[-1]


async def test_export_read_only_copies_and_uploads_nothing(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from remote_cache.dagger.main import RemoteCache

    backend = StandInBackend()
    ctr = _one_volume(offline)
    out = await RemoteCache(backend=backend, read_only=True).export(ctr)
    assert offline.chain_of(await out.id()) == offline.chain_of(await ctr.id())
    assert backend.exported == []
    assert script_execs(offline, scripts.COPY_OUT) == [] and script_execs(offline, scripts.RECORD) == []
    assert report_lines(capsys.readouterr().err) == [
        "remote-cache: export key='npm-v1' path=/root/.npm: skipped: read-only"
    ]


async def test_export_over_max_size_skips_or_fails_when_strict(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from remote_cache.dagger.main import RemoteCache

    backend = StandInBackend()
    ctr = _one_volume(offline, status="too-big abc123 3145728")  # 3 GiB measured by du -sk
    await RemoteCache(backend=backend, max_size="2G").export(ctr)
    assert backend.exported == [] and script_execs(offline, scripts.RECORD) == []
    assert script_execs(offline, scripts.COPY_OUT)[0][-1] == str(2 * 1024 * 1024)
    line = report_lines(capsys.readouterr().err)[-1]
    assert line.startswith(
        "remote-cache: export key='npm-v1' path=/root/.npm: skipped: 3.2 GB is over max_size 2G"
    )

    with pytest.raises(RemoteCacheError, match="over max_size 2G"):
        await RemoteCache(backend=backend, max_size="2G", strict=True).export(ctr)
    assert backend.exported == []
    with pytest.raises(RemoteCacheError, match="max_size"):
        await RemoteCache(backend=backend, max_size="lots").export(ctr)
    with pytest.raises(RemoteCacheError, match="max_size"):
        RemoteCache(backend=backend, max_size="lots").cache_volume("/root/.npm", "npm-v1")


async def test_export_timeout_is_fail_open(
    offline: OfflineSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from remote_cache.dagger.main import RemoteCache

    slow = StandInBackend(delay=5)
    with anyio.fail_after(4):
        await RemoteCache(backend=slow, timeout=1).export(_one_volume(offline))
    assert slow.exported == [] and script_execs(offline, scripts.RECORD) == []
    lines = report_lines(capsys.readouterr().err)
    assert "timed out after 1s" in lines[0] and lines[-1].split(": ")[-1].startswith("error in ")


async def test_cache_volume_passes_restore_keys_and_limits(offline: OfflineSession) -> None:
    from remote_cache.dagger.main import RemoteCache

    cache = RemoteCache(backend=StandInBackend(), strict=True, timeout=42)
    vol = cache.cache_volume("/root/.npm", "npm-feature-abc", restore_keys=["npm-feature-", "npm-main-"])
    assert vol.restore_keys == ["npm-feature-", "npm-main-"] and vol.timeout == 42 and vol.strict
    assert cache.cache_volume("/root/.npm", "npm-v1").restore_keys == []
    with pytest.raises(RemoteCacheError, match="restore key is empty"):
        cache.cache_volume("/root/.npm", "npm-v1", restore_keys=[""])


# -- Registry (remote-backend) ---------------------------------------------------------------


def _registry(module: Any, host: str, repo: str, **kw: Any) -> Any:
    main = module.RemoteBackend() if hasattr(module, "RemoteBackend") else None
    assert main is not None, "remote_backend has no RemoteBackend main object"
    return main.registry(address=host, repo=repo, **kw)


async def test_registry_export_saves_with_the_core_in_its_own_container(
    offline: OfflineSession,
    backend_module: Any,
    auth_registry: Any,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """export copies the directory into the function's container and saves it there with the core
    (credentials from the Secret, never in a query); it publishes nothing through the engine."""
    from remote_cache.cache.restore import restore
    from remote_cache.oci.credentials import Credentials
    from remote_cache.oci.reference import parse_reference
    from remote_cache.oci.registry import RegistryStore
    from tests.trees import assert_same_tree

    monkeypatch.chdir(tmp_path)  # the runtime workdir the export goes under
    tree = volume_tree(tmp_path / "volume")
    exported = engine_stub(offline, tree)
    offline.answers["Secret.plaintext"] = auth_registry.password
    secret = dag.set_secret("pw", auth_registry.password)
    reg = await _reg(
        backend_module, auth_registry.host, repo_name, username=auth_registry.username, password=secret
    )
    await reg.export("npm-v1", dag.directory())

    steps = [s for r in offline.recorded for s in offline.expand(r.chain)]
    assert "publish" not in names(tuple(steps)), "export must not publish through the engine"
    assert len(exported) == 1 and Path(exported[0]).is_relative_to(tmp_path), exported
    assert not Path(exported[0]).exists(), "the copy in the function's container is removed"
    module_queries = [r.text for r in offline.recorded if "setSecret" not in r.text]  # not the test's own
    assert module_queries and not any(auth_registry.password in t for t in module_queries), "a secret leaked"
    assert [(w, subpath_problem(offline, c)) for w, c in handed_directories(offline)] == [
        (w, None) for w, _ in handed_directories(offline)
    ]
    # The OWNERS listing made in the engine (remote_backend.local.owners_listing) is an exec too.
    assert script_execs(offline, scripts.OWNERS) and exec_problem(offline) is None

    store = RegistryStore.from_reference(
        parse_reference(f"{auth_registry.host}/{repo_name}"),
        credentials=Credentials(auth_registry.username, auth_registry.password),
    )
    try:
        back = tmp_path / "back"
        await restore(store, "npm-v1", back)
    finally:
        await store.aclose()
    assert_same_tree(tree, back)
    assert owners_of(back) == owners_of(tree), "owners are kept through the export"


async def _push_tiny_image(host: str, repo: str, tag: str, workdir: Path, creds: str | None = None) -> str:
    """Push a one-file OCI image with umoci + skopeo; return its manifest digest."""
    import subprocess

    layout = workdir / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
    bundle = workdir / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)], check=True)
    (bundle / "rootfs" / "hello.txt").write_text("hello\n")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)], check=True)
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            *(["--dest-creds", creds] if creds else []),
            f"oci:{layout}:{tag}",
            f"docker://{host}/{repo}:{tag}",
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            *(["--creds", creds] if creds else []),
            "--format",
            "{{.Digest}}",
            f"docker://{host}/{repo}:{tag}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


async def test_registry_import_pins_digest_and_reports_miss(
    offline: OfflineSession, backend_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    from remote_cache.keys import tag_for_key

    digest = await _push_tiny_image(registry.host, repo_name, tag_for_key("npm-v1"), tmp_path)
    reg = _registry(backend_module, registry.host, repo_name)
    reg = await reg if hasattr(reg, "__await__") else reg
    got = reg.import_("npm-v1")
    got = await got if hasattr(got, "__await__") else got
    chain = offline.chain_of(await got.id())
    froms = [s for s in chain if s.name == "from"]
    assert froms and froms[0].args["address"] == f"{registry.host}/{repo_name}@{digest}", froms

    with pytest.raises(Exception, match=MISS_MARKER):
        missing = reg.import_("no-such-key")
        missing = await missing if hasattr(missing, "__await__") else missing
        await missing.sync()


async def test_registry_import_authenticates_the_engine_with_the_host(
    offline: OfflineSession, backend_module: Any, auth_registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """The engine's pull gets the credentials under the registry host (the engine keys them by
    host: a repository there would go to docker.io); the rule is shown able to fail."""
    from remote_cache.keys import tag_for_key

    await _push_tiny_image(
        auth_registry.host, repo_name, tag_for_key("npm-v1"), tmp_path,
        creds=f"{auth_registry.username}:{auth_registry.password}",
    )  # fmt: skip
    offline.answers["Secret.plaintext"] = auth_registry.password
    secret = dag.set_secret("pw", auth_registry.password)
    reg = await _reg(
        backend_module, auth_registry.host, repo_name, username=auth_registry.username, password=secret
    )
    got = reg.import_("npm-v1")
    got = await got if hasattr(got, "__await__") else got
    auths = [s for s in offline.chain_of(await got.id()) if s.name == "withRegistryAuth"]
    assert [s.args["address"] for s in auths] == [auth_registry.host]
    assert auth_address_problem(offline) is None
    await dag.container().with_registry_auth(f"{auth_registry.host}/{repo_name}", "u", secret).sync()
    assert "wants the registry host" in str(auth_address_problem(offline))


async def test_registry_import_of_an_entry_deleted_meanwhile_is_a_miss(
    offline: OfflineSession, backend_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """The entry goes between the tag lookup and the engine's pull: a miss, not an error. A pull
    that fails while the entry is there stays an error."""
    from remote_cache.keys import tag_for_key

    digest = await _push_tiny_image(registry.host, repo_name, tag_for_key("npm-v1"), tmp_path)

    def engine_fails(delete_first: bool) -> Any:
        def answer(args: dict[str, Any], chain: tuple[Step, ...]) -> Any:
            if any(s.name == "from" and digest in str(s.args.get("address")) for s in chain):
                if delete_first:
                    _delete_manifest(registry.host, repo_name, digest)
                raise query_error(f"failed to resolve image {registry.host}/{repo_name}@{digest}: not found")
            return "offline:unused"

        return answer

    reg = await _reg(backend_module, registry.host, repo_name)
    offline.answers["Container.id"] = engine_fails(delete_first=False)
    with pytest.raises(Exception, match="could not pull") as info:
        await reg.import_("npm-v1")
    assert MISS_MARKER not in str(info.value)
    offline.answers["Container.id"] = engine_fails(delete_first=True)
    with pytest.raises(Exception, match=MISS_MARKER):
        await reg.import_("npm-v1")


def _delete_manifest(host: str, repo: str, digest: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{digest}", method="DELETE")
    with urllib.request.urlopen(request) as response:
        assert response.status == 202


async def test_an_invalid_query_is_rejected(offline: OfflineSession) -> None:
    # What every test above relies on: a query the schema does not allow fails loudly.
    from gql import gql as parse_request

    bad = parse_request(
        '{ container { withMountedCache(path: "/c", cache: "x", sharing: SOMETIMES) { id } } }'
    )
    with pytest.raises(AssertionError, match="invalid query"):
        await offline.execute(bad)
    ok = parse_request('{ container { withMountedCache(path: "/c", cache: "x", sharing: LOCKED) { id } } }')
    assert (await offline.execute(ok))["container"]["withMountedCache"]["id"].startswith("offline:")


# -- Registry: resolve, immutable export, housekeeping (real registry) --------------------------


async def _save_entry(host: str, repo: str, key: str, root: Path, *, age_days: int = 0) -> None:
    """Store an entry with the core (as the CLI would), optionally backdated by ``age_days``."""
    from remote_cache.cache.save import save
    from remote_cache.oci.reference import parse_reference
    from remote_cache.oci.registry import RegistryStore
    from tests.stores import backdate

    root.mkdir(parents=True)
    (root / "data.txt").write_text(key)
    store = RegistryStore.from_reference(parse_reference(f"{host}/{repo}"), plain_http=True)
    try:
        await save(store, key, root)
        if age_days:
            await backdate(store, key, age_days)
    finally:
        await store.aclose()


async def _reg(module: Any, host: str, repo: str, **kw: Any) -> Any:
    reg = _registry(module, host, repo, **kw)
    return await reg if hasattr(reg, "__await__") else reg


async def test_registry_resolve_exact_fallback_and_miss(
    offline: OfflineSession, backend_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    await _save_entry(registry.host, repo_name, "npm-main-old", tmp_path / "a", age_days=3)
    await _save_entry(registry.host, repo_name, "npm-main-new", tmp_path / "b", age_days=1)
    await _save_entry(registry.host, repo_name, "npm-feature-x", tmp_path / "c", age_days=2)
    reg = await _reg(backend_module, registry.host, repo_name)

    assert await reg.resolve("npm-main-old", ["npm-feature-"]) == "npm-main-old"  # exact wins
    assert await reg.resolve("npm-feature-y", ["npm-feature-", "npm-main-"]) == "npm-feature-x"
    assert await reg.resolve("npm-other-y", ["npm-other-", "npm-main-"]) == "npm-main-new"  # newest
    assert await reg.resolve("npm-other-y", ["pip-"]) == ""
    assert await reg.resolve("npm-other-y", []) == ""
    # import_ of the fallback's key pins what resolve found.
    got = reg.import_("npm-main-new")
    got = await got if hasattr(got, "__await__") else got
    froms = [s for s in offline.chain_of(await got.id()) if s.name == "from"]
    assert froms and froms[0].args["address"].startswith(f"{registry.host}/{repo_name}@sha256:")


async def test_registry_immutable_export_keeps_an_existing_tag(
    offline: OfflineSession,
    backend_module: Any,
    registry: Any,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from remote_cache.keys import tag_for_key

    monkeypatch.chdir(tmp_path)
    exported = engine_stub(offline, volume_tree(tmp_path / "volume"))
    first = await _push_tiny_image(registry.host, repo_name, tag_for_key("npm-v1"), tmp_path)

    immutable = await _reg(backend_module, registry.host, repo_name, immutable=True)
    await immutable.export("npm-v1", dag.directory())
    assert exported == [], "an immutable registry neither copies nor overwrites an existing tag"
    assert "exists and the cache is immutable" in capsys.readouterr().err
    assert await immutable.resolve("npm-v1", []) == "npm-v1"

    await immutable.export("npm-v2", dag.directory())  # a new key: saved
    assert len(exported) == 1 and "save saved npm-v2" in capsys.readouterr().err
    mutable = await _reg(backend_module, registry.host, repo_name)
    await mutable.export("npm-v1", dag.directory())  # default: replaced
    assert len(exported) == 2
    digest = await _digest_of(registry.host, repo_name, tag_for_key("npm-v1"))
    assert digest != first


async def _digest_of(host: str, repo: str, tag: str) -> str:
    from remote_cache.oci.reference import parse_reference
    from remote_cache.oci.registry import RegistryStore

    store = RegistryStore.from_reference(parse_reference(f"{host}/{repo}"))
    try:
        return (await store.resolve(tag)).digest
    finally:
        await store.aclose()


async def test_registry_entries_remove_prune(
    offline: OfflineSession, backend_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    for i, (key, age) in enumerate([("npm-a", 30), ("npm-b", 10), ("npm-c", 0), ("go-a", 30)]):
        await _save_entry(registry.host, repo_name, key, tmp_path / str(i), age_days=age)
    reg = await _reg(backend_module, registry.host, repo_name)

    table = (await reg.entries()).splitlines()
    assert table[0].split() == ["KEY", "CREATED", "SIZE", "FILES", "TAG"]
    assert [row.split()[0] for row in table[1:]] == ["npm-c", "npm-b", "go-a", "npm-a"] or [
        row.split()[0] for row in table[1:]
    ] == ["npm-c", "npm-b", "npm-a", "go-a"]
    lines = [json.loads(line) for line in (await reg.entries(prefix="npm-", json_=True)).splitlines()]
    assert [e["key"] for e in lines] == ["npm-c", "npm-b", "npm-a"]
    assert all(e["files"] == 1 and e["size"] == 5 and e["created"] for e in lines)
    assert "no entries" in await reg.entries(prefix="pip-")

    planned = await reg.prune(older_than="7d", keep=1, prefix="npm-", dry_run=True)
    assert planned.startswith("would remove 2 entries") and "npm-a" in planned and "npm-b" in planned
    assert len((await reg.entries()).splitlines()) == 5, "a dry run deletes nothing"
    done = await reg.prune(older_than="20d")
    assert done.startswith("removed 2 entries") and "npm-a" in done and "go-a" in done
    assert "removed npm-b" in await reg.remove("npm-b")
    assert [json.loads(x)["key"] for x in (await reg.entries(json_=True)).splitlines()] == ["npm-c"]

    with pytest.raises(Exception, match=MISS_MARKER):
        await reg.remove("npm-b")
    with pytest.raises(RemoteCacheError, match="refusing to delete every entry"):
        await reg.prune()
    with pytest.raises(RemoteCacheError, match="not a duration"):
        await reg.prune(older_than="a week")


async def test_registry_remove_with_copies(
    offline: OfflineSession, backend_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    """A registry deletes a manifest with every tag naming it: remove refuses an entry another tag
    copies, naming the argument that removes them together, as the CLI's rm does."""
    from remote_cache.errors import UnsupportedOperation
    from remote_cache.keys import tag_for_key
    from remote_cache.oci.reference import parse_reference
    from tests.stores import copy_tag, opened

    await _save_entry(registry.host, repo_name, "main-1", tmp_path / "a")
    await _save_entry(registry.host, repo_name, "other", tmp_path / "b")
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        await copy_tag(store, tag_for_key("main-1"), "release-1")  # as skopeo copy ...:main-1 ...:release-1
    reg = await _reg(backend_module, registry.host, repo_name)

    with pytest.raises(UnsupportedOperation, match=r"main-1.*remove --with-copies"):
        await reg.remove("release-1")
    assert sorted(json.loads(x)["key"] for x in (await reg.entries(json_=True)).splitlines()) == [
        "main-1",
        "other",
        "release-1",
    ]
    said = await reg.remove("release-1", with_copies=True)
    assert "removed release-1" in said and "with its copies main-1" in said
    assert [json.loads(x)["key"] for x in (await reg.entries(json_=True)).splitlines()] == ["other"]


async def test_registry_that_refuses_deletes_says_so(
    offline: OfflineSession, backend_module: Any, tmp_path: Path
) -> None:
    from remote_cache.errors import UnsupportedOperation
    from tests.registry_server import start_registry

    server = start_registry(tmp_path / "srv", auth="none", delete_enabled=False)
    try:
        await _save_entry(server.host, "test/no-deletes", "npm-a", tmp_path / "a")
        reg = await _reg(backend_module, server.host, "test/no-deletes")
        with pytest.raises(UnsupportedOperation, match=r"ttl\.sh"):
            await reg.remove("npm-a")
        with pytest.raises(UnsupportedOperation, match="does not allow deleting"):
            await reg.prune(prefix="npm-")
        assert "npm-a" in await reg.entries()
    finally:
        server.stop()
