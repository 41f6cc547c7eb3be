"""The CPUs a process may use (:mod:`remote_cache.cpus`): real affinity masks and real cgroups
for the processes asked, and cgroup trees written as the kernel shows them for the layouts this
machine does not have."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_cache.cpus import cgroup_cpu_quota

ROOT = Path(__file__).resolve().parents[1]

linux_with_cpus = pytest.mark.skipif(
    sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2, reason="needs Linux with 2+ CPUs"
)

_ASK = (
    "from remote_cache.cpus import usable_cpus\n"
    "from remote_cache.cache.prewalk import _may_fork\n"
    "print(usable_cpus(), _may_fork())\n"
)


def _ask(setup: str = "", runner: str = "") -> tuple[int, bool]:
    """(usable CPUs, whether a save would fork its walk) in a fresh interpreter started by
    ``sh -c '<setup> exec <runner> python ...'``."""
    out = subprocess.run(
        ["sh", "-c", f'{setup} exec {runner} "$0" -c "$1"', sys.executable, _ASK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), out[1] == "True"


@linux_with_cpus
def test_every_cpu_of_the_affinity_counts_without_a_quota() -> None:
    if cgroup_cpu_quota() is not None:
        pytest.skip("this test process runs under a CPU quota")
    assert _ask() == (len(os.sched_getaffinity(0)), True)


@linux_with_cpus
def test_an_affinity_of_one_cpu_is_one_cpu_and_no_forked_walk() -> None:
    assert _ask(runner="taskset -c 0") == (1, False)


def _cpu_hierarchy() -> tuple[Path, bool] | None:
    """Where a cgroup with a CPU quota can be made: (directory, whether it is cgroup v2)."""
    for v1 in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (v1 / "cpu.cfs_quota_us").exists():
            return v1, False
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if control.exists() and "cpu" in control.read_text().split():
        return control.parent, True
    return None


@contextlib.contextmanager
def _cpu_cgroup(quota_us: int, period_us: int = 100_000) -> Iterator[Path]:
    """A fresh cgroup with this CPU quota."""
    hierarchy = _cpu_hierarchy()
    if hierarchy is None:
        pytest.skip("no cgroup CPU controller to make a group in")
    if cgroup_cpu_quota() is not None:
        pytest.skip("this test process runs under a CPU quota, which a group made here may inherit")
    parent, v2 = hierarchy
    group = parent / f"remote-cache-test-{os.getpid()}"
    files = (
        {"cpu.max": f"{quota_us} {period_us}"}
        if v2
        else {
            "cpu.cfs_period_us": str(period_us),
            "cpu.cfs_quota_us": str(quota_us),
        }
    )
    try:
        group.mkdir()
        for name, value in files.items():
            (group / name).write_text(value)
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot make a cgroup with a CPU quota here: {exc}")
    try:
        yield group
    finally:
        group.rmdir()  # (its process has exited: `_ask` waits for it)


def _inside(group: Path) -> str:
    return f"echo $$ > {group}/cgroup.procs &&"


@linux_with_cpus
def test_a_cgroup_quota_of_one_cpu_is_one_cpu_and_no_forked_walk() -> None:
    with _cpu_cgroup(100_000) as group:
        assert _ask(_inside(group)) == (1, False)


@linux_with_cpus
def test_a_quota_is_rounded_up_to_whole_cpus() -> None:
    with _cpu_cgroup(50_000) as group:
        assert _ask(_inside(group)) == (1, False)
    with _cpu_cgroup(150_000) as group:
        assert _ask(_inside(group)) == (2, True)


# -- the layouts this machine may not have, as /proc and /sys show them -----------------------


def _proc(tmp_path: Path, cgroup: str, mountinfo: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return str(proc)


def _v1_quota(group: str, quota_us: int) -> dict[str, str]:
    """A v1 group's quota files (a period of 100 ms), for :func:`_write`."""
    return {f"{group}/cpu.cfs_quota_us": f"{quota_us}\n", f"{group}/cpu.cfs_period_us": "100000\n"}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


_V2_MOUNT = (
    "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
)


def test_v2_takes_the_smallest_quota_of_the_group_and_its_ancestors(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr\n", _V2_MOUNT)
    _write(
        tmp_path,
        {
            "/sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",
            "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(proc, str(tmp_path)) == 2.5


def test_v2_without_a_quota_anywhere_is_none(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/user.slice\n", _V2_MOUNT)
    _write(tmp_path, {"/sys/fs/cgroup/user.slice/cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(proc, str(tmp_path)) is None


def test_a_container_sees_its_own_group_at_the_mount_root(tmp_path: Path) -> None:
    # Docker on cgroup v1 without a cgroup namespace: /proc names the host's path, the mount's
    # root is that path, and the quota sits at the mount point itself.
    proc = _proc(
        tmp_path,
        "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n0::/\n",
        "700 690 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        "701 690 0:41 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
    )
    _write(tmp_path, _v1_quota("/sys/fs/cgroup/cpu,cpuacct", 200_000))
    assert cgroup_cpu_quota(proc, str(tmp_path)) == 2.0


def test_unreadable_or_strange_files_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(str(tmp_path / "missing"), str(tmp_path)) is None
    proc = _proc(tmp_path, "0::/a\n", _V2_MOUNT)
    _write(tmp_path, {"/sys/fs/cgroup/a/cpu.max": "lots 100000\n"})
    assert cgroup_cpu_quota(proc, str(tmp_path)) is None


def test_hybrid_named_and_escaped_layouts(tmp_path: Path) -> None:
    # A hybrid host: cpu on a v1 hierarchy (with optional fields before "-"), systemd's named
    # one, the unified tree without a quota; the group deeper than a bind mount's root; a
    # mount point with an escaped space.
    proc = _proc(
        tmp_path,
        "9:name=systemd:/ci/job\n4:cpu,cpuacct:/ci/job/step\n0::/ci/job\n",
        "25 20 0:22 / /sys/fs/cgroup/systemd rw shared:9 - cgroup cgroup rw,xattr,name=systemd\n"
        "26 20 0:23 /ci /sys/fs/cgroup/cpu\\040acct rw shared:10 master:3 - cgroup cgroup rw,cpu,cpuacct\n"
        "27 20 0:24 / /sys/fs/cgroup/unified rw shared:11 - cgroup2 cgroup2 rw\n"
        "28 20 0:25 / /sys/fs/cgroup/cpuset rw shared:12 - cgroup cgroup rw,cpuset\n",
    )
    _write(
        tmp_path,
        {
            **_v1_quota("/sys/fs/cgroup/cpu acct/job", 300_000),
            **_v1_quota("/sys/fs/cgroup/cpu acct/job/step", -1),
            **_v1_quota("/sys/fs/cgroup/systemd/ci/job", 10_000),  # (not the cpu hierarchy)
        },
    )
    assert cgroup_cpu_quota(proc, str(tmp_path)) == 3.0


def test_bytes_and_lines_no_kernel_writes_mean_no_quota(tmp_path: Path) -> None:
    # Bytes that are not UTF-8 in a mount point and a group name, a cut mountinfo line, a
    # mount point holding other whitespace than spaces (no field boundary for the kernel), a
    # number too big for a float.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_bytes(b"0::/caf\xe9\n")
    (proc / "mountinfo").write_bytes(
        b"40 20 0:30 / /media/caf\xe9 rw - vfat /dev/sdb1 rw\n"
        b"41 20 0:31 / /x - cgroup2\n"
        b"42 20 0:32 / /tmp/x\xe3\x80\x80-\xe3\x80\x80cgroup2\xe3\x80\x80y rw - tmpfs none rw\n"
        b"43 20 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    _write(tmp_path, {"/tmp/x/cpu.max": "10000 100000\n"})
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("1" + "0" * 400 + " 1\n")
    assert cgroup_cpu_quota(str(proc), str(tmp_path)) is None
    (tmp_path / "sys/fs/cgroup" / "caf\udce9").mkdir()
    (tmp_path / "sys/fs/cgroup" / "caf\udce9" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(str(proc), str(tmp_path)) == 1.5
