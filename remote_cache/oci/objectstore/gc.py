"""Garbage collection of a bucket: delete blobs no tag references and no save relies on.

A bucket frees nothing when a tag object goes. The sweep (BuildKit's S3 cache ``touch_refresh``
is the model) deletes a blob only when it is unreferenced by every tag *and* untouched for longer
than the grace period, where "touched" is the later of the blob's own last-modified time (a save
uploaded it) and its ``touched/`` mark's (a save relied on it: ``ObjectStore.has_blob`` writes the
mark *before* it checks that the blob exists). Times are the store's own clock, so a skewed local
clock cannot shorten the grace period.

Against a save running at the same time: its new blobs are fresh; a blob it reuses was marked
before it looked, and the sweep looks at the mark again right before each delete; its tag, once
written, makes its blobs referenced; and after writing it the save looks at the blobs it reused
once more and uploads any that went (``ObjectStore._check_reused``). One window stays open: a
save that marks and looks at a blob between the sweep's last look and its delete, and finishes
its own last look before that delete lands (a delete held up by retries). The sweep notices it
afterwards (the mark is newer than its look) and warns; the entry must then be saved again. A
saved entry otherwise keeps its blobs as long as a save takes less than the grace period
(default one hour).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ...errors import CacheMiss, ImageFormatError
from ...tasks import for_each
from ..descriptor import media_type_of, parse_json, references
from ..media import DOCUMENT_TYPES

if TYPE_CHECKING:
    from .store import ObjectStore

__all__ = ["children", "collect_garbage", "reachable"]

log = logging.getLogger("remote_cache")


def children(body: bytes, what: str) -> tuple[list[str], list[str]]:
    """(documents to read, leaves) that an index or manifest refers to; ImageFormatError when
    ``body`` (``what``, for the message) is not a JSON object: not knowing what it refers to, a
    sweep must delete nothing (a tag answered with an error page, or cut short)."""
    try:
        doc = parse_json(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise ImageFormatError(
            f"{what} is not a readable image document ({len(body)} bytes); the sweep deletes nothing "
            "while it cannot tell what that entry uses (if it is not one, remove it: `remote-cache rm` "
            "of its key, or delete that object)"
        )
    docs: list[str] = []
    leaves: list[str] = []
    for ref in references(doc):
        (docs if media_type_of(ref) in DOCUMENT_TYPES else leaves).append(ref["digest"])
    return docs, leaves


async def reachable(store: ObjectStore) -> set[str]:
    """Every digest a tag reaches: its own document, nested manifests, configs and layers."""
    keep: set[str] = set()
    pending: list[tuple[str, str, bytes]] = []  # (digest, what it is, body)
    for tag in await store.tags():
        try:
            desc, body = await store.get_manifest(tag)
        except CacheMiss:
            continue  # removed meanwhile
        pending.append((desc.digest, f"tag {tag} in {store.location}", body))
    while pending:
        digest, what, body = pending.pop()
        if digest in keep:
            continue
        keep.add(digest)
        docs, leaves = children(body, what)
        keep.update(leaves)
        for child in docs:
            if child in keep:
                continue
            try:
                _desc, child_body = await store.get_manifest(child)
            except CacheMiss:
                keep.add(child)  # gone already: its entry is broken, nothing more to keep
                continue
            # Any other failure (a 503, a timeout) leaves: not knowing what a manifest reaches,
            # the sweep must not delete anything.
            pending.append((child, f"manifest {child} in {store.location}", child_body))
    return keep


def _touched(*metas: dict[str, Any] | None) -> datetime | None:
    times = [m["last_modified"] for m in metas if m is not None]
    return max(times) if times else None


def _version(meta: dict[str, Any]) -> tuple[Any, Any]:
    """Which write of an object ``meta`` describes: a mark written again in the same second has
    the same time on a whole-second clock, but another ETag (each mark holds random bytes)."""
    return meta["last_modified"], meta.get("e_tag")


async def _warn_if_relied_on(store: ObjectStore, digest: str, seen: dict[str, Any] | None) -> None:
    """After deleting a blob: a mark newer than the one looked at means a save relied on it
    meanwhile (warn, keep the mark); else the mark goes too."""
    _blob, mark = await store.head_blob_and_mark(digest)
    if mark is None:
        return
    if seen is None or _version(mark) != _version(seen):
        log.warning(
            "a save relied on blob %s while this sweep deleted it from %s; if an entry saved just now "
            "fails to restore, save it again",
            digest,
            store.location,
        )
    else:
        await store.remove_mark(digest)


#: Blobs looked at (and deleted) at a time.
SWEEP_JOBS = 16


async def _sweep_one(store: ObjectStore, digest: str, cutoff: datetime) -> int | None:
    """Delete one unreferenced blob if it is still untouched since ``cutoff``; its size, or None."""
    # Look again right before deleting: a save may have marked it since the listing.
    blob, mark = await store.head_blob_and_mark(digest)
    last = _touched(blob, mark)
    if blob is None or (last is not None and last > cutoff):
        return None
    await store.remove_blob(digest)
    await _warn_if_relied_on(store, digest, mark)
    return int(blob["size"])


async def collect_garbage(store: ObjectStore, grace_seconds: float) -> tuple[int, int]:
    """Delete unreferenced blobs untouched for ``grace_seconds``; (blobs removed, bytes freed)."""
    cutoff = await store.server_time() - timedelta(seconds=grace_seconds)
    keep = await reachable(store)
    blobs = await store.listing("blobs/sha256/")
    marks = await store.listing("touched/sha256/")
    candidates = [
        digest
        for digest, meta in blobs.items()
        if digest not in keep and not ((last := _touched(meta, marks.get(digest))) and last > cutoff)
    ]
    freed: list[int] = []

    async def sweep(digest: str) -> None:
        size = await _sweep_one(store, digest, cutoff)
        if size is not None:
            freed.append(size)

    await for_each(candidates, sweep, jobs=SWEEP_JOBS)
    for digest, mark in marks.items():
        if digest not in blobs and mark["last_modified"] <= cutoff:
            await store.remove_mark(digest)  # the mark of a blob that never came or is gone
    return len(freed), sum(freed)
