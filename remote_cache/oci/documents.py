"""Manifests a store has read, kept by digest for the store's life.

A manifest or index is content-addressed and every read of it is verified, so a second read of
the same digest needs no round trip: a save reads the entry it may replace twice (what it can
reuse, then whether anything changed), and against a remote registry each read is a round trip
before the save can end. Tags are never kept here: they move.
"""

from __future__ import annotations

from .descriptor import Descriptor

__all__ = ["Documents"]

#: Documents kept (each at most MAX_DOCUMENT_BYTES, in practice a few kB): a save or restore
#: reads a handful; a listing reads two per entry.
_KEPT = 256


class Documents:
    """Verified manifests by digest; the oldest go first past :data:`_KEPT`."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Descriptor, bytes]] = {}

    def get(self, digest: str) -> tuple[Descriptor, bytes] | None:
        return self._kept.get(digest)

    def keep(self, desc: Descriptor, body: bytes) -> None:
        """Keep ``body``, whose digest the caller verified (``desc.digest``)."""
        if len(self._kept) >= _KEPT:
            del self._kept[next(iter(self._kept))]
        self._kept[desc.digest] = (desc, body)
