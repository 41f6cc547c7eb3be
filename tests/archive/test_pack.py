"""Pack: round trips of the nasty tree, determinism, the layer split rule, GNU tar interop."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from remote_cache.archive.extract import Extractor
from remote_cache.archive.pack import ZSTD_MT_ABOVE, PackedLayer, pack_tree
from remote_cache.archive.plan import scan_tree
from remote_cache.archive.swap import replace_dir
from remote_cache.archive.tar import DIR, HARDLINK
from remote_cache.archive.target import RestoreTarget, swap_in
from remote_cache.archive.walk import Special, tree_identity
from tests.trees import assert_same_tree, make_tree, settle_ctimes, snapshot, socket_file, staging_dir


@pytest.fixture(scope="module")
def nasty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nasty") / "src"
    make_tree(root)
    return root


def _restore(layers: list[PackedLayer], target: Path) -> None:
    st = staging_dir(target)
    ex = Extractor(st)
    for layer in layers:
        data = layer.data if isinstance(layer.data, bytes) else layer.data.read_bytes()
        ex.add_layer(io.BytesIO(data), layer.compression)
    ex.finish()
    replace_dir(st, target)


def _raw_tar(layer: PackedLayer) -> bytes:
    data = layer.data if isinstance(layer.data, bytes) else layer.data.read_bytes()
    if layer.compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    import gzip

    return gzip.decompress(data)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_round_trip_nasty_tree(nasty: Path, tmp_path: Path, compression: str) -> None:
    scan = scan_tree(nasty)
    layers = list(pack_tree(scan, compression=compression))  # type: ignore[arg-type]
    assert {x.compression for x in layers} == {compression}
    assert scan.stats.hardlinks == 4 and scan.stats.symlinks == 7 and not scan.stats.skipped
    assert sum(x.files for x in layers) == scan.stats.files
    _restore(layers, tmp_path / "out")
    assert_same_tree(nasty, tmp_path / "out")


def test_round_trip_many_small_layers_and_spool(nasty: Path, tmp_path: Path) -> None:
    # Tiny layer limits force hard links, empty dirs and parents across many layers.
    scan = scan_tree(nasty, min_bytes=32 << 10, max_bytes=256 << 10)
    assert len(scan.layers) > 20
    spool = tmp_path / "spool"
    spool.mkdir()
    layers = list(pack_tree(scan, spool_dir=spool, spool_bytes=1 << 20))
    assert any(isinstance(x.data, Path) for x in layers)  # the 20 MB file's layer spilled
    _restore(layers, tmp_path / "out")
    assert_same_tree(nasty, tmp_path / "out")


def test_hardlinks_stay_with_their_first_path(nasty: Path) -> None:
    scan = scan_tree(nasty, min_bytes=16 << 10, max_bytes=64 << 10)
    for plan in scan.layers:
        seen: set[str] = set()
        for e in plan.members:
            if e.kind == HARDLINK:
                assert e.linkname in seen, f"{e.path} links to {e.linkname} outside its layer"
            seen.add(e.path)


def test_deterministic_and_touch_changes_one_layer(nasty: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-a", str(nasty), str(src)], check=True)
    kw = {"min_bytes": 64 << 10, "max_bytes": 1 << 20}
    a = [x.digest for x in pack_tree(scan_tree(src, **kw))]
    b = [x.digest for x in pack_tree(scan_tree(src, **kw), threads=1)]
    assert a == b and len(a) > 5
    victim = src / "many" / "pkg07" / "lib" / "file00007.js"
    os.utime(victim, (1, 1_700_000_000))
    c = [x.digest for x in pack_tree(scan_tree(src, **kw))]
    assert len(c) == len(a)
    assert sum(x != y for x, y in zip(a, c, strict=True)) == 1


def test_a_layer_bigger_than_the_threaded_size_packs_alike_on_any_number_of_cores(tmp_path: Path) -> None:
    """One file over ZSTD_MT_ABOVE is a layer zstd compresses in its multi-threaded mode: the
    blob must not depend on how many workers a machine has (nor must the small layers')."""
    src = tmp_path / "src"
    src.mkdir()
    chunk = os.urandom(1 << 20) + b"compressible " * 80_000
    (src / "big").write_bytes(chunk * ((ZSTD_MT_ABOVE >> 20) // 2 + 2))
    (src / "small").write_bytes(chunk)
    scan = scan_tree(src)
    assert any(p.tar_bytes > ZSTD_MT_ABOVE for p in scan.layers)
    digests = {threads: [x.digest for x in pack_tree(scan, threads=threads)] for threads in (1, 2, 3)}
    assert digests[1] == digests[2] == digests[3]


def test_adding_files_in_one_dir_changes_at_most_two_layers(nasty: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-a", str(nasty), str(src)], check=True)
    kw = {"min_bytes": 64 << 10, "max_bytes": 1 << 20}
    before = {x.digest for x in pack_tree(scan_tree(src, **kw))}
    parent = src / "many" / "pkg21"
    st = parent.stat()
    pkg = parent / "newdep"
    pkg.mkdir()
    for i in range(30):
        (pkg / f"n{i}.js").write_bytes(os.urandom(1500))
    # The parent's own mtime changes too (its entry may sit in the layer before); the split
    # rule is what is under test here, so keep it.
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = [x.digest for x in pack_tree(scan_tree(src, **kw))]
    # The new directory's entry lands in the directories' own first layer; of the file layers,
    # at most two change.
    changed = [i for i, d in enumerate(after) if d not in before]
    assert 0 in changed
    assert len([i for i in changed if i != 0]) <= 2


def test_directories_have_a_layer_of_their_own(nasty: Path) -> None:
    scan = scan_tree(nasty, min_bytes=64 << 10, max_bytes=1 << 20)
    kinds = [{e.kind for e in plan.members} for plan in scan.layers]
    assert kinds[0] == {DIR}
    assert all(DIR not in k for k in kinds[1:])


def test_tiny_tree_is_one_layer(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "e").mkdir()
    scan = scan_tree(tmp_path)
    assert len(scan.layers) == 1
    empty = tmp_path / "empty-root"
    empty.mkdir()
    layers = list(pack_tree(empty))
    assert len(layers) == 1 and layers[0].files == 0
    _restore(layers, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _char_device(path: Path) -> bool:
    """Make ``path`` a character device (/dev/null's numbers); False without the privilege to."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        return False
    return True


def test_special_files_are_left_out_and_named(tmp_path: Path) -> None:
    src = tmp_path / "s"
    (src / "run").mkdir(parents=True)
    (src / "f").write_text("f")
    os.mkfifo(src / "a-pipe")
    socket_file(src / "run" / "x.sock")
    device = _char_device(src / "null")
    scan = scan_tree(src)
    layers = list(pack_tree(scan))
    expected = [Special("a-pipe", "fifo"), *([Special("null", "char device")] if device else [])]
    assert scan.stats.skipped == [*expected, Special("run/x.sock", "socket")]
    assert scan.stats.files == 1 and scan.stats.dirs == 1
    _restore(layers, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == ["f", "run"]


def test_gnu_tar_reads_our_layers(nasty: Path, tmp_path: Path) -> None:
    layers = list(pack_tree(scan_tree(nasty, min_bytes=256 << 10, max_bytes=2 << 20)))
    stream = b"".join(_raw_tar(x) for x in layers)
    listing = subprocess.run(["tar", "-tvif", "-"], input=stream, capture_output=True, check=True)
    assert listing.stderr == b""
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", "-xipf", "-", "-C", str(out)], input=stream, check=True)

    # GNU tar sets a directory's mtime when it leaves it, so a directory that later layers add
    # to (layers are separate archives) ends up with a newer mtime; compare everything else.
    def no_dir_mtime(tree: Path) -> dict[str, tuple[object, ...]]:
        return {k: (v[:2] + v[3:] if v[0] == "dir" else v) for k, v in snapshot(tree).items()}

    assert no_dir_mtime(nasty) == no_dir_mtime(out)


@pytest.mark.parametrize("flag", ["", "z"])
def test_our_extractor_reads_gnu_tar(nasty: Path, tmp_path: Path, flag: str) -> None:
    blob = subprocess.run(
        ["tar", "--format=pax", f"-c{flag}f", "-", "-C", str(nasty), "."], capture_output=True, check=True
    ).stdout
    out = tmp_path / "out"
    st = staging_dir(out)
    ex = Extractor(st)
    ex.add_layer(io.BytesIO(blob), "tar")  # magic decides
    ex.finish()
    replace_dir(st, out)
    assert_same_tree(nasty, out)
    assert snapshot(nasty) == snapshot(out)


def test_quick_identity_equals_the_scans_and_tracks_every_change(nasty: Path, tmp_path: Path) -> None:
    # tree_identity must walk exactly as scan_tree does: the save shortcut compares the two.
    identity = scan_tree(nasty).identity
    assert identity is not None and tree_identity(nasty) == identity
    tree = tmp_path / "t"
    make_tree(tree, small_files=50, big_bytes=1000)
    before = tree_identity(tree).digest
    changes = [
        lambda: os.chmod(tree / "big.bin", 0o600),  # metadata only
        lambda: (tree / "empty2" / "new").write_bytes(b""),  # an entry appears
        lambda: os.rename(tree / "empty2" / "new", tree / "empty2" / "renamed"),
        lambda: os.unlink(tree / "empty2" / "renamed"),
    ]
    seen = {before}
    for change in changes:
        settle_ctimes()  # so the ctime of what changes really moves
        change()
        digest = tree_identity(tree).digest
        assert digest not in seen
        seen.add(digest)


def _without_whiteout_names(src: Path, out: Path) -> None:
    """``out`` is ``src`` less the entries named like OCI whiteouts (left out by the save)."""
    doomed = sorted(src.rglob(".wh.*"), reverse=True)
    # Their removal moves their directories' mtimes, which the save recorded before it.
    saved = {parent: parent.stat() for parent in {path.parent for path in doomed}}
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for parent, st in saved.items():
        os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_same_tree(src, out)


def test_a_file_named_like_a_whiteout_is_left_out_and_named(tmp_path: Path) -> None:
    # A cache may hold files named ".wh.*" (nothing stops a tool from making them); the save
    # wrote them as ordinary members, and every OCI extractor (ours too) takes them for
    # whiteouts: the restore "hit" with them gone. They are left out, as special files are.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".wh.secret").write_bytes(b"a file, not a whiteout")
    (src / "sub" / ".wh..wh..opq").write_bytes(b"neither is this")
    (src / "sub" / "keep").write_bytes(b"keep")
    scan = scan_tree(src)
    assert sorted((s.path, s.kind) for s in scan.stats.skipped) == [
        (".wh.secret", "named like an OCI whiteout"),
        ("sub/.wh..wh..opq", "named like an OCI whiteout"),
    ]
    _restore(list(pack_tree(scan)), tmp_path / "out")
    _without_whiteout_names(src, tmp_path / "out")


def test_a_file_named_like_a_whiteout_does_not_delete_other_files(tmp_path: Path) -> None:
    # In a tree of several layers, "d/.wh.-pkg" (sorted after "d/-pkg", in a later layer)
    # deleted what earlier layers wrote under d/-pkg: data loss on a restore that says "hit".
    src = tmp_path / "src"
    (src / "d" / "-pkg").mkdir(parents=True)
    (src / "d" / "-pkg" / "big").write_bytes(os.urandom(17 << 20))  # a forced cut after it
    (src / "d" / "-pkg" / "small").write_bytes(b"small")
    (src / "d" / ".wh.-pkg").write_bytes(b"a file, not a whiteout")
    layers = list(pack_tree(scan_tree(src)))
    assert len(layers) > 2
    _restore(layers, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "-pkg" / "big").read_bytes() == (src / "d" / "-pkg" / "big").read_bytes()
    _without_whiteout_names(src, tmp_path / "out")


def test_a_restored_directory_keeps_the_mode_of_the_one_it_replaces(tmp_path: Path) -> None:
    # An entry holds no member for its root, and the extractor made every root 0755: a private
    # (0700) cache directory came back readable by everyone. It keeps the replaced directory's
    # mode now (like tar -x into it), and a new one gets mkdir's.
    src = tmp_path / "src"
    src.mkdir()
    (src / "key").write_bytes(b"secret")
    (src / "key").chmod(0o600)
    layers = list(pack_tree(scan_tree(src)))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = RestoreTarget(private, in_place=False)
    staging = staging_dir(private)
    with Extractor(staging) as extractor:
        for layer in layers:
            data = layer.data if isinstance(layer.data, bytes) else layer.data.read_bytes()
            extractor.add_layer(io.BytesIO(data), layer.compression)
        extractor.finish()
    swap_in(target, staging, staging.parent)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and (private / "key").read_bytes() == b"secret"
    fresh = tmp_path / "fresh"
    _restore(layers, fresh)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o777 & ~umask
