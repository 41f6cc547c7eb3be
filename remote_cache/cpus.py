"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's CPUs: in a CI container limited to 2 CPUs on a 64-core
host it says 64, and a save packed 64 layers at once (each held in memory until uploaded) on
2 CPUs' worth of time. Read much as Go's runtime (1.25, its default ``GOMAXPROCS``) reads it:
the affinity mask, then the CPU quota of the process's cgroup (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), rounded up -- but, unlike Go, the smallest
along the group's ancestors too (a pod's quota above its container's), the group found below
the mount's root (Docker on cgroup v1 mounts the container's own group), and no floor of 2
(one CPU to use means no second process). Unreadable, absent or strange files mean no quota:
the count is advice, and nothing here may fail a command.
"""

from __future__ import annotations

import math
import os
from functools import cache

__all__ = ["cgroup_cpu_quota", "usable_cpus"]


@cache
def usable_cpus() -> int:
    """The CPUs this process can keep busy: at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not Linux)
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(proc: str = "/proc/self", root: str = "") -> float | None:
    """The CPU quota of the process's cgroup in CPUs (``1.5``: 150 ms per 100 ms), the smallest
    along its ancestors; None without one. ``proc`` and ``root`` (prefixed to the mount points)
    let a test read a tree it made."""
    try:
        # (bytes the kernel does not escape, in a mount point or a group's name, must not fail)
        with open(f"{proc}/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f]
        with open(f"{proc}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mounts = [m for m in map(_cpu_mount, f) if m is not None]
    except OSError:
        return None
    quotas = []
    for hierarchy, controllers, path in (m for m in memberships if len(m) == 3):
        v2 = hierarchy == "0" and not controllers
        if not v2 and "cpu" not in controllers.split(","):
            continue
        for mount_root, point in (m[1:] for m in mounts if m[0] == v2):
            quota = _smallest_quota(root + point, _below(path, mount_root), v2)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _cpu_mount(line: str) -> tuple[bool, str, str] | None:
    """(whether cgroup v2, root, mount point) of a mountinfo line's mount where CPU quotas can
    be (cgroup2, or a v1 hierarchy with the ``cpu`` controller); None for other mounts."""
    # Split on spaces only, as the kernel writes it (it escapes spaces, tabs, newlines and
    # backslashes in paths; other whitespace in a mount point must not make fields).
    fields = line.rstrip("\n").split(" ")
    try:
        sep = fields.index("-")
        fstype, options, root, point = fields[sep + 1], fields[sep + 3], fields[3], fields[4]
    except (ValueError, IndexError):
        return None
    if fstype == "cgroup2" or (fstype == "cgroup" and "cpu" in options.split(",")):
        return fstype == "cgroup2", _unescape(root), _unescape(point)
    return None


def _below(path: str, mount_root: str) -> str | None:
    """``path`` (the cgroup, as /proc/self/cgroup names it) relative to the mount's root; None
    when the mount does not show it (another container's view)."""
    if mount_root == "/":
        return path.strip("/")
    if path == mount_root or path.startswith(mount_root + "/"):
        return path[len(mount_root) :].strip("/")
    return None


def _smallest_quota(point: str, relative: str | None, v2: bool) -> float | None:
    """The smallest quota from the cgroup's directory up to the mount point."""
    if relative is None:
        return None
    parts = relative.split("/") if relative else []
    quotas = []
    for depth in range(len(parts), -1, -1):
        quota = _quota(os.path.join(point, *parts[:depth]), v2)
        if quota is not None:
            quotas.append(quota)
    return min(quotas, default=None)


def _quota(directory: str, v2: bool) -> float | None:
    try:
        if v2:
            with open(os.path.join(directory, "cpu.max"), encoding="ascii") as f:
                quota, _, period = f.read().partition(" ")
        else:
            with open(os.path.join(directory, "cpu.cfs_quota_us"), encoding="ascii") as f:
                quota = f.read()
            with open(os.path.join(directory, "cpu.cfs_period_us"), encoding="ascii") as f:
                period = f.read()
        q, p = (None if quota.strip() in ("max", "-1") else int(quota)), int(period)
        return q / p if q is not None and q > 0 and p > 0 else None
    except (OSError, ValueError, OverflowError):  # (ValueError: also bytes that are not text)
        return None


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes come octal-escaped."""
    if "\\" not in field:
        return field
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
