"""Restore a cache entry from any :class:`~remote_cache.store.Store` into a directory, atomically.

Layers download concurrently into spool files next to the target while a worker thread extracts
them in order from those same files as they grow (layer 1 extracts while later layers download).
Extraction goes into a staging directory beside the target, which replaces the target only when
every layer was verified and extracted. Any failure (integrity, unsafe archive, network) discards
the staging directory and leaves the target exactly as it was.

A missing key raises :class:`~remote_cache.errors.CacheMiss`; callers (the CLI) map it to their
"miss" exit code. It is never confused with other failures.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import anyio
import anyio.to_thread

from .entries import find_entry
from .errors import CacheMiss, RemoteCacheError
from .image import ANNOTATION_LISTING, CacheImage, load_image, read_diff_ids
from .keys import validate_key
from .oci import Descriptor
from .save import first_error, human_bytes
from .state import LayerRecord, RestoreWindow, clock_ns, dir_id, settle, write_window
from .store import Store
from .unpack import Extractor, ExtractStats, discard_dir, replace_dir, staging_dir

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
        """One line for humans."""
        how = "hit" if self.status == "hit" else f"fallback hit (from {self.matched_key!r})"
        return (
            f"{how}: restored {self.key!r} from {self.tag}@{self.digest[:19]}: {self.files} files, "
            f"{human_bytes(self.size)}; downloaded {human_bytes(self.bytes)} "
            f"({self.layers} layers) in {self.seconds:.1f}s"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


class _GrowingFile:
    """A read-only file object over a spool file another task is still writing.

    ``read`` blocks (in the extraction thread) until data arrives, the writer finishes, or fails;
    EOF is only reported once the download completed and was verified, so an extractor can never
    "finish" a truncated or corrupted layer.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._cond = threading.Condition()
        self._written = 0
        self._read = 0
        self._done = False
        self._error: BaseException | None = None

    # writer side (event loop thread)
    def wrote(self, n: int) -> None:
        with self._cond:
            self._written += n
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    # reader side (extraction thread)
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._cond:
            while True:
                if self._error is not None:
                    raise _Aborted() from self._error
                available = self._written - self._read
                if available > 0 or self._done:
                    break
                self._cond.wait()
        if available == 0:
            return b""
        want = available if size is None or size < 0 else min(size, available)
        data = self._fh.read(want)
        self._read += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()


def _caused_by_abort(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, _Aborted):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class _Aborted(Exception):
    """The download feeding an extraction failed; the real error is raised by the downloader."""


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
    see :func:`~remote_cache.entries.find_entry`); CacheMiss when nothing matches.
    ``progress`` is called with each downloaded chunk's size. ``record_state`` (default) then
    records, in this machine's state (:mod:`remote_cache.state`), the image's layers and the
    window during which they were extracted (no scan), so the next save of ``path`` can reuse
    those whose files were not touched since, unread.
    """
    started = time.monotonic()
    validate_key(key)
    path = Path(path)
    match = await find_entry(store, key, restore_keys)
    if match is None:
        raise CacheMiss(key, store.location)
    tag = match.tag
    try:
        image: CacheImage = await load_image(store, match.digest)
    except CacheMiss as exc:  # replaced or deleted between the lookup and now
        raise CacheMiss(key, store.location) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(path)
    spool = Path(tempfile.mkdtemp(prefix=".remote-cache-spool-", dir=path.parent))
    limiter = anyio.Semaphore(max(1, jobs))
    downloaded = [0]
    feeds: list[_GrowingFile] = []
    ok = False
    try:
        for i, _layer in enumerate(image.layers):
            part = spool / f"layer-{i}"
            part.touch()
            feeds.append(_GrowingFile(part))

        async def download(desc: Descriptor, feed: _GrowingFile, part: Path) -> None:
            try:
                async with limiter:
                    # Unbuffered writes straight from the loop: a chunk is at most a socket
                    # read, and a thread hop per chunk cost more than the write itself.
                    with open(part, "wb", buffering=0) as out:
                        async for chunk in store.read_blob(desc):
                            view = memoryview(chunk)
                            while view:
                                view = view[out.write(view) or 0 :]
                            feed.wrote(len(chunk))
                            downloaded[0] += len(chunk)
                            if progress is not None:
                                progress(len(chunk))
            except BaseException as exc:
                feed.finish(exc)
                raise
            feed.finish()

        def layers() -> Iterator[tuple[BinaryIO, str]]:
            # Iterated in the extractor's decompression thread, which runs ahead into the next
            # layer while the current one is written out.
            for i, (desc, feed) in enumerate(zip(image.layers, feeds, strict=True)):
                yield cast(BinaryIO, feed), desc.media_type
                feed.close()  # fully read and verified: free the disk as we go
                (spool / f"layer-{i}").unlink(missing_ok=True)

        def extract() -> ExtractStats:
            with Extractor(staging) as extractor:
                extractor.add_layers(layers())
                return extractor.finish()

        async def fetch_diff_ids() -> None:
            if record_state:
                with contextlib.suppress(RemoteCacheError):
                    diff_ids.extend(await read_diff_ids(store, image))

        async def extract_task() -> None:
            try:
                stats[0] = await anyio.to_thread.run_sync(extract)
            except BaseException as exc:
                if _caused_by_abort(exc):
                    return  # the failing download raises the real error in the task group
                raise

        stats: list[ExtractStats | None] = [None]
        diff_ids: list[str] = []
        # Every file the extraction writes gets a ctime at or after this.
        window_start = clock_ns()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch_diff_ids)
                for i, (desc, feed) in enumerate(zip(image.layers, feeds, strict=True)):
                    tg.start_soon(download, desc, feed, spool / f"layer-{i}")
                tg.start_soon(extract_task)
        except BaseExceptionGroup as group:
            raise first_error(group, ignore=(_Aborted,)) from None
        window: RestoreWindow | None = None
        if record_state and diff_ids and (stats[0] is None or not stats[0].whiteouts):
            # Before the swap, while the staging directory is still private: every extracted
            # file's ctime is then before the window's end, every later change's at or after it.
            window = await anyio.to_thread.run_sync(_window, staging, image, diff_ids, window_start)
        await anyio.to_thread.run_sync(replace_dir, staging, path)
        ok = True
    finally:
        for feed in feeds:
            # Wake an extraction thread still waiting on a feed (the task group was cancelled).
            feed.finish(None if ok else _Aborted())
            feed.close()
        await anyio.to_thread.run_sync(discard_dir, spool)
        if not ok:
            await anyio.to_thread.run_sync(discard_dir, staging)
    if window is not None:
        await anyio.to_thread.run_sync(write_window, path, window)
    size, files = _stats(stats[0], image)
    return RestoreResult(
        key=key,
        tag=tag,
        digest=image.digest,
        bytes=downloaded[0],
        size=size,
        files=files,
        seconds=time.monotonic() - started,
        layers=len(image.layers),
        status="hit" if match.exact else "fallback",
        matched_key=match.key,
    )


def _window(staging: Path, image: CacheImage, diff_ids: Sequence[str], start_ns: int) -> RestoreWindow | None:
    """The restore window to record for the finished ``staging`` directory, if any.

    Only layers with a portable listing annotation (saved by us, not racy) can be matched by a
    later save. None when there are none, or the directory cannot be identified.
    """
    layers: dict[tuple[str, str], LayerRecord] = {}
    for desc, diff_id in zip(image.layers, diff_ids, strict=False):
        listing = desc.annotations.get(ANNOTATION_LISTING)
        if listing:
            rec = LayerRecord(desc.media_type, desc.digest, desc.size, diff_id)
            layers.setdefault((listing, desc.media_type), rec)
    if not layers or len(diff_ids) != len(image.layers):
        return None
    end_ns = settle(time.time_ns())
    try:
        root = dir_id(staging)
    except OSError:
        return None
    return RestoreWindow(start_ns, end_ns, root, layers)


def _stats(stats: ExtractStats | None, image: CacheImage) -> tuple[int, int]:
    """(uncompressed bytes, files) as extracted; the image's annotations if unknown."""
    if stats is None:
        return image.size or 0, image.files or 0
    return stats.bytes, stats.files
