"""A :class:`~remote_cache.store.Store` over a local OCI image-layout directory (``oci:DIR``).

The directory is a standard OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``),
readable by ``skopeo``/``umoci`` as ``oci:DIR:TAG``: a tag is the ``org.opencontainers.image.ref.name``
annotation of an ``index.json`` entry. Every write is atomic (temporary file + rename); the
read-modify-write of ``index.json`` happens under an ``flock`` on ``index.json.lock``, so several
processes can save into one layout. Blobs are verified (size and digest) on every read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .errors import CacheMiss, ImageFormatError, IntegrityError, StoreError
from .oci import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, BlobCheck, Descriptor, check_digest, sha256_digest

__all__ = ["REF_NAME", "LayoutStore"]

#: The annotation that names (tags) an entry of ``index.json``.
REF_NAME = "org.opencontainers.image.ref.name"
_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1024 * 1024
_MAX_JSON = 4 * 1024 * 1024
_T = TypeVar("_T")


def _is_digest(reference: str) -> bool:
    return reference.startswith("sha256:")


class LayoutStore:
    """An OCI image layout on the local filesystem, created on first write."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = f"oci:{self.root}"

    def __repr__(self) -> str:
        return f"LayoutStore({str(self.root)!r})"

    # -- paths and low-level helpers ------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        try:
            check_digest(digest)
        except ImageFormatError as exc:
            raise StoreError(str(exc)) from exc
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        try:
            return await anyio.to_thread.run_sync(func, *args)
        except PermissionError as exc:
            raise StoreError(
                f"permission denied writing {self.location} ({exc.filename}): check the directory's owner "
                "and mode"
            ) from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise StoreError(f"cannot use the OCI layout {self.location}: {exc}") from exc

    def _ensure_layout(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            self._atomic_write(marker, _LAYOUT_VERSION)
        if not (self.root / "index.json").exists():
            with self._locked():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "index.json.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read_index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); the layout is damaged") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise StoreError(f"{path} is not an OCI image index; the layout is damaged")
        obj.setdefault("manifests", [])
        return obj

    def _write_index(self, obj: dict[str, Any]) -> None:
        self._atomic_write(self.root / "index.json", json.dumps(obj, indent=2).encode() + b"\n")

    def _entries(self) -> list[dict[str, Any]]:
        return [m for m in self._read_index()["manifests"] if isinstance(m, dict)]

    @staticmethod
    def _tag_of(entry: dict[str, Any]) -> str | None:
        ann = entry.get("annotations") or {}
        name = ann.get(REF_NAME) if isinstance(ann, dict) else None
        return str(name) if name is not None else None

    # -- Store ----------------------------------------------------------------------------

    async def resolve(self, tag: str) -> Descriptor:
        """Descriptor of the manifest named ``tag`` in ``index.json``; CacheMiss when absent."""
        entries = await self._run(self._entries)
        for entry in reversed(entries):  # the last one wins if a foreign tool left duplicates
            if self._tag_of(entry) == tag:
                desc = Descriptor.from_json(entry)
                return Descriptor(desc.media_type, desc.digest, desc.size)
        raise CacheMiss(tag, self.location)

    def _read_small(self, digest: str) -> bytes:
        path = self._blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheMiss(digest, self.location) from None
        if size > _MAX_JSON:
            raise ImageFormatError(f"manifest {digest} in {self.location} is {size} bytes; too large")
        return path.read_bytes()

    async def get_manifest(self, reference: str) -> tuple[Descriptor, bytes]:
        """Read a manifest by tag or digest, verifying its digest."""
        media_type = ""
        if _is_digest(reference):
            digest = reference
            for entry in await self._run(self._entries):
                if entry.get("digest") == digest:
                    media_type = str(entry.get("mediaType", ""))
        else:
            desc = await self.resolve(reference)
            digest, media_type = desc.digest, desc.media_type
        body = await self._run(self._read_small, digest)
        actual = sha256_digest(body)
        if actual != digest:
            raise IntegrityError(
                f"manifest {digest} in {self.location} has digest {actual}: the layout is corrupted"
            )
        try:
            own = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            own = None
        if isinstance(own, str) and (own in MANIFEST_TYPES or own in INDEX_TYPES):
            media_type = own
        return Descriptor(media_type, digest, len(body)), body

    async def put_manifest(self, body: bytes, media_type: str, *, tag: str | None = None) -> Descriptor:
        """Store a manifest blob, then (when ``tag`` is given) point the tag at it atomically."""
        desc = Descriptor(media_type, sha256_digest(body), len(body))
        await self.put_blob(desc, body)
        if tag is not None:
            await self._run(self._set_tag, desc, tag)
        return desc

    def _set_tag(self, desc: Descriptor, tag: str) -> None:
        self._ensure_layout()
        with self._locked():
            index = self._read_index()
            kept = [m for m in index["manifests"] if not (isinstance(m, dict) and self._tag_of(m) == tag)]
            entry = Descriptor(desc.media_type, desc.digest, desc.size, annotations={REF_NAME: tag})
            kept.append(entry.to_json())
            index["manifests"] = kept
            index.setdefault("schemaVersion", 2)
            self._write_index(index)

    def _has_blob(self, digest: str) -> bool:
        path = self._blob_path(digest)
        try:
            # Refresh the mtime: a concurrent gc() spares recently touched blobs, so a save that
            # reuses this blob (and has not tagged yet) cannot lose it.
            os.utime(path)
            return True
        except FileNotFoundError:
            return False
        except PermissionError:
            return path.exists()

    async def has_blob(self, digest: str) -> bool:
        """True when the blob file exists."""
        return await self._run(self._has_blob, digest)

    async def read_blob(self, desc: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob, checking size and digest; IntegrityError at the end on mismatch."""
        path = self._blob_path(desc.digest)
        try:
            fh = await anyio.open_file(path, "rb")
        except FileNotFoundError:
            raise StoreError(
                f"blob {desc.digest} is missing from {self.location}: the layout is incomplete; "
                "save the entry again"
            ) from None
        check = BlobCheck(desc, f"in {self.location}")
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

    def _put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        path = self._blob_path(desc.digest)
        if self._has_blob(desc.digest):
            return False
        self._ensure_layout()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            hasher = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
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
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if size != desc.size or actual != desc.digest:
                raise IntegrityError(
                    f"refusing to store blob {desc.digest} ({desc.size} bytes): the content is "
                    f"{actual} ({size} bytes)"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    async def put_blob(self, desc: Descriptor, source: bytes | Path) -> bool:
        """Store a blob atomically after verifying it; False when it was already present."""
        return await self._run(self._put_blob, desc, source)

    async def tags(self) -> list[str]:
        """Every ``ref.name`` in ``index.json``."""
        entries = await self._run(self._entries)
        return sorted({t for t in (self._tag_of(e) for e in entries) if t is not None})

    def _delete(self, reference: str) -> None:
        if not (self.root / "index.json").exists():
            raise CacheMiss(reference, self.location)
        with self._locked():
            index = self._read_index()
            manifests = [m for m in index["manifests"] if isinstance(m, dict)]
            if _is_digest(reference):
                kept = [m for m in manifests if m.get("digest") != reference]
            else:
                kept = [m for m in manifests if self._tag_of(m) != reference]
            if len(kept) == len(manifests):
                raise CacheMiss(reference, self.location)
            index["manifests"] = kept
            self._write_index(index)

    async def delete(self, reference: str) -> None:
        """Remove the ``index.json`` entry for a tag (or every entry for a digest).

        Blobs stay until :meth:`gc`; CacheMiss when nothing matched.
        """
        await self._run(self._delete, reference)

    async def aclose(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    # -- garbage collection ---------------------------------------------------------------

    def _reachable(self) -> set[str]:
        seen: set[str] = set()
        stack = [str(m.get("digest")) for m in self._entries()]
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            path = self._blob_path(digest)
            try:
                if path.stat().st_size > _MAX_JSON:
                    continue
                obj = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if not isinstance(obj, dict):
                continue
            children: list[Any] = []
            for name in ("manifests", "layers", "blobs"):
                value = obj.get(name)
                if isinstance(value, list):
                    children.extend(value)
            for name in ("config", "subject"):
                if isinstance(obj.get(name), dict):
                    children.append(obj[name])
            for child in children:
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    stack.append(child["digest"])
        return seen

    def _gc(self, grace: float) -> tuple[int, int]:
        blobs = self.root / "blobs" / "sha256"
        if not blobs.is_dir():
            return 0, 0
        removed = freed = 0
        now = time.time()
        with self._locked():
            keep = {d.removeprefix("sha256:") for d in self._reachable()}
            for path in blobs.iterdir():
                if path.name in keep:
                    continue
                try:
                    st = path.stat()
                    if now - st.st_mtime < grace:
                        continue  # possibly part of a save that has not tagged yet
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
                freed += st.st_size
        return removed, freed

    async def gc(self, *, grace_seconds: float = 900.0) -> tuple[int, int]:
        """Delete blobs no tagged entry references; returns (blobs removed, bytes freed).

        Blobs (and temporary files) touched in the last ``grace_seconds`` are kept, since they
        may belong to a save in progress that has not moved its tag yet.
        """
        return await self._run(self._gc, grace_seconds)
