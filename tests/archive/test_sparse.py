"""Sparse extraction: runs of zeros become holes, the bytes read back stay the same."""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

from remote_cache.archive.extract import Extractor
from remote_cache.archive.pack import pack_tree
from remote_cache.archive.sparse import BLOCK, MIN_HOLE, SparseWriter
from tests.trees import allocated

_MTIME = 1_600_000_000


def _model_holes(data: bytes) -> int:
    """The bytes a single write of ``data`` should leave as holes: each run of whole aligned
    blocks of zeros (the last one may be partial, at the end) of MIN_HOLE bytes or more."""
    holes = run = 0
    for at in range(0, len(data), BLOCK):
        block = data[at : at + BLOCK]
        if block.count(0) == len(block):
            run += len(block)
            continue
        holes += run if run >= MIN_HOLE else 0
        run = 0
    return holes + (run if run >= MIN_HOLE else 0)


def _layout(rng: random.Random) -> bytes:
    """Data and zero runs of awkward lengths (around a block, a probe window, MIN_HOLE)."""
    zero_runs = [1, BLOCK - 1, BLOCK, 4 * BLOCK + 1, MIN_HOLE - 1, MIN_HOLE, MIN_HOLE + 1, 3 * MIN_HOLE + 7]
    parts = []
    for _ in range(rng.randrange(1, 12)):
        if rng.random() < 0.5:
            parts.append(rng.randbytes(rng.choice([1, 100, BLOCK + 3, 50_000])))
        else:
            parts.append(bytes(rng.choice([*zero_runs, rng.randrange(1, 1 << 20)])))
    return b"".join(parts)


def _write(path: Path, data: bytes, pieces: list[int]) -> int:
    """Write ``data`` through a SparseWriter, fed in ``pieces`` (sizes; the rest in one); its holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        out = SparseWriter(fd)
        at = 0
        for n in [*pieces, len(data)]:
            out.write(data, at, min(at + n, len(data)))
            at = min(at + n, len(data))
        out.close()
        return out.holes
    finally:
        os.close(fd)


def test_every_byte_is_kept_whatever_the_pieces(sparse_dir: Path) -> None:
    rng = random.Random(11)
    target = sparse_dir / "f"
    for _ in range(300):
        data = _layout(rng)
        model = _model_holes(data)
        assert _write(target, data, []) == model
        assert target.read_bytes() == data
        pieces = [rng.choice([1, 511, 512, BLOCK - 1, 70_001, 1 << 20]) for _ in range(rng.randrange(30))]
        holes = _write(target, data, pieces)
        assert target.read_bytes() == data, pieces
        assert holes <= model


def test_a_run_across_many_small_pieces_is_one_hole(sparse_dir: Path) -> None:
    data = b"head" + bytes(5 << 20) + b"tail" + bytes(3 << 20)
    model = _model_holes(data)
    assert model > 7 << 20
    for piece in (1000, 4097, 70_001):
        holes = _write(sparse_dir / "f", data, [piece] * (len(data) // piece))
        assert (sparse_dir / "f").read_bytes() == data
        # Each run starts within the first probe window it fully covers: at most that much is lost.
        assert model - 2 * (MIN_HOLE // 2) <= holes <= model, piece
        assert allocated(sparse_dir / "f") < 1 << 20


def _blob(data: bytes | Path) -> bytes:
    return data if isinstance(data, bytes) else data.read_bytes()


def test_extracted_files_keep_bytes_modes_and_mtimes_and_get_holes(sparse_dir: Path) -> None:
    src = sparse_dir / "src"
    src.mkdir()
    files = {
        "all-zeros": bytes(8 << 20),  # no data at all: the size comes from ftruncate
        "ends-in-a-hole": os.urandom(1 << 20) + bytes(16 << 20),
        "short-zeros": bytes(MIN_HOLE - 1),
        "random": os.urandom(3 << 20),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
        os.chmod(src / name, 0o640)
        os.utime(src / name, (_MTIME, _MTIME))
    out = sparse_dir / "out"
    out.mkdir()
    ex = Extractor(out)
    ex.add_layers((io.BytesIO(_blob(x.data)), x.compression) for x in pack_tree(src))
    ex.finish()
    for name, data in files.items():
        st = (out / name).stat()
        assert hashlib.sha256((out / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name
        assert (st.st_size, st.st_mode & 0o777, st.st_mtime) == (len(data), 0o640, _MTIME), name
    assert allocated(out / "all-zeros") < 64 << 10
    assert allocated(out / "ends-in-a-hole") < 2 << 20
    assert allocated(out / "random") >= 3 << 20
