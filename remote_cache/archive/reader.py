"""Exact-size reads over one layer's uncompressed chunks, writing file data without copying it.

The extractor reads headers with :meth:`LayerReader.read_exact` and hands file data straight
from the decompressed chunk to ``os.write`` (:meth:`LayerReader.data`); a big file's long runs of
zeros become holes (:mod:`.sparse`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import IntegrityError
from .decompress import EndOfLayers, Feeder, Item
from .sparse import MIN_HOLE, SparseWriter, write_all
from .tar import display

__all__ = ["LayerReader"]


class LayerReader:
    """Exact-size reads over one layer's chunks from a Feeder, without copying file data.

    ``stopped`` is asked before each chunk is taken: a reason it gives is raised, so a stop
    (a signal, ``--deadline``) ends the extraction within one chunk, not after a whole member
    (a small layer may hold gigabytes of one file)."""

    def __init__(self, feeder: Feeder, first: Item, stopped: Callable[[], BaseException | None]) -> None:
        self._stopped = stopped
        self._feeder = feeder
        self._first: Item | None = first
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._len = 0
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._ended = False

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _load(self) -> bool:
        """Replace the (fully consumed) buffer with the next chunk; False at the layer's end."""
        if self._ended:
            return False
        if (reason := self._stopped()) is not None:
            raise reason
        if self._first is not None:
            item, self._first = self._first, None
        else:
            item = self._feeder.get()
        if isinstance(item, BaseException):
            raise item
        if not isinstance(item, bytes):
            if isinstance(item, EndOfLayers):  # cannot happen: the feeder puts END_OF_LAYER first
                raise RuntimeError("layer stream ended without its end marker")
            self._ended = True
            return False
        self._base += self._len
        self._buf = item
        self._mv = memoryview(item)
        self._len = len(item)
        self._pos = 0
        return True

    def read_exact(self, n: int, what: str) -> bytes:
        p = self._pos
        e = p + n
        if e <= self._len:
            self._pos = e
            return self._buf[p:e]
        parts = [self._buf[p:]]
        got = self._len - p
        self._pos = self._len
        while got < n:
            if not self._load():
                raise IntegrityError(f"layer tar is truncated (ended inside {what})")
            take = min(n - got, self._len)
            parts.append(self._buf[:take])
            self._pos = take
            got += take
        return b"".join(parts)

    def at_eof(self) -> bool:
        return self._pos == self._len and not self._load()

    def data(self, fd: int, n: int, member: bytes) -> None:
        """Write the next ``n`` bytes to ``fd`` (``fd < 0``: skip them), then skip the padding.

        A big file (:data:`~.sparse.MIN_HOLE` bytes or more) goes through a :class:`SparseWriter`.
        """
        pad = -n % 512
        sparse = SparseWriter(fd) if fd >= 0 and n >= MIN_HOLE else None
        p = self._pos
        e = p + n
        if sparse is None and e + pad <= self._len:
            if fd >= 0 and n:
                w = os.write(fd, self._mv[p:e])
                if w < n:
                    write_all(fd, self._mv[p + w : e])
            self._pos = e + pad
            return
        while n:
            p = self._pos
            avail = self._len - p
            if not avail:
                if not self._load():
                    raise IntegrityError(f"layer tar is truncated (ended inside {display(member)})")
                continue
            take = min(avail, n)
            if sparse is not None:
                sparse.write(self._buf, p, p + take)
            elif fd >= 0:
                write_all(fd, self._mv[p : p + take])
            self._pos = p + take
            n -= take
        if sparse is not None:
            sparse.close()
        if pad:
            self._skip_padding(pad)

    def _skip_padding(self, pad: int) -> None:
        # A stream may end exactly after the last member's data, unpadded (umoci 0.4 does);
        # the caller's next at_eof() then sees the end (see HeaderDecoder.next). A stream that
        # ends inside the padding is truncated.
        if self._pos == self._len and not self._load():
            return
        self.read_exact(pad, "padding")

    def drain(self) -> None:
        """Consume the rest of the stream (checks that the compressed stream is complete)."""
        self._pos = self._len
        while self._load():
            self._pos = self._len
