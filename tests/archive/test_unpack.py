"""Unpack: layering and OCI whiteouts, magic-byte detection, ownership, replace_dir semantics."""

from __future__ import annotations

import ctypes
import gc
import gzip
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from remote_cache.archive.extract import Extractor
from remote_cache.archive.pack import pack_tree
from remote_cache.archive.swap import discard_dir, replace_dir
from remote_cache.errors import IntegrityError
from tests.trees import assert_same_tree, staging_dir

TAR = "tar"


def _tar(*members: tuple[str, bytes, str]) -> bytes:
    """Members as (name, data, kind) with kind f(ile), d(ir), l(ink target in data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _apply(dest: Path, *layers: bytes) -> None:
    ex = Extractor(dest)
    for blob in layers:
        ex.add_layer(io.BytesIO(blob), TAR)
    ex.finish()


def _listing(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            out[rel] = (
                "dir" if p.is_dir() and not p.is_symlink() else "link" if p.is_symlink() else p.read_text()
            )
    return out


def test_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    lower = _tar(
        ("a/", b"", "d"),
        ("a/one", b"1", "f"),
        ("a/two", b"2", "f"),
        ("b/", b"", "d"),
        ("b/old", b"o", "f"),
        ("b/sub/", b"", "d"),
        ("b/sub/deep", b"d", "f"),
        ("c", b"c", "f"),
    )
    upper = _tar(
        ("a/.wh.one", b"", "f"),
        ("b/", b"", "d"),
        ("b/new", b"n", "f"),
        ("b/.wh..wh..opq", b"", "f"),
        ("c/", b"", "d"),
        ("c/inside", b"i", "f"),  # a file replaced by a directory
    )
    _apply(tmp_path, lower, upper)
    assert _listing(tmp_path) == {
        "a": "dir",
        "a/two": "2",
        "b": "dir",
        "b/new": "n",
        "c": "dir",
        "c/inside": "i",
    }


_LOWER = _tar(("d/", b"", "d"), ("d/sub/", b"", "d"), ("d/sub/old", b"o", "f"), ("d/gone", b"g", "f"))


@pytest.mark.parametrize(
    ("upper", "expected"),
    [
        # The opaque marker after a subdirectory this layer declares: lower content under it goes.
        (
            [("d/sub/", b"", "d"), ("d/sub/new", b"n", "f"), ("d/.wh..wh..opq", b"", "f")],
            {"d": "dir", "d/sub": "dir", "d/sub/new": "n"},
        ),
        # ... after a file this layer wrote into a lower subdirectory: that file stays.
        (
            [("d/sub/new", b"n", "f"), ("d/.wh..wh..opq", b"", "f")],
            {"d": "dir", "d/sub": "dir", "d/sub/new": "n"},
        ),
        # A whiteout of a directory after this layer wrote into it: what this layer wrote stays.
        ([("d/new", b"n", "f"), (".wh.d", b"", "f")], {"d": "dir", "d/new": "n"}),
        # The same with the markers first (the order the spec recommends), for comparison.
        (
            [("d/.wh..wh..opq", b"", "f"), ("d/sub/new", b"n", "f")],
            {"d": "dir", "d/sub": "dir", "d/sub/new": "n"},
        ),
        ([(".wh.d", b"", "f"), ("d/new", b"n", "f")], {"d": "dir", "d/new": "n"}),
    ],
    ids=[
        "opaque-after-own-subdir",
        "opaque-after-own-file",
        "whiteout-after-own-file",
        "opaque-first",
        "whiteout-first",
    ],
)
def test_whiteouts_hide_lower_layers_only_wherever_they_stand(
    tmp_path: Path, upper: list[tuple[str, bytes, str]], expected: dict[str, str]
) -> None:
    """OCI image spec, "Whiteouts": a whiteout applies to lower layers only, and its place among
    its layer's members does not matter (moby fixed the same ordering bug, moby#17819)."""
    _apply(tmp_path, _LOWER, _tar(*upper))
    assert _listing(tmp_path) == expected


def test_later_layer_replaces_entries(tmp_path: Path) -> None:
    lower = _tar(("x", b"old", "f"), ("d/", b"", "d"), ("d/f", b"f", "f"), ("s", b"x", "l"))
    upper = _tar(("x", b"new", "f"), ("d", b"x", "l"), ("s/", b"", "d"))
    _apply(tmp_path, lower, upper)
    assert _listing(tmp_path) == {"x": "new", "d": "link", "s": "dir"}
    assert os.readlink(tmp_path / "d") == "x"


def test_missing_parents_are_created(tmp_path: Path) -> None:
    _apply(tmp_path, _tar(("p/q/r/file", b"deep", "f")), _tar(("p/", b"", "d")))
    assert (tmp_path / "p/q/r/file").read_text() == "deep"
    assert (tmp_path / "p/q").stat().st_mode & 0o777 == 0o755
    assert int((tmp_path / "p").stat().st_mtime) == 1_600_000_000


def test_media_type_mismatch_uses_magic(tmp_path: Path) -> None:
    blob = zstandard.ZstdCompressor().compress(_tar(("f", b"z", "f")))
    ex = Extractor(tmp_path)
    ex.add_layer(io.BytesIO(blob), TAR)
    ex.finish()
    assert (tmp_path / "f").read_text() == "z"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is restored only as root")
def test_owner_and_setuid_kept_as_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.chown(src / "f", 1234, 5678)
    os.chmod(src / "f", 0o4755)
    (src / "d").mkdir()
    os.chown(src / "d", 4321, 8765)
    layers = list(pack_tree(src))
    out = tmp_path / "out"
    out.mkdir()
    ex = Extractor(out)
    for layer in layers:
        assert isinstance(layer.data, bytes)
        ex.add_layer(io.BytesIO(layer.data), layer.compression)
    ex.finish()
    st = (out / "f").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o4755)
    assert ((out / "d").stat().st_uid, (out / "d").stat().st_gid) == (4321, 8765)
    # Not preserving owners: files belong to us.
    out2 = tmp_path / "out2"
    out2.mkdir()
    ex = Extractor(out2, preserve_owner=False)
    for layer in layers:
        assert isinstance(layer.data, bytes)
        ex.add_layer(io.BytesIO(layer.data), layer.compression)
    ex.finish()
    assert (out2 / "f").stat().st_uid == os.geteuid()


def test_replace_dir_swaps_and_failed_restore_leaves_target(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    (target / "old.txt").write_text("old")
    # A failed restore: staging discarded, target untouched.
    st = staging_dir(target)
    assert st.parent == target.parent and st.stat().st_mode & 0o777 == 0o700
    ex = Extractor(st)
    with pytest.raises(Exception):  # noqa: B017 - any refusal
        ex.add_layer(io.BytesIO(_tar(("new.txt", b"new", "f"))[:700]), TAR)
    ex.close()
    discard_dir(st)
    assert _listing(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]
    # A good restore replaces the contents, leaving no siblings behind.
    st = staging_dir(target)
    _apply(st, _tar(("new.txt", b"new", "f"), ("ro/", b"", "d")))
    os.chmod(st / "ro", 0o555)
    replace_dir(st, target)
    assert _listing(target) == {"new.txt": "new", "ro": "dir"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]
    # No target yet: plain rename.
    fresh = tmp_path / "fresh"
    st = staging_dir(fresh)
    _apply(st, _tar(("a", b"a", "f")))
    replace_dir(st, fresh)
    assert _listing(fresh) == {"a": "a"}


def test_round_trip_preserves_nasty_details(tmp_path: Path) -> None:
    from tests.trees import make_tree

    src = tmp_path / "src"
    make_tree(src, small_files=50, big_bytes=1 << 20)
    out = tmp_path / "out"
    st = staging_dir(out)
    ex = Extractor(st)
    for layer in pack_tree(src):
        assert isinstance(layer.data, bytes)
        ex.add_layer(io.BytesIO(layer.data), layer.compression)
    ex.finish()
    replace_dir(st, out)
    assert_same_tree(src, out)
    assert os.readlink(out / "links" / "dangling") == "does/not/exist"
    assert (out / "modes" / "rodir").stat().st_mode & 0o777 == 0o555


# -- the fast paths: pipelined layers, odd chunking, modes, owners ------------------------------


def _layers_of(src: Path, **kw: int) -> list[tuple[bytes, str]]:
    from remote_cache.archive.plan import scan_tree

    out = []
    for layer in pack_tree(scan_tree(src, **kw)):
        assert isinstance(layer.data, bytes)
        out.append((layer.data, layer.compression))
    return out


def test_add_layers_equals_add_layer(tmp_path: Path) -> None:
    from tests.trees import make_tree

    src = tmp_path / "src"
    make_tree(src, small_files=300, big_bytes=3 << 20)
    layers = _layers_of(src, min_bytes=8 << 10, max_bytes=64 << 10)
    assert len(layers) > 10
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    ex1 = Extractor(one)
    for data, mt in layers:
        ex1.add_layer(io.BytesIO(data), mt)
    s1 = ex1.finish()
    ex2 = Extractor(many)
    ex2.add_layers((io.BytesIO(data), mt) for data, mt in layers)
    s2 = ex2.finish()
    assert s1 == s2 and s2.layers == len(layers)
    assert_same_tree(src, one)
    assert_same_tree(src, many)


def test_add_layers_applies_whiteouts_in_order(tmp_path: Path) -> None:
    lower = _tar(("a/", b"", "d"), ("a/one", b"1", "f"), ("a/two", b"2", "f"), ("c", b"c", "f"))
    upper = _tar(("a/.wh.one", b"", "f"), ("c/", b"", "d"), ("c/inside", b"i", "f"))
    ex = Extractor(tmp_path)
    ex.add_layers([(io.BytesIO(lower), TAR), (io.BytesIO(upper), TAR)])
    ex.finish()
    assert _listing(tmp_path) == {"a": "dir", "a/two": "2", "c": "dir", "c/inside": "i"}


class _Dribble(io.RawIOBase):
    """A file object that returns at most ``step`` bytes per read (headers straddle chunks)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


@pytest.mark.parametrize("step", [1, 333, 700, 4096 + 7])
def test_odd_read_sizes_plain_tar(tmp_path: Path, step: int) -> None:
    big = os.urandom(70_000)
    raw = _tar(("d/", b"", "d"), ("d/big", big, "f"), ("d/small", b"s" * 513, "f"), ("d/empty", b"", "f"))
    ex = Extractor(tmp_path)
    ex.add_layer(_Dribble(raw, step), TAR)  # type: ignore[arg-type]
    ex.finish()
    assert (tmp_path / "d/big").read_bytes() == big
    assert (tmp_path / "d/small").read_bytes() == b"s" * 513
    assert (tmp_path / "d/empty").read_bytes() == b""


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_odd_read_sizes_compressed(tmp_path: Path, kind: str, step: int) -> None:
    """A layer read as it downloads may come a byte at a time: its magic bytes too."""
    raw = _tar(("d/", b"", "d"), ("d/f", b"data" * 300, "f"))
    blob = zstandard.ZstdCompressor().compress(raw) if kind == "zstd" else gzip.compress(raw)
    ex = Extractor(tmp_path)
    ex.add_layer(_Dribble(blob, step), kind)  # type: ignore[arg-type]
    ex.finish()
    assert (tmp_path / "d/f").read_bytes() == b"data" * 300


def _mode_tar(modes: dict[str, int]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, mode in modes.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = 3, mode, 1_600_000_000
            info.uid, info.gid = os.geteuid(), os.getegid()
            tf.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


_MODES = {"a": 0o644, "b": 0o664, "c": 0o777, "d": 0o600, "e": 0o444, "f": 0o000, "g": 0o751}


def test_file_modes_exact_whatever_the_umask(tmp_path: Path) -> None:
    for umask in (0o022, 0o077, 0o000, 0o777):
        dest = tmp_path / f"u{umask:o}"
        dest.mkdir()
        old = os.umask(umask)
        try:
            ex = Extractor(dest)
            ex.add_layer(io.BytesIO(_mode_tar(_MODES)), TAR)
            ex.finish()
        finally:
            os.umask(old)
        got = {n: (dest / n).stat().st_mode & 0o7777 for n in _MODES}
        assert got == _MODES, f"umask {umask:o}"
        assert all((dest / n).stat().st_mtime == 1_600_000_000 for n in _MODES)


def test_file_modes_exact_under_a_default_acl(tmp_path: Path) -> None:
    import struct

    # A default ACL "u::rwx g::rwx o::---" replaces the umask and masks the mode given to open().
    entry = struct.Struct("<HHI")
    acl = struct.pack("<I", 2) + b"".join(
        entry.pack(t, p, 0xFFFFFFFF) for t, p in ((1, 7), (4, 7), (0x20, 0))
    )
    try:
        os.setxattr(tmp_path, "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    dest = tmp_path / "dest"
    dest.mkdir()
    ex = Extractor(dest)
    ex.add_layer(io.BytesIO(_mode_tar(_MODES)), TAR)
    ex.finish()
    assert {n: (dest / n).stat().st_mode & 0o7777 for n in _MODES} == _MODES


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is restored only as root")
def test_owner_exact_in_a_setgid_dest_of_another_group(tmp_path: Path) -> None:
    # New files in a setgid directory take its group: the "ids already match" shortcut must
    # not apply, or files meant for gid 0 would keep gid 4242.
    dest = tmp_path / "dest"
    dest.mkdir()
    os.chown(dest, 0, 4242)
    os.chmod(dest, 0o2700)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, uid, gid in (("mine", 0, 0), ("other", 1234, 5678), ("huge", 3_000_000, 9)):
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = 1, uid, gid, 0o644
            tf.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("sym")
        link.type, link.linkname, link.uid, link.gid = tarfile.SYMTYPE, "mine", 0, 0
        tf.addfile(link)
    ex = Extractor(dest)
    ex.add_layer(io.BytesIO(buf.getvalue()), TAR)
    ex.finish()
    ids = {
        n: (os.lstat(dest / n).st_uid, os.lstat(dest / n).st_gid) for n in ("mine", "other", "huge", "sym")
    }
    assert ids == {"mine": (0, 0), "other": (1234, 5678), "huge": (3_000_000, 9), "sym": (0, 0)}


def _fix_checksum(raw: bytearray) -> None:
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])


def test_unusual_number_fields_are_parsed(tmp_path: Path) -> None:
    raw = bytearray(_tar(("f", b"hello", "f")))
    # Header of "f" is the first ustar block after the PAX one; tarfile writes no PAX here.
    assert raw[156:157] == b"0"
    raw[100:108] = b"  640 \0 "  # spaces around, NUL inside the trailing padding
    raw[124:136] = b"\x80" + (5).to_bytes(11, "big")  # base-256 size
    raw[136:148] = b"%011o " % 1_600_000_000  # space-terminated
    _fix_checksum(raw)
    ex = Extractor(tmp_path)
    ex.add_layer(io.BytesIO(bytes(raw)), TAR)
    ex.finish()
    st = (tmp_path / "f").stat()
    assert (tmp_path / "f").read_bytes() == b"hello"
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, 1_600_000_000)


def test_slash_directory_entry_is_the_root(tmp_path: Path) -> None:
    # umoci insert writes the root as "/" (a directory entry); it may only set the root's metadata.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        root = tarfile.TarInfo("/")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o750, 1_500_000_000
        tf.addfile(root)
        f = tarfile.TarInfo("sub/f")
        f.size, f.mode, f.mtime = 1, 0o644, 1_600_000_000
        tf.addfile(f, io.BytesIO(b"x"))
    _apply(tmp_path, buf.getvalue())
    assert (tmp_path / "sub/f").read_text() == "x"
    st = tmp_path.stat()
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o750, 1_500_000_000)


def test_stream_ending_right_after_a_member_is_accepted(tmp_path: Path) -> None:
    # umoci 0.4 ends a layer right after the last file's data: no padding, no zero blocks.
    whole = _tar(("a.txt", b"first", "f"), ("b.txt", b"second", "f"))
    header_and_data = 512 + 512 + 512 + len(b"second")  # a.txt header+block, b.txt header+data
    (tmp_path / "out").mkdir()
    _apply(tmp_path / "out", whole[:header_and_data])
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"second"
    # Cut inside the padding or inside the data: truncated.
    for cut in (header_and_data + 7, header_and_data - 2):
        (tmp_path / f"cut{cut}").mkdir()
        with pytest.raises(IntegrityError):
            _apply(tmp_path / f"cut{cut}", whole[:cut])


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> int:
    """Bytes the C allocator has handed out and not had back (glibc's mallinfo2)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc's mallinfo2 (2.33 or later)")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def test_each_layers_decompression_state_is_freed_when_the_layer_ends(tmp_path: Path) -> None:
    # A zstd stream reader holds megabytes (its window). Kept alive by a reference cycle, a
    # restore of 35 layers held ~100 MB more than it needed, and wrote to fresh pages each time.
    layers = []
    for i in range(20):
        data = _tar((f"f{i}", os.urandom(64 << 10) * 40, "f"))
        stream = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
        layers.append(stream.compress(data) + stream.flush())
    gc.collect()
    gc.disable()
    try:
        before = _malloc_in_use()
        extractor = Extractor(tmp_path)
        extractor.add_layers((io.BytesIO(blob), "zstd") for blob in layers)
        grew = _malloc_in_use() - before
        extractor.finish()
    finally:
        gc.enable()
    assert grew < 16 << 20, f"{grew >> 20} MiB still held after extracting {len(layers)} layers"


def _one_big_file(size: int, fill: bytes) -> bytes:
    """A zstd layer holding one file of ``size`` bytes of ``fill``: a few hundred kB for gigabytes."""
    header = tarfile.TarInfo("big")
    header.size, header.mode, header.mtime = size, 0o644, 1_600_000_000
    cctx = zstandard.ZstdCompressor(level=3)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        w.write(header.tobuf(tarfile.PAX_FORMAT))
        block = fill * (1 << 20)
        for _ in range(size >> 20):
            w.write(block)
        w.write(b"\0" * (-size % 512 + 1024))
    return out.getvalue()


def test_a_stop_ends_the_extraction_inside_a_big_member(tmp_path: Path) -> None:
    """A stop (a signal, --deadline) while one big file is written ends it within a chunk: it was
    looked at between members only, so a small layer holding gigabytes of one file (a
    decompression bomb, or a big cache) was written whole first (36 s past --deadline 3s)."""
    import threading

    from remote_cache.cache.spool import Aborted

    size = 1 << 30
    layer = _one_big_file(size, b"A")
    (tmp_path / "out").mkdir()
    ex = Extractor(tmp_path / "out")
    failed: list[BaseException] = []

    def extract() -> None:
        try:
            ex.add_layer(io.BytesIO(layer), "zstd")
        except BaseException as exc:  # (the thread's outcome, asserted below)
            failed.append(exc)

    worker = threading.Thread(target=extract)
    worker.start()
    big = tmp_path / "out" / "big"
    while worker.is_alive() and not (big.exists() and big.stat().st_size > 0):
        time.sleep(0.001)
    ex.stop(Aborted())
    worker.join()
    written = big.stat().st_size
    ex.close()
    assert failed and isinstance(failed[0], Aborted), failed
    assert written < 64 << 20, f"{written} of {size} bytes written after the stop"


def test_a_gzip_layer_comes_out_in_bounded_chunks(tmp_path: Path) -> None:
    """256 KiB of gzip input can inflate to ~260 MB in one call, and 16 such chunks wait in the
    queue (a 4 MB layer holding 4 GiB took 820 MB of memory): each chunk is capped; the bytes,
    concatenated members and the truncation check are as before."""
    from remote_cache.archive.decompress import _Source

    data = b"\0" * (64 << 20) + os.urandom(1 << 20)
    two_members = gzip.compress(data) + gzip.compress(b"tail")
    source = _Source(io.BytesIO(two_members), "gzip")
    chunks = []
    while chunk := source.read():
        chunks.append(chunk)
        assert len(chunk) <= 2 << 20, f"a chunk of {len(chunk)} bytes"
    assert b"".join(chunks) == data + b"tail"
    source = _Source(io.BytesIO(two_members[:-10]), "gzip")
    with pytest.raises(IntegrityError, match="truncated"):
        while source.read():
            pass
