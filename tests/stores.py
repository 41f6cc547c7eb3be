"""Test helpers for stores: open one and always close it; backdate an entry; a layout's files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from remote_cache.keys import tag_for_key
from remote_cache.oci import ANNOTATION_CREATED
from remote_cache.oci.media import ANNOTATION_REF_NAME
from remote_cache.oci.reference import Reference
from remote_cache.oci.store import Store, open_store

#: Valid JSON nested 100,000 deep (an image document nests a few levels): ``json.loads`` raises
#: RecursionError on it, not ValueError.
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def layout_blob(layout: Path, digest: str) -> Path:
    """Where the OCI layout ``layout`` keeps blob ``digest``."""
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def damage_layout_blob(layout: Path, digest: str) -> None:
    """Change a document blob of ``layout`` so that its bytes no longer match ``digest``."""
    path = layout_blob(layout, digest)
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersiom"))


def layout_top(layout: Path) -> str:
    """The digest of the first entry listed in ``layout``'s ``index.json``."""
    return str(json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"])


def layout_document(layout: Path, digest: str) -> Any:
    """The JSON document ``layout`` keeps as blob ``digest``."""
    return json.loads(layout_blob(layout, digest).read_bytes())


def list_in_index(layout: Path, entry: dict[str, Any], tag: str | None) -> None:
    """Add ``entry`` (tagged ``tag``, if any) to ``layout``'s ``index.json``, as a foreign tool would."""
    if tag is not None:
        entry = {**entry, "annotations": {ANNOTATION_REF_NAME: tag}}
    index_path = layout / "index.json"
    index = json.loads(index_path.read_bytes())
    index["manifests"].append(entry)
    index_path.write_text(json.dumps(index))


@asynccontextmanager
async def opened(ref: Reference) -> AsyncIterator[Store]:
    store = open_store(ref)
    try:
        yield store
    finally:
        await store.aclose()


async def copy_tag(store: Store, reference: str, tag: str) -> None:
    """Tag the document at ``reference`` (a tag or digest) as ``tag`` too, as ``skopeo copy`` does
    within one repository."""
    desc, body = await store.get_manifest(reference)
    await store.put_manifest(body, desc.media_type, tag=tag)


async def backdate(store: Store, key: str, days_ago: float, now: datetime | None = None) -> str:
    """Re-tag ``key``'s index with a creation time ``days_ago`` days back from ``now`` (default:
    the clock) as if saved then. Returns the new index digest.
    """
    tag = tag_for_key(key)
    desc, body = await store.get_manifest(tag)
    index = json.loads(body)
    stamp = (now or datetime.now(UTC)) - timedelta(days=days_ago)
    index["annotations"][ANNOTATION_CREATED] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (await store.put_manifest(json.dumps(index).encode(), desc.media_type, tag=tag)).digest
