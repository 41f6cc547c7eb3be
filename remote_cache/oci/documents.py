"""Manifests a store has read, kept by digest for the store's life.

A manifest or index is content-addressed and every read of it is verified, so a second read of
the same digest needs no round trip: a save reads the entry it may replace twice (what it can
reuse, then whether anything changed), and against a remote registry each read is a round trip
before the save can end. Tags are never kept here: they move.
"""

from __future__ import annotations

from .descriptor import Descriptor

__all__ = ["Documents"]

#: Bytes of documents kept: a save or restore reads a handful of a few kB each; a listing reads
#: two per entry. The oldest go first; a document may be up to MAX_DOCUMENT_BYTES (4 MiB).
_BUDGET = 16 << 20


class Documents:
    """Verified manifests by digest, at most :data:`_BUDGET` bytes of them."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Descriptor, bytes]] = {}
        self._bytes = 0

    def get(self, digest: str) -> tuple[Descriptor, bytes] | None:
        return self._kept.get(digest)

    def keep(self, desc: Descriptor, body: bytes) -> None:
        """Keep ``body``, whose digest the caller verified (``desc.digest``)."""
        if desc.digest in self._kept or len(body) > _BUDGET // 4:
            return
        while self._kept and self._bytes + len(body) > _BUDGET:
            _desc, dropped = self._kept.pop(next(iter(self._kept)))  # the oldest
            self._bytes -= len(dropped)
        self._kept[desc.digest] = (desc, body)
        self._bytes += len(body)
