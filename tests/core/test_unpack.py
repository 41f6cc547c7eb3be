"""Unpack: layering and OCI whiteouts, magic-byte detection, ownership, replace_dir semantics."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from remote_cache.pack import pack_tree
from remote_cache.unpack import Extractor, discard_dir, replace_dir, staging_dir
from tests.trees import assert_same_tree

TAR = "application/vnd.oci.image.layer.v1.tar"


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
        ex.add_layer(io.BytesIO(layer.data), layer.media_type)
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
        ex.add_layer(io.BytesIO(layer.data), layer.media_type)
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
        ex.add_layer(io.BytesIO(layer.data), layer.media_type)
    ex.finish()
    replace_dir(st, out)
    assert_same_tree(src, out)
    assert os.readlink(out / "links" / "dangling") == "does/not/exist"
    assert (out / "modes" / "rodir").stat().st_mode & 0o777 == 0o555
