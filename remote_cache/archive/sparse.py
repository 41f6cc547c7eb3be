"""Write a file's data with holes where it has long runs of zeros, as ``cp --sparse=always`` does.

A tar member does not say where its file had holes (we write no GNU sparse headers): a 2 GB
sparse file packs to a few kB, but its zeros would all be allocated on restore. So the extractor
writes a big file (:data:`MIN_HOLE` bytes or more) through :class:`SparseWriter`: every run of
whole :data:`BLOCK`-aligned blocks of zeros, :data:`MIN_HOLE` bytes or longer, is skipped with
``lseek`` instead of written, and ``ftruncate`` sets the size of a file that ends in a hole. The
bytes read back are the same; a file that was merely full of zeros comes back sparse too.

Speed: ordinary data must not pay for the search. Any qualifying run covers a whole aligned
window of :data:`_PROBE` bytes, so only the first byte of each such window is looked at (one
strided slice and a ``find``, in C) and only a window starting with zero is compared in full
(``bytes.startswith``, a memcmp). Runs are extended by comparing big blocks of zeros at once.
"""

from __future__ import annotations

import os

__all__ = ["BLOCK", "MIN_HOLE", "SparseWriter", "write_all"]

#: Holes are made of whole blocks of this size, aligned in the file (the usual filesystem block).
BLOCK = 4096
#: ... and are at least this long: shorter runs are written (fewer, bigger writes and seeks).
MIN_HOLE = 32 << 10
# A run of MIN_HOLE aligned bytes covers a whole window of this size at a multiple of it.
_PROBE = MIN_HOLE // 2
_ZEROS = bytes(1 << 20)
_ZMV = memoryview(_ZEROS)
# Zero needles to extend a run with, biggest first.
_STEPS = (_ZEROS, bytes(64 << 10), bytes(BLOCK))


class SparseWriter:
    """Writes one file's bytes, in order, to ``fd`` (at offset 0), leaving holes for zeros.

    Feed the data with :meth:`write` in pieces of any size, then call :meth:`close` once.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: Bytes fed so far: the offset in the file of the next one, its size in the end.
        self.size = 0
        #: Bytes left as holes.
        self.holes = 0
        # Where a run of zeros not written yet starts (block-aligned), or -1. Everything fed from
        # there is zero; the descriptor's offset is there.
        self._run = -1

    def write(self, buf: bytes, start: int, end: int) -> None:
        """Feed ``buf[start:end]``, the file's next bytes."""
        p = start
        while p < end:
            if self._run >= 0:
                p = self._extend(buf, p, end)
                continue
            q = self._find_run(buf, p, end)
            self._data(buf, p, q)
            p = q
            if q < end:
                self._run = self.size

    def close(self) -> None:
        """Settle a run of zeros the file ends with: a hole (the size set by ``ftruncate``) when
        long enough, else written."""
        if self._run < 0:
            return
        n = self.size - self._run
        if n >= MIN_HOLE:
            os.ftruncate(self.fd, self.size)
            self.holes += n
        else:
            write_all(self.fd, _ZMV[:n])
        self._run = -1

    def _data(self, buf: bytes, p: int, q: int) -> None:
        if q > p:
            write_all(self.fd, memoryview(buf)[p:q])
            self.size += q - p

    def _find_run(self, buf: bytes, p: int, end: int) -> int:
        """Where in ``buf[p:end]`` the first candidate run of zeros starts (a block boundary in
        the file): one covering a whole probe window, or reaching ``end``; ``end`` if none."""
        first = p + (-self.size % _PROBE)  # the first window at a multiple of _PROBE in the file
        starts = buf[first:end:_PROBE]  # each window's first byte
        i = starts.find(0)
        while i >= 0:
            y = first + i * _PROBE
            if buf.startswith(_ZMV[: min(_PROBE, end - y)], y):
                # The run may begin a few blocks before the window (not before p).
                while y - BLOCK >= p and buf.startswith(_STEPS[-1], y - BLOCK):
                    y -= BLOCK
                return y
            i = starts.find(0, i + 1)
        return end

    def _extend(self, buf: bytes, p: int, end: int) -> int:
        """Extend the pending run over the zeros at ``buf[p:end]``; settle it at the first block
        that is not all zeros. Returns where it stopped (``end`` if the run may go on)."""
        # A run that reached the end of the previous piece may stop mid-block: finish that block.
        k = min(-self.size % BLOCK, end - p)
        if k:
            if not buf.startswith(_ZMV[:k], p):
                self._settle()
                return p
            p += k
            self.size += k
            if self.size % BLOCK:
                return p  # this piece ended inside the block too
        q = p
        for zeros in _STEPS:
            n = len(zeros)
            while buf.startswith(zeros, q, end):
                q += n
        self.size += q - p
        if q < end and end - q < BLOCK and buf.startswith(_ZMV[: end - q], q):
            self.size += end - q  # zeros up to the end of the piece, inside a block
            return end
        if q < end:
            self._settle()
        return q

    def _settle(self) -> None:
        """End the pending run where data follows: its whole blocks become a hole when long
        enough, and what is not a hole (short runs, a block's leading zeros) is written."""
        whole = self.size - self.size % BLOCK
        n = whole - self._run
        if n >= MIN_HOLE:
            os.lseek(self.fd, n, os.SEEK_CUR)
            self.holes += n
        else:
            write_all(self.fd, _ZMV[:n])
        write_all(self.fd, _ZMV[: self.size - whole])
        self._run = -1


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd`` (``os.write`` may write less)."""
    while view:
        w = os.write(fd, view)
        view = view[w:]
