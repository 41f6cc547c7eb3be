"""Restore targets: symlinks, mount points, the current directory, refusals before any download,
and a swap killed half-way (a real SIGKILL to a real process) that the next run finishes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from remote_cache.archive.swap import discard_dir
from remote_cache.archive.target import IN_PLACE_PREFIX, RestoreTarget, clean_leftovers, plan_target, swap_in
from remote_cache.archive.workdirs import WorkDir, is_in_place_work, sweep_dead
from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.errors import CacheMiss, UnfinishedSwap, UnsuitableTarget
from remote_cache.oci.layout import LayoutStore
from tests.cli.output import Run
from tests.mounts import bind, overlay, overlay_upper, tmpfs
from tests.stores import layout_blob, layout_document, layout_top
from tests.trees import assert_same_tree, snapshot
from tests.users import as_nobody_in, give_to_nobody, reachable_dir


def _tree(root: Path, text: str) -> Path:
    for i in range(6):
        (root / f"d{i}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i}" / "f.txt").write_text(f"{text} {i}\n")
    (root / f"only-{text}").write_text(text)
    return root


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs mount."""
    with tmpfs(tmp_path / "mnt") as point:
        yield point


async def test_restore_into_a_mount_point_keeps_the_mount(tmp_path: Path, mount_point: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    _tree(mount_point, "old")
    plan = plan_target(mount_point)
    assert plan.in_place
    await restore(store, "k", mount_point)
    assert os.path.ismount(mount_point)
    assert_same_tree(src, mount_point)


@pytest.mark.parametrize("where", ["beside", "cwd"])
async def test_a_directory_from_a_containers_image_is_restored_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A cache directory baked into a container's image (``pip install`` in a Dockerfile leaves
    ``~/.cache/pip``): on overlayfs without ``redirect_dir`` (Docker's overlay2) a directory from
    the lower layer cannot be renamed. Restoring over it failed after the whole download with
    ``[Errno 18] Invalid cross-device link`` and an internal path; restoring into it as the
    current directory (in place) failed the same way during the swap, at the first lower
    directory (what sorted before it already moved out). Now its entries are swapped, the old
    ones removed where they are."""
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    lower = _tree(tmp_path / "image" / "cache", "old").parent
    (lower / "cache" / "d9" / "deep").mkdir(parents=True)  # a lower directory the entry lacks
    with overlay(lower, tmp_path / "root") as root:
        target = root / "cache"
        if where == "cwd":
            monkeypatch.chdir(target)
        for _ in range(2):  # the second time over the restored directory, the container's own
            await restore(store, "k", Path(".") if where == "cwd" else target, force=True)
            assert_same_tree(src, target)
            assert sorted(os.listdir(root)) == ["cache"]  # no work directory left beside it
            again = await save(store, "k", target)
            assert again.unchanged


async def test_restore_through_a_symlink_fills_what_it_points_to(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    real = _tree(tmp_path / "cache", "old")
    link = tmp_path / "home" / ".npm"
    link.parent.mkdir()
    link.symlink_to(real)
    await restore(store, "k", link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_same_tree(src, real)


async def test_the_current_directory_needs_force_and_keeps_its_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    here = _tree(tmp_path / "here", "old")
    monkeypatch.chdir(here)
    before = snapshot(here)
    with pytest.raises(UnsuitableTarget, match="--force"):
        await restore(store, "k", Path("."))
    assert snapshot(here) == before
    inode = here.stat().st_ino
    await restore(store, "k", Path("."), force=True)
    assert here.stat().st_ino == inode
    assert_same_tree(src, here)


def test_targets_that_cannot_work_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsuitableTarget, match="not a directory"):
        plan_target(tmp_path / "file")
    with pytest.raises(UnsuitableTarget, match="not a directory"):
        plan_target(tmp_path / "file" / "below")
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    for looping in (tmp_path / "l1", tmp_path / "l1" / "below" / "deeper"):  # was a raw ELOOP, exit 1
        with pytest.raises(UnsuitableTarget, match="symlinks that loop"):
            plan_target(looping)


def test_a_current_directory_removed_under_the_restore_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another restore may exchange the directory a restore of "." runs in before it starts: the
    process's current directory is then gone (getcwd fails). Say so; an absolute target still
    works."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(UnsuitableTarget, match="current directory no longer exists"):
        plan_target(Path("."), force=True)
    target = plan_target(tmp_path / "elsewhere")
    assert target.path == tmp_path / "elsewhere" and not target.in_place


def test_the_cli_refuses_a_bad_target_before_asking_the_store(cli: Run, tmp_path: Path) -> None:
    """A target that is a file: exit 2 with the reason, and the store was never read (a registry
    that does not exist would otherwise be the error)."""
    (tmp_path / "file").write_text("x")
    proc = cli("restore", "127.0.0.1:9/none/here:k", str(tmp_path / "file"))
    assert proc.returncode == 2, proc.stderr
    assert "is not a directory" in proc.stderr and "127.0.0.1:9" not in proc.stderr


_SWAP_THEN_DIE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from remote_cache.archive import swap
    from remote_cache.archive.target import IN_PLACE_PREFIX
    from remote_cache.archive.workdirs import WorkDir, is_in_place_work

    target, staged, after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    remove_old = sys.argv[4] == "remove"
    work = WorkDir(target, IN_PLACE_PREFIX)
    staging = work.path / "new"
    os.rename(staged, staging)
    steps = 0
    real_rename, real_discard = os.rename, swap.discard_dir

    def rename(a, b):
        global steps
        if steps == after:
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1
        real_rename(a, b)

    def discard(path):
        global steps
        if steps == after:  # half-way through removing a directory: one file gone
            if path.is_dir():
                next(f for f in path.rglob("*") if f.is_file()).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1
        real_discard(path)

    os.rename, swap.discard_dir = rename, discard
    swap.swap_entries(staging, target, work.path, keep=is_in_place_work, remove_old=remove_old)
    """
)


def _killed_swap(tmp_path: Path, after: int, how: str = "move") -> tuple[Path, dict[str, tuple[object, ...]]]:
    """A target whose in-place swap was SIGKILLed after ``after`` steps (renames; with ``how``
    "remove", the old entries' removals too, the last one cut half-way), and what it must end
    as: the new tree once the journal is in place (the first rename), else the old one."""
    new = _tree(tmp_path / "new", "new")
    target = _tree(tmp_path / "target", "old")
    expected = snapshot(new) if after > 0 else snapshot(target)
    staged = tmp_path / "staged"
    subprocess.run(["cp", "-a", str(new), str(staged)], check=True)
    script = [sys.executable, "-c", _SWAP_THEN_DIE, str(target), str(staged), str(after), how]
    proc = subprocess.run(script)
    assert proc.returncode == -9, "the swap was killed"
    return target, expected


@pytest.mark.parametrize("how", ["move", "remove"])
@pytest.mark.parametrize("after", [0, 1, 3, 5, 7, 9, 12])
def test_a_swap_killed_half_way_is_finished_by_the_next_run(tmp_path: Path, after: int, how: str) -> None:
    """SIGKILL after ``after`` steps of an in-place swap. The first rename puts the journal in
    place: killed before it, the next run rolls back (the old tree); after it, the target is a mix
    until the next run finishes the swap (the new tree). Never a mix after the next run. (How the
    old entries go: moved aside, or removed where they are, as for an overlayfs lower directory.)"""
    target, expected = _killed_swap(tmp_path, after, how)
    assert [p.name for p in target.iterdir() if is_in_place_work(p.name)], "its work is left"
    clean_leftovers(plan_target(target))
    assert snapshot(target) == expected
    assert not [p for p in target.iterdir() if is_in_place_work(p.name)]


@pytest.mark.parametrize("how", ["move", "remove"])
@pytest.mark.parametrize("after", [0, 3, 9])
async def test_a_save_after_a_swap_killed_half_way_stores_one_tree(
    tmp_path: Path, after: int, how: str
) -> None:
    """The same kill, then a save of the target instead of a restore: it finishes the dead swap
    first, as a restore would, and stores the new tree (the old one when killed before the
    journal). It used to store the mix as it stood, and report it saved."""
    target, expected = _killed_swap(tmp_path, after, how)
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k", target)
    await restore(store, "k", tmp_path / "out")
    assert snapshot(tmp_path / "out") == expected
    assert not [p for p in target.iterdir() if is_in_place_work(p.name)]


def test_a_restore_killed_before_its_swap_is_rolled_back(tmp_path: Path) -> None:
    """Killed while staging (no journal yet): the next run discards the work; the old tree stays."""
    target = _tree(tmp_path / "target", "old")
    before = snapshot(target)
    code = (
        "import os, signal, sys\nfrom pathlib import Path\n"
        "from remote_cache.archive.workdirs import WorkDir\n"
        "w = WorkDir(Path(sys.argv[1]), sys.argv[2]); (w.path / 'new').mkdir()\n"
        "(w.path / 'new' / 'half').write_text('x'); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target), IN_PLACE_PREFIX])
    assert proc.returncode == -9
    assert clean_leftovers(plan_target(target))
    assert snapshot(target) == before


async def test_a_live_runs_work_is_never_swept(tmp_path: Path) -> None:
    """Another process's restore in progress (it holds its lock) is left alone."""
    target = _tree(tmp_path / "target", "old")
    code = (
        "import sys, time\nfrom pathlib import Path\n"
        "from remote_cache.archive.workdirs import WorkDir\n"
        "w = WorkDir(Path(sys.argv[1]), sys.argv[2]); print(w.path, flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target), IN_PLACE_PREFIX], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        live = Path(proc.stdout.readline().strip())
        assert clean_leftovers(plan_target(target)) == []
        assert live.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert clean_leftovers(plan_target(target)) == [live]


def test_not_enough_space_is_refused_before_downloading_and_says_where(cli: Run, tmp_path: Path) -> None:
    """A 1 MiB tmpfs cannot take a 3 MB entry: exit 5 before any layer is fetched, naming the
    place and the size; the target is untouched and nothing is left there."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    proc, small = _restore_onto_a_small_disk(cli, tmp_path, src, "size=1m")
    assert proc.returncode == 5, proc.stderr
    assert f"needs about 6.3 MB free in {small}" in proc.stderr, proc.stderr  # tree + biggest layer


def _restore_onto_a_small_disk(
    cli: Run, tmp_path: Path, src: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Save ``src`` to a layout, then restore it into ``old`` (holding a file) on a tmpfs mounted
    with ``options``, checking that the mount ends as it began: the process and the mount point."""
    layout = f"oci:{tmp_path / 'layout'}:k"
    assert cli("save", str(src), layout, "-q").returncode == 0
    with tmpfs(tmp_path / "small", *options) as small:
        (small / "old").mkdir()
        (small / "old" / "kept").write_text("kept")
        before = snapshot(small)
        proc = cli("restore", layout, str(small / "old"))
        assert snapshot(small) == before, proc.stderr
        return proc, small


def _work_dir_look_alike(parent: Path, mode: int = 0o700) -> Path:
    """What a killed in-place restore leaves inside its target: a journal saying to move ``a`` out."""
    work = parent / f"{IN_PLACE_PREFIX}x"
    (work / "old").mkdir(parents=True)
    (work / "new").mkdir()
    (work / "lock").write_text("")
    (work / "swap.json").write_text(
        '{"staging": "new", "old": ["a"], "new": [], "mode": 493, "times_ns": [0, 0], "owner": [0, 0]}'
    )
    work.chmod(mode)
    return work


async def test_a_work_directory_in_a_saved_tree_never_acts_on_a_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved with the tree, restored with it, then swept by the next restore as a dead run's:
    # its journal emptied the target, even on a miss. A save leaves such entries out. (Its run
    # is alive here: a dead one's swap the save would finish first, as a restore would.)
    store = LayoutStore(tmp_path / "layout")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("mine")
    work = _work_dir_look_alike(src)
    with (work / "lock").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        await save(store, "k", src)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    await restore(store, "k", here, force=True)
    with pytest.raises(CacheMiss):
        await restore(store, "no-such-key", here, force=True)
    assert sorted(os.listdir(here)) == ["a"] and (here / "a").read_text() == "mine"


def test_the_sweep_leaves_alone_what_is_not_a_work_directory_of_ours(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").write_text("mine")
    look_alike = _work_dir_look_alike(target, mode=0o755)  # not made by WorkDir (0700)
    assert clean_leftovers(plan_target(target)) == []
    assert look_alike.exists() and (target / "a").read_text() == "mine"
    look_alike.chmod(0o700)  # now it is one: a dead run's, whose journal is finished
    assert clean_leftovers(plan_target(target)) == [look_alike]
    assert not (target / "a").exists()


def test_a_work_directory_inside_an_archive_is_not_swapped_in(tmp_path: Path) -> None:
    staging = _tree(tmp_path / "staging", "new")
    _work_dir_look_alike(staging)
    target = _tree(tmp_path / "target", "old")
    work = tmp_path / "work"
    work.mkdir()
    swap_in(plan_target(target), staging, work)
    assert not any(is_in_place_work(name) for name in os.listdir(target))
    assert (target / "only-new").exists()


def test_a_disk_that_fills_up_during_extraction_fails_cleanly(cli: Run, tmp_path: Path) -> None:
    """Space runs out half-way through extracting (here the filesystem's inodes: 60 on a tmpfs with
    plenty of bytes, for an entry of 90 directories and 10 files, which the check before the
    download cannot count): exit 5 with the place and the OS's reason, the target as it was, and
    nothing left beside it."""
    src = tmp_path / "src"
    for i in range(90):
        (src / f"d{i:02}").mkdir(parents=True)
    for i in range(10):
        (src / f"d{i:02}" / "f").write_text(str(i))
    proc, small = _restore_onto_a_small_disk(cli, tmp_path, src, "size=64m", "nr_inodes=60")
    assert proc.returncode == 5, proc.stderr
    # The OS says "No space left on device" for bytes and inodes alike: the message says which.
    assert f"not enough inodes to restore into {small / 'old'}" in proc.stderr, proc.stderr
    assert "they ran out (No space left on device)" in proc.stderr, proc.stderr


def _as_foreign(layout: Path, key: str, annotations: dict[str, str] | None = None) -> None:
    """Make the entry under ``key`` look like another tool's image: the tag names the manifest
    itself, with no annotations (so neither the tree's size nor its file count is known), or
    with ``annotations``."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_bytes())
    top = layout_document(layout, layout_top(layout))
    manifest = layout_document(layout, top["manifests"][0]["digest"])
    manifest.pop("annotations", None)
    if annotations is not None:
        manifest["annotations"] = annotations
    body = json.dumps(manifest).encode()
    digest = hashlib.sha256(body).hexdigest()
    layout_blob(layout, f"sha256:{digest}").write_bytes(body)
    index["manifests"] = [
        {
            "mediaType": manifest["mediaType"],
            "digest": f"sha256:{digest}",
            "size": len(body),
            "annotations": {"org.opencontainers.image.ref.name": key},
        }
    ]
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("runs_out", ["bytes", "inodes"])
def test_a_foreign_image_that_fills_the_disk_says_what_ran_out(
    cli: Run, tmp_path: Path, runs_out: str
) -> None:
    """An image that does not say its size (another tool's) cannot be checked before downloading;
    when it fills the disk the message says what ran out, not "needs about" its compressed size."""
    src = tmp_path / "src"
    src.mkdir()
    if runs_out == "bytes":  # 24 MB that compress to almost nothing (and are not zeros: no holes)
        (src / "big").write_bytes(os.urandom(4096) * 6000)
        options = ("size=8m",)
    else:
        for i in range(200):
            (src / f"f{i:03}").write_text(str(i))
        options = ("size=64m", "nr_inodes=60")
    layout = tmp_path / "layout"
    assert cli("save", str(src), f"oci:{layout}:k", "-q").returncode == 0
    _as_foreign(layout, "k")
    with tmpfs(tmp_path / "small", *options) as small:
        (small / "old").mkdir()
        proc = cli("restore", f"oci:{layout}:k", str(small / "old"))
        assert proc.returncode == 5, proc.stderr
        assert "needs about" not in proc.stderr, proc.stderr
        said = "not enough space" if runs_out == "bytes" else "not enough inodes"
        assert f"{said} to restore into {small / 'old'}" in proc.stderr, proc.stderr
        assert sorted(os.listdir(small)) == ["old"] and os.listdir(small / "old") == []


def test_an_entry_holding_more_than_it_says_fills_the_disk_and_says_so(cli: Run, tmp_path: Path) -> None:
    """An entry whose size annotation says 1 kB passes the check before downloading, then fills
    the disk: the message says the place filled up though the entry said otherwise (it said
    "it needs about 1.0 kB free", the entry's own claim, as if that were the need)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(4096) * 6000)  # 24 MB that compress to almost nothing
    layout = tmp_path / "layout"
    assert cli("save", str(src), f"oci:{layout}:k", "-q").returncode == 0
    _as_foreign(layout, "k", {"dev.remote-cache.size": "1000"})
    with tmpfs(tmp_path / "small", "size=8m") as small:
        (small / "old").mkdir()
        proc = cli("restore", f"oci:{layout}:k", str(small / "old"))
        assert proc.returncode == 5, proc.stderr
        said = f"{small} filled up during the restore, which the entry said needs about "
        assert said in proc.stderr and " kB (files take whole blocks" in proc.stderr, proc.stderr
        assert sorted(os.listdir(small)) == ["old"] and os.listdir(small / "old") == []


@pytest.mark.parametrize(("files", "free"), [(50, 22), (3, 4)])
def test_too_few_free_inodes_is_refused_before_downloading(
    cli: Run, tmp_path: Path, files: int, free: int
) -> None:
    """Fewer free inodes than the entry's files, or than those plus the restore's own work files
    (4 then: the work directory failed to be made, a raw errno, exit 1): exit 5 before any layer is
    fetched, naming the counts and the place (not a byte count); the target is untouched."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:02}").write_text(str(i))
    # The mount's own inodes: its root, old and the file in it.
    proc, small = _restore_onto_a_small_disk(cli, tmp_path, src, "size=64m", f"nr_inodes={free + 3}")
    assert proc.returncode == 5, proc.stderr
    assert (
        f"its {files} files, its directories and 6 work files of the restore need one each in {small}, "
        f"{free} free there" in proc.stderr
    ), proc.stderr


def test_a_work_directory_that_cannot_get_its_lock_is_not_left_behind(tmp_path: Path) -> None:
    """The filesystem runs out of inodes between a work directory and its lock file: the error is
    raised and the directory goes (a lock-less one would be left for good: no sweep claims it)."""
    with tmpfs(tmp_path / "tiny", "nr_inodes=2") as tiny:  # the root and one more
        with pytest.raises(OSError) as info:
            WorkDir(tiny, IN_PLACE_PREFIX)
        assert info.value.errno == errno.ENOSPC
        assert list(tiny.iterdir()) == []


async def test_a_target_with_a_name_near_the_limit_is_restored(tmp_path: Path) -> None:
    """A directory name of 240 bytes is valid (NAME_MAX is 255), but a work directory named
    ``.<name>.remote-cache-<hex>`` beside it is not: the restore failed with "File name too long".
    Such a name is shortened (its start and a hash of the whole) for whatever is named after it;
    a new target and an existing one (exchanged whole) both work, and nothing is left beside them."""
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k", _tree(tmp_path / "src", "x"))
    target = tmp_path / "t" / ("é" * 120)  # 240 bytes in UTF-8
    target.parent.mkdir()
    await restore(store, "k", target)
    assert_same_tree(tmp_path / "src", target)
    await restore(store, "k", target)  # over an existing tree
    assert_same_tree(tmp_path / "src", target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_an_unreadable_directory_in_an_old_tree_is_removed_as_non_root(tmp_path: Path) -> None:
    """A tree the tool itself restores as non-root (a 0555 directory holding a 000 one) is removed
    when the next restore replaces it (it was "unexpected TypeError: open() missing required
    argument 'flags'", after the new tree was in place, and the old tree stayed)."""
    old = tmp_path / "old"
    (old / "ro" / "sub").mkdir(parents=True)
    (old / "ro" / "sub" / "f").write_bytes(b"1")
    (old / "ro" / "g").write_bytes(b"2")
    for p in (old, old / "ro", old / "ro" / "sub", old / "ro" / "sub" / "f", old / "ro" / "g"):
        os.chown(p, 65534, 65534)
    (old / "ro" / "sub").chmod(0o000)
    (old / "ro").chmod(0o555)
    os.chown(tmp_path, 65534, 65534)
    assert as_nobody_in(tmp_path, lambda: discard_dir(Path("old"))) == ""
    assert not old.exists()


def test_a_work_directory_that_cannot_be_removed_whole_is_swept_later(tmp_path: Path) -> None:
    """A work directory whose removal fails half-way (here a mount inside it: EBUSY) keeps its
    lock file, released: the next run's sweep claims and removes it once it can. (The lock could
    go first and stay held, leaving a directory no sweep would ever claim.)"""
    work = WorkDir(tmp_path, "w-")
    (work.path / "new").mkdir()
    (work.path / "new" / "f").write_text("x")
    with tmpfs(work.path / "new" / "m"):
        with pytest.raises(OSError):
            work.close()
        assert (work.path / "lock").exists()
    assert sweep_dead(tmp_path, "w-") == [work.path]
    assert os.listdir(tmp_path) == []


_KILLED_AT_A_REMOVAL = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from remote_cache.archive.workdirs import sweep_dead

    left = int(sys.argv[2])

    def removal(real):
        def remove(*args, **kwargs):
            global left
            left -= 1
            if left == 0:  # this removal does not happen: the process dies as a kill would take it
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return remove

    os.unlink, os.rmdir = removal(os.unlink), removal(os.rmdir)
    sweep_dead(Path(sys.argv[1]), "w-")
    """
)


def test_a_sweep_killed_half_way_leaves_what_the_next_sweep_removes(tmp_path: Path) -> None:
    """A sweep (or a run's own clean-up) killed while removing a dead run's work directory: the
    next one removes the rest, wherever the kill came (the lock went first in listing order, and a
    work directory without a lock was never claimed again: tens of megabytes for good, found by
    killing restores at random). A kill after the lock's own removal leaves an empty directory
    without one, taken once old."""
    removals = 10  # 5 spool files, 'clock', 'new' and its file, the lock, the directory itself
    for kill_at in range(1, removals + 1):
        parent = tmp_path / str(kill_at)
        work = WorkDir(parent, "w-")
        for i in range(5):
            (work.path / f"spool-{i}").write_text("x")
        (work.path / "new").mkdir()
        (work.path / "new" / "f").write_text("x")
        (work.path / "clock").write_text("x")
        os.close(work._fd)  # type: ignore[arg-type]  # the run dies: its lock is released
        work._fd = None
        subprocess.run([sys.executable, "-c", _KILLED_AT_A_REMOVAL, str(parent), str(kill_at)], check=False)
        for left in parent.iterdir():
            os.utime(left, (time.time() - 3600, time.time() - 3600))
        sweep_dead(parent, "w-")
        assert os.listdir(parent) == [], (kill_at, [os.listdir(p) for p in parent.iterdir()])


def test_a_directory_of_another_owner_in_an_old_tree_is_removed_as_non_root(tmp_path: Path) -> None:
    """An old tree holding a directory another user owns but lets us write (0777): making it
    owner-writable fails (EPERM) but is not needed, and the tree is removed (it failed the restore
    after the swap and left the old tree beside the target)."""
    old = tmp_path / "old"
    (old / "shared").mkdir(parents=True)
    (old / "shared" / "f").write_bytes(b"1")
    for p in (old, old / "shared" / "f"):
        os.chown(p, 65534, 65534)
    (old / "shared").chmod(0o777)  # root's
    os.chown(tmp_path, 65534, 65534)
    assert as_nobody_in(tmp_path, lambda: discard_dir(Path("old"))) == ""
    assert not old.exists()


async def test_a_failed_restore_leaves_no_parent_it_made(tmp_path: Path) -> None:
    """A restore into ``a/b/c/target`` that fails (here: a damaged layer) leaves no ``a/b/c``
    behind: it made them for its work directory, and the target was not there before."""
    from remote_cache.cache.image import load_image
    from remote_cache.errors import IntegrityError

    store = LayoutStore(tmp_path / "layout")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x" * 10_000)
    await save(store, "k", src)
    image = await load_image(store, "k")
    (tmp_path / "layout" / "blobs" / "sha256" / image.layers[-1].digest.split(":")[1]).write_bytes(b"cut")
    with pytest.raises(IntegrityError):
        await restore(store, "k", tmp_path / "a" / "b" / "c" / "target")
    assert not (tmp_path / "a").exists()


# -------------------------------------------------------------------------------------------
# Targets a swap could not finish: refused before anything changes where that can be known;
# otherwise the journal stays, and the target is reported (never saved) until a run finishes it.


@pytest.mark.parametrize("what", ["a directory", "a file"])
async def test_a_mount_inside_the_target_is_refused_before_anything_changes(
    tmp_path: Path, what: str
) -> None:
    """A volume mounted inside a cache directory (a BuildKit cache mount under ``~/.cache/pip``,
    a ``settings.xml`` bound into ``~/.m2``): the old tree was exchanged, then removing it emptied
    the mounted volume and failed with EBUSY, the run exit 1 and a work directory left holding
    the mount. Now refused before any download, the volume and the target as they were."""
    store = LayoutStore(tmp_path / "layout")
    await save(store, "k", _tree(tmp_path / "src", "new"))
    target = _tree(tmp_path / "cache", "old")
    host = tmp_path / "host"
    host.mkdir()
    (host / "precious").write_text("keep")
    if what == "a directory":
        source, point = host, target / "vol"
        point.mkdir()
    else:
        source, point = host / "precious", target / "settings.xml"
        point.write_text("")
    before = snapshot(target)
    with bind(source, point):
        with pytest.raises(UnsuitableTarget, match=f"{point} is mounted inside it"):
            await restore(store, "k", target)
        assert (host / "precious").read_text() == "keep"
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "host", "layout", "src", "state"]


async def test_a_bind_mount_from_the_same_filesystem_is_restored_in_place(tmp_path: Path) -> None:
    """``-v /srv/ci/npm:/ci/npm`` beside ``-v /srv/ci:/ci``: a bind mount keeps its filesystem's
    device, so it was not seen as a mount point; the exchange failed with EBUSY after the whole
    download. Mountinfo says it is one: restored in place, into the bound directory."""
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    host = _tree(tmp_path / "host", "old")
    point = tmp_path / "ci" / "npm"
    point.mkdir(parents=True)
    with bind(host, point):
        assert plan_target(point).in_place
        await restore(store, "k", point)
        assert_same_tree(src, point)
    assert_same_tree(src, host)


def _as_nobody(base: Path, command: Any, target: Path) -> str:
    """``command`` (restore or save) of key k in ``base/layout`` and ``target``, as uid 65534."""
    return as_nobody_in(base, lambda: anyio.run(command, LayoutStore(Path("layout")), "k", target))


def test_a_restore_as_another_user_that_could_not_empty_the_target_is_refused_first() -> None:
    """uid 65534 restoring into a shared volume (a mount point: in place) holding a directory of
    root's it cannot write: moving it out of the target needs that (rename updates its ``..``).
    The swap failed half-way, the entries before it already gone and no journal left to finish
    it. Now refused before any download, naming the directory; the target as it was."""
    with reachable_dir() as base:
        anyio.run(save, LayoutStore(base / "layout"), "k", _tree(base / "src", "new"))
        give_to_nobody(base / "layout")
        with tmpfs(base / "mnt", "mode=777") as mnt:
            (mnt / "aa").mkdir()
            (mnt / "aa" / "f").write_text("a")
            give_to_nobody(mnt / "aa")
            (mnt / "rootowned").mkdir()
            (mnt / "zz").write_text("z")
            before = snapshot(mnt)
            error = _as_nobody(base, restore, Path("mnt"))
            assert error.startswith("UnsuitableTarget") and "rootowned (owner uid 0)" in error, error
            assert snapshot(mnt) == before


@pytest.mark.parametrize("after", [3, 9])
def test_another_users_swap_killed_half_way_is_not_saved_as_the_mix(tmp_path: Path, after: int) -> None:
    """Root's in-place restore killed half-way through its swap, then a save by uid 65534, which
    cannot look into root's work directory to finish it: the save stored the mix and said saved.
    Now it refuses, saying whose work it is; root's next run finishes it."""
    with reachable_dir() as base:
        target, expected = _killed_swap(base, after)
        give_to_nobody(target)
        [work] = [p for p in target.iterdir() if is_in_place_work(p.name)]
        subprocess.run(["chown", "-R", "0:0", str(work)], check=True)  # root's run's, as it was
        os.chown(base, 65534, 65534)
        error = _as_nobody(base, save, Path("target"))
        assert error.startswith("UnfinishedSwap") and "another user (uid 0" in error, error
        clean_leftovers(plan_target(target))
        assert snapshot(target) == expected


async def test_a_swap_that_fails_half_way_is_reported_and_finished_by_the_next_run(tmp_path: Path) -> None:
    """A container's cache directory from its image (overlayfs: entries removed where they are)
    whose upper layer runs out of inodes half-way through the removals (each makes a whiteout):
    the error went up, the work directory with its journal and the staged tree was removed, and
    the target stayed a mix of the old tree's rest and nothing new, for good. Now the journal
    stays: the restore and a save say the target is half-replaced, and once there is room the
    next restore finishes the replacement, then does its own."""
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    await save(store, "k", src)
    lower = _tree(tmp_path / "image" / "cache", "old").parent
    for i in range(300):
        (lower / "cache" / "d0" / f"many{i}").write_text("x")
    with overlay(lower, tmp_path / "root", "nr_inodes=150") as root:
        target = root / "cache"
        with pytest.raises(UnfinishedSwap, match="stopped half-way through replacing its entries"):
            await restore(store, "k", target)
        with pytest.raises(UnfinishedSwap):
            await save(store, "k", target)
        subprocess.run(["mount", "-o", "remount,nr_inodes=10000", str(overlay_upper(root))], check=True)
        await restore(store, "k", target)
        assert_same_tree(src, target)
        assert sorted(os.listdir(root)) == ["cache"]


def test_a_run_killed_before_naming_its_lock_is_swept(tmp_path: Path) -> None:
    """Killed between locking ``lock.new`` and naming it ``lock`` (found with a SIGKILL there):
    no sweep ever claimed the directory, and inside a target it made every later restore swap
    entries in place. Its ``lock.new`` says whether its run is alive, as ``lock`` would -- once
    the directory is old: a run making one now has not locked it yet (a racing save's sweep took
    such a directory from under it: seen once in the suite, 'lock.new' -> 'lock' ENOENT)."""
    dead = tmp_path / f"{IN_PLACE_PREFIX}dead"
    dead.mkdir(mode=0o700)
    (dead / "lock.new").write_text("")
    being_made = tmp_path / f"{IN_PLACE_PREFIX}new"  # between creating lock.new and locking it
    being_made.mkdir(mode=0o700)
    (being_made / "lock.new").write_text("")
    live = tmp_path / f"{IN_PLACE_PREFIX}live"
    live.mkdir(mode=0o700)
    fd = os.open(live / "lock.new", os.O_RDWR | os.O_CREAT, 0o600)
    an_hour_ago = time.time() - 3600
    for old in (dead, live):
        os.utime(old, (an_hour_ago, an_hour_ago))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sweep_dead(tmp_path, IN_PLACE_PREFIX) == [dead]
        assert not dead.exists() and live.exists() and being_made.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("after", [3, 9])
def test_a_swap_left_journaled_is_finished_before_another_restore_swaps(tmp_path: Path, after: int) -> None:
    """A restore's swap stopped half-way with its journal kept (here: killed), while another
    restore of the same target, begun before, was extracting: that one swapped its tree in
    without finishing the first, which the next run then finished over it -- a mix of the two,
    which a save stored. The journaled swap is finished first, under the lock."""
    target, _ = _killed_swap(tmp_path, after)
    later = _tree(tmp_path / "later", "later")
    expected = snapshot(later)
    work = WorkDir(tmp_path, ".target.remote-cache-")
    try:
        staging = work.path / "new"
        os.rename(later, staging)
        swap_in(RestoreTarget(target, in_place=False), staging, work.path)
    finally:
        work.close()
    clean_leftovers(plan_target(target))  # what the next run does first
    assert snapshot(target) == expected


def test_another_users_work_without_a_journal_does_not_stop_root(tmp_path: Path) -> None:
    """A dead (or downloading) restore of uid 65534 left its work in the target, no journal: it
    never began to swap. Root's restore and save refused ("another user ... half-way"), though
    root can see there is nothing to finish. Now they go on, leaving that work alone."""
    store = LayoutStore(tmp_path / "layout")
    src = _tree(tmp_path / "src", "new")
    anyio.run(save, store, "k", src)
    target = _tree(tmp_path / "target", "old")
    foreign = target / f"{IN_PLACE_PREFIX}0123456789ab"
    foreign.mkdir(mode=0o700)
    (foreign / "lock").write_text("")
    give_to_nobody(foreign)
    anyio.run(restore, store, "k", target)
    assert sorted(p.name for p in target.iterdir() if not is_in_place_work(p.name)) == sorted(
        p.name for p in src.iterdir()
    )
    assert foreign.exists()
    assert anyio.run(save, store, "k", target).unchanged


def test_a_directory_of_ones_own_that_one_cannot_read_is_no_reason_to_refuse() -> None:
    """uid 65534 restoring over its own tree holding a directory it made unreadable (mode 000):
    the check before downloading raised a raw EACCES (exit 1), where the restore used to make it
    writable and remove it. It does again (the check walked every directory of the old tree,
    seconds on big trees, and raced other restores swapping the tree away)."""
    with reachable_dir() as base:
        anyio.run(save, LayoutStore(base / "layout"), "k", _tree(base / "src", "new"))
        give_to_nobody(base / "layout")
        old = _tree(base / "t1", "old")
        (old / "sub" / "locked").mkdir(parents=True)
        give_to_nobody(old)
        (old / "sub" / "locked").chmod(0o000)
        assert _as_nobody(base, restore, Path("t1")) == ""
        assert_same_tree(base / "src", base / "t1")


def test_read_only_directories_of_ones_own_are_swapped_in_place_as_another_user() -> None:
    """uid 65534 restoring in place (its own volume) an entry whose top level holds a 0555
    directory, over a tree holding one too (a Go module cache's read-only directories): moving a
    directory to another parent needs write permission on it, its owner's too, so the swap failed
    after its journal, and every later restore and save of the volume refused. The owner gives
    itself that bit for the move, and the directory keeps its mode."""
    with reachable_dir() as base:
        try:
            src = _tree(base / "src", "new")
            (src / "mod" / "x").mkdir(parents=True)
            give_to_nobody(src)
            (src / "mod").chmod(0o555)
            anyio.run(save, LayoutStore(base / "layout"), "k", src)
            give_to_nobody(base / "layout")
            with tmpfs(base / "mnt", "mode=755", "uid=65534") as mnt:
                (mnt / "gomod" / "y").mkdir(parents=True)
                give_to_nobody(mnt / "gomod")
                (mnt / "gomod").chmod(0o555)
                assert _as_nobody(base, restore, Path("mnt")) == ""
                assert_same_tree(src, mnt)
                assert stat.S_IMODE((mnt / "mod").stat().st_mode) == 0o555
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)


def test_an_old_tree_another_user_partly_owns_is_left_aside_with_a_warning() -> None:
    """uid 65534 restoring over its own cache directory holding a directory of root's with files
    in it (a step run as root wrote there): the new tree went in place, then removing the old
    one failed -- exit 1 with the new tree in place, and the old tree left in a work directory
    no sweep could remove. The restore succeeds now, leaving the old tree beside the target,
    named in a warning."""
    with reachable_dir() as base:
        anyio.run(save, LayoutStore(base / "layout"), "k", _tree(base / "src", "new"))
        give_to_nobody(base / "layout")
        home = base / "home"
        old = _tree(home / "cache", "old")
        give_to_nobody(home)
        (old / "roots").mkdir()
        (old / "roots" / "f").write_text("root's")
        assert _as_nobody(base, restore, Path("home/cache")) == ""
        assert_same_tree(base / "src", home / "cache")
        [aside] = [p for p in home.iterdir() if p.name.startswith(".cache.old-")]
        assert (aside / "roots" / "f").read_text() == "root's"
        assert [p.name for p in home.iterdir() if "remote-cache" in p.name] == []


def _image_with_a_read_only_root(layout: Path, mode: int) -> None:
    """An OCI layout whose entry ``k`` is another tool's image: one gzip layer holding ``./`` with
    ``mode`` (555, as some tools write the root) and a file."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, mode, 1_600_000_000
        tf.addfile(root)
        member = tarfile.TarInfo("./f")
        member.size, member.mode, member.mtime = 5, 0o644, 1_600_000_000
        tf.addfile(member, io.BytesIO(b"hello"))
    tar = raw.getvalue()
    layer = gzip.compress(tar)

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout_blob(layout, digest).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **blob(json.dumps(config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(layer)}],
    }
    top = blob(json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                **top,
                "annotations": {"org.opencontainers.image.ref.name": "k"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("mode", [0o555, 0o444, 0o000])
@pytest.mark.parametrize("into", ["a new directory", "a mount point"])
def test_an_image_whose_root_is_read_only_restores_for_any_user(mode: int, into: str) -> None:
    """Another tool's image whose ``./`` member is read-only: the staged tree took that mode before
    it was moved into place, and a directory moves to another parent only while writable, so
    every restore but root's failed with a raw "[Errno 13] … .target.remote-cache-…/new -> …";
    in place (a mount point), one the swap could not search (444) was taken for empty: the old
    entries went, none came, and it said restored. The root gets its mode once exchanged in; in
    place, the directory keeps its own (as for any root member there)."""
    with reachable_dir() as base:
        _image_with_a_read_only_root(base / "layout", mode)
        give_to_nobody(base / "layout")
        os.chown(base, 65534, 65534)
        with contextlib.ExitStack() as stack:
            if into == "a mount point":
                target = stack.enter_context(tmpfs(base / "target", "mode=777"))
                (target / "old").write_text("the old tree")
                give_to_nobody(target / "old")
            error = _as_nobody(base, restore, Path("target"))
            assert error == "", error
            target = base / "target"
            assert stat.S_IMODE(target.stat().st_mode) == (mode if into == "a new directory" else 0o777)
            assert sorted(os.listdir(target)) == ["f"] and (target / "f").read_bytes() == b"hello"
        assert sorted(p.name for p in base.iterdir()) == ["layout", "target"]
