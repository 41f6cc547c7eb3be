"""Save a directory as a cache image under a key, into any :class:`~remote_cache.oci.store.Store`.

The phases: *skip* (read-only, an immutable key that exists, a tree unchanged since its last
save here), *plan* (walk and cut the tree into layers while the key's entry is read), *reuse*
(layers this machine's evidence vouches for, see :mod:`.reuse`), *pack and upload* (the rest,
packed in worker threads while earlier layers upload), *publish* (configs and per-platform
manifests by digest, and only then the index under the tag) and *record* (the evidence for the
next save). A save that fails anywhere before the last push leaves the previous entry under that
key untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Generator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from msgspec import Struct, to_builtins
from msgspec.structs import replace

from ..archive.codecs import Compression, check_compression, check_level
from ..archive.plan import LayerPlan, TreeScan, scan_tree
from ..archive.tar import WHITEOUT_PREFIX
from ..archive.target import finish_dead_swaps
from ..archive.walk import Special, TreeStats
from ..archive.workdirs import WorkDir, sweep_dead
from ..errors import (
    BlobsSwept,
    BrokenEntry,
    CacheMiss,
    CacheTooLarge,
    EntryExists,
    ImageFormatError,
    NoSpace,
    NothingToSave,
    RemoteCacheError,
    StoreError,
)
from ..keys import tag_for_key, validate_key
from ..oci.descriptor import Descriptor, Platform
from ..oci.media import INDEX_TYPES, MAX_DOCUMENT_BYTES, layer_media_type
from ..oci.store import Store, refuse_overlap
from ..tasks import first_error, for_each
from ..units import counted, format_bytes, format_rate
from . import state
from .evidence import (
    Evidence,
    LocalLayer,
    RestoredTree,
    TreeRecord,
    clock_ns,
    entry_shape,
    local_layers,
    records_for,
    tree_fingerprint,
    window_here,
)
from .image import (
    ANNOTATION_FILES,
    ANNOTATION_GENERATIONS,
    ANNOTATION_KEY,
    ANNOTATION_LISTING,
    ANNOTATION_SIZE,
    DEFAULT_PLATFORMS,
    bounds_text,
    build_image,
    load_image,
    parse_index,
    parse_manifest,
    read_document,
)
from .prewalk import PreWalk
from .progress import Progress
from .reuse import Candidates, Reuse, candidate_layers, reusable_layers, unchanged_tree

if TYPE_CHECKING:
    from ..archive.pack import PackedLayer

__all__ = ["SaveResult", "save"]

_Slot = tuple[Descriptor, str]  # a stored layer: its descriptor and diff_id

log = logging.getLogger("remote_cache")

#: Special files named in a summary before "and N more".
_NAMED_SPECIAL = 3


def _special_note(special: Sequence[Special]) -> str:
    """``2 special files (fifo: a/pipe, socket: run/x.sock)``: the first few named, then a count."""
    names = ", ".join(f"{s.kind}: {_shown(s.path)}" for s in special[:_NAMED_SPECIAL])
    more = f" and {len(special) - _NAMED_SPECIAL} more" if len(special) > _NAMED_SPECIAL else ""
    return f"{counted(len(special), 'special file')} ({names}{more})"


def _shown(path: str) -> str:
    # A name with a newline or another control character would break a one-line summary.
    return path if path.isprintable() else repr(path)


class SaveResult(Struct, frozen=True):
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
    #: Special files (FIFOs, sockets, devices) left out of the entry, in walk order: an image
    #: holds only files, directories and symlinks.
    special: tuple[Special, ...] = ()

    @property
    def special_files(self) -> int:
        """How many special files were left out."""
        return len(self.special)

    @property
    def status(self) -> str:
        """``saved``, ``unchanged`` or ``skipped``."""
        return "skipped" if self.skipped else "unchanged" if self.unchanged else "saved"

    def summary(self) -> str:
        """The one line a person reads, e.g. ``save saved npm: 1.2 MB uploaded (...) in 0.4 s (3.0 MB/s)``."""
        if self.skipped:
            return f"save skipped {self.key}: {self.skipped}"
        sent, secs = self.bytes_uploaded, self.seconds
        reused = ""
        if self.layers_reused:
            source = "" if self.base_key in (None, self.key) else f" from {self.base_key}"
            reused = f", {counted(self.layers_reused, 'layer')} reused{source}"
        left_out = f"; skipped {_special_note(self.special)}" if self.special else ""
        return (
            f"save {self.status} {self.key}: {format_bytes(sent)} uploaded "
            f"({format_bytes(self.bytes_total)} compressed, {format_bytes(self.size)} in "
            f"{counted(self.files, 'file')}{reused}) in {secs:.1f} s ({format_rate(sent, secs)}){left_out}"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, plus ``outcome`` (the status) and ``special_files``."""
        return {"outcome": self.status, **to_builtins(self), "special_files": self.special_files}


class _Plan(Struct, frozen=True):
    """The planned tree: layers, their local listings and annotations, and what the store holds."""

    scan: TreeScan
    local: list[LocalLayer]
    annotations: list[dict[str, str]]
    candidates: Candidates
    fingerprint: str | None

    @property
    def size(self) -> int:
        return self.scan.stats.bytes

    @property
    def files(self) -> int:
        return self.scan.stats.files


async def save(
    store: Store,
    key: str,
    path: Path,
    *,
    compression: str = "zstd",
    level: int | None = None,
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS,
    max_size: int | None = None,
    progress: Progress | None = None,
    jobs: int = 4,
    base_key: str | None = None,
    full: bool = False,
    immutable: bool = False,
    read_only: bool = False,
    prewalk: PreWalk | None = None,
) -> SaveResult:
    """Pack ``path`` and store it under ``key``; the tag moves only once everything else is stored.

    ``progress`` learns the tree's (tar) bytes to go, then each layer's as it is uploaded, found
    present or reused (:class:`~.progress.Progress`). ``max_size`` (uncompressed bytes) refuses
    with :class:`CacheTooLarge` before anything is uploaded.

    A layer is reused without reading its files only when this machine's evidence
    (:mod:`remote_cache.cache.evidence`) vouches for it and the store still has the blob; every
    other layer is packed. Packing is deterministic, so an unchanged layer gets the same digest
    and is not uploaded again. ``full`` ignores the evidence. The entries under ``key`` and
    ``base_key`` (e.g. the key a restore fell back to) only name where reused layers came from.
    Saving content identical to what the key holds pushes nothing and keeps the digest
    (``unchanged``); a tree unchanged since its last save here is known to be so after one walk
    and one manifest request. ``immutable``: an existing entry under ``key`` is never replaced
    (``skipped``). ``read_only``: do nothing at all (``skipped``), for untrusted runs. Special
    files are left out (``SaveResult.special``), with one warning on the ``remote_cache`` logger.
    ``prewalk``: a walk of ``path`` started before the call (:mod:`.prewalk`), taken for the
    unchanged check; closed once that is done (the caller closes it too: closing is idempotent).
    """
    started = time.monotonic()
    validate_key(key)
    if base_key is not None:
        validate_key(base_key)
    tag, path = tag_for_key(key), Path(path)
    if read_only:
        return _skipped(key, tag, "read-only: nothing saved", started)
    refuse_overlap(store, path, "save")
    if immutable and (current := await _current_whole(store, key, tag)) is not None:
        return _skipped(key, tag, "immutable key exists", started, current)
    if not path.exists():
        raise NothingToSave(str(path))
    codec = check_compression(compression)
    check_level(codec, level)
    # Everything the image depends on besides the tree; the tool's version stands for the
    # packing rules, so an upgrade that changes them cannot keep answering "unchanged".
    shape = entry_shape(layer_media_type(codec), [str(p) for p in platforms])
    options = f"{shape} level={level}"
    job = _Job(
        store,
        key,
        tag,
        path,
        codec,
        level,
        tuple(platforms),
        max_size,
        progress,
        jobs,
        base_key,
        options,
        started,
    )
    # A walk that must not be taken is closed (a closed one gives none): another tree's, or one
    # that a swap finished or waited for here may postdate.
    if prewalk is not None and prewalk.path != path:
        prewalk.close()
    while (swaps := await anyio.to_thread.run_sync(finish_dead_swaps, path)) != "none":
        if prewalk is not None:
            prewalk.close()
        if swaps == "finished":
            break
        await anyio.sleep(0.1)  # a restore is swapping there: it ends first (a signal stops the wait)
    # Taken before the walk: a file written from now on gets a ctime at or after it.
    bound = clock_ns()
    evidence = Evidence() if full else await anyio.to_thread.run_sync(state.load, path)
    walked = TreeStats()
    same = None
    if not full:
        same = await unchanged_tree(
            store, path, tag, bound, evidence, walked, key=key, options=options, shape=shape, prewalk=prewalk
        )
    if prewalk is not None:
        prewalk.close()  # (a child still walking for a save that no longer needs it)
    if same is not None:
        if max_size is not None and same.size > max_size:
            raise CacheTooLarge(path, same.size, max_size)
        return _warn_special(path, _unchanged(key, same, started, walked.skipped))
    try:
        result = await _save_tree(job, evidence, bound, full=full, exclusive=immutable)
    except BlobsSwept as swept:
        # A sweep deleted blobs this save had found present (see ObjectStore._check_reused): pack
        # the whole tree again, which uploads exactly what is missing, and write the tag again.
        log.warning("%s; packing and uploading again", swept)
        result = await _save_tree(job, evidence, clock_ns(), full=True, republish=True)
    return _warn_special(path, result)


def _warn_special(path: Path, result: SaveResult) -> SaveResult:
    """Warn once when the save left special files out (a caller may print no summary)."""
    if result.special:
        log.warning(
            "%s: skipped %s: a cache holds only files, directories and symlinks, none named %s* "
            "(what OCI layers use for whiteouts)",
            path,
            _special_note(result.special),
            WHITEOUT_PREFIX,
        )
    return result


class _Job(Struct, frozen=True):
    """What one save was asked to do (the arguments of :func:`save`, checked)."""

    store: Store
    key: str
    tag: str
    path: Path
    codec: Compression
    level: int | None
    platforms: tuple[Platform, ...]
    max_size: int | None
    progress: Progress | None
    jobs: int
    base_key: str | None
    options: str
    started: float


async def _save_tree(
    job: _Job, evidence: Evidence, bound: int, *, full: bool, exclusive: bool = False, republish: bool = False
) -> SaveResult:
    """Plan, reuse what the evidence vouches for, pack and upload the rest, publish, record.
    ``republish``: write the tag even when it already names this content."""
    store, key, tag = job.store, job.key, job.tag
    # The entries are read even for a full save: their generation bounds say where to cut (else
    # those of the entry last restored or saved here, whatever its key).
    keys = [key, *([job.base_key] if job.base_key else [])]
    here = await anyio.to_thread.run_sync(window_here, job.path, evidence.window)
    plan = await _plan(store, job.path, keys, bound, job.max_size, here.bounds if here else ())
    reuse = Reuse({}, None)
    if not full:
        reuse = await reusable_layers(
            store, job.path, plan.scan, plan.local, evidence, media_type=layer_media_type(job.codec),
            annotations=plan.annotations, candidates=plan.candidates, jobs=job.jobs,
        )  # fmt: skip
    slots = [reuse.slots.get(i) for i in range(len(plan.scan.layers))]
    uploaded_layers, uploaded_bytes = await _pack_and_upload(
        store, plan, slots, job.codec, job.level, job.jobs, job.progress
    )
    stored = [slot for slot in slots if slot is not None]
    try:
        digest, unchanged = await _publish(
            store, tag, key, plan, stored, job.platforms, exclusive=exclusive, republish=republish,
            relied=[desc.digest for desc, _ in reuse.slots.values()],
        )  # fmt: skip
    except EntryExists:  # another save wrote the key first
        return _skipped(key, tag, "immutable key exists", job.started, await _current(store, tag) or "")
    with anyio.CancelScope(shield=True):  # the entry is written (see _committing); local and quick
        await _record(job.path, evidence, plan, slots, where=(store.location, tag, job.options, digest))
    return SaveResult(
        key=key, tag=tag, digest=digest, layers_total=len(stored), layers_uploaded=uploaded_layers,
        bytes_total=sum(d.size for d, _ in stored), bytes_uploaded=uploaded_bytes, size=plan.size,
        files=plan.files, seconds=time.monotonic() - job.started, unchanged=unchanged and not uploaded_layers,
        layers_reused=len(reuse.slots), base_key=reuse.source, special=tuple(plan.scan.stats.skipped),
    )  # fmt: skip


# -- skip -------------------------------------------------------------------------------------


async def _current(store: Store, tag: str) -> str | None:
    """The digest under ``tag``, or None when there is no entry."""
    try:
        return (await store.resolve(tag)).digest
    except CacheMiss:
        return None


async def _current_whole(store: Store, key: str, tag: str) -> str | None:
    """The digest under an immutable key's ``tag``, or None when there is no entry; its top document
    read once, as a restore would. A broken entry (a document it names gone) is an error:
    --immutable never replaces it, so skipping kept it broken for good (every restore a miss,
    while the miss said the next save repairs it). Another tool's image is kept, as before."""
    try:
        top = await read_document(store, tag, "manifest")
        await load_image(store, tag, top)
    except BrokenEntry as exc:
        raise StoreError(
            f"the entry under immutable key {key!r} in {store.location} is broken ({exc.missing} is "
            "gone), and --immutable never replaces an entry: `remote-cache rm` the key, then save again"
        ) from None
    except CacheMiss:
        return None
    except ImageFormatError:
        return await _current(store, tag)
    return top[0].digest


def _skipped(key: str, tag: str, reason: str, started: float, digest: str = "") -> SaveResult:
    return SaveResult(
        key=key, tag=tag, digest=digest, layers_total=0, layers_uploaded=0, bytes_total=0,
        bytes_uploaded=0, size=0, files=0, seconds=time.monotonic() - started, skipped=reason,
    )  # fmt: skip


def _unchanged(
    key: str, same: TreeRecord | RestoredTree, started: float, special: Sequence[Special]
) -> SaveResult:
    """The result of a save that found, by the record of its last save or restore, nothing to do
    (``special``: what the walk that proved it left out)."""
    return SaveResult(
        key=key, tag=same.tag, digest=same.digest, layers_total=same.layers, layers_uploaded=0,
        bytes_total=same.bytes, bytes_uploaded=0, size=same.size, files=same.files,
        seconds=time.monotonic() - started, unchanged=True, layers_reused=same.layers,
        special=tuple(special),
    )  # fmt: skip


# -- plan -------------------------------------------------------------------------------------


def _racy(plan: LayerPlan, after: int) -> bool:
    return any(e.mtime >= after for e in plan.members)


async def _plan(
    store: Store, path: Path, keys: list[str], bound: int, max_size: int | None, here: Sequence[int] = ()
) -> _Plan:
    """Walk and cut the tree (in a thread) while the entries under ``keys`` are read (network),
    then cut it again at the first generation bounds one of them carries (else ``here``) where
    they split it otherwise."""
    mtime_bound = bound // 1_000_000_000
    entries: list[tuple[Candidates, tuple[int, ...]]] = []  # (the task group's one result)

    async def read_entries() -> None:
        entries.append(await candidate_layers(store, keys))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_entries)
            scan = await anyio.to_thread.run_sync(scan_tree, path)
            if max_size is not None and scan.stats.bytes > max_size:
                raise CacheTooLarge(path, scan.stats.bytes, max_size)
            local = await anyio.to_thread.run_sync(lambda: local_layers(scan, bound, mtime_bound=mtime_bound))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    candidates, base = entries[0]
    scan, local = await anyio.to_thread.run_sync(_at_bounds, scan, local, base or here, bound)
    annotations = [
        {} if _racy(plan, mtime_bound) else {ANNOTATION_LISTING: layer.listing}
        for plan, layer in zip(scan.layers, local, strict=True)
    ]
    fingerprint = tree_fingerprint(scan.identity, bound) if scan.identity is not None else None
    return _Plan(scan, local, annotations, candidates, fingerprint)


def _at_bounds(
    scan: TreeScan, local: list[LocalLayer], base: Sequence[int], bound: int
) -> tuple[TreeScan, list[LocalLayer]]:
    """``scan`` cut at the generation bounds its save writes after ``base``'s, with its layers'
    local listings (those given, when the bounds split the tree as the scan did)."""
    mtime_bound = bound // 1_000_000_000
    cut = scan.cut(scan.settle(base, clock=mtime_bound))
    if cut.layers is scan.layers:
        return cut, local
    return cut, local_layers(cut, bound, mtime_bound=mtime_bound)


# -- pack and upload --------------------------------------------------------------------------


class _Uploads:
    """Uploads packed layers, ``jobs`` at a time, counting those that were not there yet."""

    def __init__(self, store: Store, jobs: int, progress: Progress | None) -> None:
        self._store = store
        self._limiter = anyio.Semaphore(max(1, jobs))
        self._progress = progress
        self.layers = 0
        self.bytes = 0

    async def upload(self, desc: Descriptor, data: bytes | Path, tar_bytes: int) -> None:
        async with self._limiter:
            stored = await self._store.put_blob(desc, data)  # False: it was there already
        if stored:
            self.layers += 1
            self.bytes += desc.size
        if isinstance(data, Path):
            await anyio.to_thread.run_sync(lambda: data.unlink(missing_ok=True))
        self.moved(tar_bytes)

    def moved(self, tar_bytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(tar_bytes)


async def _pack_and_upload(
    store: Store,
    plan: _Plan,
    slots: list[_Slot | None],
    compression: Compression,
    level: int | None,
    jobs: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Pack every layer without a slot (filling it in) and upload it; (layers, bytes) uploaded."""
    scan = plan.scan
    total = sum(p.tar_bytes for p in scan.layers)
    if all(slot is not None for slot in slots):  # all reused (a save after a restore, as is)
        if progress is not None:
            progress.start(total)
            progress.advance(total)
        return 0, 0
    to_pack = TreeScan(
        scan.root, tuple(p for p, slot in zip(scan.layers, slots, strict=True) if slot is None), scan.stats
    )
    from ..archive.pack import pack_tree  # here: a tree whose layers are all reused is not packed

    work = await anyio.to_thread.run_sync(_spool_dir, scan.root)
    packed = _Packer(pack_tree(to_pack, compression=compression, level=level, spool_dir=work.path), work.path)
    uploads = _Uploads(store, jobs, progress)
    if progress is not None:
        progress.start(total)
    try:
        async with anyio.create_task_group() as tg:
            for i, slot in enumerate(slots):
                if slot is not None:
                    uploads.moved(scan.layers[i].tar_bytes)
                    continue
                layer = await anyio.to_thread.run_sync(packed.next)
                if layer is None:
                    raise RuntimeError("the packer yielded fewer layers than planned")
                media_type = layer_media_type(layer.compression)
                desc = Descriptor(media_type, layer.digest, layer.size, annotations=plan.annotations[i])
                slots[i] = (desc, layer.diff_id)
                tg.start_soon(uploads.upload, desc, layer.data, scan.layers[i].tar_bytes)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        with anyio.CancelScope(shield=True):  # a signal's cancellation must not skip the clean-up
            await anyio.to_thread.run_sync(packed.close)
            await anyio.to_thread.run_sync(work.close)
    return uploads.layers, uploads.bytes


#: Name prefix of a save's spool directory in the temporary directory.
SPOOL_PREFIX = "remote-cache-save-"


def _spool_dir(tree: Path) -> WorkDir:
    """A fresh spool directory in the temporary directory, after removing those of dead saves."""
    fix = "set TMPDIR to a directory this user can write, outside the directory saved"
    try:
        tmp = Path(tempfile.gettempdir())
    except FileNotFoundError:  # none of TMPDIR, /tmp, /var/tmp, /usr/tmp and the current directory
        raise RemoteCacheError(f"no writable temporary directory: {fix}") from None
    # Without TMPDIR and with /tmp, /var/tmp and /usr/tmp unwritable, Python's last resort is the
    # current directory: not when that is in the tree saved (the spool would be read with it).
    resolved, root = os.path.realpath(tmp), os.path.realpath(tree)
    if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
        named = next((f"${v}" for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)), None)
        why = f"{named} names it" if named else "/tmp, /var/tmp and /usr/tmp are not writable"
        raise RemoteCacheError(f"the temporary directory {tmp} is inside {tree} ({why}): {fix}")
    sweep_dead(tmp, SPOOL_PREFIX)
    return WorkDir(tmp, SPOOL_PREFIX)


class _Packer:
    """The packing generator, stepped from worker threads one at a time and closed only when no
    step is running: a cancelled wait for ``next`` does not stop the thread inside it, and
    closing a generator another thread is executing raises ValueError."""

    def __init__(self, layers: Generator[PackedLayer, None, None], spool: Path) -> None:
        self._layers = layers
        self._spool = spool
        self._lock = threading.Lock()

    def next(self) -> PackedLayer | None:
        with self._lock:
            try:
                return next(self._layers, None)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                from ..archive.pack import DEFAULT_SPOOL_BYTES

                # Only the spool is written while packing (the layers over its threshold).
                raise NoSpace(
                    f"not enough space in {self._spool.parent}, the temporary directory, for the packed "
                    f"layers waiting to be uploaded ({exc.strerror}): set TMPDIR to a directory with "
                    f"more room (a layer over {format_bytes(DEFAULT_SPOOL_BYTES)} is kept there until "
                    "it is uploaded)"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self._layers.close()


# -- publish ----------------------------------------------------------------------------------


async def _publish(
    store: Store,
    tag: str,
    key: str,
    plan: _Plan,
    stored: Sequence[_Slot],
    platforms: Sequence[Platform],
    *,
    exclusive: bool,
    republish: bool = False,
    relied: Sequence[str] = (),
) -> tuple[str, bool]:
    """Push configs, manifests and the tagged index; (digest, unchanged) -- unchanged when the
    tag already names exactly this content (then nothing is pushed, unless ``republish``).
    ``exclusive``: the tag is written only if it does not exist (EntryExists otherwise).
    ``relied``: reused blobs the store was not asked about (see Store.rely_on)."""
    descriptors = [d for d, _ in stored]
    existing = None if republish else await _same_entry(store, tag, key, descriptors, plan, platforms)
    if existing is not None:
        return existing, True
    if relied:
        await store.rely_on(relied)
    image = build_image(
        descriptors,
        [diff_id for _, diff_id in stored],
        key=key,
        size=plan.size,
        files=plan.files,
        platforms=platforms,
        generations=plan.scan.bounds,
    )
    try:
        async with anyio.create_task_group() as tg:
            for config in image.configs:
                tg.start_soon(store.put_blob, config.descriptor, config.body)
        # A manifest may only be pushed once its config is in; the index once its manifests are.
        async with anyio.create_task_group() as tg:
            for manifest in image.manifests:
                tg.start_soon(store.put_manifest, manifest.body, manifest.descriptor.media_type)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    async with _committing():
        index = await store.put_manifest(
            image.index.body, image.index.descriptor.media_type, tag=tag, exclusive=exclusive
        )
    return index.digest, False


@asynccontextmanager
async def _committing() -> AsyncIterator[None]:
    """The tag write commits the save: a signal arriving meanwhile lets it finish, as a restore's
    swap does, rather than leave "interrupted" over an entry that was replaced. A deadline still
    ends it (``--deadline`` bounds the whole step); one that passed before, or a signal that came
    before, stops it at once (the effective deadline of a cancelled scope is -inf)."""
    with anyio.CancelScope(shield=True, deadline=anyio.current_effective_deadline()) as scope:
        yield
    if scope.cancelled_caught:  # the deadline passed: let the step's own scope end the save
        await anyio.lowlevel.checkpoint()
        raise TimeoutError("the deadline passed while the tag was written")


async def _same_entry(
    store: Store,
    tag: str,
    key: str,
    layers: Sequence[Descriptor],
    plan: _Plan,
    platforms: Sequence[Platform],
) -> str | None:
    """The current digest under ``tag`` when it already holds exactly this content, else None.

    Listing annotations are not compared: equal layer digests imply equal listings, and a layer
    saved without one (its files were too fresh) keeps the entry unchanged rather than re-pushed.
    """
    try:
        # The tag's current index by GET (one round trip, where resolving first was two), then
        # its platforms' manifests side by side: all read now, none remembered from earlier.
        current, body = await store.get_manifest(tag)
        if current.media_type not in INDEX_TYPES or len(body) > MAX_DOCUMENT_BYTES:
            return None
        manifests, annotations = parse_index(body, current.media_type)
        bounds = bounds_text(plan.scan.bounds) or None
        if (
            annotations.get(ANNOTATION_KEY) != key
            or annotations.get(ANNOTATION_SIZE) != str(plan.size)
            or annotations.get(ANNOTATION_FILES) != str(plan.files)
            or annotations.get(ANNOTATION_GENERATIONS) != bounds
            or [str(m.platform) for m in manifests] != [str(p) for p in platforms]
        ):
            return None
        wanted = [(d.digest, d.size, d.media_type) for d in layers]
        verdicts: list[bool] = []

        async def check(manifest: Descriptor) -> None:
            mdesc, mbody = await store.get_manifest(manifest.digest)
            parsed = parse_manifest(mbody, mdesc.media_type or manifest.media_type)
            have = [(d.digest, d.size, d.media_type) for d in parsed.layers]
            verdicts.append(have == wanted and await store.has_blob(parsed.config.digest))

        await for_each(manifests, check, jobs=len(manifests) or 1)
        if not all(verdicts):
            return None
    except RemoteCacheError:
        # Anything unreadable (a miss, a foreign image) simply means "not the same": save anew.
        return None
    return current.digest


# -- record -----------------------------------------------------------------------------------


async def _record(
    path: Path,
    before: Evidence,
    plan: _Plan,
    slots: Sequence[_Slot | None],
    *,
    where: tuple[str, str, str, str],
) -> None:
    """Keep the evidence the next save of ``path`` needs: each settled layer's local listing, and
    the tree fingerprint with what this save produced (``where``: location, tag, options, digest)."""
    tree = None
    if plan.fingerprint is not None:
        stored = [slot for slot in slots if slot is not None]
        total = sum(d.size for d, _ in stored)
        tree = TreeRecord(plan.fingerprint, *where, plan.size, plan.files, len(stored), total)
    if before.window is not None:  # the bounds of the entry now here, for a save under another key
        before = replace(before, window=replace(before.window, bounds=plan.scan.bounds))
    await anyio.to_thread.run_sync(state.record_save, path, before, records_for(plan.local, slots), tree)
