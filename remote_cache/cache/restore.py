"""Restore a cache entry from any :class:`~remote_cache.oci.store.Store` into a directory, atomically.

The phases: *plan* (where it can go, checked before any download, and leftovers of killed runs
cleaned: :mod:`remote_cache.archive.target`), *resolve* (the exact key, else the newest entry
under a restore key, see :func:`~.entries.find_entry`), *fetch and extract* (layers download
concurrently into spool files in a work directory on the target's filesystem while a worker
thread extracts them in order from those same files as they grow, :mod:`.spool`), *swap* (the
staging directory replaces the target, or its entries, only when every layer was verified and
extracted) and *record* (the restore window, :mod:`.evidence`). Any failure (integrity, unsafe
archive, network, a signal) discards the work directory and leaves the target exactly as it was.

A missing key raises :class:`~remote_cache.errors.CacheMiss`; callers (the CLI) map it to their
"miss" exit code. It is never confused with other failures.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import anyio
import anyio.to_thread
from msgspec import Struct
from msgspec.structs import asdict, replace

from ..archive.extract import Extractor, ExtractStats
from ..archive.sparse import write_all
from ..archive.target import (
    RestoreTarget,
    clean_leftovers,
    locked,
    nearest_existing,
    plan_target,
    swap_in,
)
from ..archive.workdirs import WorkDir
from ..errors import CacheMiss, ImageFormatError, IntegrityError, NoSpace, RemoteCacheError, UnsafeArchive
from ..keys import validate_key
from ..oci.descriptor import Descriptor
from ..oci.media import LAYER_COMPRESSION
from ..oci.store import Store, refuse_overlap
from ..tasks import first_error
from ..units import counted, format_bytes, format_rate
from ..version import TOOL
from . import state
from .entries import find_entry
from .evidence import (
    LayerRecord,
    RestoredTree,
    RestoreWindow,
    dir_id,
    entry_shape,
    facts_digest,
    fs_clock_ns,
    fs_settle,
    names_digest,
    parents_digest,
)
from .image import ANNOTATION_LISTING, ANNOTATION_TOOL, CacheImage, generation_bounds, read_diff_ids
from .progress import Progress
from .spool import Aborted, GrowingFile, caused_by_abort

__all__ = ["RestoreResult", "restore"]


class RestoreResult(Struct, frozen=True):
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
            f"({format_rate(self.bytes, self.seconds)}); {format_bytes(self.size)} in "
            f"{counted(self.files, 'file')}"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, ``status`` named ``outcome`` as in every command."""
        fields = asdict(self)
        return {"outcome": fields.pop("status"), **fields}


async def restore(
    store: Store,
    key: str,
    path: Path,
    *,
    restore_keys: Sequence[str] = (),
    progress: Progress | None = None,
    jobs: int = 4,
    record_state: bool = True,
    force: bool = False,
) -> RestoreResult:
    """Replace ``path`` with the entry stored under ``key``, else the newest matching a restore key.

    ``restore_keys`` are prefixes tried in order when the exact key is absent (as in actions/cache,
    see :func:`~remote_cache.cache.entries.find_entry`); CacheMiss when nothing matches.
    ``progress`` learns the compressed bytes to download, then each chunk's size. ``record_state``
    (default) then records, in this machine's state (:mod:`remote_cache.cache.state`), the image's
    layers and the window during which they were extracted (no scan), so the next save of
    ``path`` can reuse those whose files were not touched since, unread. ``force``: restore into a
    non-empty current directory (refused otherwise, see
    :func:`~remote_cache.archive.target.plan_target`).
    """
    started = time.monotonic()
    validate_key(key)
    path = Path(path)
    refuse_overlap(store, path, "restore into")
    target = plan_target(path, force=force)
    await anyio.to_thread.run_sync(clean_leftovers, target)
    match = await find_entry(store, key, restore_keys, read_image=True)  # BrokenEntry: a miss too
    if match is None:
        raise CacheMiss(key, store.location)
    assert match.image is not None  # read by the lookup (read_image)
    image = match.image
    await anyio.to_thread.run_sync(_check_space, target, image)
    run = _Restore(
        store, image, target, tag=match.tag, jobs=jobs, progress=progress, record_state=record_state
    )
    try:
        stats = await run.fetch_and_extract()
        window = await run.window()
        # Recorded under the target's lock, with the swap: of two restores into one target, the
        # window of the tree that stays is the one recorded last.
        await run.swap(None if window is None else functools.partial(run.record, path, window))
    finally:
        # Shielded: a signal's cancellation must not skip the clean-up; and once the target holds
        # the new tree the restore is done, so a signal from then on cannot make it "interrupted".
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(run.close)
    return RestoreResult(
        key=key,
        tag=match.tag,
        digest=image.digest,
        bytes=image.compressed_size,  # every blob's size is checked
        size=stats.bytes,
        files=stats.files,
        seconds=time.monotonic() - started,
        layers=len(image.layers),
        status="hit" if match.exact else "fallback",
        matched_key=match.key,
    )


def _check_space(target: RestoreTarget, image: CacheImage) -> None:
    """Refuse before downloading when the work directory's filesystem cannot hold the new tree
    (the old one stays until the swap) plus the biggest compressed layer, or has fewer free
    inodes than the tree has files."""
    if image.size is None:
        return  # a foreign image: its size is not known up front
    need = _space_needed(image)
    st = os.statvfs(nearest_existing(target.work_parent))
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise NoSpace(f"{_space_message(target, need)}, {format_bytes(free)} free there")
    files = image.files
    # A filesystem without an inode limit reports no inodes at all (f_files 0).
    if files is not None and st.f_files and st.f_favail < files + _work_inodes(image):
        raise NoSpace(f"{_inodes_message(target, image)}, {st.f_favail} free there")


def _space_needed(image: CacheImage) -> int:
    """Bytes a restore of ``image`` needs free: the new tree and the biggest compressed layer."""
    return (image.size or 0) + max((d.size for d in image.layers), default=0)


def _work_inodes(image: CacheImage) -> int:
    """Inodes of the restore's own: its work directory, lock, clock probe, staging and spool
    directories, and a spool file per layer."""
    return 5 + len(image.layers)


def _inodes_message(target: RestoreTarget, image: CacheImage) -> str:
    return (
        f"not enough inodes to restore into {target.path}: its {image.files} files, its directories "
        f"and {_work_inodes(image)} work files of the restore need one each in {target.work_parent}"
    )


def _space_message(target: RestoreTarget, need: int) -> str:
    return (
        f"not enough space to restore into {target.path}: it needs about {format_bytes(need)} free in "
        f"{target.work_parent} (the new tree while the old one stays until the swap)"
    )


class _Restore:
    """One restore of ``image`` into ``target``: a work directory (spool files, the staging
    directory, the swap's journal) and the phases."""

    def __init__(
        self,
        store: Store,
        image: CacheImage,
        target: RestoreTarget,
        *,
        tag: str,
        jobs: int,
        progress: Progress | None,
        record_state: bool,
    ) -> None:
        self._store = store
        self._image = image
        self._target = target
        self._tag = tag
        self._limiter = anyio.Semaphore(max(1, jobs))
        self._progress = progress
        self._record = record_state
        self._work: WorkDir | None = None
        self._feeds: list[GrowingFile] = []
        self._reading = 0  # the layer the extraction reads (see _layers)
        self._diff_ids: list[str] = []
        self._stats: ExtractStats | None = None
        self._file_parents: list[set[bytes]] = []
        self._rewritten: set[int] = set()
        #: Whether the directory keeps the replaced one's mode and owner (no root in the entry).
        self._keep_root = True
        #: The target filesystem's time before extraction (:func:`fs_clock_ns`); None unread.
        self._window_start: int | None = None
        #: The extraction, once it runs; stopped by a cancel (see _stop_extraction_on_cancel).
        self._extractor: Extractor | None = None
        self._stopped = False
        self._progress_lock = threading.Lock()

    async def fetch_and_extract(self) -> ExtractStats:
        """Download every layer and extract them all into a new staging directory."""
        try:
            return await self._fetch_and_extract()
        except OSError as exc:  # the work directory's making included
            raise _user_facing(exc, self._target, self._image) from None

    async def _fetch_and_extract(self) -> ExtractStats:
        self._work = await anyio.to_thread.run_sync(self._make_work)
        self._staging.mkdir(mode=0o700)
        if self._progress is not None:
            self._progress.start(self._image.compressed_size)
        ok = False
        try:
            self._open_spool(self._work.path / "spool")
            # Every file the extraction writes gets a ctime at or after this.
            with contextlib.suppress(OSError):  # (then no window: saves read the tree)
                self._window_start = fs_clock_ns(self._clock_probe)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._fetch_diff_ids)
                    for desc, feed in zip(self._image.layers, self._feeds, strict=True):
                        tg.start_soon(self._download, desc, feed)
                    extracted = anyio.Event()
                    tg.start_soon(self._stop_extraction_on_cancel, extracted)
                    tg.start_soon(self._extract, extracted)
            except BaseExceptionGroup as group:
                raise first_error(group, ignore=(Aborted,)) from None
            ok = True
        finally:
            self._close_feeds(ok)  # the spool files go with the work directory (close)
        # The group ended without an error: the extraction ran to the end (it returns early only
        # when a failed download, which the group raises, aborted it).
        assert self._stats is not None
        return self._stats

    def _open_spool(self, spool: Path) -> None:
        """One empty spool file per layer, each opened for the extraction to read as it grows."""
        spool.mkdir()
        for i in range(len(self._image.layers)):
            part = spool / f"layer-{i}"
            part.touch()
            self._feeds.append(GrowingFile(part))

    @property
    def _clock_probe(self) -> Path:
        """The file whose ctime tells the target filesystem's time (in the work directory, on the
        target's filesystem)."""
        assert self._work is not None
        return self._work.path / "clock"

    @property
    def _staging(self) -> Path:
        """The directory the layers are extracted into, in the work directory."""
        assert self._work is not None
        return self._work.path / "new"

    def _make_work(self) -> WorkDir:
        target = self._target
        # In place: not while another restore exchanges the target whole.
        with locked(target) if target.in_place else contextlib.nullcontext():
            return WorkDir(target.work_parent, target.work_prefix)

    async def window(self) -> RestoreWindow | None:
        """The restore window to record, taken before the swap (see :mod:`.evidence`), if any."""
        if (
            not self._record
            or not self._diff_ids
            or self._window_start is None
            or (self._stats is not None and self._stats.whiteouts)
        ):
            return None
        # While the staging directory is still private: every extracted file's ctime is then
        # before the window's end, every later change's at or after it.
        return await anyio.to_thread.run_sync(self._make_window)

    def record(self, path: Path, window: RestoreWindow, whole: bool) -> None:
        """Record ``window`` for ``path`` once swapped. Its entries moved into the directory there
        (in place, or one overlayfs cannot rename): that directory is the root, the entries are
        no whole entry (they moved after the window; what is below them did not)."""
        if not whole:
            try:
                window = replace(window, root=dir_id(self._target.path), tree=None)
            except OSError:
                return
        state.record_restore(path, window)

    async def swap(self, then: Callable[[bool], object] | None) -> None:
        """Put the staging directory in place of the target, or its entries in the target's; then
        call ``then`` (still holding the target's lock)."""
        assert self._work is not None and self._extractor is not None
        # (A read-only root's mode, given once the tree is in place: see Extractor.finish.)
        root_mode = self._extractor.root_mode_in_place
        await anyio.to_thread.run_sync(
            functools.partial(swap_in, keep_root=self._keep_root, root_mode=root_mode),
            self._target,
            self._staging,
            self._work.path,
            then,
        )

    def close(self) -> None:
        """Remove the work directory (the staging, or after an exchange the old tree) and unlock."""
        if self._work is not None:
            self._work.close()

    # -- fetch --------------------------------------------------------------------------------

    async def _download(self, desc: Descriptor, feed: GrowingFile) -> None:
        try:
            async with self._limiter:
                # The store calls the sink from the thread that receives (and hashes) the bytes:
                # writing them there too keeps every byte off the event loop.
                with open(feed.path, "wb", buffering=0) as out:

                    def sink(chunk: memoryview) -> None:
                        write_all(out.fileno(), chunk)
                        feed.wrote(len(chunk))
                        self._moved(len(chunk))

                    await self._store.download_blob(desc, sink)
        except BaseException as exc:
            feed.finish(exc)
            raise
        feed.finish()

    def _moved(self, nbytes: int) -> None:
        """Report downloaded bytes (called from the stores' worker threads, several at once)."""
        if self._progress is not None:
            with self._progress_lock:
                self._progress.advance(nbytes)

    async def _fetch_diff_ids(self) -> None:
        if self._record:
            with contextlib.suppress(RemoteCacheError):
                self._diff_ids.extend(await read_diff_ids(self._store, self._image))

    # -- extract ------------------------------------------------------------------------------

    def _layers(self) -> Iterator[tuple[BinaryIO, str | None]]:
        # Iterated in the extractor's decompression thread, which runs ahead into the next layer
        # while the current one is written out.
        for i, (desc, feed) in enumerate(zip(self._image.layers, self._feeds, strict=True)):
            self._reading = i
            yield cast(BinaryIO, feed), LAYER_COMPRESSION.get(desc.media_type)
            feed.close()  # fully read and verified: free the disk as we go
            feed.path.unlink(missing_ok=True)

    def _extract_all(self) -> ExtractStats:
        with Extractor(self._staging) as extractor:
            self._extractor = extractor
            if self._stopped:
                extractor.stop(Aborted())
            try:
                extractor.add_layers(self._layers())
            except (ImageFormatError, IntegrityError, UnsafeArchive) as exc:
                raise _in_layer(exc, self._image, extractor.layers_begun) from exc
            self._file_parents, self._rewritten = extractor.file_parents, extractor.rewritten
            if extractor.root_given:  # (another tool's image) its root's mode, not the replaced one's
                self._keep_root = False
            return extractor.finish()

    async def _extract(self, extracted: anyio.Event) -> None:
        try:
            self._stats = await anyio.to_thread.run_sync(self._extract_all)
        except BaseException as exc:
            if caused_by_abort(exc):
                return  # the failing download (or the cancel) raises the real error in the group
            if (
                isinstance(exc, ImageFormatError | IntegrityError | UnsafeArchive)
                and await self._download_failed()
            ):
                return  # bytes that fail their download's check: that check's error says why
            raise
        finally:
            extracted.set()

    async def _stop_extraction_on_cancel(self, extracted: anyio.Event) -> None:
        """On a cancel (a signal, ``--deadline``, a failed download), stop the extraction before
        its next chunk and fail every feed, downloaded or not: the extraction thread cannot be
        cancelled, and went on through every layer already downloaded (and the chunks decompressed
        ahead) before the cancel could end the restore."""
        try:
            await extracted.wait()
        finally:
            if not extracted.is_set():
                self._stopped = True
                if self._extractor is not None:
                    self._extractor.stop(Aborted())  # before its next chunk
                for feed in self._feeds:
                    feed.finish(Aborted())  # a read waiting for a download, or the next one

    async def _download_failed(self) -> bool:
        """Whether a layer the extraction has read from failed its download (after waiting for the
        downloads of those layers to end: the extraction reads bytes before they are verified)."""
        feeds = self._feeds[: self._reading + 1]
        outcomes = await anyio.to_thread.run_sync(
            lambda: [f.outcome() for f in feeds], abandon_on_cancel=True
        )
        return any(error is not None for error in outcomes)

    # -- record and clean up ------------------------------------------------------------------

    def _make_window(self) -> RestoreWindow | None:
        """Only layers with a portable listing annotation (saved by us, not racy) that no later
        layer rewrote can be matched by a later save. None when there are none, or the directory
        cannot be identified."""
        image, diff_ids = self._image, self._diff_ids
        if len(diff_ids) != len(image.layers) or len(self._file_parents) != len(image.layers):
            return None
        # A layer a later one rewrote (a foreign tool's appended layer) no longer is in the tree.
        vouched = [
            (i, listing)
            for i, desc in enumerate(image.layers)
            if (listing := desc.annotations.get(ANNOTATION_LISTING)) and i not in self._rewritten
        ]
        if not vouched:
            return None
        try:
            dirs = set().union(*(self._file_parents[i] for i, _ in vouched)) - {b""}
            inodes = _inodes(self._staging, dirs)
            # In place, the target keeps its own inode (only its entries move in).
            root = dir_id(self._target.path if self._target.in_place else self._staging)
        except OSError:
            return None
        tree = self._restored_tree(len(vouched))
        layers: dict[tuple[str, str], LayerRecord] = {}
        parents: dict[tuple[str, str], str] = {}
        for i, listing in vouched:
            desc = image.layers[i]
            key = (listing, desc.media_type)
            if key not in layers:
                layers[key] = LayerRecord(desc.media_type, desc.digest, desc.size, diff_ids[i])
                parents[key] = parents_digest({d: inodes[d] for d in self._file_parents[i] if d})
        start = self._window_start
        assert start is not None
        try:
            end = fs_settle(self._clock_probe)  # every file is written (the stats wrote nothing)
        except OSError:
            return None
        if end <= start:  # whole-second ctimes, all in one second: no file could be trusted
            return None
        return RestoreWindow(start, end, root, layers, parents, tree, generation_bounds(image.annotations))

    def _restored_tree(self, vouched: int) -> RestoredTree | None:
        """The whole entry, for a save that finds the tree untouched (see :mod:`.evidence`): only
        an entry this tool saved, every layer vouched for, counts matching what was extracted, no
        hard links (the save's count of bytes would differ), every mode and owner as the entry
        gives them (not so for another user's files), and a staging directory swapped in whole
        (in place, the entries move in after the window)."""
        image, stats = self._image, self._stats
        media_types = {desc.media_type for desc in image.layers}
        if (
            self._target.in_place
            or stats is None
            or not (stats.exact and self._keep_root)
            or stats.hardlinks
            or vouched != len(image.layers)
            or len(media_types) != 1
            or not image.platforms
            or image.key is None
            or image.annotations.get(ANNOTATION_TOOL) != TOOL
            or (image.size, image.files) != (stats.bytes, stats.files)
        ):
            return None
        try:
            names = names_digest(os.listdir(self._staging))
        except OSError:
            return None  # (the window still vouches for the layers)
        entries = stats.files + stats.dirs + stats.symlinks
        return RestoredTree(
            location=self._store.location,
            tag=self._tag,
            key=image.key,
            shape=entry_shape(media_types.pop(), image.platforms),
            digest=image.digest,
            names=names,
            facts=facts_digest(stats.modes, stats.mtimes_ns),
            entries=entries,
            size=stats.bytes,
            files=stats.files,
            layers=len(image.layers),
            bytes=image.compressed_size,
        )

    def _close_feeds(self, ok: bool) -> None:
        for feed in self._feeds:
            # Wake a decompression thread still waiting on a feed (a cancel's task did already).
            feed.finish(None if ok else Aborted())
            feed.close()


def _inodes(root: Path, dirs: set[bytes]) -> dict[bytes, int]:
    """The inode of each directory in ``dirs`` (paths from ``root``); OSError when one is gone."""
    base = os.fsencode(root) + b"/"
    return {d: os.lstat(base + d).st_ino for d in dirs}


def _in_layer(exc: RemoteCacheError, image: CacheImage, number: int) -> RemoteCacheError:
    """``exc`` (what is wrong with a layer's bytes) saying which layer: ``layer 2 of 3 (sha256:...)``."""
    if not 1 <= number <= len(image.layers):
        return exc
    return type(exc)(f"layer {number} of {len(image.layers)} ({image.layers[number - 1].digest}): {exc}")


def _user_facing(exc: BaseException, target: RestoreTarget, image: CacheImage) -> BaseException:
    """The error as a user should read it: a full disk says how much is needed where; paths in
    the work directory are shown as the target's."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NoSpace(f"{_full_message(target, image)} ({exc.strerror})")
    if isinstance(exc, OSError) and exc.filename is not None:
        shown = _shown_path(str(exc.filename), target)
        return type(exc)(exc.errno, f"{exc.strerror}: {shown}")
    return exc


def _full_message(target: RestoreTarget, image: CacheImage) -> str:
    """What ran out when the disk filled up during the restore: the OS says only "No space left
    on device" for both bytes and inodes, so ask the filesystem (the work directory is still there)."""
    with contextlib.suppress(OSError):
        st = os.statvfs(nearest_existing(target.work_parent))
        # The restore's own spool files may have gone since (the decompression runs ahead and
        # removes each layer's once read): a few free inodes still mean they ran out.
        if st.f_files and st.f_favail <= _work_inodes(image):
            if image.files is not None:
                return f"{_inodes_message(target, image)}, and they ran out"
            return f"not enough inodes to restore into {target.path}: {target.work_parent} ran out of them"
    filled = f"not enough space to restore into {target.path}: {target.work_parent} filled up"
    if image.size is None:  # another tool's image: how much it needs was never known
        return filled
    return (
        f"{filled} during the restore, which the entry said needs about "
        f"{format_bytes(_space_needed(image))} (files take whole blocks, other writes may have taken "
        "space, or the entry holds more than it says)"
    )


def _shown_path(name: str, target: RestoreTarget) -> str:
    """A path under a work directory's ``new/`` shown where it will be in the target; any other
    path as it is (the work directory itself, its lock and spool files are real places)."""
    _head, sep, tail = name.partition(target.work_prefix)
    rest = tail.split("/", 2)
    if not sep or len(rest) < 2 or rest[1] != "new":
        return name
    return str(target.path / rest[2]) if len(rest) == 3 else str(target.path)
