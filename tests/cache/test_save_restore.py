"""save/restore round trips through a layout and the real registry, and their failure guarantees."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache.image import build_image, load_image
from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.errors import (
    CacheMiss,
    CacheTooLarge,
    ImageFormatError,
    IntegrityError,
    NoSpace,
    StoreError,
    TreeChanged,
    UnsafeArchive,
    UnsuitableTarget,
)
from remote_cache.keys import tag_for_key
from remote_cache.oci import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, sha256_digest
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.reference import Reference, parse_reference
from remote_cache.oci.store import Store, open_store
from tests.cli.output import Run, json_line, warnings
from tests.mounts import tmpfs
from tests.stores import opened
from tests.trees import allocated, assert_same_tree, make_tree, one_file_tree, snapshot, socket_file
from tests.users import reachable_dir


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every path under ``root`` with its mode, mtime and content (or link target)."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if os.path.islink(full):
                content: bytes | str | None = os.readlink(full)
            elif os.path.isfile(full):
                content = Path(full).read_bytes()
            else:
                content = None
            out[os.path.relpath(full, root)] = (st.st_mode, int(st.st_mtime), content)
    return out


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _bulk(root: Path, count: int = 40, size: int = 40_000) -> Path:
    """A tree of ``count`` incompressible files in a few directories."""
    for i in range(count):
        d = root / f"pkg{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(size))
    return root


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
async def test_round_trip(where: Reference, tmp_path: Path, compression: str) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=150, big_bytes=1 << 20)
    async with opened(where) as store:
        saved = await save(store, "round trip/key", src, compression=compression)
        assert saved.tag == tag_for_key("round trip/key")
        assert saved.layers_uploaded == saved.layers_total >= 1
        assert saved.bytes_uploaded == saved.bytes_total > 0
        dest = tmp_path / "out" / "dest"
        got = await restore(store, "round trip/key", dest)
    assert_same_tree(src, dest)
    assert got.digest == saved.digest
    assert got.bytes == saved.bytes_total
    assert (got.size, got.files) == (saved.size, saved.files)
    assert json.dumps(got.to_json()) and json.dumps(saved.to_json())
    assert "round trip/key" in got.summary() and "round trip/key" in saved.summary()
    assert _siblings(dest) == ["dest"]  # no staging or spool directory left behind


async def test_resave_unchanged_uploads_nothing_and_keeps_digest(
    where: Reference, tmp_path: Path, small_layers: None
) -> None:
    src = _bulk(tmp_path / "src")
    async with opened(where) as store:
        first = await save(store, "k", src)
        assert first.layers_total > 3
        again = await save(store, "k", src)
        assert (again.bytes_uploaded, again.layers_uploaded) == (0, 0)
        assert again.unchanged and again.digest == first.digest
        assert (await store.resolve("k")).digest == first.digest

        # Change one file: only the layers holding it go up; the rest are skipped.
        (src / "pkg3" / "f8.bin").write_bytes(os.urandom(40_000))
        changed = await save(store, "k", src)
        assert not changed.unchanged and changed.digest != first.digest
        assert 1 <= changed.layers_uploaded < changed.layers_total
        assert changed.bytes_uploaded < changed.bytes_total / 2
        dest = tmp_path / "dest"
        await restore(store, "k", dest, jobs=3)
    assert_same_tree(src, dest)


async def test_restore_replaces_existing_target(tmp_path: Path, small_layers: None) -> None:
    store = LayoutStore(tmp_path / "layout")
    src = _bulk(tmp_path / "src", count=12)
    make_tree(src / "mixed", small_files=150, big_bytes=1 << 20)
    await save(store, "k", src)
    dest = tmp_path / "dest"
    (dest / "stale" / "deep").mkdir(parents=True)
    (dest / "stale" / "deep" / "old.txt").write_text("old")
    dest.chmod(0o700)  # a private cache directory: it stays private (it came back 0755)
    result = await restore(store, "k", dest)
    assert result.layers > 1
    assert_same_tree(src, dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700


class _ChmodWhenStarted:
    """A progress that changes the target's mode (another process, say) once downloads start."""

    def __init__(self, target: Path, mode: int) -> None:
        self.target, self.mode = target, mode

    def start(self, total: int | None) -> None:
        self.target.chmod(self.mode)

    def advance(self, nbytes: int) -> None:
        pass


async def test_the_restored_directory_keeps_the_mode_it_has_when_swapped(tmp_path: Path) -> None:
    # The replaced directory's mode was read before the download (minutes, on a big entry) and
    # put back after the swap: a chmod made meanwhile was undone (a review found it).
    store = LayoutStore(tmp_path / "layout")
    src = _bulk(tmp_path / "src", count=3)
    await save(store, "k", src)
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o755)
    await restore(store, "k", dest, progress=_ChmodWhenStarted(dest, 0o700))
    assert_same_tree(src, dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700


async def test_miss_raises_cache_miss_and_leaves_target(where: Reference, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    async with opened(where) as store:
        with pytest.raises(CacheMiss) as info:
            await restore(store, "never saved", dest)
    assert info.value.key == "never saved"
    assert (dest / "keep.txt").read_text() == "mine"
    assert _siblings(dest) == ["dest"]


async def test_max_size_refuses_before_uploading(where: Reference, tmp_path: Path) -> None:
    src = _bulk(tmp_path / "src", count=3, size=10_000)
    async with opened(where) as store:
        with pytest.raises(CacheTooLarge, match="30000 bytes"):
            await save(store, "k", src, max_size=29_999)
        assert await store.tags() == []
        saved = await save(store, "k", src, max_size=30_000)
        assert saved.size == 30_000
    if where.transport == "layout":
        assert where.path is not None
        blobs = Path(where.path) / "blobs" / "sha256"
        assert len(list(blobs.iterdir())) == 1 + 2 + 2 + saved.layers_total


async def test_failed_save_keeps_previous_entry_layout(tmp_path: Path, small_layers: None) -> None:
    """A layout whose disk fills up during a save (a real tmpfs, filled by another file): NoSpace,
    and the entry saved before is still the key's, whole."""
    src = _bulk(tmp_path / "src", count=10)
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        store = LayoutStore(disk / "layout")
        first = await save(store, "k", src)
        pkg0_times = os.stat(src / "pkg0").st_atime_ns, os.stat(src / "pkg0").st_mtime_ns
        (src / "pkg0" / "new.bin").write_bytes(os.urandom(300_000))
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - (64 << 10)))
        with pytest.raises(NoSpace, match="not enough space for the OCI layout"):
            await save(store, "k", src)
        (disk / "filler").unlink()
        assert (await store.resolve("k")).digest == first.digest
        dest = tmp_path / "dest"
        await restore(store, "k", dest)
    (src / "pkg0" / "new.bin").unlink()
    os.utime(src / "pkg0", ns=pkg0_times)  # the write and unlink may have crossed a second
    assert_same_tree(src, dest)


async def test_failed_save_keeps_previous_entry_registry(
    registry: Any, repo_name: str, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    src = _bulk(tmp_path / "src", count=4)
    proxy = fault_proxy_factory(registry)
    async with (
        opened(parse_reference(f"{registry.host}/{repo_name}")) as direct,
        opened(parse_reference(f"{proxy.host}/{repo_name}")) as through,
    ):
        first = await save(direct, "k", src)
        (src / "extra.bin").write_bytes(os.urandom(1000))
        # The registry refuses the final tag write (as a registry with immutable tags does):
        # layers, configs and manifests got in, the tag must not move.
        proxy.fail(1000, status=403, method="PUT", path_contains=f"/manifests/{first.tag}")
        with pytest.raises(StoreError):
            await save(through, "k", src)
        assert (await direct.resolve("k")).digest == first.digest


async def test_corrupted_blob_leaves_target_untouched(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    store = LayoutStore(layout)
    src = _bulk(tmp_path / "src", count=6)
    saved = await save(store, "k", src)
    dest = tmp_path / "work" / "dest"
    make_tree(dest, small_files=150, big_bytes=1 << 20)
    before = _snapshot(dest)
    image_layers = await _layers_of(store, saved.digest)
    blob = layout / "blobs" / "sha256" / image_layers[-1].digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        await restore(store, "k", dest)
    assert _snapshot(dest) == before
    assert _siblings(dest) == ["dest"]


async def test_unsafe_archive_leaves_target_untouched(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("ok.txt", b"fine"), ("../escaped.txt", b"evil")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    diff_id = sha256_digest(raw.getvalue())
    blob = gzip.compress(raw.getvalue(), mtime=0)
    layer = Descriptor(OCI_LAYER_GZIP, sha256_digest(blob), len(blob))
    await store.put_blob(layer, blob)
    image = build_image([layer], [diff_id], key="evil", size=8, files=2)
    for part in (*image.configs,):
        await store.put_blob(part.descriptor, part.body)
    for part in image.manifests:
        await store.put_manifest(part.body, part.descriptor.media_type)
    await store.put_manifest(image.index.body, image.index.descriptor.media_type, tag="evil")
    dest = tmp_path / "work" / "dest"
    make_tree(dest, small_files=150, big_bytes=1 << 20)
    before = _snapshot(dest)
    with pytest.raises(UnsafeArchive):
        await restore(store, "evil", dest)
    assert _snapshot(dest) == before
    assert not (tmp_path / "work" / "escaped.txt").exists()
    assert _siblings(dest) == ["dest"]


async def test_a_layer_whose_bytes_are_not_what_its_label_says_is_named(tmp_path: Path) -> None:
    """A foreign image of three layers whose second says zstd and holds gzip (its digest is
    right): the error names that layer, by place and digest, not only what is wrong with it."""
    store = LayoutStore(tmp_path / "layout")
    layers, diff_ids = [], []
    for i, label in enumerate((OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_LAYER_GZIP)):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"file-{i}")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
        blob = gzip.compress(raw.getvalue(), mtime=0)
        layers.append(Descriptor(label, sha256_digest(blob), len(blob)))
        diff_ids.append(sha256_digest(raw.getvalue()))
        await store.put_blob(layers[-1], blob)
    image = build_image(layers, diff_ids, key="mislabelled", size=6, files=3)
    for part in image.configs:
        await store.put_blob(part.descriptor, part.body)
    for part in image.manifests:
        await store.put_manifest(part.body, part.descriptor.media_type)
    await store.put_manifest(image.index.body, image.index.descriptor.media_type, tag="mislabelled")
    with pytest.raises(ImageFormatError) as info:
        await restore(store, "mislabelled", tmp_path / "dest")
    assert str(info.value).startswith(f"layer 2 of 3 ({layers[1].digest}): ")
    assert "labelled zstd but is not zstd-compressed" in str(info.value)
    assert not (tmp_path / "dest").exists()


class _Recorder:
    """A Progress that remembers what it was told."""

    def __init__(self) -> None:
        self.totals: list[int | None] = []
        self.steps: list[int] = []

    def start(self, total: int | None) -> None:
        self.totals.append(total)

    def advance(self, nbytes: int) -> None:
        self.steps.append(nbytes)


class _ChangesTheTree(_Recorder):
    """A Progress that runs ``change`` when told the total: the save has walked and cut the tree
    then, and packs next."""

    def __init__(self, change: Callable[[], None]) -> None:
        super().__init__()
        self.change = change

    def start(self, total: int | None) -> None:
        super().start(total)
        self.change()


def _shrink(path: Path) -> None:
    os.truncate(path, 1000)


def _grow(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"more")


def _rewrite(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _remove(path: Path) -> None:
    path.unlink()


#: FIFOs a save was found waiting on: the watchdog opened them for writing so that it ended.
_UNBLOCKED: list[Path] = []


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)

    def unblock() -> None:  # a reader waiting in open() gets its writer (and the test its failure)
        with contextlib.suppress(OSError):  # ENXIO: no reader waits, as it should be
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            _UNBLOCKED.append(path)

    watchdog = threading.Timer(20, unblock)
    watchdog.daemon = True
    watchdog.start()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _socket(path: Path) -> None:
    path.unlink()
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))


@pytest.mark.parametrize("change", [_shrink, _grow, _rewrite, _remove, _fifo, _directory, _socket])
async def test_a_file_changed_while_it_is_saved_stops_the_save_and_keeps_the_entry(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    """A file that shrinks, grows, is rewritten, removed or replaced between the walk and its
    packing: the save stops naming it (it used to store a shrunk file padded with zeros, as a
    success), and the key keeps its entry. A FIFO in its place held the save for good (opening it
    waited for a writer, past --deadline and a signal); a directory said "[Errno 21] Is a
    directory" and no path."""
    store = LayoutStore(tmp_path / "layout")
    first = await save(store, "k", _bulk(tmp_path / "before", count=2))
    src = _bulk(tmp_path / "src", count=4)
    victim = src / "pkg0" / "f0.bin"
    with pytest.raises(TreeChanged, match=f"{victim}.* changed while it was saved"):
        await save(store, "k", src, progress=_ChangesTheTree(lambda: change(victim)))
    assert (await store.resolve("k")).digest == first.digest
    assert victim not in _UNBLOCKED, "the save waited for a writer to open the FIFO"


_LEASE_HOLDER = """
import fcntl, os, signal, sys, time
F_SETLEASE = 1024  # (linux/fcntl.h: Python names no lease constants)
fd = os.open(sys.argv[1], os.O_RDWR)
signal.signal(signal.SIGIO, lambda *_: fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK))
fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)  # as knfsd (a write delegation) or Samba (an oplock) holds one
print("held", flush=True)
time.sleep(60)
"""


async def test_a_file_under_another_process_s_lease_is_saved_once_it_is_given_up(tmp_path: Path) -> None:
    """A file another process holds a write lease on (an NFS server's delegation, a Samba oplock):
    the open asks for the lease back and waits for it, as a plain open does. Opened without
    waiting (O_NONBLOCK, for a FIFO put in a file's place) it failed at once, "[Errno 11]
    Resource temporarily unavailable" (a review found it)."""
    src = _bulk(tmp_path / "src", count=2)
    leased = src / "pkg0" / "f0.bin"
    with subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(leased)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            saved = await save(LayoutStore(tmp_path / "layout"), "k", src)
        finally:
            holder.kill()
    assert saved.status == "saved"
    await restore(LayoutStore(tmp_path / "layout"), "k", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


async def test_a_file_only_linked_or_chmodded_while_it_is_saved_is_saved(tmp_path: Path) -> None:
    """A new hard link to a file (another install linking from a shared store) and a chmod move
    its ctime, not its content: the save goes on (a ctime check stopped it, a review found)."""
    store = LayoutStore(tmp_path / "layout")
    src = _bulk(tmp_path / "src", count=4)
    linked, chmodded = src / "pkg0" / "f0.bin", src / "pkg1" / "f1.bin"
    expected = _snapshot(src)

    def change() -> None:
        os.link(linked, tmp_path / "elsewhere")
        chmodded.chmod(0o600)

    await save(store, "k", src, progress=_ChangesTheTree(change))
    await restore(store, "k", tmp_path / "out")
    assert _snapshot(tmp_path / "out") == expected  # as the walk saw it, the mode included


async def test_progress_reports_the_total_first_then_every_byte(tmp_path: Path, small_layers: None) -> None:
    """A save counts the tree's tar bytes (known from the plan); a restore the compressed bytes
    (known from the manifests): each announces the total once, then reaches it exactly."""
    store = LayoutStore(tmp_path / "layout")
    src = _bulk(tmp_path / "src", count=10)
    up, down = _Recorder(), _Recorder()
    saved = await save(store, "k", src, progress=up)
    result = await restore(store, "k", tmp_path / "dest", progress=down)
    assert len(up.totals) == 1 and up.totals[0] is not None and up.totals[0] >= saved.size
    assert sum(up.steps) == up.totals[0] and len(up.steps) == saved.layers_total
    assert down.totals == [saved.bytes_total]
    assert sum(down.steps) == result.bytes == saved.bytes_total


async def test_network_failure_mid_restore_leaves_target_untouched(
    registry: Any, repo_name: str, tmp_path: Path, fault_proxy_factory: Any, small_layers: None
) -> None:
    # More layers than parallel downloads (4): the refused last layer is only asked for once
    # earlier ones are done, so the failure always lands mid-restore.
    src = _bulk(tmp_path / "src", count=30)
    proxy = fault_proxy_factory(registry)
    async with (
        opened(parse_reference(f"{registry.host}/{repo_name}")) as direct,
        opened(parse_reference(f"{proxy.host}/{repo_name}")) as through,
    ):
        saved = await save(direct, "k", src)
        assert saved.layers_total > 4
        last = (await _layers_of(direct, saved.digest))[-1]
        dest = tmp_path / "work" / "dest"
        make_tree(dest, small_files=50, big_bytes=1 << 16)
        before = _snapshot(dest)
        # Every layer but the last downloads fine; the last one is refused.
        proxy.fail(1000, status=403, method="GET", path_contains=last.digest)
        with pytest.raises(StoreError):
            await restore(through, "k", dest)
        assert _snapshot(dest) == before
        assert _siblings(dest) == ["dest"]
        assert proxy.count("GET", "/blobs/") >= 2  # other layers were being fetched concurrently


async def _layers_of(store: Store, digest: str) -> list[Descriptor]:
    return list((await load_image(store, digest)).layers)


def test_special_files_are_left_out_named_and_warned_about_once(cli: Run, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("a", "run", "z"):
        (src / d).mkdir(parents=True)
    (src / "a" / "kept.txt").write_text("kept")
    os.mkfifo(src / "a" / "pipe")
    socket_file(src / "run" / "x.sock")
    layout = f"oci:{tmp_path / 'layout'}"

    saved = cli("save", str(src), f"{layout}:k", "--json")
    assert saved.returncode == 0, saved.stderr
    data = json_line(saved)
    assert data["outcome"] == "saved" and data["files"] == 1 and data["special_files"] == 2
    assert data["special"] == [{"path": "a/pipe", "kind": "fifo"}, {"path": "run/x.sock", "kind": "socket"}]
    note = "skipped 2 special files (fifo: a/pipe, socket: run/x.sock)"
    warned = warnings(saved.stderr)
    assert len(warned) == 1 and f"{src}: {note}" in warned[0], saved.stderr
    summary = saved.stderr.splitlines()[-1]
    assert summary.startswith("save saved k:") and summary.endswith(f"; {note}")

    for i in range(3):
        os.mkfifo(src / "z" / f"p{i}")
    more = cli("save", str(src), f"{layout}:k", "--json")
    assert more.returncode == 0 and json_line(more)["special_files"] == 5, more.stderr
    assert more.stderr.count("remote-cache: warning: ") == 1
    assert "skipped 5 special files (fifo: a/pipe, socket: run/x.sock, fifo: z/p0 and 2 more)" in more.stderr

    out = tmp_path / "out"
    restored = cli("restore", f"{layout}:k", str(out))
    assert restored.returncode == 0, restored.stderr
    left_out = {"a/pipe", "run/x.sock", "z/p0", "z/p1", "z/p2"}
    expected = {k: v for k, v in snapshot(src).items() if k not in left_out}
    for emptied in ("run", "z"):  # they held only special files
        expected[emptied] = (*expected[emptied][:3], False)
    assert snapshot(out) == expected


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.mark.parametrize("sparse_dir", ["disk", "shm"], indirect=True)
async def test_a_sparse_file_comes_back_sparse(sparse_dir: Path, tmp_path: Path) -> None:
    src = sparse_dir / "src"
    src.mkdir()
    image = src / "disk.img"
    with image.open("wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(os.urandom(3000))  # a few KiB in the middle
        f.seek((256 << 20) - 2000)
        f.write(os.urandom(2000))  # and at the very end
    os.chmod(image, 0o640)
    os.utime(image, (1_600_000_000, 1_600_000_000))
    assert allocated(image) < 1 << 20  # the source is sparse
    store = open_store(parse_reference(f"oci:{tmp_path / 'layout'}"))
    await save(store, "sparse", src)
    out = sparse_dir / "out"
    await restore(store, "sparse", out)
    back = out / "disk.img"
    assert _sha256(back) == _sha256(image)
    assert (back.stat().st_size, back.stat().st_mode, back.stat().st_mtime) == (
        256 << 20,
        image.stat().st_mode,
        1_600_000_000,
    )
    assert allocated(back) < 1 << 20  # not 256 MiB


@pytest.mark.parametrize("year", [1500, 2300])
async def test_mtimes_outside_64_bit_nanoseconds_round_trip(tmp_path: Path, year: int) -> None:
    """A file dated after 2262 or before 1678 (ext4 and tmpfs keep such dates): its nanoseconds
    overflow a signed 64-bit integer, which made every save of the tree fail ("unexpected
    OverflowError"). It is saved and comes back with its date, to the second."""
    src = one_file_tree(tmp_path / "src")
    seconds = int((datetime(year, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    os.utime(src / "f", ns=(seconds * 1_000_000_000,) * 2)
    dated = os.stat(src / "f").st_mtime_ns  # a filesystem may clamp it to its own range
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k", src)
    await restore(store, "k", tmp_path / "out")
    assert os.stat(tmp_path / "out" / "f").st_mtime_ns == dated
    assert (await save(store, "k", tmp_path / "out")).status == "unchanged"


async def test_a_damaged_layer_is_reported_as_its_download_fails_not_as_what_its_bytes_look_like(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer cut to a few bytes: the extraction, reading them as they arrive, may fail on them
    first ("not zstd-compressed") while the download's own check (the size) comes a moment later.
    The download's error is the one reported: it names what is wrong and what mends it (which
    one came first was a race; CI saw the other)."""
    import anyio

    store = LayoutStore(tmp_path / "layout")
    await save(store, "k", one_file_tree(tmp_path / "src", "x" * 100_000))
    image = await load_image(store, tag_for_key("k"))
    layer = image.layers[-1]
    (tmp_path / "layout" / "blobs" / "sha256" / layer.digest.split(":")[1]).write_bytes(b"cut")
    download = store.download_blob

    async def check_late(desc: Descriptor, sink: Callable[[memoryview], None]) -> None:
        try:
            await download(desc, sink)
        except IntegrityError:
            await anyio.sleep(0.5)  # the check lands after the extraction looked at the bytes
            raise

    monkeypatch.setattr(store, "download_blob", check_late)
    with pytest.raises(IntegrityError, match="is 3 bytes, expected"):
        await restore(store, "k", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the restored directory itself (an entry holds no member for its root) -----------------


def _private_tree(root: Path, mode: int) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("hi")
    (root / "g").write_text("x")
    root.chmod(mode)
    return root


def test_a_read_only_cache_directory_is_replaced_by_its_user_and_stays_read_only() -> None:
    with reachable_dir() as tmp_path:
        _read_only_round_trip(tmp_path)


def _read_only_round_trip(tmp_path: Path) -> None:
    import anyio

    from tests.users import as_nobody_in, give_to_nobody

    src = _private_tree(tmp_path / "src", 0o755)
    dest = _private_tree(tmp_path / "dest", 0o755)
    (dest / "stale").write_text("old")
    give_to_nobody(src, tmp_path)
    give_to_nobody(dest, tmp_path)
    dest.chmod(0o500)  # read-only for its owner: the new tree keeps that, and can still be moved in

    async def save_then_restore() -> None:
        store = LayoutStore(Path("layout"))
        await save(store, "k", Path("src"))
        await restore(store, "k", Path("dest"))

    # (with the replaced directory's mode given to the staging directory before it was moved
    # into place: PermissionError, a directory is moved to another parent only by one who may
    # write it)
    assert as_nobody_in(tmp_path, lambda: anyio.run(save_then_restore)) == ""
    assert stat.S_IMODE((tmp_path / "dest").stat().st_mode) == 0o500
    assert sorted(os.listdir(tmp_path / "dest")) == ["a", "g"]
    assert (tmp_path / "dest" / "a" / "f").read_text() == "hi"


def test_a_failed_in_place_restore_of_a_read_only_root_keeps_the_old_tree() -> None:
    with reachable_dir() as tmp_path:
        _read_only_in_place(tmp_path)


def _saved_for_nobody(tmp_path: Path, mode: int) -> None:
    """Save a small tree whose root has ``mode`` as key k of a layout uid 65534 may read."""
    import anyio

    from tests.users import give_to_nobody

    anyio.run(save, LayoutStore(tmp_path / "layout"), "k", _private_tree(tmp_path / "src", mode))
    give_to_nobody(tmp_path / "layout", tmp_path)


def _nobody_restores_into(tmp_path: Path, target: str) -> str:
    """Restore key k into ``target`` (relative to ``tmp_path``) as uid 65534; its error, or ""."""
    import anyio

    from tests.users import as_nobody_in

    async def restore_it() -> None:
        await restore(LayoutStore(Path("layout")), "k", Path(target))

    return as_nobody_in(tmp_path, lambda: anyio.run(restore_it))


def _read_only_in_place(tmp_path: Path) -> None:
    _saved_for_nobody(tmp_path, 0o500)
    with tmpfs(tmp_path / "mnt", "uid=65534", "gid=65534", "mode=0755") as mnt:
        (mnt / "old.txt").write_text("precious")
        os.chown(mnt / "old.txt", 65534, 65534)
        error = _nobody_restores_into(tmp_path, "mnt")
        names = sorted(os.listdir(mnt))
        # (with a 0500 staging root the swap moved old.txt out, could not move the new entries in,
        # and the clean-up removed both: the mount point was left empty)
        assert names in (["old.txt"], ["a", "g"]), (error, names)
        assert error == "", names


async def test_an_in_place_restore_leaves_the_targets_own_mode_and_owner(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    src = _private_tree(tmp_path / "src", 0o700)
    await save(store, "k", src)
    with tmpfs(tmp_path / "mnt", "mode=0750", "uid=65534", "gid=65534") as mnt:
        await restore(store, "k", mnt)
        after = mnt.stat()
        # (the staging directory's mode and owner were copied onto it: 0755, and root's, whatever
        # it had been)
        assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o750, 65534, 65534)
        assert sorted(os.listdir(mnt)) == ["a", "g"]


def test_an_in_place_restore_into_a_directory_of_another_owner_succeeds() -> None:
    with reachable_dir() as tmp_path:
        _in_place_not_ours(tmp_path)


def _in_place_not_ours(tmp_path: Path) -> None:
    _saved_for_nobody(tmp_path, 0o755)
    with tmpfs(tmp_path / "mnt", "mode=0777") as mnt:  # root's, writable by all (a shared mount)
        (mnt / "old.txt").write_text("old")
        (mnt / "old.txt").chmod(0o666)
        # (the swap copied the staging directory's mode onto the mount point, which only its
        # owner may chmod: "Operation not permitted" after the entries were swapped)
        assert _nobody_restores_into(tmp_path, "mnt") == ""
        after = mnt.stat()
        assert (stat.S_IMODE(after.st_mode), after.st_uid) == (0o777, 0)
        assert sorted(os.listdir(mnt)) == ["a", "g"]


@pytest.mark.parametrize(
    ("layout", "tree"),
    [("cache/.layout", "cache"), ("cache", "cache/sub"), ("cache", "cache")],
    ids=["layout-in-tree", "tree-in-layout", "same"],
)
async def test_a_layout_that_overlaps_the_tree_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, tree: str
) -> None:
    """``save . oci:./.layout:k`` stored the layout in itself (each entry holding the ones before
    it), and the restore of it into ``.`` replaced the directory holding the layout: the store,
    every entry in it, was deleted. Both are refused (exit 2), nothing written or removed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    src = one_file_tree(tmp_path / "src")
    store = LayoutStore(Path(layout))
    await save(store, "k", src)  # (the layout made, from a tree elsewhere)
    (tmp_path / tree).mkdir(parents=True, exist_ok=True)
    (tmp_path / tree / "mine").write_text("kept")
    before = snapshot(tmp_path / "cache")
    for through in (Path(tree), tmp_path / tree, Path("elsewhere") / ".." / tree):
        with pytest.raises(UnsuitableTarget, match="overlap"):
            await save(store, "k2", through)
        with pytest.raises(UnsuitableTarget, match="overlap"):
            await restore(store, "k", through, force=True)
        # (a read-only save stores nothing anywhere: skipped as ever, exit 0)
        assert (await save(store, "k2", through, read_only=True)).status == "skipped"
    assert snapshot(tmp_path / "cache") == before
