"""The files of an OCI image layout: ``oci-layout``, ``index.json`` under a lock, ``blobs/sha256/``.

Every write is atomic (a temporary file in the same directory, fsynced, then renamed); the
read-modify-write of ``index.json`` happens under an ``flock`` on ``index.json.lock``, so several
processes can write into one layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ...errors import ImageFormatError, StoreError
from ..digest import check_digest
from ..media import ANNOTATION_REF_NAME, OCI_INDEX

__all__ = ["LayoutDirectory", "atomic_file", "tag_of"]

_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new content into; it replaces ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


class LayoutDirectory:
    """Paths, the index and its lock of one layout root (blocking I/O: call from a worker thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        """``blobs/sha256/<hex>``; StoreError for a malformed digest."""
        try:
            check_digest(digest)
        except ImageFormatError as exc:
            raise StoreError(str(exc)) from exc
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def ensure(self) -> None:
        """Create the layout (``blobs/sha256``, ``oci-layout``, an empty ``index.json``) if missing."""
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            with atomic_file(marker) as fh:
                fh.write(_LAYOUT_VERSION)
        if not (self.root / "index.json").exists():
            with self.locked():
                if not (self.root / "index.json").exists():
                    self.write_index(_empty_index())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the layout's index lock (an exclusive ``flock``) for a read-modify-write."""
        with open(self.root / "index.json.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def read_index(self) -> dict[str, Any]:
        """``index.json`` (an empty index when absent); StoreError when it is damaged."""
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _empty_index()
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); the layout is damaged") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise StoreError(f"{path} is not an OCI image index; the layout is damaged")
        obj.setdefault("manifests", [])
        return obj

    def write_index(self, obj: dict[str, Any]) -> None:
        with atomic_file(self.root / "index.json") as fh:
            fh.write(json.dumps(obj, indent=2).encode() + b"\n")

    def entries(self) -> list[dict[str, Any]]:
        """The manifest descriptors listed in ``index.json``, as JSON objects."""
        return [m for m in self.read_index()["manifests"] if isinstance(m, dict)]


def tag_of(entry: dict[str, Any]) -> str | None:
    """The ``ref.name`` annotation of an ``index.json`` entry, if it has one."""
    ann = entry.get("annotations") or {}
    name = ann.get(ANNOTATION_REF_NAME) if isinstance(ann, dict) else None
    return str(name) if name is not None else None
