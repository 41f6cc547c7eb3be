"""Garbage collection of a bucket: delete blobs no tag references and no save relies on.

A bucket frees nothing when a tag object goes. The sweep (BuildKit's S3 cache ``touch_refresh``
is the model) deletes a blob only when it is unreferenced by every tag *and* untouched for longer
than the grace period, where "touched" is the later of the blob's own last-modified time (a save
uploaded it) and its ``touched/`` mark's (a save relied on it: ``ObjectStore.has_blob`` writes the
mark *before* it checks that the blob exists). Times are the store's own clock, so a skewed local
clock cannot shorten the grace period.

Against a save running at the same time: its new blobs are fresh; a blob it reuses was marked
before it looked, and the sweep looks at the mark again right before each delete; its tag, once
written, makes its blobs referenced. So a saved entry keeps its blobs as long as a save takes less
than the grace period (default one hour).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ...errors import CacheMiss, RemoteCacheError
from ..media import INDEX_TYPES, MANIFEST_TYPES

if TYPE_CHECKING:
    from .store import ObjectStore

__all__ = ["children", "collect_garbage", "reachable"]

_DOCUMENT_TYPES = MANIFEST_TYPES | INDEX_TYPES


def children(body: bytes) -> tuple[list[str], list[str]]:
    """(documents to read, leaves) that an index or manifest refers to."""
    try:
        doc = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(doc, dict):
        return [], []
    refs: list[Any] = []
    for name in ("manifests", "layers", "blobs"):
        if isinstance(doc.get(name), list):
            refs.extend(doc[name])
    for name in ("config", "subject"):
        if isinstance(doc.get(name), dict):
            refs.append(doc[name])
    docs: list[str] = []
    leaves: list[str] = []
    for ref in refs:
        if isinstance(ref, dict) and isinstance(ref.get("digest"), str):
            (docs if ref.get("mediaType") in _DOCUMENT_TYPES else leaves).append(ref["digest"])
    return docs, leaves


async def reachable(store: ObjectStore) -> set[str]:
    """Every digest a tag reaches: its own document, nested manifests, configs and layers."""
    keep: set[str] = set()
    pending: list[tuple[str, bytes]] = []
    for tag in await store.tags():
        try:
            desc, body = await store.get_manifest(tag)
        except CacheMiss:
            continue  # removed meanwhile
        pending.append((desc.digest, body))
    while pending:
        digest, body = pending.pop()
        if digest in keep:
            continue
        keep.add(digest)
        docs, leaves = children(body)
        keep.update(leaves)
        for child in docs:
            if child in keep:
                continue
            try:
                _desc, child_body = await store.get_manifest(child)
            except RemoteCacheError:
                keep.add(child)  # missing or unreadable: keep what can be kept
                continue
            pending.append((child, child_body))
    return keep


def _touched(*metas: dict[str, Any] | None) -> datetime | None:
    times = [m["last_modified"] for m in metas if m is not None]
    return max(times) if times else None


async def collect_garbage(store: ObjectStore, grace_seconds: float) -> tuple[int, int]:
    """Delete unreferenced blobs untouched for ``grace_seconds``; (blobs removed, bytes freed)."""
    cutoff = await store.server_time() - timedelta(seconds=grace_seconds)
    keep = await reachable(store)
    blobs = await store.listing("blobs/sha256/")
    marks = await store.listing("touched/sha256/")
    removed = freed = 0
    for digest, meta in blobs.items():
        if digest in keep:
            continue
        last = _touched(meta, marks.get(digest))
        if last is not None and last > cutoff:
            continue
        # Look again right before deleting: a save may have marked it since the listing.
        blob, mark = await store.head_blob_and_mark(digest)
        last = _touched(blob, mark)
        if blob is None or (last is not None and last > cutoff):
            continue
        await store.remove_blob(digest)
        removed += 1
        freed += int(blob["size"])
    for digest, mark in marks.items():
        if digest not in blobs and mark["last_modified"] <= cutoff:
            await store.remove_mark(digest)  # the mark of a blob that never came or is gone
    return removed, freed
