"""What a save need not read: a tree unchanged since its last save, and layers evidence vouches for.

Both rest on this machine's evidence (:mod:`.evidence`) and on the store still holding what the
evidence names; the entries under the key (and a base key) only say where a reused layer came
from, never vouch for content.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread
from msgspec import Struct

from ..archive.plan import TreeScan
from ..archive.walk import TreeStats
from ..errors import CacheMiss, RemoteCacheError, TreeChanged
from ..keys import tag_for_key
from ..oci.descriptor import Descriptor
from ..oci.store import Store
from .evidence import (
    Evidence,
    LayerRecord,
    LocalLayer,
    RestoredTree,
    RestoreWindow,
    TreeRecord,
    tree_fingerprint,
    untouched_since,
    window_here,
    window_hits,
)
from .image import generation_bounds, load_image, read_diff_ids
from .prewalk import PreWalk, walk

__all__ = ["Candidates", "Reuse", "candidate_layers", "reusable_layers", "unchanged_tree"]


async def unchanged_tree(
    store: Store,
    path: Path,
    tag: str,
    bound: int,
    evidence: Evidence,
    stats: TreeStats | None = None,
    *,
    key: str,
    options: str,
    shape: str,
    prewalk: PreWalk | None = None,
) -> TreeRecord | RestoredTree | None:
    """The record of what ``tag`` holds when the tree is known to be exactly that, else None.

    Either the last save of ``path`` here (its tree record, for the same ``options``) still
    describes the tree, or the last restore into it wrote the whole entry (for the same ``key``
    and ``shape``) and nothing changed since; and ``tag`` still names that record's digest. One
    walk (``prewalk``'s when it has one, see :mod:`.prewalk`), then one request (see
    :mod:`.evidence`). The walk lists the special files it found in ``stats``."""
    saved, window = evidence.tree, evidence.window
    if saved is not None and (saved.location, saved.tag, saved.options) != (store.location, tag, options):
        saved = None
    restored = window.tree if window is not None else None
    if restored is None or (restored.location, restored.tag, restored.key, restored.shape) != (
        store.location,
        tag,
        key,
        shape,
    ):
        window = None  # no whole tree of this entry to compare with
    if saved is None and window is None:
        return None
    same = await _same_tree(path, bound, saved, window, stats, prewalk)
    if same is None:
        return None
    # Asked only now: beside the walk, the request of a tree found changed had to be stopped, and
    # one stalled or failing in a way its stop missed held or failed a save that needed none.
    try:
        current = await store.resolve(tag)
    except CacheMiss:
        return None
    return same if current.digest == same.digest else None


async def _same_tree(
    path: Path,
    bound: int,
    saved: TreeRecord | None,
    window: RestoreWindow | None,
    stats: TreeStats | None,
    prewalk: PreWalk | None,
) -> TreeRecord | RestoredTree | None:
    """The record the walked tree still is exactly: ``saved`` by its fingerprint, or ``window``'s
    whole restored tree (see :mod:`.evidence`); None when neither."""
    walked = await prewalk.result() if prewalk is not None else None
    if walked is None:
        try:
            walked = await anyio.to_thread.run_sync(walk, path)
        except (OSError, TreeChanged):  # (a directory gone while walked: the scan walks again)
            return None  # the scan reports what is wrong with the directory
    if stats is not None:
        stats.skipped.extend(walked.skipped)
    identity = walked.identity
    # (The walk's own bound: a child's walk began before this save read ``bound``.)
    if saved is not None and tree_fingerprint(identity, min(bound, walked.bound)) == saved.fingerprint:
        return saved
    if window is None or walked.mounts != ():
        return None  # (a mount below shows other inodes and moves no ctime)
    return window.tree if untouched_since(window, identity, walked.root) else None


#: (key, digest -> (descriptor, diff_id)) of each existing entry among some keys.
Candidates = list[tuple[str, dict[str, tuple[Descriptor, str]]]]


async def candidate_layers(store: Store, keys: Sequence[str]) -> tuple[Candidates, tuple[int, ...]]:
    """The layers of each existing entry among ``keys`` (absent or unreadable ones are skipped),
    and the first generation bounds one of them carries (see remote_cache.archive.plan, rule 7).

    The layers only say where reused layers came from (``SaveResult.base_key``), and that the
    store has them; the bounds are where the entry's layers were cut, to cut there again.
    """
    found: dict[str, tuple[dict[str, tuple[Descriptor, str]], tuple[int, ...]]] = {}

    async def load(key: str) -> None:
        try:
            image = await load_image(store, tag_for_key(key))  # by tag: one round trip, not two
            diff_ids = await read_diff_ids(store, image)
        except RemoteCacheError:
            return  # absent or unreadable: nothing to learn from it
        layers = {d.digest: (d, diff_id) for d, diff_id in zip(image.layers, diff_ids, strict=True)}
        found[key] = (layers, generation_bounds(image.annotations))

    async with anyio.create_task_group() as tg:
        for key in dict.fromkeys(keys):
            tg.start_soon(load, key)
    existing = [key for key in dict.fromkeys(keys) if key in found]
    bounds = next((found[key][1] for key in existing if found[key][1]), ())
    return [(key, found[key][0]) for key in existing], bounds


async def _present(store: Store, digests: Sequence[str], jobs: int) -> set[str]:
    """Those of ``digests`` the store has (HEAD requests, ``jobs`` at a time)."""
    have: set[str] = set()
    limiter = anyio.Semaphore(max(1, jobs))

    async def check(digest: str) -> None:
        async with limiter:
            try:
                if await store.has_blob(digest):
                    have.add(digest)
            except RemoteCacheError:
                pass  # unknown: pack it (its upload is skipped if the blob is there after all)

    async with anyio.create_task_group() as tg:
        for digest in dict.fromkeys(digests):
            tg.start_soon(check, digest)
    return have


def _vouched(
    path: Path, scan: TreeScan, local: Sequence[LocalLayer], evidence: Evidence, media_type: str
) -> dict[int, LayerRecord]:
    """Planned layers (by position) the evidence vouches for: a restore window into this very
    directory, or a local listing recorded after a save."""
    hits = window_hits(scan, local, window_here(path, evidence.window), media_type)
    for i, planned in enumerate(local):
        if planned.local is not None and (planned.local, media_type) in evidence.records:
            hits.setdefault(i, evidence.records[(planned.local, media_type)])
    return hits


class Reuse(Struct, frozen=True):
    """Planned layers stored already: position -> (descriptor, diff_id), and the key they came from."""

    slots: dict[int, tuple[Descriptor, str]]
    source: str | None


async def reusable_layers(
    store: Store,
    path: Path,
    scan: TreeScan,
    local: Sequence[LocalLayer],
    evidence: Evidence,
    *,
    media_type: str,
    annotations: Sequence[dict[str, str]],
    candidates: Candidates,
    jobs: int,
) -> Reuse:
    """Layers to reuse without reading their files: vouched for by evidence, and still in the store."""
    hits = await anyio.to_thread.run_sync(_vouched, path, scan, local, evidence, media_type)
    # Blobs that the key's (or the base's) entry references are in the store: a registry takes
    # a manifest only once its blobs are in and keeps the blobs a tag references; a layout or
    # bucket is told before the new tag is written (Store.rely_on), which marks them and looks
    # at them again after it (that entry may be removed, and its blobs swept, meanwhile).
    referenced = {digest for _, layers in candidates for digest in layers}
    unknown = [rec.digest for rec in hits.values() if rec.digest not in referenced]
    have = referenced | (await _present(store, unknown, jobs) if unknown else set())
    slots = {
        i: (rec.descriptor(annotations[i]), rec.diff_id) for i, rec in hits.items() if rec.digest in have
    }
    digests = {desc.digest for desc, _ in slots.values()}
    source = next((k for k, layers in candidates if digests & layers.keys()), None)
    return Reuse(slots, source)
