"""The walk's archive order and the listings computed from it: both are stored formats (layer
bytes, listing annotations), so faster code must give exactly the same order and digests."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from remote_cache.archive.plan import LayerPlan
from remote_cache.archive.tar import DIR, FILE, HARDLINK, MAX_DEPTH, SYMLINK, Member
from remote_cache.archive.walk import TreeStats, identity_of, split_tree, tree_identity, walk_part, walk_tree
from remote_cache.cache.evidence import portable_listing
from remote_cache.errors import TreeTooDeep
from tests.mounts import long_names
from tests.trees import make_tree
from tests.users import as_nobody_in, give_to_nobody

_UTF8 = ["z", "~", "\x7f", "é", "日本", "Z", "A b", "-", ".x", "\u2139", "\U0001f600"]
_ODD = [b"\xff", b"\xc3x", b"\xe6\x97", b"\xc3"]  # not UTF-8: surrogate-escaped in str


@pytest.mark.parametrize("odd", [False, True], ids=["utf-8 names", "undecodable names"])
def test_entries_come_in_the_order_of_their_name_bytes(tmp_path: Path, odd: bool) -> None:
    names = [n.encode() for n in _UTF8] + (_ODD if odd else [])
    for name in names:
        (tmp_path / os.fsdecode(name)).write_bytes(b"x")
    members, _ = walk_tree(tmp_path, TreeStats())
    assert [os.fsencode(m.path) for m in members] == sorted(names)


def _reference_listing(members: list[Member]) -> str:
    """The listing format v1, field by field, as the annotation was first defined."""
    h = hashlib.sha256(b"remote-cache listing v1\0")
    for e in members:
        h.update(os.fsencode(e.path) + b"\0")
        h.update(f"{e.kind} {e.mode:o} {e.uid} {e.gid} {e.size} {e.mtime}".encode() + b"\0")
        h.update(os.fsencode(e.linkname) + b"\0")
    return "sha256:" + h.hexdigest()


def test_the_listing_digest_is_format_v1() -> None:
    members = [
        Member("d", DIR, 0o755, 0, 0, 0, 1),
        Member("d/é \udcff", FILE, 0o4644, 1000, 1000, 12345, 499162500),
        Member("d/l", SYMLINK, 0o777, 0, 0, 0, 2, "../\udcc3x"),
        Member("d/h", HARDLINK, 0o644, 7, 8, 0, 3, "d/é \udcff"),
    ]
    plan = LayerPlan(0, tuple(members), 0)
    assert portable_listing(plan) == _reference_listing(members)
    v1 = (
        b"remote-cache listing v1\0d\0001 755 0 0 0 1\0\0d/\xc3\xa9 \xff\0000 4644 1000 1000 12345 "
        b"499162500\0\0d/l\0002 777 0 0 0 2\0../\xc3x\0d/h\0003 644 7 8 0 3\0d/\xc3\xa9 \xff\0"
    )
    assert portable_listing(plan) == "sha256:" + hashlib.sha256(v1).hexdigest()


def test_a_tree_nested_deeper_than_the_limit_is_refused_by_name(tmp_path: Path) -> None:
    """Walks and removals recurse once per level: a tree deeper than MAX_DEPTH is refused with a
    message naming it (it was "unexpected RecursionError"); one at the limit is walked."""
    at_limit = tmp_path / "ok" / os.path.join(*["d"] * (MAX_DEPTH - 1))
    at_limit.mkdir(parents=True)
    (at_limit / "f").write_bytes(b"x")
    members, _ = walk_tree(tmp_path / "ok", TreeStats())
    assert members[-1].path.count("/") == MAX_DEPTH - 1
    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # made level by level: pathlib and os.makedirs recurse once per level themselves
        for name in ["deep"] + ["d"] * 1200:
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    try:
        with pytest.raises(TreeTooDeep, match=f"more than {MAX_DEPTH} levels deep"):
            walk_tree(tmp_path / "deep", TreeStats())
    finally:  # not left to pytest's clean-up, whose removal recurses once per level
        subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)


def test_a_walk_holds_one_directory_open_at_a_time(tmp_path: Path) -> None:
    """A walk opens each directory to look at its entries relative to it (fstatat) and closes
    it before going into them: a tree at the depth limit is walked under a limit of 32 open
    files (a descriptor held per level would need MAX_DEPTH)."""
    deep = tmp_path / "t" / os.path.join(*["d"] * (MAX_DEPTH - 1))
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from remote_cache.archive.walk import TreeStats, tree_identity, walk_tree\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
        "members, identity = walk_tree(Path(sys.argv[1]), TreeStats())\n"
        "assert tree_identity(Path(sys.argv[1])) == identity and len(members) == int(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t"), str(MAX_DEPTH)], check=True)


_CHANGED_WHEN_OPENED = """
import os, shutil, sys
from pathlib import Path
from remote_cache.archive.walk import TreeStats, tree_identity, walk_tree
from remote_cache.errors import TreeChanged

root, how = Path(sys.argv[1]), sys.argv[2]
victim = str(root / "b")

def change(event, args):  # as the walk opens the directory it listed: it goes, or turns into a file
    if event == "open" and args[0] == victim and not changed:
        changed.append(victim)
        shutil.rmtree(victim)
        if how == "replaced":
            Path(victim).write_text("now a file")

sys.addaudithook(change)
for look in (lambda root: walk_tree(root, TreeStats()), tree_identity):
    changed = []
    if os.path.isdir(victim):
        shutil.rmtree(victim)
    Path(victim).unlink(missing_ok=True)
    (root / "b" / "c").mkdir(parents=True)
    try:
        look(root)
    except TreeChanged as exc:
        print(exc)
"""


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_directory_that_goes_while_it_is_walked_is_a_changed_tree(tmp_path: Path, how: str) -> None:
    """A directory removed (or replaced by a file) between its parent's listing and its own: the
    save stops naming it as for a file that changed (it said "[Errno 2] No such file or
    directory"). The change comes as the walk opens it (an audit hook), every time."""
    (tmp_path / "t" / "a").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", _CHANGED_WHEN_OPENED, str(tmp_path / "t"), how],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    assert all(f"{tmp_path / 't' / 'b'}' changed while it was saved (it was {how})" in line for line in lines)


def test_an_entry_the_walk_cannot_look_at_is_named_by_its_path(tmp_path: Path) -> None:
    """Entries are looked at relative to their directory; an error still names the whole path
    (it named the bare entry, ``'f'``, which says nothing about where it is)."""
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_bytes(b"x")
    (tmp_path / "tree" / "sub").chmod(0o644)  # listable, not searchable: no stat of what is in it
    give_to_nobody(tmp_path / "tree", tmp_path)

    def walk() -> None:
        for look in (lambda root: walk_tree(root, TreeStats()), tree_identity):
            try:
                look(Path("tree"))
            except PermissionError as exc:
                assert exc.filename == os.path.join("tree", "sub", "f"), exc.filename
            else:
                raise AssertionError("walked a directory it may not search")

    assert as_nobody_in(tmp_path, walk) == ""


def test_a_restores_work_directory_in_the_root_is_not_looked_at(tmp_path: Path) -> None:
    """An in-place restore's work directory at the root is no part of the tree, and it may go at
    any moment (that restore ends, or sweeps a dead run's): the walk leaves it out without a stat
    of it, which here, in a root it may list but not search, would be refused."""
    (tmp_path / "tree" / ".remote-cache-restore-abc").mkdir(parents=True)
    (tmp_path / "tree").chmod(0o444)
    give_to_nobody(tmp_path / "tree", tmp_path)

    def walk() -> None:
        members, identity = walk_tree(Path("tree"), TreeStats())
        assert members == [] and identity.top == () and tree_identity(Path("tree")) == identity

    assert as_nobody_in(tmp_path, walk) == ""


def test_too_deep_is_said_before_the_deepest_entries_are_looked_at(tmp_path: Path) -> None:
    """The depth limit names the entry past it (a refusal, exit 5), whatever else is wrong with
    it: here the deepest directory may be listed, not searched."""
    deepest = tmp_path / "t" / os.path.join(*["d"] * MAX_DEPTH)
    deepest.mkdir(parents=True)
    (deepest / "f").write_bytes(b"x")
    deepest.chmod(0o644)
    give_to_nobody(tmp_path / "t", tmp_path)

    def walk() -> None:
        for look in (lambda root: walk_tree(root, TreeStats()), tree_identity):
            with pytest.raises(TreeTooDeep, match=f"more than {MAX_DEPTH} levels deep"):
                look(Path("t"))

    assert as_nobody_in(tmp_path, walk) == ""


def test_a_path_too_long_for_the_system_fails_the_walk(tmp_path: Path) -> None:
    """Packing opens files by their whole path: one longer than the system takes (ENAMETOOLONG)
    fails the walk, before anything is uploaded, as it did when the walk looked by whole path."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # made level by level: the whole path is too long for any call to take
        for name in ["t"] + ["d" * 200] * 20:
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        os.close(os.open("f" * 200, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    for look in (lambda root: walk_tree(root, TreeStats()), tree_identity):
        with pytest.raises(OSError) as raised:
            look(tmp_path / "t")
        assert raised.value.errno == errno.ENAMETOOLONG


def test_a_name_longer_than_255_bytes_counts_toward_the_path_limit(tmp_path: Path) -> None:
    """FUSE, CIFS and others take names over 255 bytes: a path too long for the system only by its
    last name fails the walk too (a bound of 255 bytes a name let it be walked, then packing,
    which opens by the whole path, failed after uploads)."""
    depth = 18
    with long_names(tmp_path / "fuse", depth) as root:
        deepest = os.path.join(root, *["d" * 200] * depth)
        assert len(os.fsencode(deepest)) + 1 + 255 < 4096 <= len(os.fsencode(deepest)) + 1 + 500
        for look in (lambda root: walk_tree(root, TreeStats()), tree_identity):
            with pytest.raises(OSError) as raised:
                look(root)
            assert raised.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize(
    "mtime_ns, second",
    [
        (1_700_000_000_999_999_999, 1_700_000_000),  # float seconds round this up to ...001
        (-1_500_000_000, -2),  # int() truncates toward zero: -1, a second after the file's
        (-86_400_500_000_000, -86_401),
    ],
)
def test_a_members_mtime_is_the_second_the_files_mtime_falls_in(
    tmp_path: Path, mtime_ns: int, second: int
) -> None:
    # "mtimes are kept to the second": the member must carry floor(mtime), as tar does
    # (GNU tar stores 1700000000 for the first); int(st_mtime) goes through a float.
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(mtime_ns, mtime_ns))
    (member,) = walk_tree(tmp_path, TreeStats())[0]
    assert member.mtime == second


@pytest.mark.parametrize("parts", [1, 2, 8, 1000])
def test_a_split_walk_gives_the_identity_of_one_walk(tmp_path: Path, parts: int) -> None:
    """The identity's parts, walked apart in any order (other processes do: a save's prewalk) and
    spliced back, are the identity one walk gives; a part left out is refused, not skipped."""
    root = tmp_path / "tree"
    make_tree(root, small_files=400, big_bytes=1 << 16)
    (root / "one" / "only").mkdir(parents=True)  # a chain the split lists a level further into
    (root / "one" / "only" / "f").write_text("x")
    os.mkfifo(root / "many" / "pipe")
    (root / ".wh.x").mkdir()  # a directory named like a whiteout: left out, not walked
    (root / ".wh.x" / "inside").write_text("x")
    stats = TreeStats()
    _, whole = walk_tree(root, stats)
    split = split_tree(root, parts)
    walked = [walk_part(split, rel) for rel in split.parts]
    random.Random(parts).shuffle(walked)
    spliced = TreeStats()
    assert identity_of(split, walked, spliced) == whole
    assert sorted(spliced.skipped, key=str) == sorted(stats.skipped, key=str)
    assert tree_identity(root) == whole
    if walked:
        with pytest.raises(KeyError):
            identity_of(split, walked[1:])
