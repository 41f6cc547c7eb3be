"""Ownership listings: taken from a real tree with find + stat, put back on a copy that lost them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from remote_cache.archive.owners import STAT_FORMAT, apply_owners, parse_owners

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def listing_of(root: Path) -> str:
    """What the Dagger helper prints for ``root`` (the same find + stat, here GNU's)."""
    not_root = ["(", "!", "-user", "0", "-o", "!", "-group", "0", ")"]
    return subprocess.run(
        ["find", ".", "-mindepth", "1", *not_root, "-exec", "stat", "-c", STAT_FORMAT, "{}", "+"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
        errors="surrogateescape",
    ).stdout


def owners_of(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            out[str(full.relative_to(root))] = (st.st_uid, st.st_gid)
    return out


def test_parse_reads_lines_and_names_with_newlines_and_spaces() -> None:
    listing = "1000 1000 ./a\n0 50 ./b c\n7 8 ./two\nlines\n9 9 ./ends with newline\n\n"
    assert parse_owners(listing) == {
        "a": (1000, 1000),
        "b c": (0, 50),
        "two\nlines": (7, 8),
        "ends with newline\n": (9, 9),
    }
    assert parse_owners("") == {}
    with pytest.raises(ValueError, match="not an ownership listing line"):
        parse_owners("Permission denied\n1 1 ./a\n")


@needs_root
def test_a_copy_gets_the_owners_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "lib").mkdir(parents=True)
    (src / "pkg" / "lib" / "a.js").write_text("a")
    (src / "pkg" / "b c.js").write_text("b")
    (src / "odd\nname").write_text("c")
    (src / "root-owned").write_text("d")
    os.symlink("pkg/lib/a.js", src / "link")
    owners = {"pkg": (1000, 1000), "pkg/lib": (1000, 100), "pkg/lib/a.js": (1000, 1000),
              "pkg/b c.js": (0, 1000), "odd\nname": (65534, 65534), "link": (1000, 1000)}  # fmt: skip
    for rel, ids in owners.items():
        os.chown(src / rel, *ids, follow_symlinks=False)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(copy):  # what an export to a root process gives
        for name in dirnames + filenames:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)
    assert owners_of(copy) != owners_of(src)

    listing = listing_of(src)
    assert "root-owned" not in listing  # only the exceptions to 0:0 are listed
    assert apply_owners(copy, parse_owners(listing)) == []
    assert owners_of(copy) == owners_of(src)


@needs_root
def test_a_symlink_in_the_copy_never_redirects_a_chown(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("x")
    copy = tmp_path / "copy"
    copy.mkdir()
    os.symlink(outside, copy / "link")
    failed = apply_owners(copy, {"link/victim": (1234, 1234), "../outside/victim": (1234, 1234)})
    assert len(failed) == 2 and "link/victim" in failed[0] and "not a path inside" in failed[1]
    assert (outside / "victim").stat().st_uid == 0
    assert apply_owners(copy, {"missing": (1, 1)}) == ["missing: No such file or directory"]
