"""Restore a cache entry from any :class:`~remote_cache.oci.store.Store` into a directory, atomically.

The phases: *resolve* (the exact key, else the newest entry under a restore key, see
:func:`~.entries.find_entry`), *fetch and extract* (layers download concurrently into spool
files next to the target while a worker thread extracts them in order from those same files as
they grow, :mod:`.spool`), *swap* (the staging directory beside the target replaces it only when
every layer was verified and extracted) and *record* (the restore window, :mod:`.evidence`).
Any failure (integrity, unsafe archive, network) discards the staging directory and leaves the
target exactly as it was.

A missing key raises :class:`~remote_cache.errors.CacheMiss`; callers (the CLI) map it to their
"miss" exit code. It is never confused with other failures.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import anyio
import anyio.to_thread

from ..archive.extract import Extractor, ExtractStats
from ..archive.swap import discard_dir, replace_dir, staging_dir
from ..errors import CacheMiss, RemoteCacheError
from ..keys import validate_key
from ..oci.descriptor import Descriptor
from ..oci.media import LAYER_COMPRESSION
from ..oci.store import Store
from ..tasks import first_error
from ..units import format_bytes, format_rate
from . import state
from .entries import find_entry
from .evidence import LayerRecord, RestoreWindow, clock_ns, dir_id, settle
from .image import ANNOTATION_LISTING, CacheImage, load_image, read_diff_ids
from .spool import Aborted, GrowingFile, caused_by_abort

__all__ = ["RestoreResult", "restore"]


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did."""

    key: str
    tag: str
    digest: str
    bytes: int
    size: int
    files: int
    seconds: float
    layers: int = 0
    #: "hit": the exact key; "fallback": the newest entry matching a restore key.
    status: Literal["hit", "fallback"] = "hit"
    #: The key of the entry actually restored (differs from ``key`` on a fallback).
    matched_key: str = ""

    def summary(self) -> str:
        """The one line a person reads, e.g. ``restore hit npm: 69.5 MB in 2.5 s (28.1 MB/s); ...``."""
        how = f"hit {self.key}" if self.status == "hit" else f"fallback {self.key} from {self.matched_key}"
        return (
            f"restore {how}: {format_bytes(self.bytes)} in {self.seconds:.1f} s "
            f"({format_rate(self.bytes, self.seconds)}); {format_bytes(self.size)} in {self.files} files"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


async def restore(
    store: Store,
    key: str,
    path: Path,
    *,
    restore_keys: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
    jobs: int = 4,
    record_state: bool = True,
) -> RestoreResult:
    """Replace ``path`` with the entry stored under ``key``, else the newest matching a restore key.

    ``restore_keys`` are prefixes tried in order when the exact key is absent (as in actions/cache,
    see :func:`~remote_cache.cache.entries.find_entry`); CacheMiss when nothing matches.
    ``progress`` is called with each downloaded chunk's size. ``record_state`` (default) then
    records, in this machine's state (:mod:`remote_cache.cache.state`), the image's layers and the
    window during which they were extracted (no scan), so the next save of ``path`` can reuse
    those whose files were not touched since, unread.
    """
    started = time.monotonic()
    validate_key(key)
    path = Path(path)
    match = await find_entry(store, key, restore_keys)
    if match is None:
        raise CacheMiss(key, store.location)
    try:
        image = await load_image(store, match.digest)
    except CacheMiss as exc:  # replaced or deleted between the lookup and now
        raise CacheMiss(key, store.location) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    run = _Restore(store, image, path, jobs=jobs, progress=progress, record_state=record_state)
    stats = await run.fetch_and_extract()
    window = await run.window()
    await run.swap()
    if window is not None:
        await anyio.to_thread.run_sync(state.record_restore, path, window)
    return RestoreResult(
        key=key,
        tag=match.tag,
        digest=image.digest,
        bytes=run.downloaded,
        size=stats.bytes,
        files=stats.files,
        seconds=time.monotonic() - started,
        layers=len(image.layers),
        status="hit" if match.exact else "fallback",
        matched_key=match.key,
    )


class _Restore:
    """One restore of ``image`` into ``path``: spool files, a staging directory, and the phases."""

    def __init__(
        self,
        store: Store,
        image: CacheImage,
        path: Path,
        *,
        jobs: int,
        progress: Callable[[int], None] | None,
        record_state: bool,
    ) -> None:
        self._store = store
        self._image = image
        self._path = path
        self._limiter = anyio.Semaphore(max(1, jobs))
        self._progress = progress
        self._record = record_state
        self._staging: Path | None = None
        self._spool: Path | None = None
        self._feeds: list[GrowingFile] = []
        self._diff_ids: list[str] = []
        self._stats: ExtractStats | None = None
        self._window_start = 0
        self.downloaded = 0

    async def fetch_and_extract(self) -> ExtractStats:
        """Download every layer and extract them all into a new staging directory."""
        self._staging = staging_dir(self._path)
        ok = False
        try:
            self._spool = Path(tempfile.mkdtemp(prefix=".remote-cache-spool-", dir=self._path.parent))
            for i in range(len(self._image.layers)):
                part = self._spool / f"layer-{i}"
                part.touch()
                self._feeds.append(GrowingFile(part))
            # Every file the extraction writes gets a ctime at or after this.
            self._window_start = clock_ns()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._fetch_diff_ids)
                    for i, desc in enumerate(self._image.layers):
                        tg.start_soon(self._download, i, desc)
                    tg.start_soon(self._extract)
            except BaseExceptionGroup as group:
                raise first_error(group, ignore=(Aborted,)) from None
            ok = True
        finally:
            await self._close_spool(ok)
        stats = self._stats
        return (
            stats
            if stats is not None
            else ExtractStats(files=self._image.files or 0, bytes=self._image.size or 0)
        )

    async def window(self) -> RestoreWindow | None:
        """The restore window to record, taken before the swap (see :mod:`.evidence`), if any."""
        if not self._record or not self._diff_ids or (self._stats is not None and self._stats.whiteouts):
            return None
        try:
            # While the staging directory is still private: every extracted file's ctime is then
            # before the window's end, every later change's at or after it.
            return await anyio.to_thread.run_sync(self._make_window)
        except BaseException:
            await self._discard_staging()
            raise

    async def swap(self) -> None:
        """Put the staging directory in place of the target (the old tree is removed)."""
        assert self._staging is not None
        try:
            await anyio.to_thread.run_sync(replace_dir, self._staging, self._path)
        except BaseException:
            await self._discard_staging()
            raise

    # -- fetch --------------------------------------------------------------------------------

    async def _download(self, i: int, desc: Descriptor) -> None:
        assert self._spool is not None
        feed = self._feeds[i]
        try:
            async with self._limiter:
                # Unbuffered writes straight from the loop: a chunk is at most a socket read, and
                # a thread hop per chunk cost more than the write itself.
                with open(self._spool / f"layer-{i}", "wb", buffering=0) as out:
                    async for chunk in self._store.read_blob(desc):
                        view = memoryview(chunk)
                        while view:
                            view = view[out.write(view) or 0 :]
                        feed.wrote(len(chunk))
                        self.downloaded += len(chunk)
                        if self._progress is not None:
                            self._progress(len(chunk))
        except BaseException as exc:
            feed.finish(exc)
            raise
        feed.finish()

    async def _fetch_diff_ids(self) -> None:
        if self._record:
            with contextlib.suppress(RemoteCacheError):
                self._diff_ids.extend(await read_diff_ids(self._store, self._image))

    # -- extract ------------------------------------------------------------------------------

    def _layers(self) -> Iterator[tuple[BinaryIO, str | None]]:
        # Iterated in the extractor's decompression thread, which runs ahead into the next layer
        # while the current one is written out.
        assert self._spool is not None
        for i, (desc, feed) in enumerate(zip(self._image.layers, self._feeds, strict=True)):
            yield cast(BinaryIO, feed), LAYER_COMPRESSION.get(desc.media_type)
            feed.close()  # fully read and verified: free the disk as we go
            (self._spool / f"layer-{i}").unlink(missing_ok=True)

    def _extract_all(self) -> ExtractStats:
        assert self._staging is not None
        with Extractor(self._staging) as extractor:
            extractor.add_layers(self._layers())
            return extractor.finish()

    async def _extract(self) -> None:
        try:
            self._stats = await anyio.to_thread.run_sync(self._extract_all)
        except BaseException as exc:
            if caused_by_abort(exc):
                return  # the failing download raises the real error in the task group
            raise

    # -- record and clean up ------------------------------------------------------------------

    def _make_window(self) -> RestoreWindow | None:
        """Only layers with a portable listing annotation (saved by us, not racy) can be matched
        by a later save. None when there are none, or the directory cannot be identified."""
        assert self._staging is not None
        image, diff_ids = self._image, self._diff_ids
        layers: dict[tuple[str, str], LayerRecord] = {}
        for desc, diff_id in zip(image.layers, diff_ids, strict=False):
            listing = desc.annotations.get(ANNOTATION_LISTING)
            if listing:
                layers.setdefault(
                    (listing, desc.media_type), LayerRecord(desc.media_type, desc.digest, desc.size, diff_id)
                )
        if not layers or len(diff_ids) != len(image.layers):
            return None
        end_ns = settle(time.time_ns())
        try:
            root = dir_id(self._staging)
        except OSError:
            return None
        return RestoreWindow(self._window_start, end_ns, root, layers)

    async def _close_spool(self, ok: bool) -> None:
        for feed in self._feeds:
            # Wake an extraction thread still waiting on a feed (the task group was cancelled).
            feed.finish(None if ok else Aborted())
            feed.close()
        if self._spool is not None:
            await anyio.to_thread.run_sync(discard_dir, self._spool)
        if not ok:
            await self._discard_staging()

    async def _discard_staging(self) -> None:
        if self._staging is not None:
            await anyio.to_thread.run_sync(discard_dir, self._staging)
