"""A cache in an object store bucket (S3 and S3-compatible, GCS, Azure) as a :class:`~..store.Store`.

Layout under the reference's prefix (the same images as in a registry, stored as objects)::

    blobs/sha256/<hex>     every blob by digest: layers, configs, manifests, indexes
    tags/<tag>             one small object per key: the entry's index (or manifest) itself
    touched/sha256/<hex>   8 random bytes: when a save last relied on a blob it did not upload
    .remote-cache/...      short-lived probes (conditional writes, the server's clock)

A save uploads blobs first and writes the tag object last, in one atomic PUT, so a failed save
leaves the previous entry whole and many jobs saving different keys never contend. A blob that
exists is not uploaded again. Every read checks size and digest. ``immutable`` saves write the
tag object with ``If-None-Match: *``; a server that ignores the header (s3rver, older MinIO) is
found by a probe (once per store) and gets check-then-write instead, with a warning: there,
``immutable`` holds only for saves that do not overlap. A bucket frees nothing by itself:
:meth:`ObjectStore.gc` (run by ``rm`` and ``prune``) does, see :mod:`.gc`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from ...errors import (
    BlobsSwept,
    CacheMiss,
    EntryExists,
    ImageFormatError,
    IntegrityError,
    StoreAuthError,
    StoreError,
    StoreStalled,
    StoreUnreachable,
)
from ...keys import is_valid_tag
from ...tasks import first_error, for_each
from ..descriptor import Descriptor, own_media_type, reached_through
from ..digest import BlobCheck, check_digest, is_digest, sha256_digest
from ..media import DOCUMENT_TYPES, MAX_DOCUMENT_BYTES, OCI_INDEX
from ..reference import Reference
from ..stalls import Stalls
from ..store import (
    DEFAULT_GC_GRACE_SECONDS,
    REPACK_FIX,
    Sink,
    download_by_reading,
    sink_failures_as_themselves,
)
from .calls import Calls
from .client import build_client
from .errors import NOT_FOUND, RACE_LOST, UNSUPPORTED, refuses_conditional, translated
from .options import ObjectStoreOptions

__all__ = ["ObjectStore"]

log = logging.getLogger("remote_cache")

#: Blobs bigger than this come down as ranged GETs of RANGE_BYTES, RANGE_WINDOW at a time,
#: and go up as multipart uploads of that part size, as many parts at a time.
RANGED_ABOVE = 32 << 20
RANGE_BYTES = 16 << 20
RANGE_WINDOW = 4


class ObjectStore:
    """One cache location in a bucket, e.g. ``s3://ci-caches/team``."""

    deletes_every_tag = False  # see Store
    local_root: Path | None = None  # see Store

    def __init__(
        self,
        reference: Reference,
        options: ObjectStoreOptions | None = None,
    ) -> None:
        self.reference = reference
        self.location = reference.location
        self.options = options or ObjectStoreOptions()
        #: Its own credentials; the environment's and a profile's are added where a message is made.
        self._secrets = (self.options.secret_access_key, self.options.session_token)
        self._stalls = Stalls(self.options.stall_seconds)
        with self._translated("set up the client"):
            client = build_client(reference, self.options)
            uploads = build_client(reference, self.options, uploads=True)
        self._calls = Calls(client, uploads)
        self._conditional: bool | None = None  # does the server honour If-None-Match? (probed once)
        self._reused: set[str] = set()  # blobs found present, to look at again once a tag is written
        self._written: dict[str, bytes] = {}  # manifests written, to walk from a tag without GETs
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"ObjectStore({self.location!r})"

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """obstore's failures as ours (:mod:`.errors`), under the store's stall budget (:mod:`..stalls`)."""
        refusal = self._stalls.refusal(f"cannot {action}: {self.location}")
        if refusal is not None:
            raise StoreUnreachable(refusal, temporary=False)
        try:
            with translated(self.location, action, self._secrets):
                yield
        except StoreStalled as exc:
            # obstore has retried the request within the whole stall budget already (its
            # retry_timeout, see .client): the store has sent nothing for the budget.
            self._stalls.spent()
            raise StoreUnreachable(self._stalls.gave_up(str(exc)), temporary=False) from exc
        self._stalls.progressed()

    @staticmethod
    def _blob_key(digest: str) -> str:
        return "blobs/sha256/" + check_digest(digest).removeprefix("sha256:")

    @staticmethod
    def _touch_key(digest: str) -> str:
        return "touched/sha256/" + check_digest(digest).removeprefix("sha256:")

    @staticmethod
    def _tag_key(tag: str) -> str:
        return f"tags/{tag}"

    # -- small objects -------------------------------------------------------------------------

    async def _read_small(self, key: str, what: str) -> bytes | None:
        """A document's bytes (at most MAX_DOCUMENT_BYTES); None when there is no such object."""
        with self._translated(f"read {what}"):
            try:
                meta = await self._calls.head(key)
                if meta["size"] > MAX_DOCUMENT_BYTES:
                    raise ImageFormatError(f"{what} in {self.location} is {meta['size']} bytes; too large")
                return await self._calls.get(key)
            except NOT_FOUND:
                return None

    async def _check_bucket(self) -> None:
        """A HEAD answers a plain 404 for a missing bucket as for a missing object: before calling
        something a miss, list one key, whose error names the bucket's absence (once per store)."""
        if not self._bucket_checked:
            with self._translated("read the bucket"):
                await self._calls.list_one(".remote-cache/")
            self._bucket_checked = True

    async def _head(self, key: str, what: str) -> dict[str, Any] | None:
        with self._translated(f"check {what}"):
            try:
                return await self._calls.head(key)
            except NOT_FOUND:
                return None

    # -- manifests and tags ----------------------------------------------------------------------

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor of the entry under ``tag`` (its tag object's bytes); CacheMiss when absent."""
        desc, _body = await self.get_manifest(tag)
        return desc

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """A manifest or index by tag or digest, its digest verified; CacheMiss when absent."""
        if is_digest(reference):
            body = await self._read_small(self._blob_key(reference), f"manifest {reference}")
        else:
            body = await self._read_small(self._tag_key(reference), f"tag {reference}")
        if body is None:
            await self._check_bucket()
            raise CacheMiss(reference, self.location)
        digest = sha256_digest(body)
        if is_digest(reference) and digest != reference:
            raise IntegrityError(
                f"manifest {reference} in {self.location} has digest {digest}: it is corrupted"
            )
        return Descriptor(_media_type(body), digest, len(body)), body

    async def put_manifest(
        self, body: bytes, media_type: str, *, tag: str | None = None, exclusive: bool = False
    ) -> Descriptor:
        """Store a manifest by digest; then, with ``tag``, write the tag object (atomically).

        ``exclusive``: only when there is no tag object yet (EntryExists otherwise).
        """
        desc = Descriptor(media_type, sha256_digest(body), len(body))
        await self.put_blob(desc, body)
        self._written[desc.digest] = body
        if tag is not None:
            await self._write_tag(tag, body, media_type, exclusive)
            await self._check_reused(body)
        return desc

    async def _check_reused(self, top: bytes) -> None:
        """After a tag write: the blobs it reaches that this store found present (rather than
        uploaded) must still be there. A sweep that looked at one just before this save marked it
        may delete it just after (its look and its delete are two requests); BlobsSwept then.
        Blobs uploaded by this save are fresh, so no sweep within the grace period touches them."""
        reused = sorted(reached_through(top, self._written) & self._reused)
        gone: list[str] = []

        async def check(digest: str) -> None:
            if await self._head(self._blob_key(digest), f"blob {digest}") is None:
                gone.append(digest)

        await for_each(reused, check, jobs=RANGE_WINDOW * 4)
        if gone:
            raise BlobsSwept(sorted(gone), self.location)

    async def _write_tag(self, tag: str, body: bytes, media_type: str, exclusive: bool) -> None:
        key = self._tag_key(tag)
        attributes = {"Content-Type": media_type}
        if exclusive and not await self._honours_conditional_writes():
            if await self._head(key, f"tag {tag}") is not None:
                raise EntryExists(tag, self.location)
            exclusive = False
        with self._translated(f"write tag {tag}"):
            try:
                await self._calls.put(
                    key, body, attributes=attributes, mode="create" if exclusive else "overwrite"
                )
            except RACE_LOST as exc:
                # The create may have landed with its answer lost, the client's retry then
                # meeting this very tag: that is this save's entry, not another's.
                if await self._read_small(key, f"tag {tag}") != body:
                    raise EntryExists(tag, self.location) from exc

    async def _honours_conditional_writes(self) -> bool:
        """Whether a create-only PUT fails when the object exists (probed on a scratch object)."""
        if self._conditional is None:
            key = f".remote-cache/probe-{secrets.token_hex(8)}"
            with self._translated("probe conditional writes"):
                try:
                    await self._calls.put(key, b"probe", mode="create")
                    await self._calls.put(key, b"probe", mode="create")
                    self._conditional = False
                except RACE_LOST:
                    self._conditional = True
                except UNSUPPORTED:  # switched off in the client
                    self._conditional = False
                except Exception as exc:
                    if not refuses_conditional(exc):  # a 501 from the server: same as ignoring it
                        raise
                    self._conditional = False
                finally:
                    await self._calls.delete(key)
            if not self._conditional:
                log.warning(
                    "%s ignores conditional writes (If-None-Match): immutable keys are checked, then "
                    "written, so two saves of one new key at the same moment can both write",
                    self.location,
                )
        return self._conditional

    async def tags(self) -> list[str]:
        """Every tag (one object each under ``tags/``). An object there that no tag can name (a
        ``.keep`` placeholder) is no entry: not listed, and no sweep stops at it."""
        with self._translated("list tags"):
            pages = await self._calls.list("tags/")
        names = (str(m["path"]).removeprefix("tags/") for m in pages)
        return sorted(name for name in names if is_valid_tag(name))

    async def delete(self, reference: str, *, digest: str | None = None) -> None:
        """Delete the tag object of a tag (or every tag naming a digest); with ``digest``, the tag's
        only if it names that digest when read just before (buckets have no delete-if-unchanged:
        a save landing between the two requests is the window left). Blobs stay until :meth:`gc`."""
        if is_digest(reference):
            doomed = [t for t in await self.tags() if (await self.resolve(t)).digest == reference]
        elif digest is not None:
            doomed = [reference] if (await self.resolve(reference)).digest == digest else []
        else:
            doomed = [reference] if await self._head(self._tag_key(reference), f"tag {reference}") else []
        if not doomed:
            raise CacheMiss(reference, self.location)
        with self._translated(f"delete {reference}"):
            await self._calls.delete([self._tag_key(t) for t in doomed])

    # -- blobs -----------------------------------------------------------------------------------

    async def rely_on(self, digests: Sequence[str]) -> None:
        """Mark blobs a tag about to be written references (see Store.rely_on): a sweep spares
        them, and the tag write looks at them again (``_check_reused``)."""
        self._reused.update(digests)
        await for_each(list(digests), self._touch, jobs=RANGE_WINDOW * 4)

    async def has_blob(self, digest: str) -> bool:
        """True when the blob is stored, marking it as just relied on first (a sweep spares it)."""
        await self._touch(digest)
        present = await self._head(self._blob_key(digest), f"blob {digest}") is not None
        if present:
            self._reused.add(digest)
        return present

    async def _touch(self, digest: str) -> None:
        with self._translated(f"mark blob {digest} as in use"):
            # (Random bytes: a mark written again has another ETag, whatever the clock's resolution.)
            await self._calls.put(self._touch_key(digest), secrets.token_bytes(8))

    async def put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        """Upload a blob unless it is there (then it is marked as relied on); False when it was."""
        key = self._blob_key(desc.digest)
        if isinstance(source, bytes) and len(source) != desc.size:
            raise IntegrityError(
                f"blob {desc.digest}: {len(source)} bytes given, descriptor says {desc.size}"
            )
        if await self._stored_whole(key, desc):
            return False
        attributes = {"Storage-Class": self.options.storage_class} if self.options.storage_class else None
        multipart = desc.size > RANGED_ABOVE
        try:
            with self._translated(f"upload blob {desc.digest}"):
                await self._calls.upload(
                    key,
                    source,
                    attributes=attributes,
                    use_multipart=multipart,
                    chunk_size=RANGE_BYTES,
                    max_concurrency=RANGE_WINDOW,
                )
        except StoreError as exc:
            # Azure keeps one set of uncommitted blocks per blob: another save committing the
            # same blob first leaves this one's commit refused (InvalidBlockList). The blob is
            # the same bytes (its name is their digest): there whole, it is uploaded.
            if not multipart or isinstance(exc, StoreAuthError | StoreUnreachable):
                raise
            with contextlib.suppress(StoreError):  # (a failing second look: the failure stays)
                if await self._stored_whole(key, desc):
                    return False
            raise
        return True

    async def _stored_whole(self, key: str, desc: Descriptor) -> bool:
        """Whether the blob is at ``key`` at its size, then marked as relied on (:meth:`has_blob`);
        one of another size was cut short (it is written again)."""
        there = await self._head(key, f"blob {desc.digest}")
        return there is not None and there["size"] == desc.size and await self.has_blob(desc.digest)

    async def _size_now(self, key: str, desc: Descriptor) -> int | None:
        """The size of the object at ``key`` now, None when absent or unknown: a second look
        after a failure, which then stays the failure to report."""
        with contextlib.suppress(StoreError):
            there = await self._head(key, f"blob {desc.digest}")
            return None if there is None else int(there["size"])
        return None

    async def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob, checking size and digest (IntegrityError at the end on a mismatch).

        Big blobs come as ranged GETs, several in flight; a stream cut short resumes where it
        stopped (obstore does it, within its retries).
        """
        key = self._blob_key(desc.digest)
        check = self._check(desc)
        pieces = self._ranges(key, desc) if desc.size > RANGED_ABOVE else self._stream(key, desc)
        async for chunk in pieces:
            check.update(chunk)
            yield chunk
        check.finish()

    async def download_blob(self, desc: Descriptor, sink: Sink) -> None:
        """A blob's bytes into ``sink``, checked: small blobs streamed in one worker thread (no
        event-loop hop per chunk), big ones as :meth:`read_blob` fetches them (ranges in parallel)."""
        if desc.size > RANGED_ABOVE:
            await download_by_reading(self, desc, sink)
            return
        key = self._blob_key(desc.digest)
        check = self._check(desc)

        with sink_failures_as_themselves(), self._translated(f"read blob {desc.digest}"):
            try:
                await self._calls.stream_into(key, check.feeding(sink))
            except NOT_FOUND:
                raise self._missing(desc) from None
        check.finish()

    async def _stream(self, key: str, desc: Descriptor) -> AsyncIterator[bytes]:
        # No resuming here: obstore resumes a body cut or stalled mid-way itself (a ranged GET
        # from where it stopped, within its retries); a second loop here multiplied the attempts
        # (16 GETs, 48 s for a server stalled under --timeout 2; 4 GETs, 11 s without it).
        with self._translated(f"read blob {desc.digest}"):
            try:
                async for chunk in self._calls.stream(key):
                    yield chunk
            except NOT_FOUND:
                raise self._missing(desc) from None

    async def _ranges(self, key: str, desc: Descriptor) -> AsyncIterator[bytes]:
        """The blob in RANGE_BYTES pieces, fetched RANGE_WINDOW at a time (about that much memory)."""
        starts = list(range(0, desc.size, RANGE_BYTES))
        for first in range(0, len(starts), RANGE_WINDOW):
            window = starts[first : first + RANGE_WINDOW]
            pieces: dict[int, bytes] = {}
            try:
                async with anyio.create_task_group() as tg:
                    for start in window:
                        tg.start_soon(self._fetch_range, key, desc, start, pieces)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            for start in window:
                yield pieces[start]

    async def _fetch_range(self, key: str, desc: Descriptor, start: int, into: dict[int, bytes]) -> None:
        end = min(start + RANGE_BYTES, desc.size)
        try:
            with self._translated(f"read blob {desc.digest}"):
                into[start] = await self._calls.get_range(key, start, end)
        except NOT_FOUND:
            raise self._missing(desc) from None
        except StoreError as exc:
            if isinstance(exc, StoreAuthError | StoreUnreachable):
                raise
            # A range past the end of a blob cut short here is refused (416): say what it is.
            size = await self._size_now(key, desc)
            if size is not None and size != desc.size:
                raise self._check(desc).wrong_size(size) from None
            raise

    def _check(self, desc: Descriptor) -> BlobCheck:
        """The check of a blob read from here: a save writes one of the wrong size again, but one of
        the right size it cannot tell from the right blob without reading it back. Bytes damaged
        on the way (a proxy, a ranged read) look the same as bytes damaged here: deleting a good
        blob would break the entry, so the advice is to read once more first."""
        corrupt = (
            f"bytes damaged on the way look the same: if another try gives the same digest, delete "
            f"{self._blob_key(desc.digest)} under {self.location} and save again"
        )
        return BlobCheck(desc.digest, desc.size, f"in {self.location}", REPACK_FIX, corrupt)

    def _missing(self, desc: Descriptor) -> StoreError:
        return StoreError(
            f"blob {desc.digest} is missing from {self.location}: the entry is incomplete; {REPACK_FIX}"
        )

    async def aclose(self) -> None:
        """Nothing to release: the client holds a connection pool that closes with it."""

    # -- housekeeping ----------------------------------------------------------------------------

    async def gc(self, *, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> tuple[int, int]:
        """Delete blobs no tag references and no save relied on within ``grace_seconds``.

        Returns (blobs removed, bytes freed). See :mod:`.gc`.
        """
        from .gc import collect_garbage

        return await collect_garbage(self, grace_seconds)

    async def server_time(self) -> datetime:
        """The store's own clock (the last-modified time of a scratch object written now)."""
        key = f".remote-cache/clock-{secrets.token_hex(8)}"
        with self._translated("read the store's clock"):
            await self._calls.put(key, b"")
            meta = await self._calls.head(key)
            await self._calls.delete(key)
        moment: datetime = meta["last_modified"]
        return moment

    async def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Digest -> object metadata of the ``blobs/`` or ``touched/`` objects."""
        with self._translated(f"list {prefix}"):
            found = await self._calls.list(prefix)
        named = {"sha256:" + str(m["path"]).removeprefix(prefix): dict(m) for m in found}
        return {digest: meta for digest, meta in named.items() if is_digest(digest)}  # strays stay

    async def head_blob_and_mark(self, digest: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The blob's and its in-use mark's metadata now (None for what is absent)."""
        return (
            await self._head(self._blob_key(digest), f"blob {digest}"),
            await self._head(self._touch_key(digest), f"mark of {digest}"),
        )

    async def remove_blob(self, digest: str) -> None:
        """Delete a blob (its in-use mark stays: see :mod:`.gc`)."""
        with self._translated(f"delete blob {digest}"):
            await self._calls.delete(self._blob_key(digest))

    async def remove_mark(self, digest: str) -> None:
        with self._translated(f"delete the mark of {digest}"):
            await self._calls.delete(self._touch_key(digest))


def _media_type(body: bytes) -> str:
    """The document's own ``mediaType``; an OCI index when it has none we know."""
    value = own_media_type(body)
    return value if value in DOCUMENT_TYPES else OCI_INDEX
