"""A :class:`~remote_cache.oci.store.Store` over a local OCI image-layout directory (``oci:DIR``).

The directory is a standard OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``),
readable by ``skopeo``/``umoci`` as ``oci:DIR:TAG``: a tag is the ``org.opencontainers.image.ref.name``
annotation of an ``index.json`` entry. Writes are atomic and ``index.json`` changes under a lock
(:mod:`.directory`); blobs are verified (size and digest) on every read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ...errors import (
    BlobsSwept,
    BlobUnreadable,
    BrokenEntry,
    CacheMiss,
    EntryExists,
    ImageFormatError,
    IntegrityError,
    NoSpace,
    StoreError,
)
from ..descriptor import Descriptor, own_media_type, reached_through
from ..digest import BlobCheck, is_digest, sha256_digest
from ..media import ANNOTATION_REF_NAME, DOCUMENT_TYPES, MAX_DOCUMENT_BYTES
from ..store import DEFAULT_GC_GRACE_SECONDS, REPACK_FIX, Sink
from .directory import LayoutDirectory, atomic_file, open_regular, read_regular, tag_of, unreadable_reason
from .gc import collect_garbage

__all__ = ["LayoutStore"]

#: What stands in a blob's place when opening it fails so: a directory, a link looping or
#: leading through a file (a FIFO, device or socket is refused before opening).
_NOT_A_FILE = frozenset((errno.EISDIR, errno.ELOOP, errno.ENOTDIR))

_CHUNK = 1024 * 1024
_T = TypeVar("_T")


def _holds(path: Path, digest: str) -> bool:
    """Whether the blob file at ``path`` has ``digest``: one changed in place is written again (a
    local read of a blob the save has just packed itself; what REPACK_FIX promises)."""
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest() == digest
    except (OSError, StoreError):
        return False


class LayoutStore:
    """An OCI image layout on the local filesystem, created on first write."""

    deletes_every_tag = False  # see Store

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.local_root: Path | None = self.root
        self.location = f"oci:{self.root}"
        self._dir = LayoutDirectory(self.root)
        self._reused: set[str] = set()  # blobs found present, to look at again once a tag is written
        self._written: dict[str, bytes] = {}  # documents this store wrote, by digest

    def __repr__(self) -> str:
        return f"LayoutStore({str(self.root)!r})"

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run blocking file work in a thread; OS errors become StoreError (a missing file stays)."""
        try:
            return await anyio.to_thread.run_sync(func, *args)
        except PermissionError as exc:
            # Reads and writes alike come here: say what each needs rather than guess which it was.
            raise StoreError(
                f"permission denied on {self.location} ({exc.filename}): this user must be able to read "
                "the layout, and to write it to save, rm or prune: check the directory's owner and mode"
            ) from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            if exc.errno == errno.ENOSPC:
                raise NoSpace(
                    f"not enough space for the OCI layout {self.location} ({exc.strerror}): free some on "
                    "its filesystem, or remove entries (`remote-cache prune`)"
                ) from exc
            raise StoreError(f"cannot use the OCI layout {self.location}: {exc}") from exc

    # -- manifests and tags ----------------------------------------------------------------

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor of the manifest named ``tag`` in ``index.json``; CacheMiss when absent."""
        entries = await self._run(self._dir.entries)
        for entry in reversed(entries):  # the last one wins if a foreign tool left duplicates
            if tag_of(entry) == tag:
                desc = Descriptor.from_json(entry)
                return Descriptor(desc.media_type, desc.digest, desc.size)
        raise CacheMiss(tag, self.location)

    def _read_small(self, digest: str) -> bytes:
        path = self._dir.blob_path(digest)
        try:
            body = read_regular(path, MAX_DOCUMENT_BYTES)
        except FileNotFoundError:
            raise CacheMiss(digest, self.location) from None
        except PermissionError as exc:
            raise BlobUnreadable(digest, self.location, unreadable_reason(exc)) from exc
        except (OSError, StoreError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _NOT_A_FILE:
                raise  # the system's trouble (EIO, EMFILE, ...), not this blob's
            fix = "put the blob's file back in its place"
            raise BlobUnreadable(digest, self.location, unreadable_reason(exc), fix) from exc
        if body is None:
            raise ImageFormatError(
                f"manifest {digest} in {self.location} is larger than {MAX_DOCUMENT_BYTES} bytes; too large"
            )
        return body

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Read a manifest by tag or digest, verifying its digest."""
        media_type = ""
        if is_digest(reference):
            digest = reference
            for entry in await self._run(self._dir.entries):
                if entry.get("digest") == digest:
                    media_type = str(entry.get("mediaType", ""))
        else:
            desc = await self.resolve(reference)
            digest, media_type = desc.digest, desc.media_type
        try:
            body = await self._run(self._read_small, digest)
        except CacheMiss as exc:
            if is_digest(reference):
                raise
            # The tag is in index.json, its document not in blobs/: an entry, broken.
            raise BrokenEntry(reference, self.location, f"document {digest}") from exc
        actual = sha256_digest(body)
        if actual != digest:
            raise IntegrityError(
                f"manifest {digest} in {self.location} has digest {actual}: the layout is corrupted"
            )
        own = own_media_type(body)
        if own in DOCUMENT_TYPES:
            media_type = own
        return Descriptor(media_type, digest, len(body)), body

    async def put_manifest(
        self, body: bytes, media_type: str, *, tag: str | None = None, exclusive: bool = False
    ) -> Descriptor:
        """Store a manifest blob, then (when ``tag`` is given) point the tag at it atomically.

        ``exclusive``: only if the tag does not exist yet (checked under the index lock).
        """
        desc = Descriptor(media_type, sha256_digest(body), len(body))
        await self.put_blob(desc, body)
        self._written[desc.digest] = body
        if tag is not None:
            await self._run(self._set_tag, desc, tag, exclusive)
            await self._run(self._check_reused, body)
        return desc

    def _check_reused(self, top: bytes) -> None:
        """After a tag write: the blobs it reaches that this store found present (rather than
        wrote) must still be there. A sweep that looked at one just before this save marked it
        may delete it just after; BlobsSwept then (the save packs again). What the tag reaches
        is read from the documents this store wrote, not from the layout's files."""
        reused = reached_through(top, self._written) & self._reused
        gone = sorted(d for d in reused if not self._dir.blob_path(d).exists())
        if gone:
            raise BlobsSwept(gone, self.location)

    def _set_tag(self, desc: Descriptor, tag: str, exclusive: bool) -> None:
        self._dir.ensure()
        with self._dir.locked():
            index = self._dir.read_index()
            if exclusive and any(isinstance(m, dict) and tag_of(m) == tag for m in index["manifests"]):
                raise EntryExists(tag, self.location)
            kept = [m for m in index["manifests"] if not (isinstance(m, dict) and tag_of(m) == tag)]
            entry = Descriptor(
                desc.media_type, desc.digest, desc.size, annotations={ANNOTATION_REF_NAME: tag}
            )
            kept.append(entry.to_json())
            index["manifests"] = kept
            index.setdefault("schemaVersion", 2)
            self._dir.write_index(index)

    async def tags(self) -> list[str]:
        """Every ``ref.name`` in ``index.json``."""
        entries = await self._run(self._dir.entries)
        return sorted({t for t in (tag_of(e) for e in entries) if t is not None})

    def _delete(self, reference: str, digest: str | None) -> None:
        if not (self.root / "index.json").exists():
            raise CacheMiss(reference, self.location)
        with self._dir.locked():
            index = self._dir.read_index()
            manifests = [m for m in index["manifests"] if isinstance(m, dict)]
            if is_digest(reference):
                kept = [m for m in manifests if m.get("digest") != reference]
            else:
                named = [m for m in manifests if tag_of(m) == reference]
                # The last of a tag's entries is the one read (a foreign tool may list a tag
                # twice): when it is what the caller read, the tag goes, duplicates and all.
                if digest is not None and named and named[-1].get("digest") != digest:
                    raise CacheMiss(reference, self.location)
                kept = [m for m in manifests if tag_of(m) != reference]
            if len(kept) == len(manifests):
                raise CacheMiss(reference, self.location)
            index["manifests"] = kept
            self._dir.write_index(index)

    async def delete(self, reference: str, *, digest: str | None = None) -> None:
        """Remove the ``index.json`` entry for a tag (or every entry for a digest); with ``digest``,
        the tag's only while it names that digest (checked under the index lock).

        Blobs stay until :meth:`gc`; CacheMiss when nothing matched.
        """
        await self._run(self._delete, reference, digest)

    # -- blobs -----------------------------------------------------------------------------

    def _has_blob(self, digest: str, size: int | None = None) -> bool:
        path = self._dir.blob_path(digest)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return False  # a link (or worse): a save writes the blob over it, nothing elsewhere
            if size is not None and st.st_size != size:
                return False  # cut short (or grown): a save writes it again
            # Refresh the mtime: a concurrent gc() spares recently touched blobs, so a save that
            # reuses this blob (and has not tagged yet) cannot lose it.
            os.utime(path, follow_symlinks=False)
            self._reused.add(digest)
            return True
        except FileNotFoundError:
            return False
        except PermissionError:
            return path.exists()

    async def has_blob(self, digest: str) -> bool:
        """True when the blob file exists."""
        return await self._run(self._has_blob, digest)

    async def rely_on(self, digests: Sequence[str]) -> None:
        """Mark blobs a tag about to be written references (see Store.rely_on): checked after it."""
        await self._run(self._rely_on, list(digests))

    def _rely_on(self, digests: list[str]) -> None:
        for digest in digests:
            self._reused.add(digest)  # a missing one is found by the check after the tag write
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._dir.blob_path(digest), follow_symlinks=False)

    async def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob, checking size and digest; IntegrityError at the end on mismatch."""
        path = self._dir.blob_path(desc.digest)
        try:
            fh = await anyio.open_file(await self._run(open_regular, path), "rb")
        except FileNotFoundError:
            raise self._missing(desc) from None
        check = self._check(desc)
        try:
            while True:
                chunk = await fh.read(_CHUNK)
                if not chunk:
                    break
                check.update(chunk)
                yield chunk
        finally:
            await fh.aclose()
        check.finish()

    async def download_blob(self, desc: Descriptor, sink: Sink) -> None:
        """A blob's bytes into ``sink`` from a worker thread (``readinto``, no event-loop hop per
        chunk), checked as :meth:`read_blob` checks them."""
        await anyio.to_thread.run_sync(self._download, desc, sink)

    def _download(self, desc: Descriptor, sink: Sink) -> None:
        check = self._check(desc)
        try:
            fh = open(open_regular(self._dir.blob_path(desc.digest)), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            raise self._missing(desc) from None
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        checked = check.feeding(sink)
        with fh:
            while n := fh.readinto(buffer):
                checked(view[:n])
        check.finish()

    def _check(self, desc: Descriptor) -> BlobCheck:
        """The check of a blob read from here (a save writes a damaged one again: REPACK_FIX)."""
        return BlobCheck(desc.digest, desc.size, f"in {self.location}", REPACK_FIX)

    def _missing(self, desc: Descriptor) -> StoreError:
        return StoreError(
            f"blob {desc.digest} is missing from {self.location}: the layout is incomplete; {REPACK_FIX}"
        )

    def _put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        path = self._dir.blob_path(desc.digest)
        if self._has_blob(desc.digest, desc.size) and _holds(path, desc.digest):
            return False
        self._dir.ensure()
        hasher = hashlib.sha256()
        size = 0
        with atomic_file(path) as out:
            if isinstance(source, bytes):
                out.write(source)
                hasher.update(source)
                size = len(source)
            else:
                with open(source, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        hasher.update(chunk)
                        size += len(chunk)
            actual = "sha256:" + hasher.hexdigest()
            if size != desc.size or actual != desc.digest:
                raise IntegrityError(
                    f"refusing to store blob {desc.digest} ({desc.size} bytes): the content is "
                    f"{actual} ({size} bytes)"
                )
        return True

    async def put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        """Store a blob atomically after verifying it; False when it was already present."""
        return await self._run(self._put_blob, desc, source)

    async def aclose(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    async def gc(self, *, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> tuple[int, int]:
        """Delete blobs no tagged entry references; returns (blobs removed, bytes freed).

        Blobs (and temporary files) touched in the last ``grace_seconds`` are kept, since they
        may belong to a save in progress that has not moved its tag yet.
        """
        return await self._run(collect_garbage, self._dir, grace_seconds)
