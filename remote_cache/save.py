"""Save a directory as a cache image under a key, into any :class:`~remote_cache.store.Store`.

Order matters for safety: layers first (skipping those the store has), then configs and
per-platform manifests by digest, and only then the index under the tag. A save that fails
anywhere before the last step leaves the previous entry under that key untouched. Packing
runs in worker threads and overlaps with uploading: layer 1 uploads while layer 2 is packed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .errors import RemoteCacheError
from .image import DEFAULT_PLATFORMS, MAX_MANIFEST_BYTES, BuiltImage, build_image, parse_index, parse_manifest
from .keys import tag_for_key, validate_key
from .layers import TreeScan, scan_tree
from .oci import (
    ANNOTATION_FILES,
    ANNOTATION_KEY,
    ANNOTATION_SIZE,
    INDEX_TYPES,
    Descriptor,
    Platform,
)
from .pack import pack_tree
from .store import Store

__all__ = ["CacheTooLarge", "SaveResult", "first_error", "human_bytes", "save"]


class CacheTooLarge(RemoteCacheError):
    """The directory is larger than the ``max_size`` the caller allowed; nothing was uploaded."""

    def __init__(self, path: Path, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(
            f"{path} holds {human_bytes(size)} ({size} bytes), more than the allowed "
            f"{human_bytes(max_size)} ({max_size} bytes); nothing was uploaded. Raise the limit "
            "or clean the directory first"
        )


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

    def summary(self) -> str:
        """One line for humans."""
        state = "unchanged" if self.unchanged else "saved"
        return (
            f"{state} {self.key!r} as {self.tag}@{self.digest[:19]}: {self.files} files, "
            f"{human_bytes(self.size)}; uploaded {human_bytes(self.bytes_uploaded)} of "
            f"{human_bytes(self.bytes_total)} ({self.layers_uploaded}/{self.layers_total} layers) "
            f"in {self.seconds:.1f}s"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


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
    """The current digest under ``tag`` when it already holds exactly this content, else None."""
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
        for manifest in manifests:
            mdesc, mbody = await store.get_manifest(manifest.digest)
            parsed = parse_manifest(mbody, mdesc.media_type or manifest.media_type)
            if [(d.digest, d.size, d.media_type) for d in parsed.layers] != [
                (d.digest, d.size, d.media_type) for d in layers
            ]:
                return None
            if not await store.has_blob(parsed.config.digest):
                return None
    except RemoteCacheError:
        # Anything unreadable (a miss, a foreign image) simply means "not the same": save anew.
        return None
    return current.digest


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
) -> SaveResult:
    """Pack ``path`` and store it under ``key``; the tag moves only once everything else is stored.

    ``progress`` is called with a byte count each time a layer has been uploaded or found present.
    ``max_size`` (uncompressed bytes) refuses with :class:`CacheTooLarge` before anything is uploaded.
    Saving content identical to what the key already holds pushes nothing and keeps the digest.
    """
    started = time.monotonic()
    validate_key(key)
    tag = tag_for_key(key)
    path = Path(path)
    scan = await anyio.to_thread.run_sync(scan_tree, path)
    size, files = scan.stats.bytes, scan.stats.files
    if max_size is not None and size > max_size:
        raise CacheTooLarge(path, size, max_size)

    spool = Path(tempfile.mkdtemp(prefix="remote-cache-save-"))
    iterator = _layers(scan, compression, level, spool)
    layers: list[_Layer] = []
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
            while True:
                layer = await anyio.to_thread.run_sync(next, iterator, None)
                if layer is None:
                    break
                layers.append(layer)
                tg.start_soon(upload, layer)
        descriptors = [layer.descriptor for layer in layers]
        existing = await _same_entry(store, tag, key, descriptors, size, files, platforms)
        if existing is not None:
            return SaveResult(
                key=key,
                tag=tag,
                digest=existing,
                layers_total=len(layers),
                layers_uploaded=counters["uploaded"],
                bytes_total=sum(d.size for d in descriptors),
                bytes_uploaded=counters["bytes"],
                size=size,
                files=files,
                seconds=time.monotonic() - started,
                unchanged=True,
            )
        image: BuiltImage = build_image(
            descriptors,
            [layer.diff_id for layer in layers],
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
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        await anyio.to_thread.run_sync(iterator.close)
        await anyio.to_thread.run_sync(shutil.rmtree, spool, True)
    return SaveResult(
        key=key,
        tag=tag,
        digest=index.digest,
        layers_total=len(layers),
        layers_uploaded=counters["uploaded"],
        bytes_total=sum(d.size for d in descriptors),
        bytes_uploaded=counters["bytes"],
        size=size,
        files=files,
        seconds=time.monotonic() - started,
    )


async def _put_manifest(store: Store, body: bytes, media_type: str) -> None:
    await store.put_manifest(body, media_type)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
