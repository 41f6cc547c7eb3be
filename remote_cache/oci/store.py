"""The storage interface shared by a registry repository and an OCI image layout, and how to open one.

Save, restore, list and prune are written against :class:`Store` only, so they work
the same on a registry (``HOST/REPO``) and on a local layout directory (``oci:DIR``).
Every read checks size and digest; a tag moves only through :meth:`Store.put_manifest`.
:func:`open_store` gives the store a parsed reference names; callers never care which kind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import UnsuitableTarget
from .descriptor import Descriptor

# Each kind of store is imported only when asked for: a layout-only run (and the CLI's start-up)
# need not pay for the registry client or obstore.
if TYPE_CHECKING:
    from .certs import TlsOptions
    from .objectstore import ObjectStoreOptions
    from .reference import Reference

__all__ = [
    "DEFAULT_GC_GRACE_SECONDS",
    "REPACK_FIX",
    "Sink",
    "Store",
    "download_by_reading",
    "guarded",
    "open_store",
    "refuse_overlap",
    "sink_failures_as_themselves",
]

#: What mends an entry whose blob is gone or damaged in a store this tool writes (a layout, a
#: bucket): a save that packs again, as a plain save of an unchanged directory trusts the entry.
REPACK_FIX = "`remote-cache save --full` of the directory stores it again"

#: Where a downloaded blob's bytes go: called with each chunk, possibly from a worker thread.
Sink = Callable[[memoryview], None]


class _SinkFailed(Exception):
    """A sink's own failure inside a download (a full disk, a bad digest): its cause is the error
    to raise, never to be taken for the network's. Stores wrap it with :func:`guarded` inside their
    client's call and unwrap it with :func:`sink_failures_as_themselves` outside their translation
    of the client's errors."""


def guarded(sink: Sink) -> Sink:
    """``sink`` with its own failures wrapped in :class:`_SinkFailed`."""

    def call(chunk: memoryview) -> None:
        try:
            sink(chunk)
        except BaseException as exc:
            raise _SinkFailed() from exc

    return call


@contextmanager
def sink_failures_as_themselves() -> Iterator[None]:
    """Around a store's translation of its client's errors: a :class:`_SinkFailed` leaves as the
    sink's own error."""
    try:
        yield
    except _SinkFailed as failed:
        assert failed.__cause__ is not None
        raise failed.__cause__ from failed.__cause__.__cause__


#: A blob a save uploaded or relied on within this many seconds is never collected as garbage: it
#: may belong to a save that has not written its tag yet. Saves must finish within it.
DEFAULT_GC_GRACE_SECONDS = 3600.0


@runtime_checkable
class Store(Protocol):
    """One repository of images: blobs by digest, manifests by digest or tag."""

    #: Human-readable location for messages, e.g. ``localhost:5000/team/cache`` or ``oci:/tmp/l``.
    location: str
    #: A delete removes the manifest, and with it every tag naming it (a registry: the
    #: distribution API deletes by digest); else only the tag deleted (a layout, a bucket).
    deletes_every_tag: bool
    #: The directory on this machine the store keeps everything in (a layout's), else None: no
    #: tree saved or restored may overlap it (:func:`refuse_overlap`).
    local_root: Path | None

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor (media type, digest, size) of the manifest tagged ``tag``.

        Raises CacheMiss when the tag does not exist; other failures raise StoreError subclasses.
        """
        ...

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index by tag or digest; verifies the digest of what it returns."""
        ...

    async def put_manifest(
        self, body: bytes, media_type: str, *, tag: str | None = None, exclusive: bool = False
    ) -> Descriptor:
        """Store a manifest/index (by digest; and under ``tag`` when given). Returns its descriptor.

        ``exclusive``: write the tag only if it does not exist yet, else raise EntryExists (as
        atomically as the store allows: a layout's lock, a bucket's conditional write; a
        registry can only check first).
        """
        ...

    async def has_blob(self, digest: str) -> bool:
        """True when the blob is already stored (lets uploads skip it).

        A store that collects its own garbage (layout, bucket) first marks the blob as just
        relied on, so a sweep running meanwhile spares it.
        """
        ...

    async def rely_on(self, digests: Sequence[str]) -> None:
        """Mark blobs a tag about to be written references without this save having uploaded or
        looked at them (another entry's layers): a store that collects its own garbage (layout,
        bucket) marks them, as :meth:`has_blob` does, and looks at them again once the tag is
        written; a registry keeps what a tag references itself."""
        ...

    def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob's bytes; raises IntegrityError at the end if size or digest differ."""
        ...

    async def download_blob(self, desc: Descriptor, sink: Sink) -> None:
        """Hand a blob's bytes to ``sink``, chunk by chunk, checked as :meth:`read_blob` checks them.

        For big bodies: the store may call ``sink`` from a worker thread that also receives and
        hashes, so the bytes never wait for the event loop (a restore's downloads). ``sink``'s
        own exceptions leave unchanged. :func:`download_by_reading` is the plain way.
        """
        ...

    async def put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        """Store a blob whose digest and size are known. Returns False if it was already there."""
        ...

    async def tags(self) -> list[str]:
        """Every tag in the repository (all pages)."""
        ...

    async def delete(self, reference: str, *, digest: str | None = None) -> None:
        """Delete a manifest by tag or digest (UnsupportedOperation where the store cannot).

        ``digest`` with a tag: only while the tag still names that digest (CacheMiss otherwise:
        the key was saved again since it was looked at).
        """
        ...

    async def aclose(self) -> None:
        """Release connections/files."""
        ...


def refuse_overlap(store: Store, tree: Path, doing: str) -> None:
    """UnsuitableTarget when ``tree`` and the store's own directory overlap: a save would store
    the layout in itself (each entry holding the ones before it), a restore replace it."""
    if store.local_root is None:
        return
    ours, theirs = os.path.realpath(store.local_root), os.path.realpath(tree)
    if os.path.commonpath([ours, theirs]) in (ours, theirs):
        raise UnsuitableTarget(
            f"cannot {doing} {tree}: it and the OCI layout {store.location} overlap (a save would store "
            "the layout in itself, a restore replace it): keep the layout outside the directory"
        )


def open_store(
    reference: Reference,
    *,
    username: str | None = None,
    password: str | None = None,
    plain_http: bool | None = None,
    timeout: float | None = None,
    objects: ObjectStoreOptions | None = None,
    auth_file: Path | None = None,
    tls: TlsOptions | None = None,
) -> Store:
    """A store for ``HOST/REPO`` (credentials resolved as in docker and podman), ``oci:DIR`` (created
    on write) or ``s3://BUCKET/PREFIX`` (and ``gs://``, ``az://``; ``objects`` says how to reach it).

    ``plain_http`` None means plain HTTP for loopback registries only; ``timeout`` is seconds;
    ``auth_file`` is the one credential file to read (``--authfile``) instead of the usual places;
    ``tls`` says how to verify the registry (``--tls-verify``, ``--cert-dir``).
    The reference's key is ignored here. Close the store with ``await store.aclose()``.
    """
    if reference.transport == "object":
        from .objectstore import ObjectStore, ObjectStoreOptions

        return ObjectStore(reference, objects or ObjectStoreOptions())
    if reference.transport == "layout":
        from .layout import LayoutStore

        assert reference.path is not None
        return LayoutStore(Path(reference.path).expanduser())
    from .credentials import resolve_credentials
    from .registry import RegistryStore

    credentials = resolve_credentials(
        reference.host, username=username, password=password, auth_file=auth_file
    )
    return RegistryStore.from_reference(
        reference, credentials=credentials, plain_http=plain_http, timeout=timeout, tls=tls
    )


async def download_by_reading(store: Store, desc: Descriptor, sink: Sink) -> None:
    """:meth:`Store.download_blob` over :meth:`Store.read_blob`, ``sink`` called on the event loop."""
    async for chunk in store.read_blob(desc):
        sink(memoryview(chunk))
