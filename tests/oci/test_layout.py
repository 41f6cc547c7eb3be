"""LayoutStore: an OCI image layout on disk, verified on read, atomic on write."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_cache.errors import CacheMiss, IntegrityError, StoreError
from remote_cache.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, sha256_digest
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.media import ANNOTATION_REF_NAME as REF_NAME
from remote_cache.oci.store import Store
from tests.stores import (
    DEEP_JSON,
    damage_layout_blob,
    layout_blob,
    layout_document,
    layout_top,
    list_in_index,
)
from tests.trees import assert_same_tree, one_file_tree
from tests.users import as_nobody_in, give_to_nobody


def _blob(data: bytes) -> Descriptor:
    return Descriptor(OCI_LAYER_GZIP, sha256_digest(data), len(data))


def _manifest(layer: Descriptor, config: Descriptor) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json()],
        }
    ).encode()


async def _read(store: LayoutStore, desc: Descriptor) -> bytes:
    return b"".join([chunk async for chunk in store.read_blob(desc)])


async def test_layout_is_created_on_first_write_and_is_a_store(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "new" / "layout")
    assert isinstance(store, Store)
    assert await store.tags() == []
    with pytest.raises(CacheMiss):
        await store.resolve("nope")
    assert await store.put_blob(_blob(b"x"), b"x") is True
    root = tmp_path / "new" / "layout"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((root / "index.json").read_text())["manifests"] == []
    assert (root / "blobs" / "sha256" / sha256_digest(b"x").removeprefix("sha256:")).read_bytes() == b"x"


async def test_put_blob_verifies_and_skips_existing(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path)
    data = os.urandom(3_000_000)
    desc = _blob(data)
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    assert await store.put_blob(desc, source) is True
    assert await store.put_blob(desc, source) is False
    assert await store.has_blob(desc.digest)
    assert await _read(store, desc) == data
    with pytest.raises(IntegrityError):
        await store.put_blob(Descriptor(OCI_LAYER_GZIP, sha256_digest(b"other"), 5), b"wrong")
    assert not await store.has_blob(sha256_digest(b"other"))
    leftovers = [p.name for p in (tmp_path / "blobs" / "sha256").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


async def test_read_blob_detects_corruption_and_truncation(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path)
    data = b"hello world" * 1000
    desc = _blob(data)
    await store.put_blob(desc, data)
    path = tmp_path / "blobs" / "sha256" / desc.digest.removeprefix("sha256:")
    flipped = bytearray(data)
    flipped[500] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="corrupted"):
        await _read(store, desc)
    path.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match="expected"):
        await _read(store, desc)
    path.write_bytes(data + b"!")
    with pytest.raises(IntegrityError, match="larger"):
        await _read(store, desc)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        await _read(store, desc)


async def test_tags_move_and_manifests_verify(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path)
    config = _blob(b"{}")
    await store.put_blob(config, b"{}")
    layer1, layer2 = _blob(b"1"), _blob(b"2")
    m1 = await store.put_manifest(_manifest(layer1, config), OCI_MANIFEST, tag="t")
    assert (await store.resolve("t")).digest == m1.digest
    m2 = await store.put_manifest(_manifest(layer2, config), OCI_MANIFEST, tag="t")
    assert (await store.resolve("t")).digest == m2.digest
    entries = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert entries == [m2.to_json() | {"annotations": {REF_NAME: "t"}}]
    desc, body = await store.get_manifest(m1.digest)
    assert (desc.digest, desc.media_type) == (m1.digest, OCI_MANIFEST)
    assert body == _manifest(layer1, config)
    # A manifest blob that was tampered with is refused.
    damage_layout_blob(tmp_path, m2.digest)
    with pytest.raises(IntegrityError):
        await store.get_manifest("t")


async def test_concurrent_tagging_loses_nothing(tmp_path: Path) -> None:
    config = _blob(b"{}")

    async def one(i: int) -> None:
        store = LayoutStore(tmp_path)  # separate instances, as separate processes would be
        await store.put_manifest(_manifest(_blob(str(i).encode()), config), OCI_MANIFEST, tag=f"t{i}")

    async with anyio.create_task_group() as tg:
        for i in range(24):
            tg.start_soon(one, i)
    assert await LayoutStore(tmp_path).tags() == sorted(f"t{i}" for i in range(24))


async def test_delete_and_gc(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path)
    config = _blob(b"{}")
    await store.put_blob(config, b"{}")
    shared, only_a, only_b = _blob(b"shared"), _blob(b"a"), _blob(b"b")
    for d, data in ((shared, b"shared"), (only_a, b"a"), (only_b, b"b")):
        await store.put_blob(d, data)
    body_a = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [shared.to_json(), only_a.to_json()],
        }
    ).encode()
    ma = await store.put_manifest(body_a, OCI_MANIFEST, tag="a")
    mb = await store.put_manifest(_manifest(only_b, config), OCI_MANIFEST, tag="b")
    await store.put_manifest(_manifest(only_b, config), OCI_MANIFEST, tag="b2")
    stray = _blob(b"stray")
    await store.put_blob(stray, b"stray")

    assert await store.gc() == (0, 0)  # everything is recent: the grace period protects it
    await store.delete("a")
    assert await store.tags() == ["b", "b2"]
    with pytest.raises(CacheMiss):
        await store.delete("a")
    removed, freed = await store.gc(grace_seconds=0)
    assert removed == 4  # manifest a, only_a, shared, stray
    assert freed == len(body_a) + 1 + 6 + 5
    for gone in (ma, only_a, shared, stray):
        assert not await store.has_blob(gone.digest)
    for kept in (mb, only_b, config):
        assert await store.has_blob(kept.digest)
    await store.delete(mb.digest)  # by digest: every tag of it goes
    assert await store.tags() == []


def test_skopeo_reads_the_layout(tmp_path: Path) -> None:
    async def write() -> Descriptor:
        store = LayoutStore(tmp_path / "l")
        layer = _blob(b"not really gzip")
        await store.put_blob(layer, b"not really gzip")
        config_body = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        config = Descriptor(OCI_CONFIG, sha256_digest(config_body), len(config_body))
        await store.put_blob(config, config_body)
        return await store.put_manifest(_manifest(layer, config), OCI_MANIFEST, tag="v1")

    desc = anyio.run(write)
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'l'}:v1"], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out)["Digest"] == desc.digest


def _entry(tmp_path: Path) -> tuple[Path, str, Path]:
    """A layout with one entry ``k`` made by the CLI: (layout, its top document's digest, a blob of it)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    layout = tmp_path / "layout"
    cli = [sys.executable, "-m", "remote_cache"]
    subprocess.run([*cli, "save", str(src), f"oci:{layout}:k", "-q"], check=True)
    top = layout_top(layout)
    return layout, top, layout_blob(layout, top)


@pytest.mark.parametrize("what", ["index.json", "top document"])
@pytest.mark.parametrize("hostile", ["fifo", "/dev/zero"])
def test_a_file_of_the_layout_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, what: str, hostile: str
) -> None:
    """A FIFO (a read that never ends) or a link to /dev/zero (one that never stops) where the
    layout has a file: restore fails at once saying so, and ls too, or for the top document lists
    its entry as broken saying so; they hung, or read until memory ran out."""
    layout, _top, blob = _entry(tmp_path)
    path = layout / "index.json" if what == "index.json" else blob
    path.unlink()
    if hostile == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for args in (["restore", f"oci:{layout}:k", str(tmp_path / "out")], ["ls", f"oci:{layout}"]):
        done = subprocess.run(
            [sys.executable, "-m", "remote_cache", *args], capture_output=True, text=True, timeout=30
        )
        listed = args[0] == "ls" and what == "top document"
        assert done.returncode == (0 if listed else 1), (args, done.stderr)
        said = done.stdout if listed else done.stderr
        assert "not a regular file" in said and (not listed or "broken: " in said), (done.stdout, done.stderr)


def test_links_in_a_layout_write_nothing_outside_it(tmp_path: Path) -> None:
    """A blob that links to a file elsewhere does not get that file's time changed by a save that
    reuses it, and a lock file that links elsewhere does not create the file it names."""
    layout, top, _blob = _entry(tmp_path)
    blobs = layout / "blobs" / "sha256"
    index = json.loads((blobs / top.split(":")[1]).read_bytes())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    blob = blobs / manifest["layers"][0]["digest"].split(":")[1]  # what a save of the same tree reuses
    outside = tmp_path / "outside"
    outside.write_bytes(blob.read_bytes())
    os.utime(outside, (1_000_000_000, 1_000_000_000))
    blob.unlink()
    blob.symlink_to(outside)
    (layout / "index.json.lock").unlink(missing_ok=True)
    (layout / "index.json.lock").symlink_to(tmp_path / "created-by-lock")
    src = tmp_path / "src"
    subprocess.run(
        [sys.executable, "-m", "remote_cache", "save", str(src), f"oci:{layout}:k2", "-q"], check=False
    )
    assert outside.stat().st_mtime == 1_000_000_000
    assert not (tmp_path / "created-by-lock").exists()


async def test_temporary_files_a_killed_save_left_are_removed_by_the_next(tmp_path: Path) -> None:
    """A save killed while writing a blob or index.json leaves a ``.tmp-*`` file (megabytes): the
    next save that writes into the layout removes it, but not one a live writer holds or one
    made a moment ago (they stayed until an rm or prune with an expired grace, or for ever
    in the layout's root)."""
    store = LayoutStore(tmp_path / "layout")
    config = _blob(b"{}")
    await store.put_blob(config, b"{}")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    old = time.time() - 120
    made: dict[Path, Path] = {}
    for where in (blobs, tmp_path / "layout"):
        for name in (".tmp-dead", ".tmp-live", ".tmp-young"):
            made[where / name] = where / name
            (where / name).write_bytes(b"partial blob")
            if name != ".tmp-young":
                os.utime(where / name, (old, old))
    held = [os.open(p, os.O_RDONLY) for p in made if p.name == ".tmp-live"]
    for fd in held:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        later = LayoutStore(tmp_path / "layout")  # the next run
        await later.put_blob(_blob(b"new"), b"new")
        left = sorted(str(p.relative_to(tmp_path)) for p in made if p.exists())
    finally:
        for fd in held:
            os.close(fd)
    assert left == [
        "layout/.tmp-live",
        "layout/.tmp-young",
        "layout/blobs/sha256/.tmp-live",
        "layout/blobs/sha256/.tmp-young",
    ]


async def test_a_layout_shared_by_a_group_stays_writable_by_the_group(tmp_path: Path) -> None:
    """The index lock is created as other files are (0666 less the umask): with umask 002 the
    group can lock it (it became 0644, and a second user of the group could not save)."""
    old = os.umask(0o002)
    try:
        store = LayoutStore(tmp_path / "layout")
        await store.put_manifest(b'{"schemaVersion": 2}', OCI_MANIFEST, tag="t")
    finally:
        os.umask(old)
    assert (tmp_path / "layout" / "index.json.lock").stat().st_mode & 0o777 == 0o664


async def test_rm_removes_every_duplicate_of_a_tag(tmp_path: Path) -> None:
    """A foreign tool may list a tag twice (the last one wins): rm removes the tag, not only the
    entry it read, or the older one would restore as a hit afterwards."""
    from remote_cache.cache.entries import remove
    from remote_cache.cache.save import save

    store = LayoutStore(tmp_path / "layout")
    for text in ("v1", "v2"):
        src = tmp_path / text
        src.mkdir()
        (src / "f").write_text(text)
        await save(store, text, src)
    index_path = tmp_path / "layout" / "index.json"
    index = json.loads(index_path.read_bytes())
    for entry in index["manifests"]:
        entry["annotations"][REF_NAME] = "k"
    index_path.write_text(json.dumps(index))
    await remove(store, "k")
    with pytest.raises(CacheMiss):
        await store.resolve("k")


def _keep_and_gone(tmp_path: Path) -> tuple[Path, LayoutStore, Path]:
    """A layout holding entry "keep" (of the tree returned) and the blobs of entry "gone", which
    was removed without a sweep: (the layout, its store, keep's tree)."""
    from remote_cache.cache.entries import remove
    from remote_cache.cache.save import save

    root = tmp_path / "layout"
    store = LayoutStore(root)
    src = one_file_tree(tmp_path / "src", "kept")

    async def setup() -> None:
        await save(store, "keep", src)
        await save(store, "gone", one_file_tree(tmp_path / "other", "gone"))
        await remove(store, "gone", collect=False)

    anyio.run(setup)
    return root, store, src


@pytest.mark.parametrize("damage", ["fifo", "unreadable", "dangling-link"])
def test_a_sweep_that_cannot_read_a_document_an_entry_uses_deletes_nothing(
    tmp_path: Path, damage: str
) -> None:
    """An entry's document that is there but cannot be read (a FIFO where its file was; a file
    the sweeping user may not read; a link to nothing): the sweep stops, naming it and its entry,
    and deletes nothing. (It took the document for a leaf and freed everything it lists: the
    entry's manifests and layers.)"""
    from remote_cache.cache.restore import restore

    root, store, src = _keep_and_gone(tmp_path)
    top = layout_top(root)  # keep's index, the only entry left
    path = layout_blob(root, top)
    before = sorted(os.listdir(root / "blobs" / "sha256"))

    def sweep(layout: Path) -> None:
        anyio.run(lambda: LayoutStore(layout).gc(grace_seconds=0))

    if damage in ("fifo", "dangling-link"):
        path.rename(tmp_path / "aside")
        if damage == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(tmp_path / "nowhere")
        with pytest.raises(StoreError) as caught:
            sweep(root)
        error = str(caught.value)
        path.unlink()
        (tmp_path / "aside").rename(path)
    else:
        give_to_nobody(root, tmp_path)
        path.chmod(0o000)
        error = as_nobody_in(tmp_path, lambda: sweep(Path("layout")))
        path.chmod(0o644)
    assert top in error and "entry tagged keep" in error and "deletes nothing" in error, error
    assert sorted(os.listdir(root / "blobs" / "sha256")) == before
    anyio.run(restore, store, "keep", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    removed, _freed = anyio.run(lambda: store.gc(grace_seconds=0))
    assert removed > 0  # gone's blobs, once every document can be read


def test_a_sweep_does_not_read_layers_and_configs(tmp_path: Path) -> None:
    """A layer (or config) refers to nothing, whatever its bytes: one the sweeping user cannot
    read does not stop the sweep, which frees what no entry uses and keeps that layer."""

    root, _store, _src = _keep_and_gone(tmp_path)
    top = layout_document(root, layout_top(root))
    manifest = layout_document(root, top["manifests"][0]["digest"])
    layer = layout_blob(root, manifest["layers"][0]["digest"])
    config = layout_blob(root, manifest["config"]["digest"])
    before = set(os.listdir(root / "blobs" / "sha256"))
    give_to_nobody(root, tmp_path)
    layer.chmod(0o000)
    config.chmod(0o000)

    def sweep() -> None:
        anyio.run(lambda: LayoutStore(Path("layout")).gc(grace_seconds=0))

    error = as_nobody_in(tmp_path, sweep)
    assert error == "", error
    after = set(os.listdir(root / "blobs" / "sha256"))
    assert after < before and {layer.name, config.name} <= after


def test_a_sweep_keeps_what_a_sha512_document_refers_to(tmp_path: Path) -> None:
    """A foreign tool's manifest stored under a sha512 digest (``blobs/sha512``) is read like
    any other: the sha256 blobs it lists stay. (It was a leaf, and they were freed.)"""
    import hashlib

    root = tmp_path / "layout"
    store = LayoutStore(root)
    layer_bytes, config_bytes = b"foreign layer", b"{}"
    layer, config = _blob(layer_bytes), _blob(config_bytes)

    async def write_blobs() -> None:
        await store.put_blob(layer, layer_bytes)
        await store.put_blob(config, config_bytes)

    anyio.run(write_blobs)
    body = _manifest(layer, config)
    hexdigest = hashlib.sha512(body).hexdigest()
    (root / "blobs" / "sha512").mkdir()
    (root / "blobs" / "sha512" / hexdigest).write_bytes(body)
    entry = {"mediaType": OCI_MANIFEST, "digest": f"sha512:{hexdigest}", "size": len(body)}
    list_in_index(root, entry, "foreign")
    _age(layout_blob(root, layer.digest), layout_blob(root, config.digest))
    removed, _freed = anyio.run(lambda: store.gc(grace_seconds=3600))
    assert removed == 0
    assert layout_blob(root, layer.digest).exists() and layout_blob(root, config.digest).exists()


def _foreign_entry(root: Path, store: LayoutStore, descriptor_type: Any, tag: str | None) -> Descriptor:
    """A foreign tool's entry: an index whose one child manifest's descriptor says
    ``descriptor_type``, the manifest listing a layer and a config, all two hours old. Returns
    the layer."""
    layer_bytes, config_bytes = b"foreign layer", b"{}"
    layer, config = _blob(layer_bytes), _blob(config_bytes)
    manifest = _manifest(layer, config)
    child = Descriptor(OCI_MANIFEST, sha256_digest(manifest), len(manifest)).to_json()
    child["mediaType"] = descriptor_type
    index = json.dumps({"schemaVersion": 2, "manifests": [child]}).encode()

    async def write() -> None:
        for data in (layer_bytes, config_bytes, manifest, index):
            await store.put_blob(_blob(data), data)

    anyio.run(write)
    list_in_index(root, {"mediaType": OCI_INDEX, "digest": sha256_digest(index), "size": len(index)}, tag)
    _age(*(layout_blob(root, sha256_digest(data)) for data in (layer_bytes, config_bytes, manifest, index)))
    return layer


def _age(*blobs: Path) -> None:
    """Make ``blobs`` two hours old: outside any grace period the tests give."""
    old = time.time() - 7200
    for blob in blobs:
        os.utime(blob, (old, old))


@pytest.mark.parametrize("descriptor_type", [OCI_CONFIG, {"not": "a string"}, None])
def test_a_sweep_follows_a_foreign_document_whatever_its_descriptor_says(
    tmp_path: Path, descriptor_type: Any
) -> None:
    """A foreign index whose manifest's descriptor gives it a config's media type, or one that is
    not a string, or none: the sweep still reads that manifest and keeps its layer. (It freed
    the layer, taking the manifest for a leaf; a media type that is not a string made every
    sweep fail with a TypeError.)"""
    root = tmp_path / "layout"
    store = LayoutStore(root)
    layer = _foreign_entry(root, store, descriptor_type, "foreign")
    removed, _freed = anyio.run(lambda: store.gc(grace_seconds=3600))
    assert removed == 0 and layout_blob(root, layer.digest).exists()


def test_a_sweep_stopped_by_an_untagged_entry_says_so(tmp_path: Path) -> None:
    """An untagged index.json entry whose document cannot be read: the error says to remove that
    entry from index.json (``rm`` cannot name it)."""
    root = tmp_path / "layout"
    store = LayoutStore(root)
    _foreign_entry(root, store, OCI_MANIFEST, None)
    manifest = layout_document(root, layout_top(root))["manifests"][0]["digest"]
    path = layout_blob(root, manifest)
    path.unlink()
    os.mkfifo(path)
    wanted = r"untagged entry of index\.json .* remove that entry from index\.json"
    with pytest.raises(StoreError, match=wanted):
        anyio.run(lambda: store.gc(grace_seconds=0))


@pytest.mark.parametrize("where", ["an entry's document", "a manifest an index lists", "a config"])
def test_json_nested_too_deeply_stops_a_sweep_that_must_read_it(tmp_path: Path, where: str) -> None:
    """A document an entry uses that is JSON nested too deeply to parse: the sweep stops as for
    one it cannot read, naming it and its entry, and deletes nothing; a config (a leaf) does not
    stop it. (json raised RecursionError out of the sweep: "unexpected", naming neither.)"""
    root, store, _src = _keep_and_gone(tmp_path)
    blobs = root / "blobs" / "sha256"
    before = set(os.listdir(blobs))
    deep = Descriptor(
        OCI_CONFIG if where == "a config" else OCI_MANIFEST, sha256_digest(DEEP_JSON), len(DEEP_JSON)
    )
    written = {
        "an entry's document": [DEEP_JSON],
        "a manifest an index lists": [DEEP_JSON, _index(deep)],
        "a config": [DEEP_JSON, b"layer", _manifest(_blob(b"layer"), deep)],
    }[where]

    async def write() -> None:
        for data in written:
            await store.put_blob(_blob(data), data)

    anyio.run(write)
    top = written[-1]  # what index.json lists under "deep"
    list_in_index(root, {"mediaType": OCI_MANIFEST, "digest": sha256_digest(top), "size": len(top)}, "deep")
    if where == "a config":
        assert anyio.run(lambda: store.gc(grace_seconds=0))[0] > 0
        assert layout_blob(root, deep.digest).exists()
        return
    with pytest.raises(StoreError) as caught:
        anyio.run(lambda: store.gc(grace_seconds=0))
    error = str(caught.value)
    assert deep.digest in error and "entry tagged deep" in error and "deletes nothing" in error, error
    assert before <= set(os.listdir(blobs))


def _index(manifest: Descriptor) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest.to_json()]}
    ).encode()


def test_an_index_json_nested_too_deeply_is_damaged(tmp_path: Path) -> None:
    """index.json holding JSON nested too deeply to parse is damaged, as one that is not JSON is,
    and said so. (json's RecursionError came out "unexpected".)"""
    root = tmp_path / "layout"
    anyio.run(lambda: LayoutStore(root).put_manifest(b"{}", OCI_MANIFEST, tag="t"))
    (root / "index.json").write_bytes(DEEP_JSON)
    with pytest.raises(StoreError, match=r"index\.json is not valid JSON .*damaged"):
        anyio.run(LayoutStore(root).tags)


def test_a_sweep_leaves_what_is_not_a_blob_and_frees_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory and a FIFO in blobs/sha256 that no entry uses (no save writes such things):
    the sweep leaves them, says so in one warning naming both, and frees every blob no entry
    uses. (The directory stopped it half-way with "Is a directory", some blobs deleted.)"""
    root, store, src = _keep_and_gone(tmp_path)
    blobs = root / "blobs" / "sha256"
    kept = {layout_top(root).split(":")[1]}
    kept |= {d["digest"].split(":")[1] for d in layout_document(root, layout_top(root))["manifests"]}
    directory, fifo = blobs / ("0" * 64), blobs / ("f" * 64)
    directory.mkdir()
    (directory / "inside").write_bytes(b"someone else's")
    os.mkfifo(fifo)
    removed, _freed = anyio.run(lambda: store.gc(grace_seconds=0))
    assert removed > 0 and directory.is_dir() and fifo.exists()
    left = os.listdir(blobs)  # keep's index, 2 manifests, 2 configs and layer; the two strays
    assert kept <= set(left) and len(left) == 1 + 2 + 2 + 1 + 2, left
    warnings = [r.getMessage() for r in caplog.records if directory.name in r.getMessage()]
    assert len(warnings) == 1 and fifo.name in warnings[0], caplog.text
    anyio.run(lambda: LayoutStore(root).gc(grace_seconds=0))  # nothing more to free: no error
    from remote_cache.cache.restore import restore

    anyio.run(restore, store, "keep", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


def test_a_layout_the_user_cannot_read_says_so(tmp_path: Path) -> None:
    """A read refused by the layout's mode is not reported as a write (it said "permission denied
    writing"): the message names the file and what the user needs."""
    root = tmp_path / "layout"
    anyio.run(lambda: LayoutStore(root).put_manifest(b"{}", OCI_MANIFEST, tag="t"))
    root.chmod(0o700)
    tmp_path.chmod(0o755)
    error = as_nobody_in(tmp_path, lambda: print(anyio.run(LayoutStore(Path("layout")).tags)))
    assert "writing" not in error and "layout/index.json" in error, error
    assert "must be able to read the layout" in error and "owner and mode" in error, error
