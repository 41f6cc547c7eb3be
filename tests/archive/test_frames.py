"""Zstd frame boundaries, on streams made by the real ``zstd`` tool in its various frame shapes."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from remote_cache.archive.extract import Extractor
from remote_cache.archive.frames import FrameCheck
from remote_cache.errors import IntegrityError

pytestmark = pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd tool is not installed")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zstd(data: bytes, *flags: str) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", *flags], input=data, capture_output=True, check=True).stdout


def _skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A5E, len(payload)) + payload


# Random data makes raw blocks, zeros RLE blocks, text compressed blocks.
FILES = {"a.bin": os.urandom(300_000), "b.txt": b"hello\n" * 5000, "c/empty": b"", "zeros": bytes(300_000)}
RAW = _tar(FILES)
HALF = len(RAW) // 2 // 512 * 512


def _shapes() -> dict[str, tuple[bytes, set[int]]]:
    """Streams with the same tar inside, and the offsets at which a frame ends inside them."""
    one = _zstd(RAW)
    first, second = _zstd(RAW[:HALF], "--no-check"), _zstd(RAW[HALF:], "-19")
    skip = _skippable(b"metadata a reader must skip")
    return {
        "default": (one, set()),
        "no checksum": (_zstd(RAW, "--no-check"), set()),
        "no content size": (_zstd(RAW, "--no-content-size"), set()),
        "level 19, long window": (_zstd(RAW, "-19", "--long=24"), set()),
        "two frames and a skippable one": (
            first + skip + second,
            {len(first), len(first) + len(skip)},
        ),
        # pzstd starts its output with a skippable frame (the next frame's size).
        "a skippable frame first": (skip + one, {len(skip)}),
    }


@pytest.mark.parametrize("shape", list(_shapes()))
def test_complete_streams_pass_in_any_chunking(shape: str) -> None:
    stream, _ = _shapes()[shape]
    for step in (1, 3, 512, 65536, len(stream)):
        check = FrameCheck()
        for i in range(0, len(stream), step):
            check.feed(stream[i : i + step])
        check.finish()


@pytest.mark.parametrize("shape", list(_shapes()))
def test_every_cut_inside_a_frame_is_caught(shape: str) -> None:
    stream, boundaries = _shapes()[shape]
    cuts = set(range(1, 64)) | set(range(64, len(stream), 97)) | {len(stream) - k for k in range(1, 9)}
    for cut in sorted(cuts - boundaries):
        check = FrameCheck()
        with pytest.raises(IntegrityError):
            check.feed(stream[:cut])
            check.finish()


@pytest.mark.parametrize("shape", list(_shapes()))
def test_extractor_reads_every_shape_and_refuses_cuts(shape: str, tmp_path: Path) -> None:
    stream, boundaries = _shapes()[shape]
    out = tmp_path / "out"
    out.mkdir()
    with Extractor(out) as ex:
        ex.add_layer(io.BytesIO(stream), "zstd")
        ex.finish()
    assert {p: (out / p).read_bytes() for p in FILES} == FILES
    for cut in sorted({len(stream) // 3, len(stream) // 2, len(stream) - 5} - boundaries):
        dest = tmp_path / f"cut-{cut}"
        dest.mkdir()
        with pytest.raises(IntegrityError), Extractor(dest) as ex:
            ex.add_layer(io.BytesIO(stream[:cut]), "zstd")
            ex.finish()


def test_garbage_and_reserved_bits_are_corrupt() -> None:
    for bad in (b"not zstd at all", _zstd(RAW)[:4] + b"\x08" + b"\0" * 16):
        with pytest.raises(IntegrityError, match="corrupt"):
            FrameCheck().feed(bad)
    check = FrameCheck()
    check.feed(_skippable(b"only metadata"))
    with pytest.raises(IntegrityError, match="no frame"):
        check.finish()
