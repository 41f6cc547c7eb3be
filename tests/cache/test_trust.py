"""Trust and limits: immutable keys are never overwritten, read-only saves touch nothing, max_size refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache.save import save
from remote_cache.errors import CacheMiss, CacheTooLarge
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.store import open_store
from remote_cache.units import parse_size
from tests.registry_server import RegistryServer
from tests.stores import opened


def _tree(root: Path, content: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "f").write_bytes(content)
    return root


async def test_immutable_key_is_never_overwritten(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = fault_proxy_factory(registry)
    async with opened(parse_reference(f"{proxy.host}/{repo_name}")) as store:
        first = await save(store, "release-1", _tree(tmp_path / "a", b"one"), immutable=True)
        assert first.status == "saved" and first.skipped is None
        proxy.clear()
        second = await save(store, "release-1", _tree(tmp_path / "b", b"two"), immutable=True)
        assert second.skipped == "immutable key exists" and second.status == "skipped"
        assert second.digest == first.digest and second.bytes_uploaded == 0
        assert "immutable key exists" in second.summary()
        assert sum(proxy.count(m) for m in ("PUT", "POST", "PATCH")) == 0
        assert (await store.resolve("release-1")).digest == first.digest
        # Without the flag the same key is replaced as usual.
        third = await save(store, "release-1", tmp_path / "b")
        assert third.status == "saved" and third.digest != first.digest


async def test_read_only_save_touches_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    store = open_store(parse_reference(f"oci:{layout}"))
    result = await save(store, "k", tmp_path / "does-not-even-exist", read_only=True)
    assert result.status == "skipped" and result.skipped is not None and "read-only" in result.skipped
    assert result.to_json()["outcome"] == "skipped"
    assert "read-only" in result.summary()
    with pytest.raises(CacheMiss):
        await store.resolve("k")
    assert not layout.exists() or await store.tags() == []


async def test_max_size_message_names_size_limit_and_how_to_raise(tmp_path: Path) -> None:
    store = open_store(parse_reference(f"oci:{tmp_path / 'layout'}"))
    src = _tree(tmp_path / "src", os.urandom(3 << 20))
    with pytest.raises(CacheTooLarge) as info:
        await save(store, "k", src, max_size=1 << 20)
    message = str(info.value)
    assert (
        "3.1 MB (3145728 bytes)" in message
        and "1.0 MB (1048576 bytes)" in message
        and "--max-size" in message
    )
    suggested = message.split("--max-size ")[1].split(" ")[0]
    assert parse_size(suggested) > 3 << 20  # the suggestion would actually let it through
    assert await save(store, "k", src, max_size=parse_size(suggested))
