"""Run the module's shell snippets for real under BusyBox, the way the Alpine helper runs them.

``PATH`` holds only BusyBox applets (as on Alpine), so a snippet that needs a GNU option or a
tool Alpine lacks fails here too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_cache.dagger import scripts

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(
    BUSYBOX is None, reason="busybox is not installed (Debian: apt-get install busybox)"
)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: Probes of the snippets' shared functions (the module never runs these two by themselves).
IS_EMPTY = "set -eu" + scripts.FUNCTIONS + 'is_empty "$1"\n'
LISTING = "set -eu" + scripts.FUNCTIONS + 'listing "$1"\n'

Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def applets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of BusyBox applet symlinks: the whole PATH of the snippets."""
    assert BUSYBOX is not None
    bindir = tmp_path_factory.mktemp("busybox-bin")
    names = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for name in [*names, "busybox"]:
        (bindir / name).symlink_to(BUSYBOX)
    return bindir


@pytest.fixture
def run(applets: Path) -> Runner:
    def _run(script: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(applets / "sh"), "-c", script, "sh", *map(str, args)],
            env={"PATH": str(applets), "LC_ALL": "C"},
            capture_output=True,
            text=True,
            check=check,
        )

    return _run


def make_tree(root: Path) -> None:
    """A tree with every awkward thing a cache can hold."""
    root.mkdir()
    (root / ".hidden").write_text("dot\n")
    (root / ".config").mkdir()
    (root / ".config" / "settings.json").write_text("{}")
    (root / "name with spaces").write_text("spaces")
    (root / "line\nbreak").write_text("newline in name")
    (root / "-leading-dash").write_text("dash")
    (root / "tab\tand*glob?").write_text("glob chars")
    (root / "bin").mkdir(mode=0o755)
    tool = root / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    secret = root / "private"
    secret.write_bytes(os.urandom(3000))
    secret.chmod(0o600)
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "pkgs" / "a").mkdir(parents=True)
    (root / "pkgs" / "a" / "data.bin").write_bytes(bytes(range(256)) * 40)
    os.link(root / "pkgs" / "a" / "data.bin", root / "pkgs" / "hardlink.bin")
    os.link(root / "pkgs" / "a" / "data.bin", root / "bin" / "third-link")
    (root / "pkgs" / "rel-link").symlink_to("a/data.bin")
    (root / "pkgs" / "dir-link").symlink_to("a")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "abs-link").symlink_to("/etc/hostname")
    if IS_ROOT:
        os.chown(root / ".hidden", 1234, 5678)
        os.chown(root / "pkgs" / "a", 4321, 8765)
    (root / "locked-dir").mkdir(mode=0o700)
    (root / "locked-dir" / "f").write_text("x")
    # mtimes last: children first, so creating them does not touch the parents' mtimes again.
    stamp = 1_000_000_000
    for i, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(path, (stamp + i, stamp + i * 7), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a restore must keep, per path; hardlinks become shared group ids."""
    inodes: dict[int, list[str]] = {}
    entries: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
                mtime: object = None  # BusyBox cp does not carry symlink mtimes; nothing reads them
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(path.read_bytes()).hexdigest()
                mtime = int(st.st_mtime)
                inodes.setdefault(st.st_ino, []).append(rel)
            else:
                body = None
                mtime = int(st.st_mtime)
            entries[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, mtime)
    groups = {rel: tuple(sorted(group)) for group in inodes.values() for rel in group}
    return {rel: (*value, groups.get(rel)) for rel, value in entries.items()}


def test_copy_out_then_seed_reproduces_the_tree(tmp_path: Path, run: Runner) -> None:
    original = tmp_path / "volume"
    make_tree(original)
    before = snapshot(original)
    out = tmp_path / "out"
    state = tmp_path / "state" / "entry"

    result = run(scripts.COPY_OUT, original, out, state)
    status = scripts.parse_status(result.stdout)
    changed, listing = status.changed, status.listing
    assert changed and status.kib is None  # no limit: no size measured
    assert snapshot(out) == before
    assert snapshot(original) == before  # copying out never touches the volume

    fresh = tmp_path / "fresh-volume"
    fresh.mkdir()
    run(scripts.SEED, out, fresh, state)
    restored = snapshot(fresh)
    assert restored == before
    # spot checks that make a failure readable
    assert restored["pkgs/hardlink.bin"][-1] == ("bin/third-link", "pkgs/a/data.bin", "pkgs/hardlink.bin")
    assert restored["dangling"][4] == "does/not/exist"
    assert restored["line\nbreak"][1] == 0o644 or restored["line\nbreak"][1] == before["line\nbreak"][1]
    assert restored["empty/nested-empty"][0] == stat.S_IFDIR
    # the seed recorded the restored volume's listing
    assert state.read_text().strip() == run(LISTING, fresh).stdout.strip()
    assert len(listing) == 64


def test_seed_leaves_a_non_empty_volume_alone(tmp_path: Path, run: Runner) -> None:
    src = tmp_path / "remote"
    make_tree(src)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "local-only").write_text("warm engine content")
    (volume / "pkgs").mkdir()
    before = snapshot(volume)
    state = tmp_path / "state"

    result = run(scripts.SEED, src, volume, state)

    assert snapshot(volume) == before
    assert "kept" in result.stdout
    # A kept volume is not "what the remote holds": nothing is recorded, so the next export
    # compares against the last restore/upload (here: none) and uploads the local changes.
    assert not state.exists()
    state.write_text("listing-of-the-last-upload\n")
    run(scripts.SEED, src, volume, state)
    assert state.read_text() == "listing-of-the-last-upload\n"
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "out", state).stdout)
    assert status.changed


def test_seed_counts_a_lone_dotfile_as_content(tmp_path: Path, run: Runner) -> None:
    src = tmp_path / "remote"
    make_tree(src)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / ".lock").write_text("")

    run(scripts.SEED, src, volume, tmp_path / "state")

    assert sorted(p.name for p in volume.iterdir()) == [".lock"]


def test_is_empty(tmp_path: Path, run: Runner) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    (dotted / ".only-a-dotfile").write_text("")
    subdir = tmp_path / "subdir"
    (subdir / "x").mkdir(parents=True)

    assert run(IS_EMPTY, empty, check=False).returncode == 0
    assert run(IS_EMPTY, dotted, check=False).returncode != 0
    assert run(IS_EMPTY, subdir, check=False).returncode != 0


def test_copy_out_skips_an_unchanged_volume_and_sees_every_change(tmp_path: Path, run: Runner) -> None:
    volume = tmp_path / "volume"
    make_tree(volume)
    state = tmp_path / "state"
    run(scripts.RECORD, run(LISTING, volume).stdout.strip(), state)  # as after an upload

    out = tmp_path / "out"
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, out, state).stdout)
    changed, listing = status.changed, status.listing
    assert not changed and status.state == "unchanged"
    assert not out.exists()  # decided before copying anything
    assert state.read_text().strip() == listing

    # Same size, same mtime, different bytes: only ctime tells.
    target = volume / "pkgs" / "a" / "data.bin"
    st = target.stat()
    target.write_bytes(bytes(reversed(range(256))) * 40)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, out, state).stdout)
    changed, new_listing = status.changed, status.listing
    assert changed
    assert new_listing != listing
    assert snapshot(out) == snapshot(volume)

    # After the upload succeeded the module records the new listing: unchanged again.
    run(scripts.RECORD, new_listing, state)
    assert not scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "out2", state).stdout).changed

    # A new empty directory is a change too.
    (volume / "new-dir").mkdir()
    assert scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "out3", state).stdout).changed


def test_forget_makes_the_next_export_upload(tmp_path: Path, run: Runner) -> None:
    volume = tmp_path / "volume"
    make_tree(volume)
    state = tmp_path / "state"
    run(scripts.RECORD, run(LISTING, volume).stdout.strip(), state)
    assert not scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "o1", state).stdout).changed

    run(scripts.FORGET, state)
    run(scripts.FORGET, state)  # idempotent: a miss with nothing recorded is fine

    assert not state.exists()
    assert scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "o2", state).stdout).changed


def test_copy_out_of_an_empty_volume_gives_an_empty_directory(tmp_path: Path, run: Runner) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    out = tmp_path / "out"

    changed = scripts.parse_status(run(scripts.COPY_OUT, volume, out, tmp_path / "state").stdout).changed

    assert changed
    assert list(out.iterdir()) == []


def test_parse_status_rejects_output_without_a_status_line() -> None:
    with pytest.raises(ValueError, match="remote-cache-status"):
        scripts.parse_status("cp: error\n")
    with pytest.raises(ValueError, match="remote-cache-status"):
        scripts.parse_status("remote-cache-status: changed abc\n")  # no size field
    with pytest.raises(ValueError, match="remote-cache-status"):
        scripts.parse_status("remote-cache-status: exploded abc -\n")
    assert scripts.parse_status("noise\nremote-cache-status: unchanged abc -\n") == scripts.CopyStatus(
        "unchanged", "abc", None
    )
    big = scripts.parse_status("remote-cache-status: too-big abc 2048\n")
    assert big == scripts.CopyStatus("too-big", "abc", 2048) and not big.changed


def test_seed_from_a_fallback_records_nothing(tmp_path: Path, run: Runner) -> None:
    # Seeded from a restore key's entry, the exact key has no remote copy yet: the next export
    # must upload even though the volume did not change since the seed.
    src = tmp_path / "remote"
    make_tree(src)
    volume = tmp_path / "volume"
    volume.mkdir()
    state = tmp_path / "state"
    run(scripts.RECORD, "stale-listing-of-an-older-entry", state)

    run(scripts.SEED, src, volume, state, "forget")

    assert snapshot(volume) == snapshot(src)
    assert not state.exists()
    out = tmp_path / "out"
    assert scripts.parse_status(run(scripts.COPY_OUT, volume, out, state).stdout).changed
    assert snapshot(out) == snapshot(src)


def _du_kib(path: Path, run: Runner) -> int:
    return int(run('du -sk "$1" | cut -f1', path).stdout.strip())


def test_copy_out_skips_a_volume_over_the_size_limit(tmp_path: Path, run: Runner) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "big.bin").write_bytes(os.urandom(300 * 1024))
    (volume / "small").write_text("x")
    kib = _du_kib(volume, run)
    assert kib >= 300
    state = tmp_path / "state"

    out = tmp_path / "out"
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, out, state, str(kib - 1)).stdout)
    assert status.state == "too-big" and status.kib == kib and not status.changed
    assert not out.exists(), "an over-limit volume must not be copied at all"

    # At the limit exactly it is copied, and the size is reported.
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, out, state, str(kib)).stdout)
    assert status.changed and status.kib == kib
    assert snapshot(out) == snapshot(volume)

    # An unchanged volume is not even measured.
    run(scripts.RECORD, status.listing, state)
    status = scripts.parse_status(run(scripts.COPY_OUT, volume, tmp_path / "o2", state, "1").stdout)
    assert status.state == "unchanged" and status.kib is None


@pytest.mark.skipif(not IS_ROOT, reason="the tree's odd owners need root")
def test_owners_lists_what_is_not_root_owned_and_the_core_puts_it_back(tmp_path: Path, run: Runner) -> None:
    """OWNERS, under BusyBox, over the awkward tree: the core's parser reads every line, and a copy
    that lost its owners (as an engine export to a root process does) gets them all back."""
    from remote_cache.archive.owners import apply_owners, parse_owners

    src = tmp_path / "volume"
    make_tree(src)
    os.chown(src / "line\nbreak", 1000, 1000)
    os.chown(src / "pkgs" / "dir-link", 1000, 1000, follow_symlinks=False)
    listing = run(scripts.OWNERS, src).stdout
    owners = parse_owners(listing)
    assert owners == {".hidden": (1234, 5678), "pkgs/a": (4321, 8765), "line\nbreak": (1000, 1000),
                      "pkgs/dir-link": (1000, 1000)}  # fmt: skip
    copy = tmp_path / "exported"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)  # keeps hard links, as an export does
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in dirnames + filenames:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)
    assert apply_owners(copy, owners) == []
    assert snapshot(copy) == snapshot(src)


@pytest.mark.skipif(not IS_ROOT, reason="the tree's odd owners need root")
def test_put_owners_gives_an_imported_copy_its_owners_and_set_id_bits_back(
    tmp_path: Path, run: Runner
) -> None:
    """The other direction: the core lists a restored tree's owners, the engine's import makes
    every entry 0:0 (here: a copy chowned so), and PUT_OWNERS under BusyBox puts them all back,
    set-user-ID bits too (a chown clears them), never following a symlink."""
    from remote_cache.archive.owners import write_owner_lists

    src = tmp_path / "volume"
    make_tree(src)
    os.chown(src / "line\nbreak", 1000, 1000)
    os.chown(src / "-leading-dash", 1000, 1000)
    os.chown(src / "pkgs" / "dir-link", 1000, 1000, follow_symlinks=False)
    os.chown(src / "bin" / "tool", 1000, 50)
    (src / "bin" / "tool").chmod(0o4755)
    os.utime(src / "bin" / "tool", (1_000_000_000, 1_000_000_000))
    lists = tmp_path / "lists"
    assert write_owner_lists(src, lists) == 6
    copy = tmp_path / "imported"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in dirnames + filenames:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)
    assert snapshot(copy) != snapshot(src)
    run(scripts.PUT_OWNERS, copy, lists)
    assert snapshot(copy) == snapshot(src)
    assert os.stat("/etc/hostname").st_uid == 0  # abs-link's target, never followed
