"""Save a directory as a cache image under a key, into any :class:`~remote_cache.store.Store`.

Order matters for safety: layers first (skipping those the store has), then configs and
per-platform manifests by digest, and only then the index under the tag. A save that fails
anywhere before the last step leaves the previous entry under that key untouched. Packing
runs in worker threads and overlaps with uploading: layer 1 uploads while layer 2 is packed.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .errors import CacheMiss, RemoteCacheError
from .image import (
    ANNOTATION_LISTING,
    DEFAULT_PLATFORMS,
    MAX_MANIFEST_BYTES,
    TOOL,
    BuiltImage,
    build_image,
    load_image,
    parse_index,
    parse_manifest,
    read_diff_ids,
)
from .keys import tag_for_key, validate_key
from .layers import LayerPlan, TreeScan, scan_tree, tree_identity
from .oci import (
    ANNOTATION_FILES,
    ANNOTATION_KEY,
    ANNOTATION_SIZE,
    INDEX_TYPES,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
    Platform,
)
from .pack import pack_tree
from .state import (
    LayerRecord,
    RestoreWindow,
    TreeRecord,
    clock_ns,
    dir_id,
    load_state,
    load_tree,
    load_window,
    local_layers,
    records_for,
    tree_fingerprint,
    window_hits,
    write_state,
)
from .store import Store

__all__ = ["CacheTooLarge", "SaveResult", "first_error", "human_bytes", "save"]

_MEDIA_TYPES = {"zstd": OCI_LAYER_ZSTD, "gzip": OCI_LAYER_GZIP}


class CacheTooLarge(RemoteCacheError):
    """The directory is larger than the ``max_size`` the caller allowed; nothing was uploaded."""

    def __init__(self, path: Path, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(
            f"{path} holds {human_bytes(size)} ({size} bytes), more than the allowed "
            f"{human_bytes(max_size)} ({max_size} bytes); nothing was uploaded. Raise the limit "
            f"(--max-size {_suggest(size)} on the command line, max_size in code) or clean the "
            "directory first"
        )


def _suggest(size: int) -> str:
    """A --max-size value comfortably above ``size``, e.g. ``3G``."""
    for unit, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if size * 2 < factor * 1024 or unit == "G":
            return f"{-(-size * 2 // factor)}{unit}"
    raise AssertionError("unreachable")


def first_error(
    group: BaseExceptionGroup[BaseException], *, ignore: tuple[type[BaseException], ...] = ()
) -> BaseException:
    """The error to report from a task group: the first real one, not a cancellation or an echo."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for exc in leaves:
        if not isinstance(exc, (cancelled, *ignore)):
            return exc
    return leaves[0] if leaves else group


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SaveResult:
    """What a save did: where the entry is, and how much was (re)uploaded."""

    key: str
    tag: str
    digest: str
    layers_total: int
    layers_uploaded: int
    bytes_total: int
    bytes_uploaded: int
    size: int
    files: int
    seconds: float
    #: True when the entry already held exactly this content: nothing was pushed, the tag did not move.
    unchanged: bool = False
    #: Layers reused without reading or packing their files (local ctime evidence, blob present).
    layers_reused: int = 0
    #: The first of ``key`` and the base key whose entry holds a reused layer, if any.
    base_key: str | None = None
    #: Why nothing was saved ("immutable key exists", "read-only: nothing saved"), else None.
    skipped: str | None = None

    @property
    def status(self) -> str:
        """``saved``, ``unchanged`` or ``skipped``."""
        return "skipped" if self.skipped else "unchanged" if self.unchanged else "saved"

    def summary(self) -> str:
        """One line for humans."""
        if self.skipped:
            at = f" ({self.tag}@{self.digest[:19]})" if self.digest else ""
            return f"skipped {self.key!r}{at}: {self.skipped}; uploaded 0 B in {self.seconds:.1f}s"
        reused = ""
        if self.layers_reused:
            source = "" if self.base_key in (None, self.key) else f" from {self.base_key!r}"
            reused = f", {self.layers_reused} reused{source}"
        return (
            f"{self.status} {self.key!r} as {self.tag}@{self.digest[:19]}: {self.files} files, "
            f"{human_bytes(self.size)}; uploaded {human_bytes(self.bytes_uploaded)} of "
            f"{human_bytes(self.bytes_total)} ({self.layers_uploaded}/{self.layers_total} layers"
            f"{reused}) in {self.seconds:.1f}s"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, plus ``status``."""
        return {"status": self.status, **asdict(self)}


@dataclass(frozen=True)
class _Layer:
    descriptor: Descriptor
    diff_id: str
    uncompressed_size: int
    files: int
    data: bytes | Path


def _layers(
    scan: TreeScan, compression: str, level: int | None, spool_dir: Path
) -> Generator[_Layer, None, None]:
    """Adapter over :func:`remote_cache.pack.pack_tree` (which packs ahead in its own threads)."""
    if compression not in ("zstd", "gzip"):
        raise ValueError(f"compression must be 'zstd' or 'gzip', not {compression!r}")
    packed = pack_tree(
        scan,
        compression="zstd" if compression == "zstd" else "gzip",
        level=level,
        spool_dir=spool_dir,
    )
    try:
        for item in packed:
            yield _Layer(
                Descriptor(item.media_type, item.digest, item.size),
                item.diff_id,
                item.uncompressed_size,
                item.files,
                item.data,
            )
    finally:
        close = getattr(packed, "close", None)  # a generator: stops its packing threads
        if close is not None:
            close()


async def _same_entry(
    store: Store,
    tag: str,
    key: str,
    layers: Sequence[Descriptor],
    size: int,
    files: int,
    platforms: Sequence[Platform],
) -> str | None:
    """The current digest under ``tag`` when it already holds exactly this content, else None.

    Listing annotations are not compared: equal layer digests imply equal listings, and a layer
    saved without one (its files were too fresh) keeps the entry unchanged rather than re-pushed.
    """
    try:
        current = await store.resolve(tag)
        desc, body = await store.get_manifest(current.digest)
        if desc.media_type not in INDEX_TYPES or len(body) > MAX_MANIFEST_BYTES:
            return None
        manifests, annotations = parse_index(body, desc.media_type)
        if (
            annotations.get(ANNOTATION_KEY) != key
            or annotations.get(ANNOTATION_SIZE) != str(size)
            or annotations.get(ANNOTATION_FILES) != str(files)
            or [str(m.platform) for m in manifests] != [str(p) for p in platforms]
        ):
            return None
        wanted = [(d.digest, d.size, d.media_type) for d in layers]
        for manifest in manifests:
            mdesc, mbody = await store.get_manifest(manifest.digest)
            parsed = parse_manifest(mbody, mdesc.media_type or manifest.media_type)
            have = [(d.digest, d.size, d.media_type) for d in parsed.layers]
            if have != wanted:
                return None
            if not await store.has_blob(parsed.config.digest):
                return None
    except RemoteCacheError:
        # Anything unreadable (a miss, a foreign image) simply means "not the same": save anew.
        return None
    return current.digest


def _racy(plan: LayerPlan, after: int) -> bool:
    return any(e.mtime >= after for e in plan.entries)


_Candidates = list[tuple[str, dict[str, tuple[Descriptor, str]]]]


async def _candidate_layers(store: Store, keys: Sequence[str]) -> _Candidates:
    """(key, digest -> (descriptor, diff_id)) of each existing entry among ``keys``.

    Only says where reused layers came from (``SaveResult.base_key``); never trusted as content.
    """
    found: dict[str, dict[str, tuple[Descriptor, str]]] = {}

    async def load(key: str) -> None:
        try:
            top = await store.resolve(tag_for_key(key))
            image = await load_image(store, top.digest)
            diff_ids = await read_diff_ids(store, image)
        except RemoteCacheError:
            return  # absent or unreadable: nothing to learn from it
        found[key] = {d.digest: (d, diff_id) for d, diff_id in zip(image.layers, diff_ids, strict=True)}

    async with anyio.create_task_group() as tg:
        for key in dict.fromkeys(keys):
            tg.start_soon(load, key)
    return [(key, found[key]) for key in dict.fromkeys(keys) if key in found]


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


def _skipped(key: str, tag: str, reason: str, started: float, digest: str = "") -> SaveResult:
    return SaveResult(
        key=key,
        tag=tag,
        digest=digest,
        layers_total=0,
        layers_uploaded=0,
        bytes_total=0,
        bytes_uploaded=0,
        size=0,
        files=0,
        seconds=time.monotonic() - started,
        skipped=reason,
    )


async def save(
    store: Store,
    key: str,
    path: Path,
    *,
    compression: str = "zstd",
    level: int | None = None,
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS,
    max_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 4,
    base_key: str | None = None,
    full: bool = False,
    immutable: bool = False,
    read_only: bool = False,
) -> SaveResult:
    """Pack ``path`` and store it under ``key``; the tag moves only once everything else is stored.

    ``progress`` is called with a byte count each time a layer has been uploaded, found present
    or reused. ``max_size`` (uncompressed bytes) refuses with :class:`CacheTooLarge` before
    anything is uploaded.

    A layer is reused without reading its files only when this machine's state
    (:mod:`remote_cache.state`) vouches for it, and the store still has the blob: its local
    listing (portable fields plus each file's ctime and inode) was recorded at a save, or it
    matches a layer the last restore into ``path`` extracted and no file of it changed since.
    Every other layer is packed; packing is deterministic, so an unchanged one gets the same
    digest and is not uploaded again. ``full`` ignores the state. The entries under ``key`` and
    ``base_key`` (e.g. the key a restore fell back to) only name where reused layers came from,
    never vouch for content.
    Saving content identical to what the key holds pushes nothing and keeps the digest
    (``unchanged``); a tree unchanged since its last save here (its tree fingerprint, see
    :mod:`remote_cache.state`) is known to be so after one walk and one manifest request.
    ``immutable``: an existing entry under ``key`` is never replaced
    (``skipped``). ``read_only``: do nothing at all (``skipped``), for untrusted runs.
    """
    started = time.monotonic()
    validate_key(key)
    if base_key is not None:
        validate_key(base_key)
    tag = tag_for_key(key)
    path = Path(path)
    if read_only:
        return _skipped(key, tag, "read-only: nothing saved", started)
    if immutable:
        try:
            current = await store.resolve(tag)
        except CacheMiss:
            pass
        else:
            return _skipped(key, tag, "immutable key exists", started, current.digest)
    if compression not in ("zstd", "gzip"):
        raise ValueError(f"compression must be 'zstd' or 'gzip', not {compression!r}")
    media_type = _MEDIA_TYPES[compression]
    # Taken before the scan: a file written from now on gets a ctime at or after it.
    bound = clock_ns()
    mtime_bound = bound // 1_000_000_000
    candidates: _Candidates = []
    # Everything the image depends on besides the tree; the tool's version stands for the
    # packing rules, so an upgrade that changes them cannot keep answering "unchanged".
    options = f"{TOOL} {media_type} level={level} platforms={','.join(str(p) for p in platforms)}"
    if not full:
        same = await _same_tree(store, path, tag, options, bound)
        if same is not None:
            if max_size is not None and same.size > max_size:
                raise CacheTooLarge(path, same.size, max_size)
            return _unchanged(key, same, started)

    async def find_candidates() -> None:
        candidates.extend(await _candidate_layers(store, [key] + ([base_key] if base_key else [])))

    try:
        async with anyio.create_task_group() as tg:
            if not full:
                tg.start_soon(find_candidates)  # network, while the scan reads the disk
            scan = await anyio.to_thread.run_sync(scan_tree, path)
            size, files = scan.stats.bytes, scan.stats.files
            if max_size is not None and size > max_size:
                raise CacheTooLarge(path, size, max_size)
            local = await anyio.to_thread.run_sync(
                functools.partial(local_layers, scan, bound, mtime_bound=mtime_bound)
            )
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    fingerprint = tree_fingerprint(scan.identity, bound) if scan.identity is not None else None
    annotations = [
        {} if _racy(plan, mtime_bound) else {ANNOTATION_LISTING: layer.listing}
        for plan, layer in zip(scan.layers, local, strict=True)
    ]

    slots: list[tuple[Descriptor, str] | None] = [None] * len(scan.layers)
    if not full:
        # Reuse unread only on local evidence (ctime + inode recorded here after a save, or a
        # restore window), and only while the store still has the blob.
        state, window = await anyio.to_thread.run_sync(_evidence, path)
        hits = await anyio.to_thread.run_sync(window_hits, scan, local, window, media_type)
        for i, planned in enumerate(local):
            if planned.local is not None and (planned.local, media_type) in state:
                hits.setdefault(i, state[(planned.local, media_type)])
        # Blobs that the key's (or the base's) entry references are in the store: a registry
        # takes a manifest only once its blobs are in, and keeps the blobs a tag references.
        referenced = {digest for _, layers in candidates for digest in layers}
        unknown = [rec.digest for rec in hits.values() if rec.digest not in referenced]
        have = referenced | (await _present(store, unknown, jobs) if unknown else set())
        for i, rec in hits.items():
            if rec.digest in have:
                slots[i] = (rec.descriptor(annotations[i]), rec.diff_id)
    reused = sum(1 for slot in slots if slot is not None)
    reused_digests = {slot[0].digest for slot in slots if slot is not None}
    source = next((k for k, layers in candidates if reused_digests & layers.keys()), None)
    to_pack = TreeScan(
        scan.root, tuple(p for p, slot in zip(scan.layers, slots, strict=True) if slot is None), scan.stats
    )

    spool = Path(tempfile.mkdtemp(prefix="remote-cache-save-"))
    iterator = _layers(to_pack, compression, level, spool)
    counters = {"uploaded": 0, "bytes": 0}
    limiter = anyio.Semaphore(max(1, jobs))

    async def upload(layer: _Layer) -> None:
        async with limiter:
            # put_blob checks for the blob first and returns False when it was already there.
            stored = await store.put_blob(layer.descriptor, layer.data)
        if stored:
            counters["uploaded"] += 1
            counters["bytes"] += layer.descriptor.size
        if isinstance(layer.data, Path):
            await anyio.to_thread.run_sync(_unlink, layer.data)
        if progress is not None:
            progress(layer.descriptor.size)

    try:
        async with anyio.create_task_group() as tg:
            for i, slot in enumerate(slots):
                if slot is not None:
                    if progress is not None:
                        progress(slot[0].size)
                    continue
                layer = await anyio.to_thread.run_sync(next, iterator, None)
                if layer is None:
                    raise RuntimeError("the packer yielded fewer layers than planned")
                d = layer.descriptor
                layer = replace(
                    layer, descriptor=Descriptor(d.media_type, d.digest, d.size, annotations=annotations[i])
                )
                slots[i] = (layer.descriptor, layer.diff_id)
                tg.start_soon(upload, layer)
        final = [slot for slot in slots if slot is not None]
        descriptors = [d for d, _ in final]
        diff_ids = [diff_id for _, diff_id in final]
        existing = await _same_entry(store, tag, key, descriptors, size, files, platforms)

        def result(digest: str, *, unchanged: bool = False) -> SaveResult:
            return SaveResult(
                key=key,
                tag=tag,
                digest=digest,
                layers_total=len(final),
                layers_uploaded=counters["uploaded"],
                bytes_total=sum(d.size for d in descriptors),
                bytes_uploaded=counters["bytes"],
                size=size,
                files=files,
                seconds=time.monotonic() - started,
                unchanged=unchanged,
                layers_reused=reused,
                base_key=source,
            )

        def tree(digest: str) -> TreeRecord | None:
            if fingerprint is None:
                return None
            total = sum(d.size for d in descriptors)
            return TreeRecord(
                fingerprint, store.location, tag, options, digest, size, files, len(final), total
            )

        if existing is not None:
            await anyio.to_thread.run_sync(write_state, path, records_for(local, slots), tree(existing))
            return result(existing, unchanged=True)
        image: BuiltImage = build_image(
            descriptors,
            diff_ids,
            key=key,
            size=size,
            files=files,
            platforms=platforms,
        )
        async with anyio.create_task_group() as tg:
            for config in image.configs:
                tg.start_soon(store.put_blob, config.descriptor, config.body)
        # A manifest may only be pushed once its config is in; the index once its manifests are.
        async with anyio.create_task_group() as tg:
            for manifest in image.manifests:
                tg.start_soon(_put_manifest, store, manifest.body, manifest.descriptor.media_type)
        index = await store.put_manifest(image.index.body, image.index.descriptor.media_type, tag=tag)
        await anyio.to_thread.run_sync(write_state, path, records_for(local, slots), tree(index.digest))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        await anyio.to_thread.run_sync(iterator.close)
        await anyio.to_thread.run_sync(shutil.rmtree, spool, True)
    return result(index.digest)


def _unchanged(key: str, same: TreeRecord, started: float) -> SaveResult:
    """The result of a save that found, by its tree record, nothing to do."""
    return SaveResult(
        key=key,
        tag=same.tag,
        digest=same.digest,
        layers_total=same.layers,
        layers_uploaded=0,
        bytes_total=same.bytes,
        bytes_uploaded=0,
        size=same.size,
        files=same.files,
        seconds=time.monotonic() - started,
        unchanged=True,
        layers_reused=same.layers,
    )


async def _same_tree(store: Store, path: Path, tag: str, options: str, bound: int) -> TreeRecord | None:
    """The record of the last save of ``path`` when nothing in it changed since and ``tag``
    still names what that save produced (a walk and one manifest request); else None."""
    recorded = await anyio.to_thread.run_sync(load_tree, path)
    if recorded is None or (recorded.location, recorded.tag, recorded.options) != (
        store.location,
        tag,
        options,
    ):
        return None
    try:
        identity = await anyio.to_thread.run_sync(tree_identity, path)
    except OSError:
        return None  # the scan reports what is wrong with the directory
    if tree_fingerprint(identity, bound) != recorded.fingerprint:
        return None
    try:
        current = await store.resolve(tag)
    except CacheMiss:
        return None
    return recorded if current.digest == recorded.digest else None


def _evidence(path: Path) -> tuple[dict[tuple[str, str], LayerRecord], RestoreWindow | None]:
    """This machine's records for ``path``, and its restore window if ``path`` is still that directory."""
    window = load_window(path)
    if window is not None:
        try:
            if dir_id(path) != window.root:
                window = None  # another directory now sits at this path
        except OSError:
            window = None
    return load_state(path), window


async def _put_manifest(store: Store, body: bytes, media_type: str) -> None:
    await store.put_manifest(body, media_type)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
