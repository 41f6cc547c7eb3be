"""Render the GraphQL each module function builds, validate it, and check what matters in it.

Each function's Python method runs in-process against the offline session (``offline``
fixture): every query it executes is validated against the pinned v0.21.8 schema (an invalid one
fails the test) and recorded; IDs expand back into the calls that built them. Canned answers
are few and listed in each test. A stand-in backend replaces the engine's interface binding.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagger
import graphql
import pytest
from dagger import dag

from remote_cache import scripts
from remote_cache.errors import MISS_MARKER
from tests.dagger.offline.session import OfflineSession, Step, query_error

REPO_ROOT = Path(__file__).resolve().parents[2]
HELPER_PREFIX = "alpine:3.22.2@sha256:4b7ce0"


@dataclass
class StandInBackend:
    """What the engine hands a function for a ``Backend`` argument: lazy import, awaited export."""

    exported: list[tuple[str, str]] = field(default_factory=list)

    def import_(self, key: str) -> dagger.Directory:
        return dag.directory().with_new_file("stand-in-backend", key)

    async def export(self, key: str, dir: dagger.Directory) -> None:
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


async def _mount(session: OfflineSession, **opts: Any) -> tuple[tuple[Step, ...], StandInBackend]:
    from remote_cache.mod.volume import RemoteCacheVolume

    backend = StandInBackend()
    vol = RemoteCacheVolume(
        path="/root/.npm",
        key="npm-v1",
        volume=dag.cache_volume("npm"),
        backend=backend,
        **opts,
    )
    out = await vol.mount(dag.container().from_("node:22"))
    return session.chain_of(await out.id()), backend


async def test_mount_hit(offline: OfflineSession) -> None:
    out, _ = await _mount(offline, sharing=dagger.CacheSharingMode.LOCKED, owner="1000:1000")
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
    from remote_cache.mod.main import RemoteCache

    backend = StandInBackend()
    bookkeeping = scripts.bookkeeping_dir("/root/.npm")
    offline.answers.update(
        {
            "Container.mounts": ["/root/.npm", bookkeeping],
            "File.contents": scripts.volume_record("npm-v1", "/root/.npm"),
            "Container.stdout": f"{scripts.STATUS_PREFIX} changed abc123\n",
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
    for chain in exec_queries(offline):
        if chain[: len(before)] == before and len(chain) > len(before):
            rest = chain[len(before) :]
            if "withExec" in names(rest):
                assert "withRootfs" in names(rest), "export runs a command in the user's image"


# -- Registry (remote-backend) ---------------------------------------------------------------


@pytest.fixture
def registry_module() -> Any:
    src = REPO_ROOT / "remote_backend" / "src"
    if not (src / "remote_backend").is_dir():
        pytest.skip("remote_backend is not written yet")
    sys.path.insert(0, str(src))
    try:
        import remote_backend

        yield remote_backend
    finally:
        sys.path.remove(str(src))


def _registry(module: Any, host: str, repo: str, **kw: Any) -> Any:
    main = module.RemoteBackend() if hasattr(module, "RemoteBackend") else None
    assert main is not None, "remote_backend has no RemoteBackend main object"
    return main.registry(address=host, repo=repo, **kw)


async def test_registry_export_publishes_zstd_oci_with_auth_first(
    offline: OfflineSession, registry_module: Any, registry: Any, repo_name: str
) -> None:
    offline.answers["Container.publish"] = lambda args, chain: f"{args['address']}@sha256:{'0' * 64}"
    offline.answers["Container.platform"] = "linux/amd64"
    offline.answers["Query.defaultPlatform"] = "linux/amd64"
    secret = dag.set_secret("pw", "s3cret")
    reg = _registry(registry_module, registry.host, repo_name, username="bob", password=secret)
    reg = await reg if hasattr(reg, "__await__") else reg
    await reg.export("npm-v1", dag.directory().with_new_file("a", "b"))
    publishes = [
        offline.expand(r.chain) for r in offline.recorded if r.chain and r.chain[-1].name == "publish"
    ]
    assert publishes, "export published nothing"
    for chain in publishes:
        calls = names(chain)
        assert "withRegistryAuth" in calls and calls.index("withRegistryAuth") < calls.index("publish")
        publish = chain[-1]
        assert publish.args.get("forcedCompression") == "Zstd"
        # The SDK leaves out an argument equal to the schema default; the default is OCI.
        media = publish.args.get("mediaTypes", _default(offline, "Container", "publish", "mediaTypes"))
        assert media == "OCIMediaTypes"
        variants = [expand_arg(offline, v) for v in publish.args.get("platformVariants") or []]
        assert variants, "publish must carry the platform variants"
        platforms = [c[0].args.get("platform") for c in [chain, *variants]]
        assert len(set(platforms)) == len(platforms) >= 2 and None not in platforms, platforms
        for variant in variants:
            assert "withRegistryAuth" in names(variant)
        assert str(publish.args["address"]).startswith(f"{registry.host}/{repo_name}:")
        assert "s3cret" not in json.dumps([str(s) for s in chain])


async def _push_tiny_image(host: str, repo: str, tag: str, workdir: Path) -> str:
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
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{host}/{repo}:{tag}"],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
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
    offline: OfflineSession, registry_module: Any, registry: Any, repo_name: str, tmp_path: Path
) -> None:
    from remote_cache.keys import tag_for_key

    digest = await _push_tiny_image(registry.host, repo_name, tag_for_key("npm-v1"), tmp_path)
    reg = _registry(registry_module, registry.host, repo_name)
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
