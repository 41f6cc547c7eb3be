"""find_entry and restore with restore keys: exact hit, newest prefix fallback, miss (actions/cache rules)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache import save as save_module
from remote_cache.cache.entries import Match, find_entry, inspect, list_entries, prune, remove
from remote_cache.cache.image import load_image
from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.errors import CacheMiss, IntegrityError, InvalidKey, RegistryAuthError
from remote_cache.keys import tag_for_key, tag_prefix_for
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.reference import Reference, parse_reference
from tests.registry_server import FaultProxy, RegistryServer
from tests.stores import backdate, copy_tag, damage_layout_blob, layout_blob, opened
from tests.trees import assert_same_tree


def _tree(root: Path, content: bytes) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.txt").write_bytes(content)
    return root


@pytest.mark.parametrize(
    ("prefix", "key"),
    [("npm-", "npm-abc"), ("npm/", "npm/linux x"), (".x", ".xyz"), ("-", "-a"), ("a" * 120, "a" * 200)],
)
def test_tag_prefix_covers_every_matching_key(prefix: str, key: str) -> None:
    assert tag_for_key(key).startswith(tag_prefix_for(prefix))


async def test_exact_then_newest_prefix_then_miss(where: Reference, tmp_path: Path) -> None:
    async with opened(where) as store:
        for i, key in enumerate(["npm-old", "npm-new", "npm/odd key", "pip-1"]):
            await save(store, key, _tree(tmp_path / str(i), key.encode()))
        await backdate(store, "npm-old", 3)
        newest = await backdate(store, "npm-new", 1)
        await backdate(store, "npm/odd key", 2)
        await backdate(store, "pip-1", 0)

        exact = await find_entry(store, "npm-old", ["pip-"])
        assert exact is not None and exact.exact and exact.key == "npm-old"

        fallback = await find_entry(store, "npm-missing", ["nope-", "npm-", "pip-"])
        assert fallback == Match(key="npm-new", tag="npm-new", digest=newest, exact=False)
        # The sanitised prefix "npm-" also covers "npm/odd key"'s tag; the annotation decides.
        odd = await find_entry(store, "npm-missing", ["npm/"])
        assert odd is not None and odd.key == "npm/odd key" and odd.tag == tag_for_key("npm/odd key")
        assert await find_entry(store, "npm-missing", ["go-", "npm-x"]) is None
        assert await find_entry(store, "npm-missing") is None
        with pytest.raises(InvalidKey):
            await find_entry(store, "npm-missing", [""])


async def test_equal_times_pick_the_greater_key(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    now = datetime.now(UTC)
    for key in ["k-a", "k-c", "k-b"]:
        await save(store, key, _tree(tmp_path / key, key.encode()))
        await backdate(store, key, 1, now)  # same second for all three
    match = await find_entry(store, "k-z", ["k-"])
    assert match is not None and match.key == "k-c"


async def test_prune_keeps_what_a_restore_key_would_pick_when_times_are_equal(tmp_path: Path) -> None:
    """Entries of one second: ``prune --keep 1`` keeps the one a restore key picks (the greater
    key), and ``ls`` lists it first. Ties went by tag there: with a key whose tag is hashed
    (``x/a``) prune removed exactly the entry a restore would choose."""
    store = LayoutStore(tmp_path / "layout")
    now = datetime.now(UTC)
    for key in ["x/a", "x-b"]:  # ('x/a' > 'x-b'; its hashed tag '_x_a--...' sorts below 'x-b')
        await save(store, key, _tree(tmp_path / key.replace("/", "_"), key.encode()))
        await backdate(store, key, 1, now)
    match = await find_entry(store, "x-none", ["x"])
    assert match is not None and match.key == "x/a"
    assert [e.key for e in await list_entries(store, prefix="x")] == ["x/a", "x-b"]
    assert [e.key for e in await prune(store, keep=1, prefix="x", dry_run=True)] == ["x-b"]


async def test_only_candidate_manifests_are_read(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        for key in ["npm-1", "go-1", "go-2", "pip-1"]:
            await save(store, key, _tree(tmp_path / key, key.encode()))
        proxy.clear()
        match = await find_entry(store, "npm-2", ["npm-"])
        assert match is not None and match.key == "npm-1"
        assert proxy.count("GET", "/tags/list") == 1
        for other in ["go-1", "go-2", "pip-1"]:
            assert proxy.count(None, f"/manifests/{other}") == 0


async def test_restore_falls_back_and_reports_it(where: Reference, tmp_path: Path) -> None:
    async with opened(where) as store:
        src = _tree(tmp_path / "src", b"cached")
        saved = await save(store, "npm-aaa", src)
        hit = await restore(store, "npm-aaa", tmp_path / "hit", restore_keys=["npm-"])
        assert hit.status == "hit" and hit.matched_key == "npm-aaa"
        assert "hit" in hit.summary() and "fallback" not in hit.summary()

        out = tmp_path / "out"
        result = await restore(store, "npm-bbb", out, restore_keys=["npm-"])
        assert_same_tree(src, out)
        assert result.status == "fallback" and result.matched_key == "npm-aaa"
        assert result.key == "npm-bbb" and result.digest == saved.digest
        assert "restore fallback npm-bbb from npm-aaa: " in result.summary()
        assert result.to_json()["outcome"] == "fallback"

        with pytest.raises(CacheMiss):
            await restore(store, "npm-bbb", tmp_path / "miss", restore_keys=["go-"])
        assert not (tmp_path / "miss").exists()


async def test_a_failure_while_reading_candidates_is_an_error_not_a_miss(
    registry: RegistryServer, repo_name: str, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        await save(store, "npm-abc", _tree(tmp_path / "t", b"x"))
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        # The exact key misses (404 from the real registry); reading the candidate is refused.
        proxy.fail(1, status=403, method="GET", path_contains=f"/manifests/{tag_for_key('npm-abc')}")
        with pytest.raises(RegistryAuthError):
            await find_entry(store, "npm-zzz", ["npm-"])


async def test_a_restore_reads_each_document_once(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """Round trips before the first blob are latency on every CI job: a hit reads its tag's index
    (no HEAD before it) and the manifest; a fallback reads each candidate's once (the chosen
    entry's index and manifest were fetched a second time to restore it)."""
    proxy = fault_proxy_factory(registry)
    ref = parse_reference(f"{proxy.host}/{repo_name}")
    async with opened(ref) as store:
        await save(store, "npm-1", _tree(tmp_path / "src", b"one"))
    proxy.requests.clear()
    async with opened(ref) as store:  # each restore is a command of its own, with a fresh store
        await restore(store, "npm-1", tmp_path / "hit")
    assert proxy.count("HEAD") == 0
    assert proxy.count("GET", "/manifests/") == 2
    proxy.requests.clear()
    async with opened(ref) as store:
        fallback = await restore(store, "npm-2", tmp_path / "fallback", restore_keys=["npm-"])
    assert fallback.status == "fallback"
    assert proxy.count("GET", "/manifests/", status=200) == 2  # npm-1's index and manifest
    assert_same_tree(tmp_path / "src", tmp_path / "fallback")


async def test_an_exact_key_whose_manifest_is_gone_is_a_miss_not_a_fallback(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """The exact key's tag exists but a manifest it names was deleted: a broken entry is a miss
    for the key (as the Dagger module's lookup, which only resolves the tag, sees it), not an
    absent key to fall back from."""
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        await save(store, "npm-old", _tree(tmp_path / "old", b"old"))
        await save(store, "npm-new", _tree(tmp_path / "new", b"new"))
        await store.delete((await load_image(store, "npm-new")).manifest.digest)
        with pytest.raises(CacheMiss, match="npm-new"):
            await restore(store, "npm-new", tmp_path / "out", restore_keys=["npm-"])


async def test_a_key_shaped_like_another_keys_tag_does_not_take_its_entry(tmp_path: Path) -> None:
    """``npm-linux--<16 hex>`` is a valid tag, and exactly ``npm/linux``'s: saved under it, it
    used to replace that entry, and a restore of ``npm/linux`` returned it as a hit."""
    store = LayoutStore(tmp_path / "layout")
    await save(store, "npm/linux", _tree(tmp_path / "real", b"real"))
    await save(store, tag_for_key("npm/linux"), _tree(tmp_path / "other", b"other"))
    result = await restore(store, "npm/linux", tmp_path / "out")
    assert (result.status, result.matched_key) == ("hit", "npm/linux")
    assert_same_tree(tmp_path / "real", tmp_path / "out")


async def test_an_entry_saved_for_another_key_under_the_tag_is_a_miss(tmp_path: Path) -> None:
    """The exact key's tag holding an image whose key annotation names another key (a hash
    collision, another tool's write): not this key's entry, so a miss, never a hit."""
    store = LayoutStore(tmp_path / "layout")
    saved = await save(store, "other", _tree(tmp_path / "other", b"other"))
    await copy_tag(store, saved.digest, tag_for_key("npm/linux"))
    assert await find_entry(store, "npm/linux", ()) is None
    with pytest.raises(CacheMiss):
        await restore(store, "npm/linux", tmp_path / "out")


async def test_an_entry_copied_under_another_key_that_is_its_own_tag_is_found(tmp_path: Path) -> None:
    """``skopeo copy …:k1 …:promoted``: a key that is its own tag takes whatever is there, by
    every command (a review found the key check above making it a miss for restore only)."""
    store = LayoutStore(tmp_path / "layout")
    saved = await save(store, "k1", _tree(tmp_path / "src", b"k1"))
    await copy_tag(store, saved.digest, "promoted")
    result = await restore(store, "promoted", tmp_path / "out")
    assert (result.status, result.digest) == ("hit", saved.digest)
    assert (await inspect(store, "promoted")).digest == saved.digest
    # A restore key finds it under that key too (it looked at the key the copy records, k1).
    match = await find_entry(store, "promoted-2", ["promo"])
    assert match is not None and (match.key, match.tag, match.exact) == ("promoted", "promoted", False)
    fallback = await restore(store, "promoted-2", tmp_path / "out2", restore_keys=["promo"])
    assert (fallback.status, fallback.matched_key, fallback.digest) == ("fallback", "promoted", saved.digest)


@contextmanager
def saved_as_older_versions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Saves inside are made as versions before the hashed-tag rule made them: under the key itself."""
    with monkeypatch.context() as old_rule:
        old_rule.setattr(save_module, "tag_for_key", lambda k: k)
        yield


async def test_a_key_shaped_like_a_hashed_tag_still_finds_what_older_versions_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions before the rule saved such a key under itself: restore (exact or as a fallback's
    key, as the Dagger backends restore it), inspect and rm still find that entry."""
    store = LayoutStore(tmp_path / "layout")
    key = "go-build--0123456789abcdef"
    with saved_as_older_versions(monkeypatch):
        saved = await save(store, key, _tree(tmp_path / "src", b"old"))
    assert saved.tag == key != tag_for_key(key)
    assert (await restore(store, key, tmp_path / "out")).status == "hit"
    match = await find_entry(store, "go-build--fedcba9876543210", ["go-build-"])
    assert match is not None and match.key == key
    assert (await restore(store, match.key, tmp_path / "again")).digest == saved.digest
    assert (await inspect(store, key)).tag == key
    await remove(store, key)
    assert await find_entry(store, key, ()) is None


async def test_rm_of_a_key_whose_older_entry_cannot_be_read_removes_no_other_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key shaped like a hashed tag, saved under itself by an older version, whose document
    there is damaged, while its own tag (as a key, saved under itself too) holds another key's
    entry: a restore of it says the entry is damaged, and rm removes that entry, as ls lists it,
    and not the other. (rm deleted the other key's entry: the damaged document's error was taken
    for one under the key's own tag.)"""
    root = tmp_path / "layout"
    store = LayoutStore(root)
    key = "go-build--0123456789abcdef"
    other = tag_for_key(key)  # a key too, shaped like a hashed tag as well
    with saved_as_older_versions(monkeypatch):
        damaged = await save(store, key, _tree(tmp_path / "src", b"damaged"))
        await save(store, other, _tree(tmp_path / "other", b"other"))
    damage_layout_blob(root, damaged.digest)
    with pytest.raises(IntegrityError):
        await restore(store, key, tmp_path / "damaged")
    assert [e.tag for e in await list_entries(store) if e.error] == [key]
    assert (await remove(store, key)).entry.tag == key
    assert await store.tags() == [other]
    assert (await restore(store, other, tmp_path / "out")).status == "hit"
    assert_same_tree(tmp_path / "other", tmp_path / "out")


# A registry keeps only valid manifests, and no tag without its manifest; a bucket's tag holds its
# top document, which cannot be gone while the tag is there: a layout can show both damages.
@pytest.mark.parametrize(
    ("where", "damage"),
    [("layout", "garbage"), ("layout", "gone"), ("s3", "garbage"), ("azure", "garbage")],
    indirect=["where"],
)
async def test_an_older_entry_that_cannot_be_read_is_an_error_and_rm_removes_it(
    where: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A hashed-looking key's entry saved under the key itself by an older version, whose top
    document is not a readable image document (bytes that are not one; a document that is gone),
    while the key's own tag holds another key's entry: on every store, restore fails (no fallback
    to a restore key) and rm removes that entry, as ls lists it, not the other. (On a bucket,
    whose tags are not checked against a digest, it was a miss and rm could not remove it; a
    gone document was a miss everywhere.)"""
    from remote_cache.errors import BrokenEntry, ImageFormatError
    from remote_cache.oci.media import OCI_INDEX

    key = "go-build--0123456789abcdef"
    other = tag_for_key(key)
    async with opened(where) as store:
        with saved_as_older_versions(monkeypatch):
            damaged = await save(store, key, _tree(tmp_path / "src", b"damaged"))
            await save(store, other, _tree(tmp_path / "other", b"other"))
        await save(store, "go-build-main", _tree(tmp_path / "main", b"main"))
        if damage == "gone":
            assert where.path is not None
            layout_blob(Path(where.path), damaged.digest).unlink()
        else:
            await store.put_manifest(b"not an image document", OCI_INDEX, tag=key)
        expected = BrokenEntry if damage == "gone" else (ImageFormatError, IntegrityError)
        with pytest.raises(expected):
            await restore(store, key, tmp_path / "out")
        with pytest.raises(expected):
            await find_entry(store, key, ["go-build-"])
        assert key in [e.tag for e in await list_entries(store) if e.error]
        assert (await remove(store, key)).entry.tag == key
        assert sorted(await store.tags()) == sorted([other, "go-build-main"])
        assert (await restore(store, other, tmp_path / "again")).status == "hit"


async def test_rm_of_a_key_whose_own_entry_cannot_be_read_removes_that_entry(tmp_path: Path) -> None:
    """A key whose own tag (here a hashed one) names a document that cannot be read (its bytes
    no longer match its digest): rm removes that tag, and nothing else."""
    root = tmp_path / "layout"
    store = LayoutStore(root)
    key = "npm/linux"
    saved = await save(store, key, _tree(tmp_path / "src", b"a"))
    await save(store, "kept", _tree(tmp_path / "kept", b"k"))
    damage_layout_blob(root, saved.digest)
    with pytest.raises(IntegrityError):
        await restore(store, key, tmp_path / "out")
    assert (await remove(store, key)).entry.tag == tag_for_key(key)
    assert await store.tags() == ["kept"]
