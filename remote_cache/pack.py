"""Pack a directory tree into deterministic OCI layer blobs (tar + zstd or gzip), fast.

Tar headers are built here directly (POSIX ustar, with a PAX extended header only when a
field does not fit: long or non-ASCII names, big sizes or ids, odd mtimes), with numeric
uid/gid, empty uname/gname, whole-second mtimes and no atime/ctime, so the same tree always
gives the same bytes. Layers are packed concurrently in threads (zstd's worker threads, zlib,
hashlib and file I/O run without the GIL); zstd runs in its multi-threaded mode, whose output
does not depend on the number of workers, so blobs are the same on every machine. (Its stream
reader would release the GIL in the calling thread too, but measured slower: it keeps less of
the layer in flight.)
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zstandard

from .layers import KIND_DIR, KIND_FILE, KIND_HARDLINK, KIND_SYMLINK, Entry, LayerPlan, TreeScan, scan_tree
from .oci import OCI_LAYER_GZIP, OCI_LAYER_ZSTD

__all__ = [
    "DEFAULT_SPOOL_BYTES",
    "Compression",
    "PackedLayer",
    "pack_layer",
    "pack_tree",
    "tar_header",
]

Compression = Literal["zstd", "gzip"]

#: A compressed layer bigger than this is written to a file in ``spool_dir`` (when given).
DEFAULT_SPOOL_BYTES = 64 << 20
_BUF = 4 << 20  # feed the compressor and hashes in chunks of this size
_OCTAL_12 = 0o77777777777
_OCTAL_8 = 0o7777777
_TYPE = {KIND_FILE: b"0", KIND_DIR: b"5", KIND_SYMLINK: b"2", KIND_HARDLINK: b"1"}
_ZERO_BLOCK = bytes(512)


@dataclass(frozen=True)
class PackedLayer:
    """One compressed layer blob: its descriptor fields, diff_id, and the bytes (or spool file)."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    files: int
    data: bytes | Path


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


_NUL100 = bytes(100)
_MID = b"ustar\x0000" + bytes(64) + b"0000000\x000000000\x00" + bytes(167)
# Checksum of the constant parts: the 8 spaces of the checksum field and _MID.
_CONST_SUM = 8 * 32 + sum(_MID)


def _bsum(b: bytes) -> int:
    # Exact byte sum of <= 256 bytes: adler32's low half is (1 + sum) mod 65521, and
    # 256 * 255 < 65520. Much faster than sum() for the header fields.
    return (zlib.adler32(b) & 0xFFFF) - 1


def _ustar(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typ: bytes, link: bytes
) -> bytes:
    nums = b"%07o\x00%07o\x00%07o\x00%011o\x00%011o\x00" % (mode, uid, gid, size, mtime)
    chk = _CONST_SUM + _bsum(name) + _bsum(nums) + typ[0] + (_bsum(link) if link else 0)
    return b"".join(
        (
            name,
            _NUL100[len(name) :],
            nums,
            b"%06o\x00 " % chk,
            typ,
            link,
            _NUL100[len(link) :],
            _MID,
        )
    )


def tar_header(e: Entry, name_suffix: str = "") -> bytes:
    """The tar header block(s) for ``e``: ustar, preceded by a PAX header when a field needs it."""
    name = (e.path + name_suffix).encode("utf-8", "surrogateescape")
    link = e.linkname.encode("utf-8", "surrogateescape") if e.linkname else b""
    size, mtime, uid, gid = e.size, e.mtime, e.uid, e.gid
    pax: list[bytes] = []
    if len(name) > 100 or not name.isascii():
        pax.append(_pax_record("path", name))
        name = name[:100]
    if len(link) > 100 or not link.isascii():
        pax.append(_pax_record("linkpath", link))
        link = link[:100]
    if size > _OCTAL_12:
        pax.append(_pax_record("size", b"%d" % size))
        size = 0
    if not 0 <= mtime <= _OCTAL_12:
        pax.append(_pax_record("mtime", b"%d" % mtime))
        mtime = 0 if mtime < 0 else _OCTAL_12
    if uid > _OCTAL_8:
        pax.append(_pax_record("uid", b"%d" % uid))
        uid = 0
    if gid > _OCTAL_8:
        pax.append(_pax_record("gid", b"%d" % gid))
        gid = 0
    main = _ustar(name, e.mode & 0o7777, uid, gid, size, mtime, _TYPE[e.kind], link)
    if not pax:
        return main
    try:
        b"".join(pax).decode("utf-8")
    except UnicodeDecodeError:
        pax.insert(0, _pax_record("hdrcharset", b"BINARY"))
    body = b"".join(pax)
    xhdr = _ustar(b"././@PaxHeader", 0o644, 0, 0, len(body), 0, b"x", b"")
    return xhdr + body + bytes(-len(body) % 512) + main


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

    zstd always runs in its multi-threaded mode (``zstd_threads`` >= 1 workers), whose output
    is the same for any worker count, so blobs stay identical across machines.
    """
    sink = _Sink(compression, level, spool_dir, spool_bytes, max(1, zstd_threads))
    base = os.fspath(root)
    buf = bytearray(_BUF)
    mv = memoryview(buf)
    pos = 0
    files = 0

    def put(data: bytes) -> None:
        nonlocal pos
        if pos + len(data) > _BUF:
            sink.write(mv[:pos])
            pos = 0
        if len(data) > _BUF:
            sink.write(data)
        else:
            mv[pos : pos + len(data)] = data
            pos += len(data)

    prefix = base if base.endswith("/") else base + "/"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for e in plan.entries:
            kind = e.kind
            hdr = tar_header(e, "/") if kind == KIND_DIR else tar_header(e)
            if pos + len(hdr) <= _BUF:
                end = pos + len(hdr)
                mv[pos:end] = hdr
                pos = end
            else:
                put(hdr)
            if kind != KIND_FILE:
                continue
            files += 1
            if not e.size:
                continue
            fd = os.open(prefix + e.path, flags)
            try:
                left = e.size
                while left:
                    if pos == _BUF:
                        sink.write(mv)
                        pos = 0
                    want = min(left, _BUF - pos)
                    n = os.readv(fd, [mv[pos : pos + want]])
                    if n == 0:
                        # The file shrank while we read it: zero-fill to keep the archive
                        # well-formed. Packing expects a quiescent tree (callers compare listings).
                        mv[pos : pos + want] = bytes(want)
                        n = want
                    pos += n
                    left -= n
            finally:
                os.close(fd)
            pad = -e.size % 512
            if pad:
                put(_ZERO_BLOCK[:pad])
        put(_ZERO_BLOCK * 2)
        sink.write(mv[:pos])
        digest, diff_id, data = sink.close()
    except BaseException:
        sink.abort()
        raise
    return PackedLayer(
        media_type=OCI_LAYER_ZSTD if compression == "zstd" else OCI_LAYER_GZIP,
        digest=digest,
        size=sink.out_size,
        diff_id=diff_id,
        uncompressed_size=sink.raw_size,
        files=files,
        data=data,
    )


def pack_tree(
    tree: Path | TreeScan,
    *,
    compression: Compression = "zstd",
    level: int | None = None,
    threads: int = 0,
    spool_dir: Path | None = None,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
) -> Iterator[PackedLayer]:
    """Yield the tree's layers in order, packing up to ``threads`` (0: one per CPU) at once.

    Pass a :class:`~remote_cache.layers.TreeScan` (from ``scan_tree``) to see the stats; a plain
    path is scanned here. Layers bigger than ``spool_bytes`` are spooled to files in ``spool_dir``
    (when given), which the caller deletes.
    """
    scan = tree if isinstance(tree, TreeScan) else scan_tree(Path(tree))
    workers = threads if threads > 0 else (os.cpu_count() or 1)
    plans = list(scan.layers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack") as pool:
        queue: deque[Future[PackedLayer]] = deque()
        it = iter(plans)
        try:
            for plan in it:
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
            for f in queue:
                f.cancel()
            for f in queue:
                if not f.cancelled():
                    try:
                        layer = f.result()
                    except BaseException:
                        continue
                    if isinstance(layer.data, Path):
                        layer.data.unlink(missing_ok=True)
