"""What is mounted where: the mountinfo parsing, mounts below a directory, a filesystem's type."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_cache.archive.mounts import filesystem_type, mounts, mounts_below
from tests.mounts import ext4, overlay, tmpfs


def test_mount_points_are_read_with_their_escapes() -> None:
    mountinfo = (
        b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        b"30 22 0:26 / /dev/shm rw shared:5 - tmpfs tmpfs rw\n"
        b"41 22 0:40 / /srv/a\\040b\\011c\\012d\\134e rw - tmpfs tmpfs rw\n"
    )
    assert [point for point, _ in mounts(mountinfo)] == [b"/", b"/dev/shm", b"/srv/a b\tc\nd\\e"]
    with pytest.raises(ValueError):
        mounts(b"22 1 254:0 /\n")


def test_only_what_is_mounted_below_a_directory_counts(tmp_path: Path) -> None:
    (tmp_path / "a b").mkdir()
    (tmp_path / "a bc").mkdir()
    assert mounts_below(tmp_path / "a b") == []
    with tmpfs(tmp_path / "a bc" / "x"):  # a sibling whose name starts the same: not below
        assert mounts_below(tmp_path / "a b") == []
        assert mounts_below(tmp_path / "a bc") == [os.fsencode(tmp_path / "a bc" / "x")]
        assert mounts_below(tmp_path)
    with tmpfs(tmp_path / "a b" / "y"):  # a name with a space (escaped in mountinfo)
        assert mounts_below(tmp_path / "a b") == [os.fsencode(tmp_path / "a b" / "y")]
        assert mounts_below(tmp_path / "a b" / ".." / "a b")  # (the path resolved)


def test_the_type_comes_after_the_optional_fields() -> None:
    mountinfo = (
        b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        b"41 22 0:40 / /srv rw shared:7 master:3 - overlay overlay rw,lowerdir=/l\n"
    )
    assert mounts(mountinfo) == [(b"/", "ext4"), (b"/srv", "overlay")]


def test_a_directory_is_on_the_deepest_mount_above_it(tmp_path: Path) -> None:
    with ext4(tmp_path / "disk") as disk:  # (not tmp_path's own: it may be a tmpfs)
        assert filesystem_type(disk) == "ext4"
        (disk / "image" / "d").mkdir(parents=True)
        with tmpfs(disk / "t") as t:
            (t / "sub").mkdir()
            assert filesystem_type(t / "sub") == "tmpfs"
            assert filesystem_type(t) == "tmpfs"
        with overlay(disk / "image", disk / "o") as o:
            assert filesystem_type(o / "d") == "overlay"
        assert filesystem_type(disk / "o") == "ext4"
