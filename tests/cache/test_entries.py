"""list / inspect / remove / prune over a layout and over the real registry."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_cache.cache.entries import Entry, format_table, inspect, list_entries, prune, remove
from remote_cache.cache.save import save
from remote_cache.errors import CacheMiss, RemoteCacheError, StoreError
from remote_cache.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, sha256_digest
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.reference import Reference, parse_reference
from remote_cache.oci.store import Store
from tests.registry_server import FaultProxy, RegistryServer
from tests.stores import DEEP_JSON, backdate, copy_tag, layout_blob, layout_document, opened
from tests.trees import assert_same_tree, one_file_tree
from tests.users import as_nobody_in, give_to_nobody


def _tree(root: Path, content: bytes) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.txt").write_bytes(content)
    (root / "other").write_bytes(content * 3)
    return root


async def test_list_inspect_remove(where: Reference, tmp_path: Path) -> None:
    async with opened(where) as store:
        await _list_inspect_remove(store, tmp_path)


async def _list_inspect_remove(store: Store, tmp_path: Path) -> None:
    assert await list_entries(store) == []
    a = await save(store, "npm linux", _tree(tmp_path / "a", b"aaa"))
    b = await save(store, "pip-3.12", _tree(tmp_path / "b", b"bbbb"))
    entries = await list_entries(store)
    assert sorted(e.key for e in entries) == ["npm linux", "pip-3.12"]
    by_key = {e.key: e for e in entries}
    assert by_key["npm linux"].tag == a.tag and by_key["npm linux"].digest == a.digest
    assert by_key["pip-3.12"].size == b.size == 4 + 12
    assert by_key["pip-3.12"].files == 2
    assert by_key["pip-3.12"].created is not None
    assert abs(by_key["pip-3.12"].created - datetime.now(UTC)) < timedelta(minutes=5)
    assert [e.key for e in await list_entries(store, prefix="pip")] == ["pip-3.12"]
    # A prefix is a key's: "npm linux" is stored under the tag npm-linux--<hash>, but its key
    # does not start with "npm-" (listed, and pruned with --keep 0, it was).
    assert await list_entries(store, prefix="npm-") == []
    assert await prune(store, keep=0, prefix="npm-", dry_run=True) == []

    info = await inspect(store, "npm linux")
    assert info.digest == a.digest and len(info.layers) == a.layers_total
    assert info.compressed_size == a.bytes_total
    assert json.dumps(info.to_json(with_layers=True))  # serialisable
    with pytest.raises(CacheMiss):
        await inspect(store, "absent")

    removed = await remove(store, "npm linux")
    assert removed.entry.digest == a.digest and removed.copies == ()
    assert [e.key for e in await list_entries(store)] == ["pip-3.12"]
    with pytest.raises(CacheMiss):
        await remove(store, "npm linux")


async def test_foreign_image_is_listed_with_what_is_known(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    layer = b"\x1f\x8b not really"
    await store.put_blob(await _desc(layer), layer)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(layer), "size": len(layer)}],
    }
    await store.put_manifest(json.dumps(manifest).encode(), OCI_MANIFEST, tag="foreign")
    weird = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": manifest["config"],
        "layers": [{"mediaType": "application/vnd.example.weird", "digest": sha256_digest(b"w"), "size": 1}],
    }
    await store.put_manifest(json.dumps(weird).encode(), OCI_MANIFEST, tag="weird")
    entries = {e.tag: e for e in await list_entries(store)}
    assert entries["foreign"].key == "foreign"
    assert entries["foreign"].created is None and entries["foreign"].size is None
    assert entries["foreign"].compressed_size == len(layer)
    assert entries["weird"].error is not None and "weird" in entries["weird"].error


async def _desc(data: bytes) -> Any:
    from remote_cache.oci import Descriptor

    return Descriptor(OCI_LAYER_GZIP, sha256_digest(data), len(data))


async def test_prune_by_age_keep_and_prefix(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    for i, key in enumerate(["npm-1", "npm-2", "npm-3", "go-1"]):
        await save(store, key, _tree(tmp_path / key, key.encode() * (i + 1)))
    await backdate(store, "npm-1", 30)
    await backdate(store, "npm-2", 10)
    await backdate(store, "go-1", 30)

    with pytest.raises(ValueError):
        await prune(store)
    planned = await prune(store, older_than=timedelta(days=7), dry_run=True)
    assert sorted(e.key for e in planned) == ["go-1", "npm-1", "npm-2"]
    assert len(await list_entries(store)) == 4  # dry run removed nothing

    removed = await prune(store, older_than=timedelta(days=7), keep=2, prefix="npm-")
    assert [e.key for e in removed] == ["npm-1"]  # npm-2 is old but among the 2 newest npm- entries
    assert sorted(e.key for e in await list_entries(store)) == ["go-1", "npm-2", "npm-3"]

    removed = await prune(store, keep=1)
    assert sorted(e.key for e in removed) == ["go-1", "npm-2"]
    assert [e.key for e in await list_entries(store)] == ["npm-3"]
    # Blobs only the pruned entries used are gone once the grace period has passed.
    assert await store.gc(grace_seconds=0) != (0, 0)
    remaining = {p.name for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir()}
    assert len(remaining) == 1 + 2 + 2 + 1  # index, 2 manifests, 2 configs, 1 layer


async def test_prune_on_registry(registry: Any, repo_name: str, tmp_path: Path) -> None:
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        await save(store, "k-old", _tree(tmp_path / "a", b"a"))
        await save(store, "k-new", _tree(tmp_path / "b", b"b"))
        removed = await prune(store, keep=1)
        assert len(removed) == 1
        assert [e.key for e in await list_entries(store)] == [({"k-old", "k-new"} - {removed[0].key}).pop()]


async def test_prune_removes_nothing_when_a_store_error_hides_an_entry(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """The newest entry's manifest answers 503 while ``prune --keep 2`` lists: that entry is not
    broken, only unread, so prune fails and deletes nothing. (It was ranked as undated, the
    oldest, and deleted: healthy and newest.)"""
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        for key in ("k1", "k2", "k3"):
            await save(store, key, one_file_tree(tmp_path / key, key))
        await backdate(store, "k1", 2)  # created days apart: k3 is the newest
        await backdate(store, "k2", 1)
        newest = await inspect(store, "k3")
        manifests = {e.key: e for e in await list_entries(store)}
        assert list(manifests) == ["k3", "k2", "k1"]
        from remote_cache.cache.image import load_image
        from remote_cache.keys import tag_for_key

        manifest = (await load_image(store, tag_for_key("k3"))).manifest.digest
        proxy.fail(1000, 503, method="GET", path_contains=manifest.split(":")[1])
        with pytest.raises(RemoteCacheError) as info:
            await prune(store, keep=2)
        assert not isinstance(info.value, CacheMiss)
        proxy.clear()
        assert (await inspect(store, "k3")).digest == newest.digest
        assert sorted(e.key for e in await list_entries(store)) == ["k1", "k2", "k3"]


@pytest.mark.parametrize("copy", ["index", "one platform"])
async def test_an_entry_copied_to_another_tag_is_never_removed_with_the_copy(
    where: Reference, tmp_path: Path, copy: str
) -> None:
    """``skopeo copy ...:main-1 ...:release-1`` makes a second tag: of our index (``--all``), or of
    one platform's manifest out of it (plain). Removing one entry must not remove or break the
    other: a registry deletes a manifest with every tag naming it, so there rm refuses (exit 5)
    unless told to remove the copies too, and prune leaves an entry whose manifest an entry it
    keeps uses. The copy is release-1's entry (its own tag), for prune's prefix too. (rm
    release-1 removed main-1 or broke it, saying nothing; on a layout or a bucket prune counted
    main-1 as removed along with its copy and left it.)"""
    from remote_cache.cache.image import load_image
    from remote_cache.errors import UnsupportedOperation

    src = one_file_tree(tmp_path / "a", "a")

    async def main_and_its_copy(store: Store) -> str:
        saved = await save(store, "main-1", src)
        image = await load_image(store, saved.tag)
        await copy_tag(store, saved.digest if copy == "index" else image.manifest.digest, "release-1")
        return saved.digest

    async with opened(where) as store:
        digest = await main_and_its_copy(store)
        await save(store, "other", one_file_tree(tmp_path / "b", "b"))
        await backdate(store, "other", -1)  # created a day later: "other" is the newest
        assert {e.tag: e.key for e in await list_entries(store)}["release-1"] == "release-1"
        main_only = [e.tag for e in await prune(store, prefix="main-", dry_run=True)]
        if where.transport == "registry":  # it deletes the manifest, so every tag of it
            # Deleting main-1's index leaves a copy of one of its manifests whole, not a copy of it.
            assert main_only == ([] if copy == "index" else ["main-1"])
            with pytest.raises(UnsupportedOperation, match=r"main-1.*--with-copies"):
                await remove(store, "release-1")
            assert await prune(store, prefix="release-") == []
            assert (await inspect(store, "main-1")).digest == digest
            removed = await prune(store, keep=1)  # "other" is the newest; main-1 and its copy go
            assert sorted(e.tag for e in removed) == ["main-1", "release-1"]
            assert [e.key for e in await list_entries(store)] == ["other"]
            await main_and_its_copy(store)
            assert (await remove(store, "release-1", with_copies=True)).copies == ("main-1",)
            with pytest.raises(CacheMiss):
                await inspect(store, "main-1")  # gone with it, or broken (its manifest gone)
        else:  # only the tag goes
            assert main_only == ["main-1"]
            await remove(store, "release-1")
            assert (await inspect(store, "main-1")).digest == digest
            await main_and_its_copy(store)
            removed = await prune(store, keep=1)
            assert sorted(e.tag for e in removed) == ["main-1", "release-1"]
        assert [e.key for e in await list_entries(store)] == ["other"]


def test_format_table_aligns_columns_and_marks_what_is_unknown() -> None:
    known = Entry(key="npm-a", tag="npm-a", digest="sha256:" + "0" * 64, size=2_000_000, files=3)
    foreign = Entry(key="x", tag="x", digest="sha256:" + "1" * 64, error="not a cache image")
    lines = format_table([known, foreign]).splitlines()
    assert lines[0].split() == ["KEY", "CREATED", "SIZE", "FILES", "TAG"]
    assert lines[1].split()[:1] == ["npm-a"] and "2.0 MB" in lines[1] and lines[1].split()[-1] == "npm-a"
    assert lines[2].split()[1:4] == ["-", "-", "-"] and "(not a cache image)" in lines[2]
    assert lines[1].index("npm-a", 5) == lines[0].index("TAG")


async def test_listing_and_inspecting_read_each_tag_by_get(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """Each entry a listing (or ``inspect``) shows costs its tag's index and its manifest: by GET
    of the tag, where a HEAD then a GET by digest were two round trips."""
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        for key in ("a", "b"):
            await save(store, key, one_file_tree(tmp_path / key))
        proxy.requests.clear()
        assert sorted(e.key for e in await list_entries(store)) == ["a", "b"]
        assert (await inspect(store, "a")).key == "a"
    assert proxy.count("HEAD", "/manifests/") == 0
    assert proxy.count("GET", "/manifests/") == 6  # per entry listed or inspected: tag, manifest


async def test_prune_on_a_registry_reads_each_tag_once(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """Finding copies (see the copies test below) takes what the listing read: one tag list and
    one GET per tag, not a second round of each."""
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        for key in ("k1", "k2", "k3"):
            await save(store, key, one_file_tree(tmp_path / key, key))
        proxy.requests.clear()
        await prune(store, keep=1, dry_run=True)
    assert proxy.count("GET", "/tags/list") == 1
    assert sum(r.method == "GET" and "/manifests/k" in r.path for r in proxy.requests) == 3


async def test_an_entry_saved_again_while_prune_lists_is_kept(
    where: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prune deletes what it listed: a key saved again between its listing and its delete keeps
    its new entry (the delete was by tag, removing whatever the tag named by then)."""
    from remote_cache.cache import entries
    from remote_cache.cache.restore import restore

    async with opened(where) as store:
        await save(store, "a", one_file_tree(tmp_path / "a1", "first"))
        await save(store, "b", one_file_tree(tmp_path / "b", "b"))
        listed = entries._listing
        again = None

        async def list_then_save(store: Store, *args: Any) -> Any:
            nonlocal again
            found = await listed(store, *args)
            again = await save(store, "a", one_file_tree(tmp_path / "a2", "second"))
            return found

        monkeypatch.setattr(entries, "_listing", list_then_save)
        await prune(store, keep=1, grace=timedelta(0))  # a registry deletes the listed manifest
        assert again is not None and (await inspect(store, "a")).digest == again.digest
        out = tmp_path / "out"
        await restore(store, "a", out)
        assert (out / "f").read_text() == "second"


async def test_a_save_that_reuses_a_removed_entrys_blobs_stays_restorable(
    where: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A save reusing layers of its base (unchanged files: this machine's evidence) while ``rm``
    removes that base and sweeps its blobs: the save ends with an entry that restores (it finds
    what was swept and packs it again), not one whose layers are gone."""
    from remote_cache.cache.evidence import FRESH_NS
    from remote_cache.cache.restore import restore

    src = tmp_path / "src"
    for i in range(40):  # 40 MB: several layers (16 MiB at most each), most of them reused
        (src / f"d{i:02}").mkdir(parents=True)
        (src / f"d{i:02}" / "f").write_bytes(os.urandom(1_000_000))
    time.sleep(FRESH_NS / 1e9 + 0.2)  # settled files: the save records evidence for its layers
    async with opened(where) as store:
        await save(store, "base", src)
        (src / "new").write_text("one more file")
        put = store.put_blob
        removed: list[str] = []

        async def remove_base_first(desc: Any, source: Any) -> bool:
            # The save has chosen what to reuse and uploads the rest: the sweep (no grace) frees
            # every blob of the base that no tag references, those the save reuses included.
            if not removed:  # uploads run concurrently: only the first removes
                removed.append("base")
                await remove(store, "base", grace=timedelta(0))
            return await put(desc, source)

        monkeypatch.setattr(store, "put_blob", remove_base_first)
        result = await save(store, "next", src, base_key="base")
        assert removed == ["base"]
        if hasattr(store, "gc"):  # a store this tool sweeps: the sweep took blobs the save reused
            assert "packing and uploading again" in caplog.text, result.summary()
        else:  # a registry frees nothing itself: the reused layers stay
            assert result.layers_reused >= 1, result.summary()
        out = tmp_path / "out"
        await restore(store, "next", out)
        assert_same_tree(src, out)


async def test_entries_another_tool_wrote_unreadably_can_be_removed(tmp_path: Path) -> None:
    """index.json entries this tool cannot read (a sha512 digest, no mediaType) are listed with
    their error and rm removes them; the sweep after it carries on (rm failed, half-way)."""
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k1", one_file_tree(tmp_path / "src"))
    index_path = tmp_path / "layout" / "index.json"
    index = json.loads(index_path.read_bytes())
    ref = "org.opencontainers.image.ref.name"
    index["manifests"] += [
        {"mediaType": OCI_MANIFEST, "digest": "sha512:" + "ab" * 64, "size": 10, "annotations": {ref: "k2"}},
        {"digest": "sha256:" + "ab" * 32, "size": 10, "annotations": {ref: "k3"}},
    ]
    index_path.write_text(json.dumps(index))
    listed = {e.key: e for e in await list_entries(store)}
    assert listed["k2"].error and listed["k3"].error and not listed["k1"].error
    for key in ("k2", "k3"):
        assert (await remove(store, key)).entry.key == key
    assert [e.key for e in await list_entries(store)] == ["k1"]


async def test_an_entry_whose_document_nests_too_deeply_is_listed_with_its_error(tmp_path: Path) -> None:
    """A tag whose document is JSON nested too deeply to parse: ls lists it with its error beside
    the other entries, and rm removes it. (json's RecursionError failed both, "unexpected".)"""
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k1", one_file_tree(tmp_path / "src"))
    deep = Descriptor(OCI_MANIFEST, sha256_digest(DEEP_JSON), len(DEEP_JSON))
    await store.put_blob(deep, DEEP_JSON)
    index_path = tmp_path / "layout" / "index.json"  # as another tool would list it
    index = json.loads(index_path.read_bytes())
    index["manifests"].append(
        {**deep.to_json(), "annotations": {"org.opencontainers.image.ref.name": "deep"}}
    )
    index_path.write_text(json.dumps(index))
    listed = {e.key: e for e in await list_entries(store)}
    assert not listed["k1"].error and "too deeply" in str(listed["deep"].error), listed
    assert (await remove(store, "deep", grace=timedelta(0))).entry.key == "deep"
    assert [e.key for e in await list_entries(store)] == ["k1"]


@pytest.mark.parametrize("document", ["index", "manifest"])
@pytest.mark.parametrize("damage", ["directory", "fifo", "unreadable"])
def test_an_entry_whose_document_cannot_be_read_is_listed_as_broken_and_stops_prune(
    tmp_path: Path, document: str, damage: str
) -> None:
    """The newest entry's index or manifest is there but cannot be read (a directory or a FIFO in
    its place, a file this user may not read): ls lists it as broken beside the other entry;
    prune, which cannot tell how old it is, stops naming it and the way out, removing nothing;
    rm removes it. (ls, prune and rm all failed on the file, naming no entry.)"""
    root = tmp_path / "layout"
    store = LayoutStore(root)

    async def setup() -> str:
        await save(store, "k1", one_file_tree(tmp_path / "a", "a"))
        await backdate(store, "k1", 2)
        top = (await save(store, "k2", one_file_tree(tmp_path / "b", "b"))).digest
        return top if document == "index" else layout_document(root, top)["manifests"][0]["digest"]

    digest = anyio.run(setup)
    path = layout_blob(root, digest)
    if damage == "unreadable":
        give_to_nobody(root, tmp_path)
        path.chmod(0o000)
    else:
        path.unlink()
        path.mkdir() if damage == "directory" else os.mkfifo(path)
    blobs = sorted(os.listdir(root / "blobs" / "sha256"))

    async def list_and_prune(layout: Path) -> None:
        store = LayoutStore(layout)
        listed = {e.key: e for e in await list_entries(store)}
        assert listed["k1"].error is None and listed["k1"].created is not None, listed
        assert str(listed["k2"].error).startswith("broken: ") and digest in str(listed["k2"].error), listed
        with pytest.raises(StoreError, match=r"k2 .*cannot be read.*remote-cache rm") as info:
            await prune(store, keep=1)
        # The way out fits the damage: chmod cannot mend a directory or a FIFO in a blob's place.
        wanted = "readable by this user" if damage == "unreadable" else "file back in its place"
        assert wanted in str(info.value), info.value
        assert sorted(await store.tags()) == ["k1", "k2"]
        assert sorted(os.listdir(layout / "blobs" / "sha256")) == blobs

    if damage == "unreadable":  # (nobody cannot write here: pytest's directories above are root's)
        assert as_nobody_in(tmp_path, lambda: anyio.run(list_and_prune, Path("layout"))) == ""
    else:
        anyio.run(list_and_prune, root)
    assert anyio.run(lambda: remove(store, "k2", grace=timedelta(0))).entry.key == "k2"
    assert [e.key for e in anyio.run(list_entries, store)] == ["k1"]


async def test_rm_on_a_registry_that_cannot_read_another_tag_says_why_and_with_copies_goes_on(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """On a registry (which deletes a manifest with every tag naming it), rm must know whether
    another tag is a copy; one whose document cannot be read stops it, saying so and what to
    do, and --with-copies removes the entry anyway. (It failed with that tag's bare integrity
    error, --with-copies too, and the entry could not be removed.)"""
    from remote_cache.errors import IntegrityError

    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        saved = await save(store, "release-1", one_file_tree(tmp_path / "a", "a"))
        await save(store, "other", one_file_tree(tmp_path / "b", "b"))
        other = (await store.resolve("other")).digest
        path = registry.blob_data_path(other)
        path.write_bytes(path.read_bytes().replace(b'"size":', b'"size": ', 1))  # valid JSON, other bytes
        with pytest.raises(
            IntegrityError, match=r"cannot tell whether other .*nothing was removed.*--with-copies"
        ):
            await remove(store, "release-1")
        assert sorted(await store.tags()) == ["other", "release-1"]
        assert (await remove(store, "release-1", with_copies=True)).entry.digest == saved.digest
        assert await store.tags() == ["other"]
