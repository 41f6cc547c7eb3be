"""Pack planned layers of a directory tree into deterministic compressed tar blobs, fast.

Headers come from :mod:`.tar`, so the same tree always gives the same bytes. Layers are packed
concurrently in threads (zstd's and zlib's compressors, hashlib and file I/O run without the
GIL). A layer is compressed by zstd on its own thread, unless it is bigger than
:data:`ZSTD_MT_ABOVE`: then in zstd's multi-threaded mode, which can share one layer between
cores. Which mode depends on the layer alone, and the multi-threaded mode's output does not
depend on the number of workers, so blobs are the same on every machine. (zstd's multi-threaded
mode on layers of a few MiB cost 1.5-1.65x the CPU of its single-threaded mode for the same
output size, measured on the 322 MB node_modules corpus: 2.03-2.29 vs 1.38 CPU-s.)
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tempfile
import zlib
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zstandard
from msgspec import Struct

from ..cpus import usable_cpus
from ..errors import TreeChanged
from .codecs import Compression
from .plan import LayerPlan, TreeScan, scan_tree
from .tar import DIR, FILE, ZERO_BLOCK, Member, tar_header

__all__ = [
    "DEFAULT_SPOOL_BYTES",
    "ZSTD_MT_ABOVE",
    "PackedLayer",
    "pack_layer",
    "pack_tree",
]

#: A compressed layer bigger than this is written to a file in ``spool_dir`` (when given).
DEFAULT_SPOOL_BYTES = 64 << 20
#: A layer of more tar bytes than this is compressed in zstd's multi-threaded mode. Layers are
#: cut at 16 MiB (:mod:`.plan`), so only a layer holding one bigger file gets it; below two
#: of its 8 MiB jobs it could not share a layer between cores anyway.
ZSTD_MT_ABOVE = 32 << 20
_BUF = 4 << 20  # feed the compressor and hashes in chunks of this size


class PackedLayer(Struct, frozen=True):
    """One compressed layer blob: its compression, digest, size, diff_id, and the bytes (or spool file)."""

    compression: Compression
    digest: str
    size: int
    #: sha256 of the uncompressed tar (the OCI ``diff_id``).
    diff_id: str
    uncompressed_size: int
    files: int
    data: bytes | Path


class _Sink:
    """Compresses, hashes and stores one layer's tar stream."""

    def __init__(
        self,
        compression: Compression,
        level: int | None,
        spool_dir: Path | None,
        spool_bytes: int,
        zstd_threads: int,
    ) -> None:
        self._raw_hash = hashlib.sha256()
        self._out_hash = hashlib.sha256()
        self.raw_size = 0
        self.out_size = 0
        self._spool_dir = spool_dir
        self._spool_bytes = spool_bytes
        self._mem: io.BytesIO | None = io.BytesIO()
        self._file: io.BufferedWriter | None = None
        self.path: Path | None = None
        self._z: zstandard.ZstdCompressionObj | None = None
        self._g: zlib._Compress | None = None
        if compression == "zstd":
            params = zstandard.ZstdCompressionParameters.from_level(
                3 if level is None else level,
                write_checksum=True,
                write_content_size=False,
                threads=zstd_threads,
            )
            self._z = zstandard.ZstdCompressor(compression_params=params).compressobj()
        else:
            self._g = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._out_hash.update(data)
        self.out_size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        assert self._mem is not None
        self._mem.write(data)
        if self._spool_dir is not None and self.out_size > self._spool_bytes:
            fd, name = tempfile.mkstemp(prefix="layer-", suffix=".blob", dir=self._spool_dir)
            self.path = Path(name)
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._mem.getbuffer())
            self._mem = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raw_hash.update(data)
        self.raw_size += len(data)
        if self._z is not None:
            self._emit(self._z.compress(data))
        else:
            assert self._g is not None
            self._emit(self._g.compress(data))

    def close(self) -> tuple[str, str, bytes | Path]:
        if self._z is not None:
            self._emit(self._z.flush())
        else:
            assert self._g is not None
            self._emit(self._g.flush())
        digest = "sha256:" + self._out_hash.hexdigest()
        diff_id = "sha256:" + self._raw_hash.hexdigest()
        if self._file is not None:
            self._file.close()
            assert self.path is not None
            return digest, diff_id, self.path
        assert self._mem is not None
        return digest, diff_id, self._mem.getvalue()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _check_unchanged(fd: int, path: str, member: Member) -> None:
    """TreeChanged unless the file read is the walk's: a write or truncation since moves its mtime
    (or size), a replacement has another inode. Not its ctime: a new hard link elsewhere or a
    chmod moves that without touching the bytes (the header keeps the walk's mode). A member made
    without a walk has only its size to compare."""
    st = os.fstat(fd)
    if member.mtime_ns and st.st_ino != member.ino:  # (a FIFO fed in its place too: another inode)
        raise TreeChanged(path, "it was replaced")
    if st.st_size != member.size or (member.mtime_ns and st.st_mtime_ns != member.mtime_ns):
        raise TreeChanged(path, "it was written to")


#: O_NOCTTY: a terminal put in a file's place is not taken.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
#: O_NONBLOCK: a FIFO put in a file's place would wait for a writer, past --deadline and a signal
#: (a regular file's reads ignore it).
_OPEN_AT_ONCE = _OPEN_FLAGS | os.O_NONBLOCK


def _open_member(path: str) -> int:
    """The file at ``path`` opened for reading; TreeChanged when it is gone or no longer a file."""
    try:
        try:
            return os.open(path, _OPEN_AT_ONCE)
        except BlockingIOError:
            # A file another process holds a lease on (an NFS server's delegation, a Samba
            # oplock): only a blocking open asks for it back and waits (fcntl(2), leases).
            return os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise TreeChanged(path, "it was removed") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink where the walk saw a file
            raise TreeChanged(path, "it was replaced by a symlink") from None
        if exc.errno == errno.ENXIO:  # a socket (or a device with nothing behind it)
            raise TreeChanged(path, "it was replaced") from None
        raise


def _replaced(fd: int, member: Member) -> bool:
    """Whether what ``fd`` reads is no longer the walk's file: not a file (a FIFO or a directory
    in its place), or another inode (a member made without a walk has none to compare). Looked
    at when a read ends early or fails, off the hot path."""
    st = os.fstat(fd)
    return not stat.S_ISREG(st.st_mode) or bool(member.mtime_ns and st.st_ino != member.ino)


class _TarBuffer:
    """The tar stream of one layer, gathered in a big buffer that goes to the sink when full."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.buf = bytearray(_BUF)
        self.mv = memoryview(self.buf)
        self.pos = 0

    def put(self, data: bytes) -> None:
        """Append ``data`` (a header, padding or the end blocks)."""
        pos = self.pos
        if pos + len(data) > _BUF:
            self.sink.write(self.mv[:pos])
            pos = 0
        if len(data) > _BUF:
            self.sink.write(data)
        else:
            self.mv[pos : pos + len(data)] = data
            pos += len(data)
        self.pos = pos

    def put_file(self, path: str, member: Member) -> None:
        """Append the data of ``member``, the file at ``path``, read straight into the buffer;
        TreeChanged when the file is no longer what the walk saw."""
        mv, pos = self.mv, self.pos
        fd = _open_member(path)
        try:
            left = member.size
            while left:
                if pos == _BUF:
                    self.sink.write(mv)
                    pos = 0
                want = min(left, _BUF - pos)
                try:
                    n = os.readv(fd, [mv[pos : pos + want]])
                except OSError:  # EISDIR, EAGAIN...
                    if _replaced(fd, member):
                        raise TreeChanged(path, "it was replaced") from None
                    raise
                if n == 0:
                    raise TreeChanged(path, "it was replaced" if _replaced(fd, member) else "it shrank")
                pos += n
                left -= n
            _check_unchanged(fd, path, member)
        finally:
            os.close(fd)
            self.pos = pos

    def flush(self) -> None:
        self.sink.write(self.mv[: self.pos])
        self.pos = 0


def pack_layer(
    root: Path,
    plan: LayerPlan,
    *,
    compression: Compression = "zstd",
    level: int | None = None,
    spool_dir: Path | None = None,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
    zstd_threads: int = 1,
) -> PackedLayer:
    """Archive and compress one planned layer of the tree at ``root``.

    A layer over :data:`ZSTD_MT_ABOVE` tar bytes is compressed in zstd's multi-threaded mode
    (``zstd_threads`` workers, at least one: the output is the same for any count), a smaller
    one on this thread; so blobs stay identical across machines.
    """
    threads = max(1, zstd_threads) if plan.tar_bytes > ZSTD_MT_ABOVE else 0
    sink = _Sink(compression, level, spool_dir, spool_bytes, threads)
    out = _TarBuffer(sink)
    base = os.fspath(root)
    prefix = base if base.endswith("/") else base + "/"
    files = 0
    try:
        for e in plan.members:
            out.put(tar_header(e, "/") if e.kind == DIR else tar_header(e))
            if e.kind != FILE:
                continue
            files += 1
            if e.size:
                out.put_file(prefix + e.path, e)
                if e.size % 512:
                    out.put(ZERO_BLOCK[: -e.size % 512])
        out.put(ZERO_BLOCK * 2)
        out.flush()
        digest, diff_id, data = sink.close()
    except BaseException:
        sink.abort()
        raise
    return PackedLayer(compression, digest, sink.out_size, diff_id, sink.raw_size, files, data)


def pack_tree(
    tree: Path | TreeScan,
    *,
    compression: Compression = "zstd",
    level: int | None = None,
    threads: int = 0,
    spool_dir: Path | None = None,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
) -> Generator[PackedLayer, None, None]:
    """Yield the tree's layers in order, packing up to ``threads`` at once (0: one per CPU the
    process may use, :mod:`..cpus`).

    Pass a :class:`~remote_cache.archive.plan.TreeScan` (from ``scan_tree``) to see the stats; a
    plain path is scanned here. Layers bigger than ``spool_bytes`` are spooled to files in
    ``spool_dir`` (when given), which the caller deletes. Closing the iterator early cancels the
    packing not started yet and deletes the spool files of layers packed but not yielded.
    """
    scan = tree if isinstance(tree, TreeScan) else scan_tree(Path(tree))
    workers = threads if threads > 0 else usable_cpus()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack") as pool:
        queue: deque[Future[PackedLayer]] = deque()
        try:
            for plan in scan.layers:
                queue.append(
                    pool.submit(
                        pack_layer,
                        scan.root,
                        plan,
                        compression=compression,
                        level=level,
                        spool_dir=spool_dir,
                        spool_bytes=spool_bytes,
                        zstd_threads=workers,
                    )
                )
                if len(queue) >= workers + 1:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            _discard(queue)


def _discard(queue: deque[Future[PackedLayer]]) -> None:
    """Cancel pending packs; delete the spool files of those that finished anyway."""
    for f in queue:
        f.cancel()
    for f in queue:
        if f.cancelled():
            continue
        try:
            layer = f.result()
        except BaseException:
            continue
        if isinstance(layer.data, Path):
            layer.data.unlink(missing_ok=True)
