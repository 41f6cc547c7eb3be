"""Zstandard frame boundaries: did a compressed stream end exactly after a complete frame?

python-zstandard's ``stream_reader`` decompresses without holding the GIL (its
``decompressobj`` holds it throughout: measured, a third of a restore's wall time), but it
reports a stream cut inside a frame as a normal end. :class:`FrameCheck` follows the frame
layout of RFC 8878 over the same bytes (headers only: block contents are skipped by length) so
the extractor can tell a complete layer from a truncated one, as ``decompressobj`` could.
"""

from __future__ import annotations

from ..errors import IntegrityError

__all__ = ["FrameCheck"]

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50

# What the next header bytes are.
_MAGIC, _SKIPPABLE_SIZE, _FRAME_HEADER, _BLOCK_HEADER = range(4)
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)


class FrameCheck:
    """Feed it a zstd stream's bytes in order; :meth:`finish` raises unless it ended cleanly."""

    def __init__(self) -> None:
        self.frames = 0  # complete zstd frames seen (skippable frames not counted)
        self._state = _MAGIC
        self._want = 4  # header bytes the state needs
        self._hdr = bytearray()
        self._skip = 0  # content bytes to pass over before the next header
        self._checksum = False

    def feed(self, data: bytes) -> None:
        """Follow ``data``, the next bytes of the stream; IntegrityError on a malformed header."""
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                continue
            take = min(self._want - len(self._hdr), end - pos)
            self._hdr += data[pos : pos + take]
            pos += take
            if len(self._hdr) == self._want:
                header = bytes(self._hdr)
                self._hdr.clear()
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        if self._state == _MAGIC:
            magic = int.from_bytes(header, "little")
            if magic == _ZSTD_MAGIC:
                self._state, self._want = _FRAME_HEADER, 1
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._state, self._want = _SKIPPABLE_SIZE, 4
            else:
                raise IntegrityError("zstd layer stream is corrupt: no frame where one should start")
        elif self._state == _SKIPPABLE_SIZE:
            self._skip = int.from_bytes(header, "little")
            self._state, self._want = _MAGIC, 4
        elif self._state == _FRAME_HEADER:
            fhd = header[0]
            if fhd & 0x08:
                raise IntegrityError("zstd layer stream is corrupt: reserved frame header bit set")
            single_segment = bool(fhd & 0x20)
            fcs = _FCS_BYTES[fhd >> 6] or (1 if single_segment else 0)
            self._checksum = bool(fhd & 0x04)
            self._skip = (0 if single_segment else 1) + _DICT_ID_BYTES[fhd & 0x03] + fcs
            self._state, self._want = _BLOCK_HEADER, 3
        else:  # _BLOCK_HEADER
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise IntegrityError("zstd layer stream is corrupt: reserved block type")
            self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if last:
                self._skip += 4 if self._checksum else 0
                self.frames += 1
                self._state, self._want = _MAGIC, 4

    def finish(self) -> None:
        """IntegrityError unless the stream ended right after a complete frame."""
        if self._state != _MAGIC or self._hdr or self._skip:
            raise IntegrityError("zstd layer stream is truncated (ended mid-frame)")
        if not self.frames:
            raise IntegrityError("zstd layer stream holds no frame")
