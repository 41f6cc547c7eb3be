"""The storage interface shared by a registry repository and an OCI image layout.

Save, restore, list and prune are written against :class:`Store` only, so they work
the same on a registry (``HOST/REPO``) and on a local layout directory (``oci:DIR``).
Every read checks size and digest; a tag moves only through :meth:`Store.put_manifest`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from .oci import Descriptor

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """One repository of images: blobs by digest, manifests by digest or tag."""

    #: Human-readable location for messages, e.g. ``localhost:5000/team/cache`` or ``oci:/tmp/l``.
    location: str

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor (media type, digest, size) of the manifest tagged ``tag``.

        Raises CacheMiss when the tag does not exist; other failures raise StoreError subclasses.
        """
        ...

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index by tag or digest; verifies the digest of what it returns."""
        ...

    async def put_manifest(self, body: bytes, media_type: str, *, tag: str | None = None) -> Descriptor:
        """Store a manifest/index (by digest; and under ``tag`` when given). Returns its descriptor."""
        ...

    async def has_blob(self, digest: str) -> bool:
        """True when the blob is already stored (lets uploads skip it)."""
        ...

    def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob's bytes; raises IntegrityError at the end if size or digest differ."""
        ...

    async def put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        """Store a blob whose digest and size are known. Returns False if it was already there."""
        ...

    async def tags(self) -> list[str]:
        """Every tag in the repository (all pages)."""
        ...

    async def delete(self, reference: str) -> None:
        """Delete a manifest by tag or digest (UnsupportedOperation where the store cannot)."""
        ...

    async def aclose(self) -> None:
        """Release connections/files."""
        ...
