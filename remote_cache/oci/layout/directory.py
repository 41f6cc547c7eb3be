"""The files of an OCI image layout: ``oci-layout``, ``index.json`` under a lock, ``blobs/sha256/``.

Every write is atomic (a temporary file in the same directory, fsynced, then renamed); the
read-modify-write of ``index.json`` happens under an ``flock`` on ``index.json.lock``, so several
processes can write into one layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ...errors import ImageFormatError, StoreError, os_reason
from ..descriptor import parse_json
from ..digest import check_digest
from ..media import ANNOTATION_REF_NAME, OCI_INDEX

__all__ = [
    "MAX_INDEX_BYTES",
    "LayoutDirectory",
    "atomic_file",
    "open_regular",
    "read_regular",
    "sweep_dead_temps",
    "tag_of",
    "unreadable_reason",
]

_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
#: Largest ``index.json`` read (about 250,000 entries).
MAX_INDEX_BYTES = 64 << 20


def open_regular(path: Path) -> int:
    """A descriptor to read ``path``, which must be a regular file (links are followed): a FIFO
    or a device where a layout has a file would make a read wait, or never end. StoreError
    otherwise; FileNotFoundError as it is."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise _NotRegular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # no wait, had it changed since
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotRegular(path)
    return fd


class _NotRegular(StoreError):
    reason = "not a regular file"

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is {self.reason}: the layout is damaged, or not an OCI layout")


def unreadable_reason(exc: Exception) -> str:
    """Why a file of the layout could not be read, in a few words for a message that names it:
    ``not a regular file``, the system's reason (``Permission denied``), else the error's."""
    if isinstance(exc, _NotRegular):
        return exc.reason
    return os_reason(exc)


def read_regular(path: Path, limit: int) -> bytes | None:
    """``path``'s bytes (see :func:`open_regular`); None when it holds more than ``limit``."""
    with os.fdopen(open_regular(path), "rb") as fh:
        data = fh.read(limit + 1)
    return None if len(data) > limit else data


_TEMP_PREFIX = ".tmp-"
#: A temporary file younger than this is never swept (between its creation and its lock).
_TEMP_SETTLE_SECONDS = 60


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new content into; it replaces ``path`` only if the block succeeds.

    The temporary file is locked (``flock``) while it is written: one a killed run left is
    unlocked, and :func:`sweep_dead_temps` removes it."""
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
    lock = os.dup(fd)  # the lock stays held until the file is in place (see sweep_dead_temps)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    finally:
        os.close(lock)


def sweep_dead_temps(directory: Path) -> None:
    """Remove the temporary files in ``directory`` that a killed writer left: unlocked, and older
    than a minute (a live writer locks its file at once). Anything unexpected is left alone."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_TEMP_PREFIX)]
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < _TEMP_SETTLE_SECONDS:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer's
                os.unlink(directory / name)
            finally:
                os.close(fd)


def _empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


class LayoutDirectory:
    """Paths, the index and its lock of one layout root (blocking I/O: call from a worker thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._swept = False  # by the first write (see ensure)

    def blob_path(self, digest: str) -> Path:
        """``blobs/sha256/<hex>``; StoreError for a malformed digest."""
        try:
            check_digest(digest)
        except ImageFormatError as exc:
            raise StoreError(str(exc)) from exc
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def ensure(self) -> None:
        """Create the layout (``blobs/sha256``, ``oci-layout``, an empty ``index.json``) if missing;
        in one that exists, remove what killed writers left (:func:`sweep_dead_temps`)."""
        if not self._swept:
            self._swept = True
            sweep_dead_temps(self.root)
            sweep_dead_temps(self.root / "blobs" / "sha256")
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
        lock = self.root / "index.json.lock"
        try:  # never through a link: that would create or lock a file outside the layout
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)  # less umask
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StoreError(
                f"{lock} is a symbolic link; remove it (the layout's lock is a plain file)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_index(self) -> dict[str, Any]:
        """``index.json`` (an empty index when absent); StoreError when it is damaged."""
        path = self.root / "index.json"
        try:
            data = read_regular(path, MAX_INDEX_BYTES)
        except FileNotFoundError:
            return _empty_index()
        if data is None:
            raise StoreError(f"{path} is larger than {MAX_INDEX_BYTES} bytes; the layout is damaged")
        try:
            obj = parse_json(data)
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
