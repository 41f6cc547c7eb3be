"""Blob uploads to a registry repository: mount or check, then one PUT or PATCH chunks and a PUT.

Endpoints (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-blobs):
``POST /v2/<name>/blobs/uploads/`` (with ``?mount=<digest>&from=<repo>`` to mount), ``PATCH`` and
``PUT ?digest=`` on the ``Location`` it answers with.

Without another repository to mount from, an upload starts with a mount request from the
repository itself: one request that answers 201 when the blob is here already and otherwise
opens the upload session (a registry that cannot mount must answer 202), instead of a HEAD and
then a POST. Registries that refuse such mounts outright (400/404/405) get HEAD + POST from then
on; pull-only credentials (401/403) fall back to a HEAD, which can still find the blob present.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread

from ...errors import IntegrityError, RegistryAuthError, RegistryError, StoreError
from ..descriptor import Descriptor
from .threaded import WireAnswer
from .transport import RegistryTransport

__all__ = ["DEFAULT_CHUNK_SIZE", "Uploader"]

#: Upload chunk size, and the size above which a file is uploaded in chunks (PATCH) rather than
#: in one PUT. 32 MiB keeps memory bounded while staying far from per-request overheads.
DEFAULT_CHUNK_SIZE = 32 << 20
_INTEGRITY_CODES = frozenset({"DIGEST_INVALID", "SIZE_INVALID"})


class Uploader:
    """Uploads blobs into one repository (see the module docstring)."""

    def __init__(
        self,
        transport: RegistryTransport,
        repository: str,
        location: str,
        has_blob: Callable[[str], Awaitable[bool]],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._transport = transport
        self._repository = repository
        self._location = location
        self._has_blob = has_blob
        self.chunk_size = chunk_size
        self._push = f"repository:{repository}:pull,push"
        self._self_mount = True  # off once the registry refuses it

    async def put(self, desc: Descriptor, source: bytes | Path, origin: str | None) -> bool:
        """Upload unless present (mount from ``origin`` when given); False when it was already here.

        A failed upload starts over (within the transport's retry budget) after checking that the
        blob did not land anyway.
        """
        if isinstance(source, bytes) and len(source) != desc.size:
            raise IntegrityError(
                f"blob {desc.digest}: {len(source)} bytes given, descriptor says {desc.size}"
            )
        if origin == self._repository:
            origin = None
        if origin is not None and await self._has_blob(desc.digest):
            return False
        attempt = 0
        while True:
            try:
                return await self._upload(desc, source, origin)
            except RegistryError as exc:
                if exc.code in _INTEGRITY_CODES:
                    raise IntegrityError(
                        f"registry {self._transport.host} rejected blob {desc.digest}: the content does "
                        f"not match its digest/size ({exc.code})"
                    ) from exc
                await self._transport.retry.pause(attempt, exc)
            except StoreError as exc:
                await self._transport.retry.pause(attempt, exc)
            attempt += 1
            if await self._has_blob(desc.digest):
                return True

    async def _upload(self, desc: Descriptor, source: bytes | Path, origin: str | None) -> bool:
        """Mount or upload; False when a mount from this repository found the blob here."""
        location = await self._start(desc, origin)
        if location is None:
            return origin is not None  # mounted from origin, or already here
        if isinstance(source, bytes):
            await self._finish(location, desc, source)
        elif desc.size <= self.chunk_size:
            data = await anyio.to_thread.run_sync(source.read_bytes)
            if len(data) != desc.size:
                raise IntegrityError(f"{source} is {len(data)} bytes, descriptor says {desc.size}")
            await self._finish(location, desc, data)
        else:
            await self._finish(await self._patch_chunks(location, desc, source), desc, b"")
        return True

    async def _patch_chunks(self, location: str, desc: Descriptor, source: Path) -> str:
        """PATCH the file in ``chunk_size`` pieces; the location to finish the upload at."""
        offset = 0
        with source.open("rb") as handle:
            while offset < desc.size:
                chunk = await anyio.to_thread.run_sync(handle.read, min(self.chunk_size, desc.size - offset))
                if not chunk:
                    raise IntegrityError(f"{source} is shorter than the {desc.size} bytes of {desc.digest}")
                response = await self._transport.request(
                    "PATCH",
                    location,
                    scopes=[self._push],
                    action=f"upload {desc.digest} to {self._location}",
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    },
                    content=chunk,
                    ok=(202,),
                    retry=False,
                )
                offset += len(chunk)
                location = self._next_location(response)
        return location

    async def _start(self, desc: Descriptor, origin: str | None) -> str | None:
        """Open an upload session: its location, or None when the blob is here (or was mounted)."""
        if origin is not None:
            return await self._post(desc, [self._push, f"repository:{origin}:pull"], origin)
        if self._self_mount:
            try:
                return await self._post(desc, [self._push], self._repository)
            except RegistryAuthError:
                # Pull-only credentials: a HEAD can still say the blob is here (then no push is
                # needed); otherwise the refusal stands.
                if await self._has_blob(desc.digest):
                    return None
                raise
            except RegistryError as exc:
                if exc.status not in (400, 404, 405):
                    raise
                self._self_mount = False  # it refuses mounts instead of answering 202
        if await self._has_blob(desc.digest):
            return None
        return await self._post(desc, [self._push], None)

    async def _post(self, desc: Descriptor, scopes: list[str], mount: str | None) -> str | None:
        response = await self._transport.request(
            "POST",
            f"/v2/{self._repository}/blobs/uploads/",
            scopes=scopes,
            action=f"start upload of {desc.digest} to {self._location}",
            params={"mount": desc.digest, "from": mount} if mount else None,
            ok=(201, 202),
        )
        return None if response.status_code == 201 else self._next_location(response)

    async def _finish(self, location: str, desc: Descriptor, data: bytes) -> None:
        await self._transport.request(
            "PUT",
            location,
            params={"digest": desc.digest},  # after the Location's own (opaque) query
            scopes=[self._push],
            action=f"upload {desc.digest} to {self._location}",
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            ok=(201, 204),
            retry=False,
        )

    def _next_location(self, response: WireAnswer) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(
                f"registry {self._transport.host} started an upload for {self._location} without a "
                "Location header"
            )
        return self._transport.resolve(
            response.url, location, f"the Location of an upload for {self._location}"
        )
