"""Decompress layer blobs in a background thread into a bounded queue of uncompressed chunks.

Layers are tar, tar+gzip or tar+zstd, told apart by their magic bytes (a label that says zstd or
gzip must agree; "tar" labels are not trusted). zlib, and zstd through its stream reader, release
the GIL, so decompression overlaps the extraction's writing as in ``zstd -d | tar -x``. The
zstd stream reader reports a stream cut inside a frame as a normal end, so the compressed bytes
are followed through :class:`~.frames.FrameCheck` too. Corrupt or truncated streams raise
:class:`~remote_cache.errors.IntegrityError`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, cast

import zstandard

from ..errors import ImageFormatError, IntegrityError
from .frames import FrameCheck

__all__ = ["END_OF_LAYER", "END_OF_LAYERS", "EndOfLayer", "EndOfLayers", "Feeder", "Item"]

_READ = 1 << 20  # plain tar: bytes per read
_READ_COMPRESSED = 256 << 10  # compressed input per decompress call (~1 MiB out for zstd)
_READ_FIRST = 16 << 10  # compressed input of a layer's first decompress call
_ZSTD_WRITE_SIZE = 2 << 20  # decompressed bytes per zstd read: one allocation per call, no joins
_ZSTD_FIRST = 128 << 10  # a layer's first zstd read: small, so writing starts soon
#: Decompressed bytes per gzip call at most: 256 KiB of input can inflate to ~260 MB, and the
#: queue holds _QUEUE_CHUNKS of them.
_GZIP_OUT = 2 << 20
_QUEUE_CHUNKS = 16  # decompressed chunks buffered between the two threads
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class _Source:
    """Reads decompressed bytes from a layer blob; errors become IntegrityError."""

    def __init__(self, fileobj: BinaryIO, expected: str | None) -> None:
        self._f = fileobj
        head = b""
        while len(head) < 4 and (more := self._raw_read(4 - len(head))):
            head += more  # (a read of a growing file returns what is there: maybe 1 byte)
        self._head = head
        kind = _kind_of(expected, head)
        self._zd: Any = None
        self._zr: Any = None
        self.kind = kind
        self._want = _READ_FIRST
        self._pending = b""
        self._eof = False
        if kind == "zstd":
            # stream_reader decompresses without the GIL (decompressobj holds it), so the
            # writing thread keeps running; FrameCheck catches what it would let through: a
            # stream cut inside a frame.
            self._frames = FrameCheck()
            self._zr = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, _Tap(self)), read_size=_READ_COMPRESSED, read_across_frames=True
            )
            self._out = _ZSTD_FIRST
        elif kind == "gzip":
            self._zd = zlib.decompressobj(31)

    def _raw_read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except OSError as exc:
            raise IntegrityError(f"could not read layer data: {exc}") from exc

    def _next_compressed(self) -> bytes:
        if self._zd is None:
            n = _READ
        else:
            # Start small so the writer gets its first chunk soon, then read bigger pieces.
            n = self._want
            self._want = min(n * 2, _READ_COMPRESSED)
        if self._head:
            data = self._head + self._raw_read(n)
            self._head = b""
            return data
        return self._raw_read(n)

    def _tap(self, n: int) -> bytes:
        """Compressed bytes for the zstd reader, followed through FrameCheck."""
        data = self._next_compressed()
        self._frames.feed(data)
        return data

    def _read_zstd(self) -> bytes:
        if self._eof:
            return b""
        try:
            out: bytes = self._zr.read(self._out)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd layer stream is corrupt: {exc}") from exc
        self._out = _ZSTD_WRITE_SIZE
        if not out:
            self._frames.finish()
            self._eof = True
            # The reader reaches back to this source (_Tap): let it go now, with its window
            # (megabytes), not at the next cycle collection.
            self._zr = None
        return out

    def read(self) -> bytes:
        """Next chunk of uncompressed bytes; b"" at the end of a complete stream."""
        if self.kind == "zstd":
            return self._read_zstd()
        while not self._eof:
            if self._pending:
                comp, self._pending = self._pending, b""
            else:
                comp = self._next_compressed()
            if self._zd is None:
                if not comp:
                    self._eof = True
                return comp
            try:
                # (With no input left, what the cap held back is still given out.)
                out: bytes = self._zd.decompress(comp, _GZIP_OUT)
            except zlib.error as exc:
                raise IntegrityError(f"{self.kind} layer stream is corrupt: {exc}") from exc
            if self._zd.eof:
                rest = self._zd.unused_data
                if rest:
                    # Another concatenated gzip member follows.
                    self._zd = zlib.decompressobj(31)
                    self._pending = rest
            elif self._zd.unconsumed_tail:  # input the output cap left for the next call
                self._pending = self._zd.unconsumed_tail
            if out:
                return out
            if not comp:
                if self._zd.eof:
                    self._eof = True
                    return b""
                raise IntegrityError(f"{self.kind} layer stream is truncated (ended mid-member)")
        return b""


class _Tap:
    """The file object a zstd stream reader pulls compressed bytes from (see _Source)."""

    def __init__(self, source: _Source) -> None:
        self.read = source._tap


def _is_skippable(head: bytes) -> bool:
    """A zstd skippable frame's magic (0x184D2A50-5F, little-endian): pzstd starts with one."""
    return len(head) == 4 and head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def _kind_of(expected: str | None, head: bytes) -> str:
    """What the stream is by its magic bytes; ImageFormatError when its label says otherwise."""
    if head.startswith(_ZSTD_MAGIC) or _is_skippable(head):
        magic = "zstd"
    elif head.startswith(_GZIP_MAGIC):
        magic = "gzip"
    else:
        magic = "tar"
    # Some tools label compressed layers as plain tar: then the magic bytes decide.
    if expected in ("zstd", "gzip") and magic != expected:
        raise ImageFormatError(f"layer is labelled {expected} but is not {expected}-compressed")
    return magic


class EndOfLayer:
    """Queue marker: the current layer's stream ended complete."""


class EndOfLayers:
    """Queue marker: no more layers."""


END_OF_LAYER = EndOfLayer()
END_OF_LAYERS = EndOfLayers()
Item = bytes | EndOfLayer | EndOfLayers | BaseException


class Feeder:
    """Decompresses layers, in order, in a background thread into a bounded queue of chunks.

    Only bytes travel to the writing thread; every check on them happens there. On failure
    the writer calls ``stop()`` and does not wait: the thread may be blocked reading a blob
    that is still downloading, and exits at its next read or queue put.
    """

    def __init__(self, layers: Iterable[tuple[BinaryIO, str | None]]) -> None:
        self._q: queue.Queue[Item] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(iter(layers),), name="unpack-decompress", daemon=True
        )
        self._thread.start()

    def _put(self, item: Item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, layers: Iterator[tuple[BinaryIO, str | None]]) -> None:
        try:
            for fileobj, expected in layers:
                src = _Source(fileobj, expected)
                while True:
                    chunk = src.read()
                    if not chunk:
                        break
                    if not self._put(chunk):
                        return
                if not self._put(END_OF_LAYER):
                    return
            self._put(END_OF_LAYERS)
        except BaseException as exc:  # handed to the writing thread, which raises it
            self._put(exc)

    def get(self) -> Item:
        """The next item, an exception the thread raised included."""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._stop.set()
        return item

    def stop(self) -> None:
        """Make the thread exit soon and drop what it buffered."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()

    def join(self) -> None:
        """Wait for the thread, which has put END_OF_LAYERS or failed."""
        self._thread.join()
