"""Incremental saves: a layer is reused unread only on local ctime evidence; never on mtimes alone."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from msgspec.structs import replace

from remote_cache.archive import pack as pack_mod
from remote_cache.archive import walk as walk_mod
from remote_cache.archive.plan import TreeScan
from remote_cache.archive.tar import FILE
from remote_cache.cache import evidence as state_mod
from remote_cache.cache import restore as restore_mod
from remote_cache.cache import save as save_mod
from remote_cache.cache import state
from remote_cache.cache.evidence import local_layers
from remote_cache.cache.image import ANNOTATION_GENERATIONS, ANNOTATION_LISTING, load_image
from remote_cache.cache.restore import restore
from remote_cache.cache.save import SaveResult, save
from remote_cache.oci.media import OCI_INDEX, OCI_LAYER_ZSTD
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.store import Store, open_store
from tests.cli.output import CLI, empty_user_dirs, is_user_setting
from tests.mounts import bind, ext4, tmpfs, whole_seconds
from tests.registry_server import Fault, FaultProxy, RegistryServer
from tests.skips import unavailable
from tests.stores import opened
from tests.trees import assert_same_tree, settle_ctimes, socket_file
from tests.users import as_nobody_in, give_to_nobody, reachable_dir

pytestmark = pytest.mark.usefixtures("small_layers")

_PAST = int(time.time()) - 3600


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store in an OCI layout directory (tests through the registry make their own)."""
    return open_store(parse_reference(f"oci:{tmp_path / 'layout'}"))


def _refuse_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("an unchanged layer was packed (its files were read)")

    monkeypatch.setattr(pack_mod, "pack_layer", refuse)


@pytest.fixture
def pack_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the layers actually packed (each call reads that layer's files)."""
    calls: list[str] = []
    real = pack_mod.pack_layer

    def counting(root: Path, plan: Any, **kw: Any) -> Any:
        calls.append(plan.members[0].path if plan.members else "")
        return real(root, plan, **kw)

    monkeypatch.setattr(pack_mod, "pack_layer", counting)
    return calls


def _backdate(root: Path, when: int = _PAST) -> None:
    """Give every path an mtime well before now (files written this second are 'racy')."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


async def _restored(store: Store, key: str, tmp_path: Path) -> Path:
    """``key`` restored into a fresh ``out`` directory under ``tmp_path``."""
    out = tmp_path / "out"
    await restore(store, key, out)
    return out


async def _bounds(store: Store, key: str) -> str:
    """The generation bounds ``key``'s entry carries, as written ("" when none)."""
    return (await load_image(store, key)).annotations.get(ANNOTATION_GENERATIONS, "")


def _backdate_dirs(root: Path, when: int = _PAST) -> None:
    for path in (root, *(p for p in root.rglob("*") if p.is_dir())):
        os.utime(path, (when, when))


def _bulk(root: Path, count: int = 8) -> Path:
    for i in range(count):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        for j in range(10):
            (pkg / f"f{j}.bin").write_bytes(bytes([i, j]) * 4000)
    (root / "pkg0" / "link").symlink_to("f0.bin")
    _backdate(root)
    settle_ctimes()
    return root


def _fake_npm_edit(path: Path, content: bytes) -> None:
    """Rewrite ``path`` as npm does: same size, and the mtime put back to what it was."""
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@asynccontextmanager
async def proxied(
    registry: RegistryServer, repo: str, factory: Callable[[RegistryServer], FaultProxy]
) -> AsyncIterator[tuple[Store, FaultProxy]]:
    proxy = factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo}")) as store:
        yield store, proxy


def _writes(proxy: FaultProxy) -> int:
    return sum(proxy.count(m) for m in ("PUT", "POST", "PATCH", "DELETE"))


def _one_random_file(root: Path) -> Path:
    """``root`` with ``d/f``, 5000 random bytes, written just now (too fresh for the one-walk
    shortcut an unchanged tree takes)."""
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(os.urandom(5000))
    return root


async def test_the_save_after_a_restore_asks_for_the_tag_by_get_only(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path
) -> None:
    """A CI job's closing save reads the entry it may replace twice (what it can reuse, then, just
    before deciding, whether anything changed): each time by GET of the tag, where a HEAD then a
    GET by digest were two round trips before the save could end."""
    src = _one_random_file(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        await save(store, "k", src)
        await restore(store, "k", tmp_path / "out")
        proxy.requests.clear()
        result = await save(store, "k", tmp_path / "out")
        assert result.unchanged
        assert proxy.count("HEAD", "/manifests/") == 0
        assert proxy.count("GET", "/manifests/k") == 2


async def test_a_manifest_deleted_while_a_save_runs_is_not_taken_for_unchanged(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the save read at its start is not trusted at its end: a platform manifest deleted
    meanwhile (registry GC of untagged children, a lifecycle rule) makes the entry different, so
    it is pushed again and stays restorable."""
    src = _one_random_file(tmp_path / "src")
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        await save(store, "k", src, full=True)
        image = await load_image(store, "k")
        real_same_entry = save_mod._same_entry

        async def delete_first(*args: Any, **kwargs: Any) -> Any:
            await store.delete(image.manifest.digest)
            return await real_same_entry(*args, **kwargs)

        monkeypatch.setattr(save_mod, "_same_entry", delete_first)
        again = await save(store, "k", src, full=True)
        assert not again.unchanged
        await restore(store, "k", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


async def test_unchanged_resave_reads_and_pushes_nothing(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src)
        assert first.layers_total > 3 and first.layers_reused == 0
        image = await load_image(store, "k")
        assert all(
            layer.annotations.get(ANNOTATION_LISTING, "").startswith("sha256:") for layer in image.layers
        )

        _refuse_packing(monkeypatch)
        # Move the root's ctime (its mtime is put back): the tree shortcut no longer applies,
        # so this exercises the per-layer local listings.
        os.utime(src, (_PAST, _PAST))
        settle_ctimes()
        proxy.clear()
        again = await save(store, "k", src)
        assert proxy.count("GET", "/manifests/") > 0  # the long way: the entry was compared
        assert again.unchanged and again.digest == first.digest
        assert (again.bytes_uploaded, again.layers_uploaded) == (0, 0)
        assert again.layers_reused == again.layers_total == first.layers_total
        assert _writes(proxy) == 0
        assert again.to_json()["outcome"] == "unchanged" and "reused" in again.summary()


async def test_one_changed_file_packs_and_uploads_one_layer(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src)
        assert len(pack_calls) == first.layers_total
        pack_calls.clear()
        target = src / "pkg5" / "f3.bin"
        target.write_bytes(b"X" * 8000)  # same size, so the layer cuts stay where they were
        os.utime(target, (_PAST - 5, _PAST - 5))  # (not newer than the tree was: see the next test)
        proxy.clear()
        changed = await save(store, "k", src)
        assert len(pack_calls) == 1
        assert changed.layers_uploaded == 1 and changed.layers_reused == changed.layers_total - 1
        assert not changed.unchanged and changed.digest != first.digest
        # One layer blob plus the two new per-platform configs went up.
        assert proxy.count("POST", "/blobs/uploads/") == 3
        out = await _restored(store, "k", tmp_path)
        assert_same_tree(src, out)


def _scatter(root: Path, when: int) -> list[Path]:
    """New files beside old ones in every package, as a hash-sharded cache (Go's, npm's
    ``_cacache``) grows: each new entry lands in a directory its hash picks."""
    added = []
    for pkg in sorted(root.glob("pkg*")):
        new = pkg / "fresh.bin"
        new.write_bytes(pkg.name.encode() * 500)
        for path in (new, pkg):
            os.utime(path, (when, when))
        added.append(new)
    return added


async def test_new_files_scattered_over_the_tree_pack_only_a_new_generation(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    assert await _bounds(store, "k") == str(_PAST)
    _scatter(src, _PAST + 60)  # written after the save, in every package
    settle_ctimes()
    pack_calls.clear()
    grown = await save(store, "k", src)
    # The directories' layer (their mtimes moved) and the new files' generation; every other
    # layer as it was. One generation (the rule before) repacked every layer but one here.
    assert pack_calls == ["pkg0", "pkg0/fresh.bin"]
    assert grown.layers_reused == first.layers_total - 1
    assert grown.layers_total == first.layers_total + 1
    bounds = await _bounds(store, "k")
    assert bounds == f"{_PAST},{_PAST + 60}"
    # Saved again as it is: the same cut, the same entry.
    os.utime(src, (_PAST, _PAST))  # (a new root ctime: the long way, not the tree shortcut)
    settle_ctimes()
    pack_calls.clear()
    again = await save(store, "k", src)
    assert again.unchanged and again.digest == grown.digest and pack_calls == []
    # --full reads every file but cuts where the entry was cut: nothing new to upload.
    full = await save(store, "k", src, full=True)
    assert full.digest == grown.digest and full.bytes_uploaded == 0
    out = await _restored(store, "k", tmp_path)
    assert_same_tree(src, out)


async def test_a_file_rewritten_later_moves_to_the_new_generation(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    target = src / "pkg5" / "f3.bin"
    target.write_bytes(b"X" * 8000)
    os.utime(target, (_PAST + 5, _PAST + 5))
    pack_calls.clear()
    changed = await save(store, "k", src)
    # The layer it left is cut again, and the next until the cuts meet the old ones (one here),
    # and it makes a generation of its own; the other layers are reused.
    assert pack_calls == ["pkg4/f7.bin", "pkg6/f4.bin", "pkg5/f3.bin"]
    assert changed.layers_reused == changed.layers_total - 3 == first.layers_total - 3
    out = await _restored(store, "k", tmp_path)
    assert_same_tree(src, out)


async def test_a_fresh_runner_restores_generations_and_packs_only_what_it_added(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "k", src)
    _scatter(src, _PAST + 60)
    await save(store, "k", src)  # two generations now
    work = tmp_path / "work"  # another machine: only the restore's evidence
    await restore(store, "k", work)
    (work / "pkg3" / "later.bin").write_bytes(b"L" * 3000)
    os.utime(work / "pkg3" / "later.bin", (_PAST + 120, _PAST + 120))
    os.utime(work / "pkg3", (_PAST + 120, _PAST + 120))
    settle_ctimes()
    pack_calls.clear()
    third = await save(store, "k", work)
    # The directories' layer and a third generation (smaller than the second: not merged); both
    # restored generations' layers reused on the restore's evidence, unread.
    assert pack_calls == ["pkg0", "pkg3/later.bin"]
    assert third.layers_reused == third.layers_total - 2
    bounds = await _bounds(store, "k")
    assert bounds == f"{_PAST},{_PAST + 60},{_PAST + 120}"
    out = await _restored(store, "k", tmp_path)
    assert_same_tree(work, out)


async def test_a_new_key_after_a_fallback_cuts_where_the_restored_entry_was_cut(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "main", src)
    _scatter(src, _PAST + 60)
    await save(store, "main", src)  # two generations
    work = tmp_path / "work"
    restored = await restore(store, "branch", work, restore_keys=["main"])
    assert restored.status == "fallback"
    pack_calls.clear()
    # No --base: the restore's record says where the entry it wrote was cut.
    branch = await save(store, "branch", work)
    assert pack_calls == [] and branch.bytes_uploaded == 0
    assert branch.layers_reused == branch.layers_total
    bounds = await _bounds(store, "branch")
    assert bounds == f"{_PAST},{_PAST + 60}"


async def test_a_file_dated_in_the_future_leaves_later_files_a_generation_of_their_own(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    ahead = src / "pkg2" / "ahead.bin"
    ahead.write_bytes(b"A" * 3000)
    os.utime(ahead, (int(time.time()) + 365 * 86400,) * 2)
    _backdate_dirs(src)
    await save(store, "k", src)
    _scatter(src, _PAST + 60)
    settle_ctimes()
    pack_calls.clear()
    grown = await save(store, "k", src)
    # The directories' layer, the new files' generation, and the dated file's own (read again:
    # a file dated after the save is never vouched for, but its layer is the same); none of the
    # old generation's layers, which one file a year ahead used to hold open for everything.
    assert pack_calls == ["pkg0", "pkg0/fresh.bin", "pkg2/ahead.bin"]
    assert grown.layers_reused == grown.layers_total - 3


async def test_saves_under_new_keys_cut_where_the_last_save_here_cut(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "main", src)
    work = tmp_path / "work"
    await restore(store, "run1", work, restore_keys=["main"])
    _scatter(work, _PAST + 60)
    settle_ctimes()
    await save(store, "run1", work)  # no --base: the restore's record gives main's bounds
    for pkg in sorted(work.glob("pkg*"))[:4]:
        (pkg / "later.bin").write_bytes(b"L" * 3000)
        os.utime(pkg / "later.bin", (_PAST + 120, _PAST + 120))
        os.utime(pkg, (_PAST + 120, _PAST + 120))
    settle_ctimes()
    pack_calls.clear()
    run2 = await save(store, "run2", work)  # cut where run1 was, not where main was
    assert pack_calls == ["pkg0", "pkg0/later.bin"] and run2.layers_reused == run2.layers_total - 2
    bounds = await _bounds(store, "run2")
    assert bounds == f"{_PAST},{_PAST + 60},{_PAST + 120}"


async def test_the_first_bounds_among_the_key_and_the_base_count(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "base", src)
    _scatter(src, _PAST + 60)
    settle_ctimes()
    await save(store, "base", src)
    with monkeypatch.context() as old_version:  # an entry written before generations
        old_version.setattr(TreeScan, "settle", lambda *a, **k: ())
        await save(store, "k", src)
    assert await _bounds(store, "k") == ""
    (src / "pkg1" / "later.bin").write_bytes(b"L" * 3000)
    os.utime(src / "pkg1" / "later.bin", (_PAST + 120, _PAST + 120))
    again = await save(store, "k", src, base_key="base")
    assert again.layers_reused >= again.layers_total - 3
    bounds = await _bounds(store, "k")
    assert bounds == f"{_PAST},{_PAST + 60},{_PAST + 120}"


async def test_a_record_of_another_directory_there_gives_no_bounds(store: Store, tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "main", src)
    _scatter(src, _PAST + 60)
    settle_ctimes()
    await save(store, "main", src)
    work = tmp_path / "work"
    await restore(store, "main", work)
    shutil.rmtree(work)
    shutil.copytree(src, work)  # another directory now, the old one's record still there
    await save(store, "other", work)
    assert await _bounds(store, "other") == str(_PAST + 60)


async def test_generations_merge_newest_first_and_stay_few(store: Store, tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "k", src)
    seen = []
    for n in range(1, 6):
        (src / "pkg1" / f"n{n}.bin").write_bytes(bytes([n]) * 4000)
        os.utime(src / "pkg1" / f"n{n}.bin", (_PAST + 10 * n, _PAST + 10 * n))
        await save(store, "k", src)
        seen.append((await _bounds(store, "k")).count(",") + 1)
    # Equal additions: a generation as big as the one before merges into it (a binary counter).
    assert seen == [2, 2, 3, 2, 3]
    out = await _restored(store, "k", tmp_path)
    assert_same_tree(src, out)


async def test_full_rereads_everything(store: Store, tmp_path: Path, pack_calls: list[str]) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    pack_calls.clear()
    again = await save(store, "k", src, full=True)
    assert len(pack_calls) == first.layers_total and again.layers_reused == 0
    assert again.unchanged and again.digest == first.digest  # packing is deterministic


async def test_fresh_files_are_never_reused_by_listing(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    now = int(time.time()) + 2  # "modified in the second of the scan" (or later): racy
    _backdate(src, now)
    first = await save(store, "k", src)
    image = await load_image(store, "k")
    assert not any(ANNOTATION_LISTING in layer.annotations for layer in image.layers)
    pack_calls.clear()
    again = await save(store, "k", src)
    assert again.layers_reused == 0 and len(pack_calls) == first.layers_total
    assert again.unchanged and again.digest == first.digest


async def test_other_compression_is_not_reused(store: Store, tmp_path: Path, pack_calls: list[str]) -> None:
    src = _bulk(tmp_path / "src")
    await save(store, "k", src, compression="gzip")
    pack_calls.clear()
    zstd = await save(store, "k", src)
    assert zstd.layers_reused == 0 and len(pack_calls) == zstd.layers_total


async def test_new_key_reuses_layers_of_the_restored_fallback(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        old = await save(store, "npm-aaa", src)
        work = tmp_path / "work"
        restored = await restore(store, "npm-bbb", work, restore_keys=["npm-"])
        assert restored.status == "fallback" and restored.matched_key == "npm-aaa"
        target = work / "pkg2" / "f7.bin"
        target.write_bytes(b"Y" * 8000)
        os.utime(target, (_PAST - 9, _PAST - 9))  # (in the entry's generation: one layer changes)
        pack_calls.clear()
        proxy.clear()
        new = await save(store, "npm-bbb", work, base_key=restored.matched_key)
        assert len(pack_calls) == 1 and new.layers_uploaded == 1
        assert new.layers_reused == new.layers_total - 1 and new.base_key == "npm-aaa"
        assert "layers reused from npm-aaa" in new.summary()
        # Without a base key the same local evidence still holds; nothing names a source.
        pack_calls.clear()
        fresh = await save(store, "npm-ccc", work)
        assert fresh.layers_reused >= fresh.layers_total - 1 and fresh.base_key is None
        assert fresh.bytes_uploaded == 0  # any packed layer is already there
        out = await _restored(store, "npm-bbb", tmp_path)
        assert_same_tree(work, out)
        assert old.digest != new.digest


# -------------------------------------------------------------------------------------------
# Local evidence only: what tools can fake (mtime, size) never decides reuse.


async def test_npm_style_edit_after_restore_is_saved_not_the_stale_layer(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    (src / "pkg3" / "package.json").write_text('{"version": "1.0.0"}')
    _backdate(src, 499162860)  # npm's fixed 1985-10-26 mtime
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, _proxy):
        first = await save(store, "npm", src)
        work = tmp_path / "work"
        await restore(store, "npm", work)
        assert_same_tree(src, work)
        manifest = work / "pkg3" / "package.json"
        _fake_npm_edit(manifest, b'{"version": "1.0.1"}')
        pack_calls.clear()
        second = await save(store, "npm", work)
        assert len(pack_calls) == 1 and second.layers_reused == second.layers_total - 1
        assert not second.unchanged and second.digest != first.digest
        out = await _restored(store, "npm", tmp_path)
        assert (out / "pkg3" / "package.json").read_bytes() == b'{"version": "1.0.1"}'
        assert_same_tree(work, out)


async def test_npm_style_edit_between_two_saves_is_saved(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    target = src / "pkg6" / "f2.bin"
    _fake_npm_edit(target, b"Z" * 8000)
    pack_calls.clear()
    second = await save(store, "k", src)
    assert len(pack_calls) == 1 and second.digest != first.digest
    out = await _restored(store, "k", tmp_path)
    assert (out / "pkg6" / "f2.bin").read_bytes() == b"Z" * 8000
    assert_same_tree(src, out)


async def test_unchanged_restore_then_save_reads_and_pushes_nothing(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src, full=True)  # records nothing the restore could lean on
        work = tmp_path / "work"
        await restore(store, "k", work)
        _refuse_packing(monkeypatch)
        proxy.clear()
        again = await save(store, "k", work)
        assert again.unchanged and again.digest == first.digest
        assert again.layers_reused == again.layers_total == first.layers_total
        assert (again.bytes_uploaded, again.layers_uploaded) == (0, 0)
        assert _writes(proxy) == 0
        # ... and a save right after that save reuses everything again.
        proxy.clear()
        third = await save(store, "k", work)
        assert third.unchanged and third.layers_reused == third.layers_total and _writes(proxy) == 0


async def test_restore_without_state_recording_leaves_saves_to_pack(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await restore(store, "k", work, record_state=False)
    assert not state.state_path(work).exists()
    pack_calls.clear()
    again = await save(store, "k", work)
    assert again.layers_reused == 0 and len(pack_calls) == first.layers_total
    assert again.unchanged and again.bytes_uploaded == 0


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "bad record", "huge"])
async def test_damaged_state_means_packing_never_an_error(
    store: Store, tmp_path: Path, pack_calls: list[str], damage: str
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    state_file = state.state_path(src)
    body = state_file.read_bytes()
    if damage == "missing":
        state_file.unlink()
    elif damage == "garbage":
        state_file.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        state_file.write_bytes(body[: len(body) // 2])
    elif damage == "bad record":
        state_file.write_bytes(body.replace(b'"size":', b'"size":-', 1))
    else:
        state_file.write_bytes(b" " * (state.MAX_STATE_BYTES + 1) + body)
    target = src / "pkg1" / "f1.bin"
    _fake_npm_edit(target, b"Q" * 8000)
    settle_ctimes()  # so that this save may record the edited layer too
    pack_calls.clear()
    again = await save(store, "k", src)
    assert again.layers_reused == 0 and len(pack_calls) == first.layers_total
    out = await _restored(store, "k", tmp_path)
    assert (out / "pkg1" / "f1.bin").read_bytes() == b"Q" * 8000
    assert_same_tree(src, out)
    # The save rewrote a good state file: the next one reuses again.
    pack_calls.clear()
    assert (await save(store, "k", src)).unchanged and pack_calls == []


async def test_state_is_not_trusted_when_the_blob_is_gone(tmp_path: Path, pack_calls: list[str]) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(open_store(parse_reference(f"oci:{tmp_path / 'one'}")), "k", src)
    other = open_store(parse_reference(f"oci:{tmp_path / 'two'}"))
    pack_calls.clear()
    moved = await save(other, "k", src)  # same directory, a store that has none of its blobs
    assert moved.layers_reused == 0 and len(pack_calls) == first.layers_total
    out = await _restored(other, "k", tmp_path)
    assert_same_tree(src, out)


async def test_metadata_only_change_packs_but_uploads_nothing(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    target = src / "pkg4" / "f4.bin"
    target.chmod(0o600)
    target.chmod(0o644)  # back as it was, but the ctime moved: no evidence, so it is re-read
    pack_calls.clear()
    again = await save(store, "k", src)
    assert len(pack_calls) == 1 and again.layers_reused == first.layers_total - 1
    assert again.unchanged and again.bytes_uploaded == 0 and again.digest == first.digest


# -------------------------------------------------------------------------------------------
# Restore windows: a restore records which layers it extracted and when, without a scan.


async def test_restore_scans_nothing_and_an_untouched_tree_saves_unread(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"

    def no_scan(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a restore scanned the tree")

    with monkeypatch.context() as m:
        m.setattr("remote_cache.archive.walk._Walk.visit", no_scan)
        await restore(store, "k", work)
    # The window is the only evidence there is: no local listing was recorded.
    assert state.load(work).records == {}
    window = state.load(work).window
    assert window is not None and len(window.layers) == first.layers_total
    _refuse_packing(monkeypatch)
    again = await save(store, "k", work)
    assert again.unchanged and again.digest == first.digest
    assert again.layers_reused == again.layers_total == first.layers_total
    assert state.load(work).records == {}  # the whole tree was the restore's: nothing to learn
    # A FIFO at the top (left out of the entry) stops the whole-tree shortcut, not the layers':
    # each is reused on the window, and that save records local listings the next one reuses.
    os.mkfifo(work / "pipe")
    settle_ctimes()  # (a save records listings of files changed before its clock's last tick)
    third = await save(store, "k", work)
    assert third.unchanged and third.layers_reused == first.layers_total
    assert len(state.load(work).records) == first.layers_total
    assert (await save(store, "k", work)).layers_reused == first.layers_total


async def test_edit_after_restore_with_size_and_mtime_kept_is_repacked(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await restore(store, "k", work)
    _fake_npm_edit(work / "pkg4" / "f6.bin", b"E" * 8000)  # right after the swap
    pack_calls.clear()
    second = await save(store, "k", work)
    assert len(pack_calls) == 1 and second.layers_reused == first.layers_total - 1
    assert not second.unchanged and second.digest != first.digest
    out = await _restored(store, "k", tmp_path)
    assert (out / "pkg4" / "f6.bin").read_bytes() == b"E" * 8000
    assert_same_tree(work, out)


async def test_a_restore_window_only_vouches_for_its_own_directory(
    store: Store, tmp_path: Path, pack_calls: list[str]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    total = first.layers_total
    a, b = tmp_path / "a", tmp_path / "b"
    await restore(store, "k", a)
    a.rename(b)  # moving a directory keeps its files' ctimes: they still lie in a's window
    pack_calls.clear()
    assert (await save(store, "k", b, full=False)).layers_reused == 0 and len(pack_calls) == total
    # a's state file copied to b's place names a's path: not b's evidence.
    state.state_path(b).unlink()
    state.state_path(b).write_bytes(state.state_path(a).read_bytes())
    pack_calls.clear()
    assert (await save(store, "k", b)).layers_reused == 0 and len(pack_calls) == total
    # Another directory moved onto a restored path is not the restored directory.
    await restore(store, "k", a)
    pack_calls.clear()
    (tmp_path / "spare").mkdir()
    a.rename(tmp_path / "spare" / "a")
    b.rename(a)
    assert (await save(store, "k", a)).layers_reused == 0 and len(pack_calls) == total
    # The same check in isolation: a window wide enough to cover any ctime, but another root.
    window = state.load(a).window
    assert window is not None
    # (Without the whole restored tree: that check, wide open, would vouch for any tree here.)
    wide = replace(window, start_ns=0, end_ns=1 << 62, tree=None)
    state.state_path(a).unlink()  # drop the local listings the last save recorded
    assert state.record_restore(a, wide)
    pack_calls.clear()
    assert (await save(store, "k", a)).layers_reused == 0 and len(pack_calls) == total
    state.state_path(a).unlink()
    assert state.record_restore(a, replace(wide, root=state_mod.dir_id(a)))
    pack_calls.clear()
    assert (await save(store, "k", a)).layers_reused < total  # its directories are not a's either
    state.state_path(a).unlink()
    assert state.record_restore(a, replace(wide, root=state_mod.dir_id(a), parents=_parents_now(a)))
    pack_calls.clear()
    assert (await save(store, "k", a)).layers_reused == total and pack_calls == []


def _parents_now(root: Path) -> dict[tuple[str, str], str]:
    """What a restore of the tree at ``root`` would record as each layer's parents (by lstat)."""
    scan = save_mod.scan_tree(root)  # (cut as the save cuts it here: see small_layers)
    out = {}
    for plan, layer in zip(scan.layers, local_layers(scan, state_mod.clock_ns()), strict=True):
        dirs = {os.path.dirname(m.path) for m in plan.members if m.kind == FILE} - {""}
        inodes = {os.fsencode(d): os.lstat(root / d).st_ino for d in dirs}
        out[layer.listing, OCI_LAYER_ZSTD] = state_mod.parents_digest(inodes)
    return out


async def test_directories_swapped_after_a_restore_are_saved_not_the_restored_layer(
    store: Store, tmp_path: Path
) -> None:
    """Renaming a directory moves its own ctime, not those of the files inside: two directories
    with the same listing (same names, sizes and modes; npm's fixed mtimes) swapped after a restore
    still hold files whose ctimes lie in the restore window, each under the other's path. The
    layer's listing is unchanged, so only the files' identities can tell the tree changed."""
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"f{i}").write_bytes(f"{name}{i}".encode() * 1000)
    _backdate(src, 499162860)  # npm's fixed 1985-10-26 mtime
    await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await restore(store, "k", work)
    (work / "a").rename(work / "swap")
    (work / "b").rename(work / "a")
    (work / "swap").rename(work / "b")
    second = await save(store, "k", work)
    assert not second.unchanged
    out = await _restored(store, "k", tmp_path)
    assert (out / "a" / "f0").read_bytes() == b"b0" * 1000
    assert_same_tree(work, out)


async def test_two_restores_into_one_in_place_target_never_vouch_for_the_other_s_tree(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two restores of different entries into one in-place target (the current directory, a mount
    point) at once, extracting side by side: the target's inode is both windows' root, and the
    files of the tree that stays have ctimes inside the other's window too. That window must not
    vouch for them: the tree's directories are other inodes (and its root entries were renamed in
    at the swap). Each restore records its window with its swap, under the target's lock, so the
    window recorded last is that of the tree in place (it was recorded after the old tree's
    removal, outside the lock: the other's could come last)."""

    def entry(root: Path, version: bytes) -> Path:
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "package.json").write_bytes(b'{"version":"' + version + b'"}')
        (root / "pkg" / "index.js").write_bytes(b"module.exports = 1\n")
        _backdate(root, 499162860)  # npm: same size, same mtime, other bytes
        return root

    a = await save(store, "a", entry(tmp_path / "a", b"1.0.0"), full=True)
    b = await save(store, "b", entry(tmp_path / "b", b"2.0.0"), full=True)
    target = tmp_path / "target"
    target.mkdir()
    monkeypatch.chdir(target)  # restored in place, as a mount point is

    # a extracts while b extracts, then a swaps, then b; a's clean-up of the old tree (slow, say)
    # ends only after b's window is recorded.
    b_extracted, a_swapped, b_recorded = anyio.Event(), anyio.Event(), threading.Event()
    real_window, real_swap = restore_mod._Restore.window, restore_mod._Restore.swap
    real_close, real_record = restore_mod._Restore.close, state.record_restore
    windows: dict[str, Any] = {}

    def record(path: Path, made: Any) -> bool:
        done = real_record(path, made)
        if made is windows.get(b.digest):
            b_recorded.set()
        return done

    def close(self: Any) -> None:
        if self._image.digest == a.digest:
            b_recorded.wait(10)
        real_close(self)

    async def window(self: Any) -> Any:
        if self._image.digest == a.digest:
            await b_extracted.wait()
        else:
            b_extracted.set()
            await a_swapped.wait()
        windows[self._image.digest] = made = await real_window(self)
        return made

    async def swap(self: Any, then: Any) -> None:
        await real_swap(self, then)
        if self._image.digest == a.digest:
            a_swapped.set()

    with monkeypatch.context() as m:
        m.setattr(restore_mod._Restore, "window", window)
        m.setattr(restore_mod._Restore, "swap", swap)
        m.setattr(restore_mod._Restore, "close", close)
        m.setattr(state, "record_restore", record)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: restore(store, "a", Path("."), force=True))
            tg.start_soon(lambda: restore(store, "b", Path("."), force=True))
    assert (target / "pkg" / "package.json").read_bytes() == b'{"version":"2.0.0"}'  # b's tree
    assert state.load(target).window == windows[b.digest]  # recorded last, with the last swap
    # Had a's window been recorded last, it must not vouch for b's tree all the same:
    assert state.record_restore(target, windows[a.digest])
    await save(store, "c", target)
    out = await _restored(store, "c", tmp_path)
    assert (out / "pkg" / "package.json").read_bytes() == b'{"version":"2.0.0"}'
    assert_same_tree(target, out)


@pytest.fixture
def fresh_is_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trees written by the test a moment ago may get a fingerprint (normally FRESH_NS old)."""
    monkeypatch.setattr(state_mod, "FRESH_NS", 0)


def _refuse_scanning(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("an unchanged tree was scanned")

    monkeypatch.setattr(save_mod, "scan_tree", refuse)


def _assert_unchanged_after_one_head(again: SaveResult, first: SaveResult, proxy: FaultProxy) -> None:
    """``again`` is ``first``'s entry, found so by one request: does the tag still name it?"""
    assert again.unchanged and again.digest == first.digest
    assert (again.layers_total, again.bytes_total, again.size, again.files) == (
        first.layers_total,
        first.bytes_total,
        first.size,
        first.files,
    )
    assert [r.method for r in proxy.requests] == ["HEAD"]


@pytest.mark.usefixtures("fresh_is_settled")
async def test_unchanged_tree_costs_one_request_and_no_scan(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src)
        assert state.load(src).tree is not None
        with monkeypatch.context() as m:
            _refuse_scanning(m)
            proxy.clear()
            again = await save(store, "k", src)
        _assert_unchanged_after_one_head(again, first, proxy)

        # Another option (here gzip) is another image: the shortcut does not apply.
        proxy.clear()
        gzip = await save(store, "k", src, compression="gzip")
        assert not gzip.unchanged and gzip.digest != first.digest


@pytest.mark.usefixtures("fresh_is_settled")
async def test_an_npm_style_edit_defeats_the_tree_shortcut(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src)
    _fake_npm_edit(src / "pkg3" / "f4.bin", b"Z" * 8000)  # same size, same mtime: only ctime moves
    settle_ctimes()
    second = await save(store, "k", src)
    assert not second.unchanged and second.digest != first.digest
    out = await _restored(store, "k", tmp_path)
    assert (out / "pkg3" / "f4.bin").read_bytes() == b"Z" * 8000


@pytest.mark.usefixtures("fresh_is_settled")
async def test_a_moved_tag_defeats_the_tree_shortcut(store: Store, tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"other tree")
    first = await save(store, "k", src)
    first_layers = [layer.digest for layer in (await load_image(store, "k")).layers]
    moved = await save(store, "k", other)  # e.g. another runner saved under the same key
    back = await save(store, "k", src)
    assert moved.digest != first.digest
    # Pushed again: the key holds src's layers. (The index's digest may differ from the first
    # one's: its `created` stamp has one-second resolution.)
    assert not back.unchanged
    assert [layer.digest for layer in (await load_image(store, "k")).layers] == first_layers


@pytest.mark.usefixtures("fresh_is_settled")
async def test_special_files_neither_defeat_nor_escape_the_tree_shortcut(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _bulk(tmp_path / "src")
    pipe = src / "pkg0" / "pipe"
    os.mkfifo(pipe)
    socket_file(src / "pkg1" / "s.sock")
    settle_ctimes()
    first = await save(store, "k", src)
    assert [s.path for s in first.special] == ["pkg0/pipe", "pkg1/s.sock"]

    # Data through a FIFO moves its ctime (a process using it between two saves): the tree
    # is still unchanged, and the shortcut still names what it left out.
    ctime = pipe.stat().st_ctime_ns
    fd = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"through the pipe")
        os.read(fd, 100)
    finally:
        os.close(fd)
    assert pipe.stat().st_ctime_ns > ctime
    settle_ctimes()
    with monkeypatch.context() as m:
        _refuse_scanning(m)
        again = await save(store, "k", src)
    assert again.unchanged and again.digest == first.digest and again.special == first.special
    assert "skipped 2 special files" in again.summary()

    # A new one is not hidden: its directory changed, and the save names it.
    os.mkfifo(src / "pkg2" / "new-pipe")
    settle_ctimes()
    third = await save(store, "k", src)
    assert not third.unchanged and third.digest != first.digest
    assert [s.path for s in third.special] == ["pkg0/pipe", "pkg1/s.sock", "pkg2/new-pipe"]


def _fingerprint(root: Path, bound: int) -> str | None:
    return state_mod.tree_fingerprint(walk_mod.tree_identity(root), bound)


@pytest.mark.usefixtures("fresh_is_settled")
async def test_fresh_entries_or_a_restore_leave_no_tree_record(store: Store, tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src")
    assert _fingerprint(src, state_mod.clock_ns()) is not None
    before = state_mod.clock_ns()
    (src / "pkg1" / "new.bin").write_bytes(b"new")  # a ctime at or after the bound
    assert _fingerprint(src, before) is None
    settle_ctimes()
    after = _fingerprint(src, state_mod.clock_ns())
    os.chmod(src / "pkg1" / "new.bin", 0o600)  # metadata only: the ctime still moves
    settle_ctimes()
    assert after is not None and _fingerprint(src, state_mod.clock_ns()) not in (None, after)

    await save(store, "k", src)
    assert state.load(src).tree is not None
    await restore(store, "k", src)  # the restore replaced the tree: its record is void
    assert state.load(src).tree is None


def test_a_tree_changed_lately_gets_no_fingerprint(tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src")
    identity = walk_mod.tree_identity(src)
    newest = max(identity.ctimes)
    assert state_mod.FRESH_NS >= 2_000_000_000  # FAT rounds timestamps to 2 s
    assert state_mod.tree_fingerprint(identity, newest + state_mod.FRESH_NS) is None
    assert state_mod.tree_fingerprint(identity, newest + state_mod.FRESH_NS + 1) == identity.digest


# -------------------------------------------------------------------------------------------
# The save right after a restore: the restored tree as a whole, when nothing touched it.


async def test_an_untouched_restored_tree_saves_with_one_request_and_no_scan(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CI job's closing save when the job left the restored tree alone: its entries are too
    fresh for the tree fingerprint, but each one's ctime still lies in the restore's window, the
    restored directory holds the names the restore gave it, and the tag still names the entry
    restored: nothing to walk but the tree's inodes, nothing to ask but the tag."""
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src, full=True)
        work = tmp_path / "work"
        await restore(store, "k", work)
        for _ in range(2):  # the window keeps vouching until something changes
            with monkeypatch.context() as m:
                _refuse_scanning(m)
                proxy.clear()
                again = await save(store, "k", work)
            _assert_unchanged_after_one_head(again, first, proxy)

        # Another compression is another image; another key (a fallback restore's) another entry.
        gzip = await save(store, "k", work, compression="gzip")
        assert not gzip.unchanged and gzip.digest != first.digest
        other = tmp_path / "other"
        fallback = await restore(store, "k2", other, restore_keys=["k"])
        assert fallback.status == "fallback"
        saved = await save(store, "k2", other)
        assert not saved.unchanged and saved.layers_uploaded == 0


def _drop_top_level_entry(root: Path) -> None:
    shutil.rmtree(root / "pkg7")  # only the root's ctime moves, and the root moved at the swap


def _drop_nested_file(root: Path) -> None:
    (root / "pkg2" / "f3.bin").unlink()


def _add_top_level_file(root: Path) -> None:
    (root / "new.bin").write_bytes(b"new")
    os.utime(root / "new.bin", (_PAST, _PAST))


def _rename_top_level_entry(root: Path) -> None:
    (root / "pkg1").rename(root / "pkgX")


def _replace_a_directory_with_an_edited_copy(root: Path) -> None:
    """Same names, sizes, modes and mtimes; one file's bytes differ."""
    shutil.copytree(root / "pkg4", root / "copy", copy_function=shutil.copy2)
    (root / "copy" / "f6.bin").write_bytes(b"E" * 8000)
    shutil.rmtree(root / "pkg4")
    (root / "copy").rename(root / "pkg4")
    _backdate(root / "pkg4")


def _chmod_nested_directory(root: Path) -> None:
    os.chmod(root / "pkg5", 0o700)


@pytest.mark.parametrize(
    "edit",
    [
        _drop_top_level_entry,
        _drop_nested_file,
        _add_top_level_file,
        _rename_top_level_entry,
        _replace_a_directory_with_an_edited_copy,
        _chmod_nested_directory,
    ],
)
async def test_any_change_to_a_restored_tree_is_saved(
    store: Store, tmp_path: Path, edit: Callable[[Path], None]
) -> None:
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await restore(store, "k", work)
    edit(work)
    second = await save(store, "k", work)
    assert not second.unchanged and second.digest != first.digest
    out = await _restored(store, "k", tmp_path)
    assert_same_tree(work, out)


def _roots_files(src: Path) -> None:
    pass


def _a_root_owned_file_among_its_own(src: Path) -> None:
    give_to_nobody(src)
    os.chown(src / "pkg4" / "f2.bin", 0, 0)


def _a_root_owned_symlink_among_its_own(src: Path) -> None:
    give_to_nobody(src)
    os.lchown(src / "pkg0" / "link", 0, 0)


def _a_sticky_directory_of_its_own(src: Path) -> None:
    give_to_nobody(src)
    os.chmod(src / "pkg3", 0o1777)  # only root may give it that bit back


@pytest.mark.parametrize(
    "prepare",
    [
        _roots_files,
        _a_root_owned_file_among_its_own,
        _a_root_owned_symlink_among_its_own,
        _a_sticky_directory_of_its_own,
    ],
)
def test_a_tree_restored_by_a_user_without_its_owners_or_bits_is_no_copy_of_the_entry(
    monkeypatch: pytest.MonkeyPatch, prepare: Callable[[Path], None]
) -> None:
    """uid 65534 restoring what root saved gets the files as its own, without set-ID or sticky
    bits: the tree is not what the entry holds, and its save stores what it holds (the whole-tree
    shortcut took it for the entry)."""
    with reachable_dir() as base:
        src = _bulk(base / "src")
        prepare(src)
        anyio.run(
            functools.partial(save, full=True),
            open_store(parse_reference(f"oci:{base / 'layout'}")),
            "k",
            src,
        )
        give_to_nobody(base / "layout", base)
        (base / "state").mkdir(mode=0o700)
        os.chown(base / "state", 65534, 65534)
        monkeypatch.setenv("REMOTE_CACHE_STATE_DIR", str(base / "state"))

        async def restore_then_save() -> None:
            store = open_store(parse_reference("oci:layout"))
            await restore(store, "k", Path("work"))
            again = await save(store, "k", Path("work"))
            assert not again.unchanged, "the restored tree was taken for the entry"

        assert as_nobody_in(base, lambda: anyio.run(restore_then_save)) == ""


@pytest.mark.parametrize("fault", ["fail", "stall"])
async def test_a_changed_tree_s_save_asks_no_head_that_could_fail_or_hold_it(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path, fault: str
) -> None:
    """A save that finds the tree changed reads the tag its own way (by GET) and asks nothing
    by HEAD: a registry refusing HEADs, or never answering one, fails or holds no such save (when
    the HEAD went out beside the walk, they did)."""
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src, full=True)
        work = tmp_path / "work"
        await restore(store, "k", work)
        (work / "pkg1" / "f1.bin").write_bytes(b"changed")
        if fault == "fail":
            proxy.fail(20, status=405, method="HEAD", path_contains="/manifests/")
        else:
            proxy.stall(method="HEAD", path_contains="/manifests/")
        started = time.monotonic()
        changed = await save(store, "k", work)
        assert not changed.unchanged and changed.digest != first.digest
        assert time.monotonic() - started < 10  # (a stalled HEAD held it for the read timeout)


#: An mtime in 1811: tmpfs keeps it, ext4 (from 1901 on) cannot.
_1811_NS = -5_000_000_000 * 10**9


async def test_an_mtime_the_target_filesystem_cannot_hold_is_no_copy_of_the_entry(
    store: Store, tmp_path: Path
) -> None:
    """ext4 keeps mtimes from 1901 on: restored there, an entry's 1811 mtime becomes 1901, and
    the tree is not what the entry holds (the whole-tree shortcut took it for the entry)."""
    with tmpfs(tmp_path / "mnt") as mnt, ext4(tmp_path / "disk") as disk:  # tmpfs keeps it
        src = _bulk(mnt / "src")
        os.utime(src / "pkg3" / "f4.bin", ns=(_1811_NS, _1811_NS))
        first = await save(store, "k", src, full=True)
        work = disk / "work"
        await restore(store, "k", work)
        assert (work / "pkg3" / "f4.bin").stat().st_mtime_ns != _1811_NS
        again = await save(store, "k", work)
        assert not again.unchanged and again.digest != first.digest


async def test_a_set_group_id_bit_the_kernel_cleared_is_no_copy_of_the_entry(
    store: Store, tmp_path: Path
) -> None:
    """Root without CAP_FSETID (a hardened container) cannot give a file of a group it is not in
    its set-group-ID bit: the kernel clears it, and the tree is not what the entry holds."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a file another group")
    if shutil.which("setpriv") is None:
        unavailable("setpriv (util-linux) is not installed", fix="apt-get install util-linux")
    gid = next(g for g in range(12345, 13000) if g not in os.getgroups() and g != os.getegid())
    src = _bulk(tmp_path / "src")
    tool = src / "pkg2" / "f0.bin"
    os.chown(tool, -1, gid)
    os.chmod(tool, 0o2755)
    if not tool.stat().st_mode & 0o2000:
        pytest.skip("this process cannot set a set-group-ID bit either (no CAP_FSETID)")
    _backdate(src)
    settle_ctimes()
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "remote_cache",
        "restore",
        "-q",
        f"oci:{tmp_path / 'layout'}:k",
        str(work),
    ]
    restored = subprocess.run(
        ["setpriv", "--bounding-set=-fsetid", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert restored.returncode == 0, restored.stderr
    assert not (work / "pkg2" / "f0.bin").stat().st_mode & 0o2000  # (what this test is about)
    again = await save(store, "k", work)
    assert not again.unchanged and again.digest != first.digest


def _old_tool(monkeypatch: pytest.MonkeyPatch, src: Path) -> None:
    monkeypatch.setattr("remote_cache.cache.image.TOOL", "remote-cache/0.0.1")  # saved by another version


def _hard_link(monkeypatch: pytest.MonkeyPatch, src: Path) -> None:
    os.link(src / "pkg1" / "f1.bin", src / "pkg1" / "linked.bin")
    _backdate(src)
    settle_ctimes()


def _a_fresh_file(monkeypatch: pytest.MonkeyPatch, src: Path) -> None:
    """A file written in the save's second (or later): its layer gets no listing."""
    os.utime(src / "pkg5" / "f5.bin", (time.time() + 5, time.time() + 5))


@pytest.mark.parametrize("variant", [None, _old_tool, _hard_link, _a_fresh_file, "in place"])
async def test_what_a_restore_records_no_whole_tree_for(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: Any
) -> None:
    """Only an entry this version saved, without hard links, every layer with a listing, restored
    into a directory swapped in whole, is recorded whole (``None``: such an entry)."""
    src = _bulk(tmp_path / "src")
    with monkeypatch.context() as m:
        if callable(variant):
            variant(m, src)
        await save(store, "k", src, full=True)
    if variant == "in place":
        with tmpfs(tmp_path / "mnt") as work:
            await restore(store, "k", work)
            window = state.load(work).window
    else:
        await restore(store, "k", tmp_path / "work")
        window = state.load(tmp_path / "work").window
    assert window is not None  # (a layer with a listing, at least, is vouched for)
    assert (window.tree is not None) == (variant is None)


async def test_a_directory_mounted_inside_a_restored_tree_is_saved(store: Store, tmp_path: Path) -> None:
    """A bind mount shows another directory's inodes, which the restore wrote too, and moves no
    ctime: the tree is not the entry any more (the whole-tree shortcut took it for the entry)."""
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await restore(store, "k", work)
    with bind(work / "pkg1", work / "pkg2"):
        again = await save(store, "k", work)
        assert not again.unchanged and again.digest != first.digest
        out = await _restored(store, "k", tmp_path)
        assert_same_tree(work, out)


async def test_a_head_answer_with_an_unreadable_length_is_read_again_by_get(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path
) -> None:
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src, full=True)
        work = tmp_path / "work"
        await restore(store, "k", work)
        headers = {
            "Docker-Content-Digest": first.digest,
            "Content-Type": OCI_INDEX,
            "Content-Length": "twelve",
        }
        proxy.add(Fault("status", status=200, headers=headers, method="HEAD", path_contains="/manifests/"))
        proxy.requests.clear()
        again = await save(store, "k", work)  # (ValueError from int() before)
        assert again.unchanged and again.digest == first.digest
        assert proxy.count("GET", "/manifests/k") == 1


# -------------------------------------------------------------------------------------------
# The restore window is the target filesystem's time, not the restoring process's clock (a
# network filesystem's server stamps ctimes from its own). faketime shifts the process's clock
# only: the kernel still stamps ctimes from its own.


def _restore_with_clock(offset: str, ref: str, target: Path, *options: str) -> None:
    """Restore ``ref`` into ``target`` with the console script, its clock ``offset`` (faketime's
    ``+2s``/``-30s``) off the one the filesystem stamps ctimes with; the state goes where this
    test's own saves look (``REMOTE_CACHE_STATE_DIR``)."""
    if shutil.which("faketime") is None:
        unavailable("faketime is not installed")
    env = {k: v for k, v in os.environ.items() if not is_user_setting(k)}
    env.update(empty_user_dirs(target.parent), REMOTE_CACHE_STATE_DIR=os.environ["REMOTE_CACHE_STATE_DIR"])
    proc = subprocess.run(
        ["faketime", "-f", offset, str(CLI), "restore", "-q", *options, ref, str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("offset", ["+30s", "-30s"])
async def test_a_restore_whose_clock_is_off_the_filesystems_still_vouches_for_the_tree(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: str
) -> None:
    """Windows read from the process's clock lay 30 s off the ctimes the restore gave: no
    file was ever inside one, and every save after a restore read the whole tree."""
    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    work = tmp_path / "work"
    await anyio.to_thread.run_sync(_restore_with_clock, offset, f"oci:{tmp_path / 'layout'}:k", work)
    with monkeypatch.context() as m:
        _refuse_scanning(m)
        again = await save(store, "k", work)
    assert again.unchanged and again.digest == first.digest


async def test_an_edit_right_after_a_restore_whose_clock_runs_ahead_is_saved(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path
) -> None:
    """A restore whose clock runs 2 s ahead of the filesystem's, and whose last layer arrives
    late (its first answer stalls for 3 s, then is resumed): a window read from that clock ended
    2 s after the restore did, so the last layer's files lay inside it and so did an npm-style
    edit (same size, mtime put back) made at once after the restore -- the save reused the stale
    layer unread."""
    src = _bulk(tmp_path / "src")
    async with proxied(registry, repo_name, fault_proxy_factory) as (store, proxy):
        first = await save(store, "k", src, full=True)
        last = (await load_image(store, "k")).layers[-1]
        proxy.add(Fault("stall", after_bytes=0, method="GET", path_contains=last.digest))
        work = tmp_path / "work"
        ref = f"{proxy.host}/{repo_name}:k"
        await anyio.to_thread.run_sync(_restore_with_clock, "+2s", ref, work, "--timeout", "3")
        _fake_npm_edit(work / "pkg7" / "f9.bin", b"E" * 8000)  # the last layer's last file
        second = await save(store, "k", work)
        assert not second.unchanged and second.digest != first.digest
        assert second.layers_reused == second.layers_total - 1  # the window vouched for the rest
        out = await _restored(store, "k", tmp_path)
        assert_same_tree(work, out)


async def test_a_restore_onto_a_whole_second_filesystem_keeps_the_directory_s_records(
    store: Store, tmp_path: Path
) -> None:
    """On a filesystem keeping whole-second ctimes (ext4 with 128-byte inodes) a restore within one
    second read the same probe ctime at both ends: it recorded the window [t, t), which the state
    loader takes for a damaged file -- and then trusts none of it, the directory's local records
    lost too. Such a restore records no window (no file could be trusted in it anyway)."""
    with whole_seconds(tmp_path / "ext4") as fs:
        work = _bulk(fs / "work")
        time.sleep(1.1)  # whole-second ctimes settle only once their second is over
        await save(store, "k", work, full=True)
        records = state.load(work).records
        assert records
        while time.time() % 1 > 0.2:  # the restore's few ms all inside one second
            time.sleep(0.01)
        await restore(store, "k", work)
        assert state.load(work).records == records


async def test_a_restore_into_a_directory_from_a_container_image_vouches_for_its_layers(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a directory from an overlayfs lower layer the restore swaps entries into it (it cannot
    be renamed); its window named the staging directory as the root, which the target never is:
    every save after such a restore packed the whole tree again. The window now names the
    target, as an in-place restore's does (entries moved in after the window are not vouched
    for; the files below them are)."""
    from tests.mounts import overlay

    src = _bulk(tmp_path / "src")
    first = await save(store, "k", src, full=True)
    lower = tmp_path / "image"
    (lower / "cache" / "old").mkdir(parents=True)
    with overlay(lower, tmp_path / "root") as root:
        work = root / "cache"
        await restore(store, "k", work)
        _refuse_packing(monkeypatch)
        again = await save(store, "k", work)
        assert again.unchanged and again.digest == first.digest
        assert again.layers_reused == again.layers_total


_GONE_AS_THE_IDENTITY_WALK_OPENS_IT = """
import asyncio, os, shutil, sys
from pathlib import Path
from remote_cache.cache.save import save
from remote_cache.oci.layout import LayoutStore

tree, victim = Path(sys.argv[1]), os.path.join(sys.argv[1], "b", "c")
store = LayoutStore(sys.argv[2])
asyncio.run(save(store, "k", tree))  # recorded: the next save walks for its identity first
armed = []

def remove(event, args):  # a build removes its temporary directory as the walk opens it
    if event == "open" and args[0] == victim and not armed:
        armed.append(victim)
        shutil.rmtree(victim)

sys.addaudithook(remove)
print(asyncio.run(save(store, "k", tree)).status)
"""


def test_a_directory_gone_during_the_identity_walk_leaves_the_save_to_walk_again(tmp_path: Path) -> None:
    """The identity walk of a recorded tree meeting a directory removed under it: the save walks
    again (as for any failure of that walk) and saves what is there. Once the walk said so with a
    TreeChanged, the save failed with it (a review found it)."""
    tree = tmp_path / "tree"
    (tree / "b" / "c").mkdir(parents=True)
    (tree / "b" / "c" / "f").write_text("temporary")
    (tree / "a").write_text("kept")
    time.sleep(state_mod.FRESH_NS / 1e9 + 0.2)  # old enough for its save to record the whole tree
    proc = subprocess.run(
        [sys.executable, "-c", _GONE_AS_THE_IDENTITY_WALK_OPENS_IT, str(tree), str(tmp_path / "layout")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "saved"), proc.stderr
    assert not (tree / "b" / "c").exists()
