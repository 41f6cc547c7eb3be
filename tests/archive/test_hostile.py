"""Hostile archives: every escape attempt is refused with UnsafeArchive and writes nothing outside."""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard

from remote_cache.archive.extract import Extractor
from remote_cache.archive.swap import discard_dir
from remote_cache.errors import ImageFormatError, IntegrityError, UnsafeArchive
from tests.trees import snapshot, staging_dir


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _m(
    name: str, typ: bytes = tarfile.REGTYPE, data: bytes = b"pwned\n", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = typ
    info.linkname = link
    info.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
    return info, data


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """A sentinel directory around the target: nothing may appear or change in it."""
    box = tmp_path / "box"
    target = box / "inner" / "target"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("original\n")
    (box / "inner" / "x").mkdir()  # an existing sibling an escape might aim at
    return box, target


def _outside(box: Path, st: Path) -> dict[str, tuple[object, ...]]:
    """``snapshot(box)`` minus the staging dir, and minus its parent's mtime (which creating and
    removing the staging dir changes: comparing it made these tests flaky at second boundaries)."""
    rel = os.path.relpath(st, box)
    parent = os.path.dirname(rel)
    out: dict[str, tuple[object, ...]] = {}
    for k, v in snapshot(box).items():
        if k == rel or k.startswith(rel + os.sep):
            continue
        out[k] = (v[0], v[1], *v[3:]) if k == parent else v
    return out


def _attempt(box: Path, target: Path, blob: bytes, compression: str = "tar") -> type[BaseException]:
    st = staging_dir(target)
    before = _outside(box, st)
    with pytest.raises((UnsafeArchive, IntegrityError, ImageFormatError)) as info:
        ex = Extractor(st)
        try:
            ex.add_layer(io.BytesIO(blob), compression)
            ex.finish()
        finally:
            ex.close()
    assert _outside(box, st) == before, "something outside the staging dir changed"
    discard_dir(st)
    assert _outside(box, st) == before and not st.exists()
    assert (target / "keep.txt").read_text() == "original\n"
    assert not os.path.exists("/tmp/rc-hostile-pwned")
    return info.type


CASES = {
    "dotdot": [_m("../x/pwned")],
    "absolute": [_m("/tmp/rc-hostile-pwned")],
    "inner-dotdot": [_m("a/../../x/pwned")],
    "symlink-abs-then-write": [_m("l", tarfile.SYMTYPE, link="/tmp"), _m("l/rc-hostile-pwned")],
    "symlink-dotdot-then-write": [_m("up", tarfile.SYMTYPE, link=".."), _m("up/x/pwned")],
    "symlink-then-dir-through": [_m("s", tarfile.SYMTYPE, link="../x"), _m("s/sub/", tarfile.DIRTYPE)],
    "hardlink-etc-passwd": [_m("h", tarfile.LNKTYPE, link="/etc/passwd")],
    "hardlink-outside": [_m("h", tarfile.LNKTYPE, link="../target/keep.txt")],
    "hardlink-missing": [_m("h", tarfile.LNKTYPE, link="nope")],
    "chardev": [_m("dev", tarfile.CHRTYPE)],
    "blockdev": [_m("blk", tarfile.BLKTYPE)],
    "fifo": [_m("fifo", tarfile.FIFOTYPE)],
    "dir-then-symlink": [
        _m("d/", tarfile.DIRTYPE),
        _m("d", tarfile.SYMTYPE, link="/tmp"),
        _m("d/rc-hostile-pwned"),
    ],
    "file-twice": [_m("f"), _m("f")],
    "whiteout-dotdot": [_m("a/.wh...")],
    # Nesting thousands deep (30 kB of tar) must not exhaust recursion in the extractor or in
    # the clean-up that removes the staging directory (it was "unexpected RecursionError", and
    # the work directory stayed, failing every later restore of an in-place target).
    "too-deep-implicit": [_m("d/" * 2000 + "f")],
    "too-deep-explicit": [_m("d/" * (i + 1), tarfile.DIRTYPE) for i in range(1500)],
}


def _pax(name: str, **records: str) -> tuple[tarfile.TarInfo, bytes]:
    info, data = _m(name)
    info.pax_headers = records
    return info, data


#: PAX records a writer may put anything in: each is refused as a format or integrity error, not
#: an "unexpected ValueError/OverflowError" (and a sparse file is not written as its raw map).
PAX_CASES = {
    "size-not-a-number": _pax("f", size="abc"),
    "uid-not-a-number": _pax("f", uid="x1"),
    "uid-too-big": _pax("f", uid="9" * 30),
    "gid-negative": _pax("f", gid="-5"),
    "mtime-too-big": _pax("f", mtime="9" * 30),
    "nul-in-path": _pax("f", path="a\0b"),
    "nul-in-linkpath": (lambda m: (m[0], b""))(_pax("l", linkpath="a\0b")),
    "gnu-sparse-1.0": _pax(
        "GNUSparseFile.0/s", **{"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s"}
    ),
    "gnu-sparse-0.1": _pax("s", **{"GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0"}),
}


@pytest.mark.parametrize("case", sorted(PAX_CASES))
def test_odd_pax_records_are_refused_as_format_errors(sandbox: tuple[Path, Path], case: str) -> None:
    box, target = sandbox
    member = PAX_CASES[case]
    if case == "nul-in-linkpath":
        member[0].type = tarfile.SYMTYPE
    assert _attempt(box, target, _tar(member)) in (ImageFormatError, IntegrityError, UnsafeArchive)


@pytest.mark.parametrize(("field", "value"), [("uid", 1 << 40), ("gid", 1 << 40), ("mtime", 1 << 80)])
def test_numbers_out_of_range_in_base_256_fields_are_refused(
    sandbox: tuple[Path, Path], field: str, value: int
) -> None:
    """GNU base-256 fields hold any number: one no owner id or time can be is a format error."""
    info, data = _m("f")
    setattr(info, field, value)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    box, target = sandbox
    assert _attempt(box, target, buf.getvalue()) is IntegrityError


def test_what_this_filesystem_cannot_hold_is_named_by_member(sandbox: tuple[Path, Path]) -> None:
    """A name over NAME_MAX, or a symlink with an empty target (Linux has none), fails naming the
    archive member and its layer, not as a bare errno with a bytes name (b'nnn...', b'')."""
    box, target = sandbox
    assert _attempt(box, target, _tar(_m("l", tarfile.SYMTYPE, link=""))) is ImageFormatError
    st = staging_dir(target)
    ex = Extractor(st)
    with pytest.raises(OSError, match=r"File name too long \(archive member 'ok/n{20}.*', layer 1\)"):
        ex.add_layer(io.BytesIO(_tar(_m("ok/" + "n" * 300))), "tar")
    ex.close()
    discard_dir(st)


def test_an_owner_id_out_of_range_is_refused_whatever_field_held_the_same_bytes_before(
    sandbox: tuple[Path, Path],
) -> None:
    """The decoder caches numbers by their raw field: a mode field holding the same base-256 bytes
    as the uid field must not let the uid past its range check (it ended as 'unexpected
    OverflowError' from fchown)."""
    info, data = _m("f")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    big = b"\x80" + (1 << 40).to_bytes(7, "big")
    raw[100:108] = big  # mode
    raw[108:116] = big  # uid
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    box, target = sandbox
    assert _attempt(box, target, bytes(raw)) is IntegrityError


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused(sandbox: tuple[Path, Path], case: str) -> None:
    box, target = sandbox
    err = _attempt(box, target, _tar(*CASES[case]))
    assert err is UnsafeArchive


def test_hostile_member_is_named(sandbox: tuple[Path, Path]) -> None:
    _box, target = sandbox
    st = staging_dir(target)
    ex = Extractor(st)
    with pytest.raises(UnsafeArchive, match=re.escape("a/../../x/pwned")):
        ex.add_layer(io.BytesIO(_tar(_m("ok.txt"), _m("a/../../x/pwned"))), "tar")
    ex.close()
    discard_dir(st)


def test_a_hard_link_out_of_the_tree_is_named_by_its_target(sandbox: tuple[Path, Path]) -> None:
    """The '..' is the link target's, not the member's name ("archive member 'h' has a '..' path
    component" sent the reader looking at 'h')."""
    _box, target = sandbox
    st = staging_dir(target)
    ex = Extractor(st)
    said = "hard link 'h' points to '../target/keep.txt' (a '..' component)"
    with pytest.raises(UnsafeArchive, match=re.escape(said)):
        ex.add_layer(io.BytesIO(_tar(*CASES["hardlink-outside"])), "tar")
    ex.close()
    discard_dir(st)


def test_symlink_from_earlier_layer_is_not_followed(sandbox: tuple[Path, Path]) -> None:
    box, target = sandbox
    st = staging_dir(target)
    before = _outside(box, st)
    ex = Extractor(st)
    ex.add_layer(io.BytesIO(_tar(_m("l", tarfile.SYMTYPE, link=str(box / "inner" / "x")))), "")
    with pytest.raises(UnsafeArchive):
        ex.add_layer(io.BytesIO(_tar(_m("l/pwned"))), "")
    ex.close()
    assert _outside(box, st) == before
    discard_dir(st)
    assert _outside(box, st) == before


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_truncated_stream_is_integrity_error(sandbox: tuple[Path, Path], kind: str) -> None:
    box, target = sandbox
    raw = _tar(_m("a.bin", data=os.urandom(200_000)), _m("b.txt"))
    if kind == "zstd":
        blob = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
        mt = "zstd"
    else:
        blob = gzip.compress(raw)
        mt = "gzip"
    for cut in (len(blob) // 2, len(blob) - 3):
        assert _attempt(box, target, blob[:cut], mt) is IntegrityError
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    assert _attempt(box, target, bytes(corrupt), mt) is IntegrityError


def test_truncated_plain_tar_and_non_tar(sandbox: tuple[Path, Path]) -> None:
    box, target = sandbox
    raw = _tar(_m("a.bin", data=os.urandom(5000)))
    assert _attempt(box, target, raw[:1500]) is IntegrityError
    assert _attempt(box, target, b'{"not": "a tar"}' * 64) is ImageFormatError
    assert _attempt(box, target, b"") is ImageFormatError


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_after_a_good_one_is_refused_by_add_layers(
    sandbox: tuple[Path, Path], case: str
) -> None:
    # The pipelined path (next layer decompressed while the current one is written) keeps
    # every check: the hostile member arrives in the second layer.
    box, target = sandbox
    st = staging_dir(target)
    before = _outside(box, st)
    ex = Extractor(st)
    good = io.BytesIO(zstandard.ZstdCompressor().compress(_tar(_m("ok/fine.txt"))))
    with pytest.raises(UnsafeArchive):
        ex.add_layers([(good, "zstd"), (io.BytesIO(_tar(*CASES[case])), "")])
    ex.close()
    assert (st / "ok" / "fine.txt").read_text() == "pwned\n"
    assert _outside(box, st) == before
    discard_dir(st)
    assert _outside(box, st) == before


def test_symlink_from_earlier_layer_is_not_followed_by_add_layers(sandbox: tuple[Path, Path]) -> None:
    box, target = sandbox
    st = staging_dir(target)
    before = _outside(box, st)
    ex = Extractor(st)
    first = _tar(_m("l", tarfile.SYMTYPE, link=str(box / "inner" / "x")))
    with pytest.raises(UnsafeArchive):
        ex.add_layers([(io.BytesIO(first), ""), (io.BytesIO(_tar(_m("l/pwned"))), "")])
    ex.close()
    assert _outside(box, st) == before
    discard_dir(st)
    assert _outside(box, st) == before


class _Stalled(io.RawIOBase):
    """Returns ``data``, then blocks until ``release`` is set (a download that stalls)."""

    def __init__(self, data: bytes, release: threading.Event) -> None:
        self._data, self._release = data, release

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._data:
            n = len(self._data) if size < 0 else size
            out, self._data = self._data[:n], self._data[n:]
            return out
        self._release.wait()
        raise OSError("connection reset")


def test_refusal_does_not_wait_for_a_stalled_reader(sandbox: tuple[Path, Path]) -> None:
    _box, target = sandbox
    release = threading.Event()
    # A hostile first member, then a stream that never ends until released.
    blob = _tar(_m("../x/pwned"), _m("padding.bin", data=os.urandom(4096)))[:1024]
    st = staging_dir(target)
    ex = Extractor(st)
    started = time.monotonic()
    with pytest.raises(UnsafeArchive):
        ex.add_layers([(_Stalled(blob, release), "")])  # type: ignore[list-item]
    assert time.monotonic() - started < 5
    ex.close()
    discard_dir(st)
    release.set()
    deadline = time.monotonic() + 5
    while any(t.name == "unpack-decompress" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the decompression thread did not exit"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_truncated_later_layer_is_integrity_error_in_add_layers(
    sandbox: tuple[Path, Path], kind: str
) -> None:
    _box, target = sandbox
    raw = _tar(_m("a.bin", data=os.urandom(300_000)), _m("b.txt"))
    blob = (
        zstandard.ZstdCompressor(write_checksum=True).compress(raw) if kind == "zstd" else gzip.compress(raw)
    )
    st = staging_dir(target)
    ex = Extractor(st)
    with pytest.raises(IntegrityError):
        ex.add_layers([(io.BytesIO(_tar(_m("first.txt"))), ""), (io.BytesIO(blob[: len(blob) - 3]), "")])
    ex.close()
    assert ex.stats.layers == 2
    discard_dir(st)


@pytest.mark.parametrize(
    "members",
    [
        [_m("/")],  # a file named "/": only a directory entry may name the root
        [_m("//", tarfile.SYMTYPE, link="/etc")],
        [_m("/", tarfile.DIRTYPE), _m("/etc/rc-hostile-pwned")],
    ],
)
def test_slash_names_other_than_the_root_dir_entry_are_refused(
    sandbox: tuple[Path, Path], members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    box, target = sandbox
    assert _attempt(box, target, _tar(*members)) is UnsafeArchive
