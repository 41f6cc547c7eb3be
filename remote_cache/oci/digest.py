"""Content digests: the one pattern, computing and checking them, and streamed size+digest checks.

Only ``sha256`` is supported (what every registry and tool writes today).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from ..errors import ImageFormatError, IntegrityError

__all__ = ["DIGEST_PATTERN", "BlobCheck", "check_digest", "is_digest", "sha256_digest", "verify_bytes"]

#: A digest as the image spec writes it (``algorithm:encoded``), for the one algorithm we use.
DIGEST_PATTERN = re.compile(r"sha256:[a-f0-9]{64}")


def is_digest(text: str) -> bool:
    """True when ``text`` is a well-formed sha256 digest (a reference is a digest or a tag)."""
    return DIGEST_PATTERN.fullmatch(text) is not None


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise ImageFormatError."""
    if not is_digest(digest):
        raise ImageFormatError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return digest


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, digest: str, size: int | None = None) -> None:
    """Raise IntegrityError unless ``data`` has this digest (and size, when given)."""
    if size is not None and len(data) != size:
        raise IntegrityError(f"content of {digest} is {len(data)} bytes, expected {size}")
    actual = sha256_digest(data)
    if actual != digest:
        raise IntegrityError(f"content digest {actual} does not match expected {digest}")


class BlobCheck:
    """Size and digest of a blob, checked while it streams: every store's reads end in :meth:`finish`."""

    def __init__(
        self, digest: str, size: int, where: str, fix: str = "", corrupt_fix: str | None = None
    ) -> None:
        self._digest = digest
        self._size = size
        self._where = where  # e.g. "in oci:/x" or "from ghcr.io/acme/cache"
        # What mends it, where the store knows: a blob of the wrong size, and one of the right
        # size with other bytes (which a store may not tell from the right one without reading it).
        self._fix = f"; {fix}" if fix else ""
        self._corrupt_fix = self._fix if corrupt_fix is None else f"; {corrupt_fix}"
        self._hasher = hashlib.sha256()
        self.seen = 0

    def wrong_size(self, size: int) -> IntegrityError:
        """The error for the blob found to be ``size`` bytes (read whole, or told by the store)."""
        return IntegrityError(
            f"blob {self._digest} {self._where} is {size} bytes, expected {self._size}{self._fix}"
        )

    def update(self, chunk: bytes | memoryview) -> None:
        """Count and hash ``chunk``; IntegrityError as soon as the blob runs past its size."""
        self.seen += len(chunk)
        if self.seen > self._size:
            raise IntegrityError(
                f"blob {self._digest} {self._where} is larger than its {self._size} bytes{self._fix}"
            )
        self._hasher.update(chunk)

    def feeding(self, sink: Callable[[memoryview], None]) -> Callable[[memoryview], None]:
        """A sink that passes each chunk through :meth:`update`, then on to ``sink``."""

        def checked(chunk: memoryview) -> None:
            self.update(chunk)
            sink(chunk)

        return checked

    def finish(self) -> None:
        """IntegrityError unless exactly the blob's size and digest went through :meth:`update`."""
        if self.seen != self._size:
            raise self.wrong_size(self.seen)
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != self._digest:
            raise IntegrityError(
                f"blob {self._digest} {self._where} has digest {actual}: it is corrupted{self._corrupt_fix}"
            )
