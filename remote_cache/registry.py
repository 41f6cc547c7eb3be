"""A registry repository as a :class:`~remote_cache.store.Store` (OCI distribution spec v1.1).

Endpoints used (https://github.com/opencontainers/distribution-spec/blob/main/spec.md):
``GET /v2/`` (ping), ``HEAD|GET|PUT|DELETE /v2/<name>/manifests/<ref>``,
``HEAD|GET /v2/<name>/blobs/<digest>``, ``POST /v2/<name>/blobs/uploads/`` (+ ``?mount=``),
``PATCH``/``PUT`` on the upload location, ``GET /v2/<name>/tags/list?n=`` with ``Link`` pages.

Every read is verified: manifests against the digest asked for or announced, blobs against their
descriptor's size and sha256 while streaming. Many transfers may run concurrently on one store.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin

import httpx

from .credentials import Credentials
from .errors import (
    CacheMiss,
    ImageFormatError,
    IntegrityError,
    InvalidReference,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    UnsupportedOperation,
)
from .oci import MANIFEST_ACCEPT, BlobCheck, Descriptor, check_digest, sha256_digest, verify_bytes
from .reference import Reference
from .transport import RegistryTransport, Timeouts, unreachable

__all__ = ["DEFAULT_CHUNK_SIZE", "MAX_MANIFEST_BYTES", "RegistryStore"]

#: Upload chunk size, and the size above which a file is uploaded in chunks (PATCH) rather than
#: in one PUT. 32 MiB keeps memory bounded while staying far from per-request overheads.
DEFAULT_CHUNK_SIZE = 32 << 20
#: Largest manifest we read; registries commonly cap manifests at 4 MiB.
MAX_MANIFEST_BYTES = 16 << 20
_DIGEST_REF = re.compile(r"sha256:[a-f0-9]{64}")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_RETRYABLE_STATUS = frozenset({0, 408, 429, 500, 502, 503, 504})
_INTEGRITY_CODES = frozenset({"DIGEST_INVALID", "SIZE_INVALID"})


def _is_digest(reference: str) -> bool:
    return _DIGEST_REF.fullmatch(reference) is not None


class RegistryStore:
    """One repository on an OCI registry, e.g. ``localhost:5000/team/cache``.

    ``plain_http`` defaults to plain HTTP for loopback hosts only; ``timeout`` is seconds per
    phase (or :class:`~remote_cache.transport.Timeouts`); ``retries`` bounds retries of each
    request and of each whole blob upload. ``chunk_size`` sets when and how files upload in
    chunks. ``mount_from`` names a repository on the same registry to mount blobs from.
    """

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
        client: httpx.AsyncClient | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_connections: int = 16,
        mount_from: str | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.host = host
        self.repository = repository
        self.location = f"{host}/{repository}"
        self.chunk_size = chunk_size
        self.mount_from = mount_from
        self.retries = max(0, retries)
        self._transport = transport or RegistryTransport(
            host,
            credentials=credentials,
            plain_http=plain_http,
            timeout=timeout,
            retries=retries,
            client=client,
            max_connections=max_connections,
        )
        self._pull = f"repository:{repository}:pull"
        self._push = f"repository:{repository}:pull,push"
        self._self_mount = True  # see put_blob; off once the registry refuses it

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

    # -- ping ------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Check that the registry answers and accepts our credentials (``GET /v2/``)."""
        await self._transport.request("GET", "/v2/", action=f"reach registry {self.host}")

    # -- manifests ---------------------------------------------------------------------------

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor of the manifest under ``tag`` (or digest); CacheMiss when there is none."""
        what = f"resolve {self.location}:{tag}" if not _is_digest(tag) else f"resolve {self.location}@{tag}"
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
        length = response.headers.get("Content-Length")
        if digest and media_type and length is not None and _is_digest(digest):
            return Descriptor(media_type=media_type, digest=digest, size=int(length))
        desc, _body = await self.get_manifest(tag)
        return desc

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Fetch a manifest by tag or digest, verifying its digest; CacheMiss when absent."""
        what = f"read manifest {self.location}:{reference}"
        async with self._transport.stream(
            "GET",
            self._path("manifests", reference),
            scopes=[self._pull],
            action=what,
            headers={"Accept": MANIFEST_ACCEPT},
            ok=(200, 404),
        ) as response:
            if response.status_code == 404:
                raise CacheMiss(reference, self.location)
            chunks: list[bytes] = []
            total = 0
            try:
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > MAX_MANIFEST_BYTES:
                        raise ImageFormatError(
                            f"manifest {self.location}:{reference} is larger than {MAX_MANIFEST_BYTES} bytes"
                        )
                    chunks.append(chunk)
            except httpx.HTTPError as exc:
                raise unreachable(self.host, exc, timeouts=self._transport.timeouts) from exc
            body = b"".join(chunks)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            announced = response.headers.get("Docker-Content-Digest")
        digest = sha256_digest(body)
        if _is_digest(reference):
            verify_bytes(body, reference)
        if announced and _is_digest(announced) and announced != digest:
            raise IntegrityError(
                f"manifest {self.location}:{reference} has digest {digest}, but the registry said {announced}"
            )
        if not media_type or media_type in ("application/json", "text/plain"):
            media_type = _media_type_from_body(body) or media_type
        return Descriptor(media_type=media_type, digest=digest, size=len(body)), body

    async def put_manifest(self, body: bytes, media_type: str, *, tag: str | None = None) -> Descriptor:
        """Store a manifest; under ``tag`` when given (the registry keeps it by digest too)."""
        digest = sha256_digest(body)
        ref = tag if tag is not None else digest
        response = await self._transport.request(
            "PUT",
            self._path("manifests", ref),
            scopes=[self._push],
            action=f"push manifest {self.location}:{ref}",
            headers={"Content-Type": media_type},
            content=body,
            ok=(200, 201, 202),
        )
        announced = response.headers.get("Docker-Content-Digest")
        if announced and _is_digest(announced) and announced != digest:
            raise IntegrityError(
                f"registry {self.host} stored manifest {ref} as {announced}, but its digest is {digest}"
            )
        return Descriptor(media_type=media_type, digest=digest, size=len(body))

    async def delete(self, reference: str) -> None:
        """Delete the manifest under a tag or digest (every tag pointing at it goes too)."""
        digest = reference if _is_digest(reference) else (await self.resolve(reference)).digest
        try:
            response = await self._transport.request(
                "DELETE",
                self._path("manifests", digest),
                scopes=[f"repository:{self.repository}:delete", self._push],
                action=f"delete {self.location}:{reference}",
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
        found: list[str] = []
        for _page in range(100_000):
            response = await self._transport.request(
                "GET",
                path,
                scopes=[self._pull],
                action=f"list tags of {self.location}",
                params=params,
                ok=(200, 404),
            )
            if response.status_code == 404:
                return found
            try:
                data = response.json()
                found.extend(str(t) for t in (data.get("tags") or []))
            except (ValueError, AttributeError, TypeError) as exc:
                raise RegistryError(
                    f"registry {self.host} sent an unreadable tag list for {self.location}"
                ) from exc
            match = _LINK_NEXT.search(response.headers.get("Link", ""))
            if not match:
                return found
            path = urljoin(str(response.url), match.group(1))
            params = None
        raise RegistryError(f"registry {self.host} sent endless tag pages for {self.location}")

    # -- blobs -------------------------------------------------------------------------------

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
        """Stream a blob; a broken download resumes with ``Range``; IntegrityError on mismatch."""
        check_digest(desc.digest)
        check = BlobCheck(desc, f"from {self.location}")
        failures = 0
        while True:
            received = check.seen
            # The digest is of the stored bytes: ask for them as they are (and Range counts them).
            headers = {"Accept-Encoding": "identity"}
            if received:
                headers["Range"] = f"bytes={received}-"
            try:
                async with self._transport.stream(
                    "GET",
                    self._path("blobs", desc.digest),
                    scopes=[self._pull],
                    action=f"read blob {desc.digest} from {self.location}",
                    headers=headers,
                    ok=(200, 206),
                ) as response:
                    skip = received if response.status_code == 200 else 0
                    # A proxy may still compress the answer: then decode it (as httpx would).
                    encoded = response.headers.get("Content-Encoding", "identity") != "identity"
                    try:
                        async for chunk in response.aiter_bytes() if encoded else response.aiter_raw():
                            if skip:
                                cut = min(skip, len(chunk))
                                chunk, skip = chunk[cut:], skip - cut
                                if not chunk:
                                    continue
                            check.update(chunk)
                            yield chunk
                    except httpx.HTTPError as exc:
                        raise unreachable(self.host, exc, timeouts=self._transport.timeouts) from exc
                break
            except RegistryUnreachable:
                failures += 1
                if failures > self.retries or check.seen >= desc.size:
                    raise
                await asyncio.sleep(self._transport.backoff_delay(failures - 1, None))
        check.finish()

    async def put_blob(
        self, desc: Descriptor, source: bytes | Path, *, mount_from: str | None = None
    ) -> bool:
        """Upload a blob unless present; mount it from ``mount_from`` when possible.

        ``bytes`` and files up to ``chunk_size`` go in one PUT; larger files in PATCH chunks.
        A failed upload is restarted (up to ``retries`` times) after checking the blob did not
        land anyway. Returns False when the blob was already there.

        Without another repository to mount from, the upload starts with a mount request from
        this repository itself: one request that answers 201 when the blob is here already and
        otherwise opens the upload session (a registry that cannot mount must answer 202,
        distribution spec), instead of a HEAD and then a POST.
        """
        check_digest(desc.digest)
        if isinstance(source, bytes) and len(source) != desc.size:
            raise IntegrityError(
                f"blob {desc.digest}: {len(source)} bytes given, descriptor says {desc.size}"
            )
        origin = mount_from or self.mount_from
        if origin == self.repository:
            origin = None
        if origin is not None and await self.has_blob(desc.digest):
            return False
        for attempt in range(self.retries + 1):
            try:
                return await self._upload(desc, source, origin)
            except (RegistryUnreachable, RegistryError) as exc:
                if isinstance(exc, RegistryError) and exc.code in _INTEGRITY_CODES:
                    raise IntegrityError(
                        f"registry {self.host} rejected blob {desc.digest}: the content does not match "
                        f"its digest/size ({exc.code})"
                    ) from exc
                retryable = (
                    isinstance(exc, RegistryUnreachable)
                    or exc.status in _RETRYABLE_STATUS
                    or (exc.code == "BLOB_UPLOAD_UNKNOWN")
                )
                if not retryable or attempt == self.retries:
                    raise
                if await self.has_blob(desc.digest):
                    return True
                await asyncio.sleep(self._transport.backoff_delay(attempt, None))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _upload(self, desc: Descriptor, source: bytes | Path, origin: str | None) -> bool:
        """Mount or upload; False when a mount from this repository found the blob here."""
        response = await self._start_upload(desc, origin)
        if response.status_code == 201:
            return origin is not None  # mounted from origin, or already here
        location = self._upload_location(response)
        if isinstance(source, bytes):
            await self._finish(location, desc, source)
            return True
        if desc.size <= self.chunk_size:
            data = await asyncio.to_thread(source.read_bytes)
            if len(data) != desc.size:
                raise IntegrityError(f"{source} is {len(data)} bytes, descriptor says {desc.size}")
            await self._finish(location, desc, data)
            return True
        offset = 0
        with source.open("rb") as handle:
            while offset < desc.size:
                chunk = await asyncio.to_thread(handle.read, min(self.chunk_size, desc.size - offset))
                if not chunk:
                    raise IntegrityError(f"{source} is shorter than the {desc.size} bytes of {desc.digest}")
                response = await self._transport.request(
                    "PATCH",
                    location,
                    scopes=[self._push],
                    action=f"upload {desc.digest} to {self.location}",
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    },
                    content=chunk,
                    ok=(202,),
                    retry=False,
                )
                offset += len(chunk)
                location = self._upload_location(response)
        await self._finish(location, desc, b"")
        return True

    async def _start_upload(self, desc: Descriptor, origin: str | None) -> httpx.Response:
        """POST an upload: a mount from ``origin``, else a presence check and upload (put_blob).

        201 means mounted from ``origin``, or (without one) that the blob is here already.
        """
        if origin is not None:
            return await self._post_upload(desc, [self._push, f"repository:{origin}:pull"], origin)
        if self._self_mount:
            try:
                return await self._post_upload(desc, [self._push], self.repository)
            except RegistryAuthError:
                # Pull-only credentials: a HEAD can still say the blob is here (and then no
                # push is needed); otherwise the refusal stands.
                if await self.has_blob(desc.digest):
                    return httpx.Response(201)
                raise
            except RegistryError as exc:
                if exc.status not in (400, 404, 405):
                    raise
                # It refuses mounts outright instead of answering 202: HEAD + POST from now on.
                self._self_mount = False
        if await self.has_blob(desc.digest):
            return httpx.Response(201)
        return await self._post_upload(desc, [self._push], None)

    async def _post_upload(self, desc: Descriptor, scopes: list[str], mount: str | None) -> httpx.Response:
        return await self._transport.request(
            "POST",
            self._path("blobs", "uploads") + "/",
            scopes=scopes,
            action=f"start upload of {desc.digest} to {self.location}",
            params={"mount": desc.digest, "from": mount} if mount else None,
            ok=(201, 202),
        )

    async def _finish(self, location: str, desc: Descriptor, data: bytes) -> None:
        url = httpx.URL(location).copy_merge_params({"digest": desc.digest})
        await self._transport.request(
            "PUT",
            str(url),
            scopes=[self._push],
            action=f"upload {desc.digest} to {self.location}",
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            ok=(201, 204),
            retry=False,
        )

    def _upload_location(self, response: httpx.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(
                f"registry {self.host} started an upload for {self.location} without a Location header"
            )
        return urljoin(str(response.url), str(location))


def _media_type_from_body(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        return None
    return str(value) if isinstance(value, str) else None
