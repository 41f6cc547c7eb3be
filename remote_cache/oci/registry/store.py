"""A registry repository as a :class:`~remote_cache.oci.store.Store` (OCI distribution spec v1.1).

Endpoints used (https://github.com/opencontainers/distribution-spec/blob/main/spec.md):
``GET /v2/`` (ping), ``HEAD|GET|PUT|DELETE /v2/<name>/manifests/<ref>``,
``HEAD|GET /v2/<name>/blobs/<digest>``, ``GET /v2/<name>/tags/list?n=`` with ``Link`` pages, and
the upload endpoints of :mod:`.upload`.

Every read is verified: manifests against the digest asked for or announced, blobs against their
descriptor's size and sha256 while streaming. Many transfers may run concurrently on one store.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ...errors import (
    CacheMiss,
    EntryExists,
    IntegrityError,
    InvalidReference,
    RegistryError,
    StoreError,
    UnsupportedOperation,
)
from ..certs import TlsOptions
from ..credentials import Credentials
from ..descriptor import Descriptor, own_media_type, parse_json
from ..digest import BlobCheck, check_digest, is_digest, sha256_digest, verify_bytes
from ..media import MANIFEST_ACCEPT
from ..reference import Reference
from ..store import Sink
from .threaded import WireAnswer
from .timeouts import Timeouts
from .transport import RegistryTransport
from .upload import DEFAULT_CHUNK_SIZE, Uploader

__all__ = ["RegistryStore"]

_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


#: Tags a listing reads at most (a registry could page without end).
_MAX_TAGS = 1_000_000


class RegistryStore:
    """One repository on an OCI registry, e.g. ``localhost:5000/team/cache``.

    ``plain_http`` defaults to plain HTTP for loopback hosts only; ``timeout`` is seconds per
    phase (or :class:`~remote_cache.oci.registry.timeouts.Timeouts`); ``retries`` bounds retries
    of each request, of each download's resumptions and of each upload's restarts.
    ``chunk_size`` sets when and how files upload in chunks. ``mount_from`` names a repository
    on the same registry to mount blobs from. ``tls``: certificate verification and certificate
    directories (``--tls-verify``, ``--cert-dir``).
    """

    deletes_every_tag = True  # see Store
    local_root: Path | None = None  # see Store

    def __init__(
        self,
        host: str,
        repository: str,
        *,
        credentials: Credentials | None = None,
        plain_http: bool | None = None,
        timeout: float | Timeouts | None = None,
        retries: int = 3,
        transport: RegistryTransport | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        mount_from: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.host = host
        self.repository = repository
        self.location = f"{host}/{repository}"
        self.mount_from = mount_from
        self._transport = transport or RegistryTransport(
            host,
            credentials=credentials,
            plain_http=plain_http,
            timeout=timeout,
            retries=retries,
            tls=tls,
        )
        self._pull = f"repository:{repository}:pull"
        self._push = f"repository:{repository}:pull,push"
        self._uploader = Uploader(
            self._transport, repository, self.location, self.has_blob, chunk_size=chunk_size
        )

    @classmethod
    def from_reference(cls, ref: Reference, **kwargs: Any) -> RegistryStore:
        """The store for a parsed ``HOST/REPO[:KEY]`` reference (its key is ignored here)."""
        if ref.transport != "registry":
            raise InvalidReference(f"{ref} is an OCI layout, not a registry repository")
        store = cls(ref.host, ref.repository, **kwargs)
        store.location = ref.location
        return store

    @property
    def transport(self) -> RegistryTransport:
        """The HTTP layer (shared connection pool, auth state)."""
        return self._transport

    async def __aenter__(self) -> RegistryStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._transport.aclose()

    def _path(self, kind: str, ref: str = "") -> str:
        return f"/v2/{self.repository}/{kind}/{ref}"

    async def ping(self) -> None:
        """Check that the registry answers and accepts our credentials (``GET /v2/``)."""
        await self._transport.request("GET", "/v2/", action=f"reach registry {self.host}")

    # -- manifests ---------------------------------------------------------------------------

    def _named(self, reference: str) -> str:
        """``REPO@DIGEST`` or ``REPO:TAG``, as a message names a manifest."""
        return f"{self.location}{'@' if is_digest(reference) else ':'}{reference}"

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor of the manifest under ``tag`` (or digest); CacheMiss when there is none."""
        what = f"resolve {self._named(tag)}"
        response = await self._transport.request(
            "HEAD",
            self._path("manifests", tag),
            scopes=[self._pull],
            action=what,
            headers={"Accept": MANIFEST_ACCEPT},
            ok=(200, 404),
        )
        if response.status_code == 404:
            raise CacheMiss(tag, self.location)
        digest = response.headers.get("Docker-Content-Digest")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        length = response.headers.get("Content-Length", "")
        if digest and media_type and length.isascii() and length.isdigit() and is_digest(digest):
            return Descriptor(media_type=media_type, digest=digest, size=int(length))
        desc, _body = await self.get_manifest(tag)  # (a HEAD answer short of these, read by GET)
        return desc

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Fetch a manifest by tag or digest, verifying its digest; CacheMiss when absent."""
        what = f"manifest {self._named(reference)}"
        response = await self._transport.request(
            "GET",
            self._path("manifests", reference),
            scopes=[self._pull],
            action=f"read {what}",
            headers={"Accept": MANIFEST_ACCEPT},
            ok=(200, 404),
            what=what,
        )
        if response.status_code == 404:
            raise CacheMiss(reference, self.location)
        body = response.body
        digest = sha256_digest(body)
        if is_digest(reference):
            verify_bytes(body, reference)
        announced = response.headers.get("Docker-Content-Digest")
        if announced and is_digest(announced) and announced != digest:
            raise IntegrityError(f"{what} has digest {digest}, but the registry said {announced}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type in ("application/json", "text/plain"):
            media_type = own_media_type(body) or media_type
        return Descriptor(media_type=media_type, digest=digest, size=len(body)), body

    async def put_manifest(
        self, body: bytes, media_type: str, *, tag: str | None = None, exclusive: bool = False
    ) -> Descriptor:
        """Store a manifest; under ``tag`` when given (the registry keeps it by digest too).

        ``exclusive``: only if the tag does not exist yet. The distribution API has no
        conditional write, so this checks first: two writers at the same moment can both write.
        """
        if exclusive and tag is not None:
            try:
                await self.resolve(tag)
            except CacheMiss:
                pass
            else:
                raise EntryExists(tag, self.location)
        digest = sha256_digest(body)
        ref = tag if tag is not None else digest
        response = await self._transport.request(
            "PUT",
            self._path("manifests", ref),
            scopes=[self._push],
            action=f"push manifest {self._named(ref)}",
            headers={"Content-Type": media_type},
            content=body,
            ok=(200, 201, 202),
        )
        announced = response.headers.get("Docker-Content-Digest")
        if announced and is_digest(announced) and announced != digest:
            raise IntegrityError(
                f"registry {self.host} stored manifest {ref} as {announced}, but its digest is {digest}"
            )
        return Descriptor(media_type=media_type, digest=digest, size=len(body))

    async def delete(self, reference: str, *, digest: str | None = None) -> None:
        """Delete the manifest under a tag or digest (every tag pointing at it goes too); with
        ``digest``, that manifest: a tag saved again since names another, which stays."""
        if digest is None:
            digest = reference if is_digest(reference) else (await self.resolve(reference)).digest
        try:
            response = await self._transport.request(
                "DELETE",
                self._path("manifests", digest),
                scopes=[f"repository:{self.repository}:delete", self._push],
                action=f"delete {self._named(reference)}",
                ok=(200, 202, 404),
            )
        except RegistryError as exc:
            if exc.status == 405 or exc.code == "UNSUPPORTED":
                raise UnsupportedOperation(
                    f"registry {self.host} does not allow deleting manifests ({exc.status} {exc.code}); "
                    "registries such as ttl.sh expire tags by name instead (there a key like 1h or 24h "
                    "is the entry's lifetime), others have their own retention policies, and "
                    "self-hosted ones need deletes enabled (registry:2: REGISTRY_STORAGE_DELETE_ENABLED=true)"
                ) from exc
            raise
        if response.status_code == 404:
            raise CacheMiss(reference, self.location)

    async def tags(self, *, page_size: int | None = None) -> list[str]:
        """Every tag in the repository, following ``Link`` pages; [] when the repository is new."""
        params = {"n": str(page_size)} if page_size else None
        path = self._path("tags", "list")
        found: dict[str, None] = {}  # in order, each once
        pages: set[str] = set()
        while True:
            response = await self._transport.request(
                "GET", path, scopes=[self._pull], action=f"list tags of {self.location}", params=params,
                ok=(200, 404),
            )  # fmt: skip
            if response.status_code == 404:
                return list(found)
            known = len(found)
            found.update(dict.fromkeys(self._page_tags(response)))
            match = _LINK_NEXT.search(response.headers.get("Link", ""))
            if not match:
                return list(found)
            page = f"the next page of the tags of {self.location}"
            path, params = self._transport.resolve(response.url, match.group(1), page), None
            # A page named twice, or one that brought no new tag, would go on for ever: a listing
            # that stops short is no answer either (prune would rank what it saw), so it fails.
            if len(found) > _MAX_TAGS:
                raise RegistryError(
                    f"registry {self.host} lists more than {_MAX_TAGS} tags for {self.location}; "
                    "a cache repository that large is not supported"
                )
            if path in pages or len(found) == known:
                raise RegistryError(
                    f"registry {self.host} sent tag pages for {self.location} that never end (the "
                    f"page after {len(found)} tags repeats what it sent); list the tags with another tool"
                )
            pages.add(path)

    def _page_tags(self, response: WireAnswer) -> list[str]:
        try:
            return [str(t) for t in (parse_json(response.body).get("tags") or [])]
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryError(
                f"registry {self.host} sent an unreadable tag list for {self.location}"
            ) from exc

    # -- blobs -------------------------------------------------------------------------------

    async def rely_on(self, digests: Sequence[str]) -> None:
        """Nothing to do: a registry keeps the blobs a manifest references (see Store.rely_on)."""

    async def has_blob(self, digest: str) -> bool:
        """True when the repository already has the blob (``HEAD``)."""
        response = await self._transport.request(
            "HEAD",
            self._path("blobs", digest),
            scopes=[self._pull],
            action=f"check blob {digest} in {self.location}",
            ok=(200, 404),
        )
        return response.status_code == 200

    async def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """A blob's bytes, fetched whole by :meth:`download_blob` (so checked, resumed and retried
        alike) and then handed out: this serves documents (an image's config); bodies go through
        :meth:`download_blob`, which never holds them."""
        parts: list[bytes] = []
        await self.download_blob(desc, lambda chunk: parts.append(bytes(chunk)))
        for part in parts:
            yield part

    async def download_blob(self, desc: Descriptor, sink: Sink) -> None:
        """A blob's body into ``sink`` from a worker thread (see :mod:`.threaded`), checked; a broken
        download resumes with ``Range`` under the transport's retry policy."""
        check_digest(desc.digest)
        check = BlobCheck(desc.digest, desc.size, f"from {self.location}")

        attempt = 0
        while True:
            try:
                await self._transport.fetch_body(
                    self._path("blobs", desc.digest),
                    scopes=[self._pull],
                    action=f"read blob {desc.digest} from {self.location}",
                    offset=check.seen,
                    sink=check.feeding(sink),
                )
                break
            except StoreError as exc:  # retried and resumed as one: answers, cuts, stalls
                if check.seen >= desc.size:
                    break  # the whole body arrived before the failure: finish() judges it
                await self._transport.retry.pause(attempt, exc)
                attempt += 1
        check.finish()

    async def put_blob(
        self, desc: Descriptor, source: bytes | Path, *, mount_from: str | None = None
    ) -> bool:
        """Upload a blob unless present, mounting it from ``mount_from`` when possible.

        ``bytes`` and files up to the chunk size go in one PUT; larger files in PATCH chunks.
        Returns False when the blob was already there (see :mod:`.upload`).
        """
        check_digest(desc.digest)
        return await self._uploader.put(desc, source, mount_from or self.mount_from)
