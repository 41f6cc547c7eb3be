"""What Linux says is mounted where (``/proc/self/mountinfo``): whether a directory is a mount
point, whether anything is mounted below it, and the type of the filesystem it is on."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["filesystem_type", "is_mount_point", "mounts", "mounts_below"]

_OCTAL = re.compile(rb"\\([0-7]{3})")
_MOUNTINFO = "/proc/self/mountinfo"


def mounts(mountinfo: bytes) -> list[tuple[bytes, str]]:
    """(mount point, filesystem type) of each line of a ``/proc/<pid>/mountinfo`` (the point is
    its fifth field, where space, tab, newline and backslash are octal escapes; the type follows
    the ``-`` that ends the optional fields); ValueError for a line without them."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5:
            raise ValueError(f"not a mountinfo line: {line!r}")
        point = _OCTAL.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
        try:
            fstype = os.fsdecode(fields[fields.index(b"-", 5) + 1])
        except (ValueError, IndexError):
            fstype = ""
        out.append((point, fstype))
    return out


def _read() -> list[tuple[bytes, str]] | None:
    try:
        with open(_MOUNTINFO, "rb") as mountinfo:
            return mounts(mountinfo.read())
    except (OSError, ValueError):
        return None


def is_mount_point(path: Path) -> bool:
    """Whether ``path`` (resolved) is a mount point: by its device (another filesystem's root),
    or as mountinfo lists it (a bind mount from the same filesystem keeps the device)."""
    if os.path.ismount(path):
        return True
    found = _read()
    return found is not None and any(point == os.fsencode(path) for point, _ in found)


def mounts_below(path: Path) -> list[bytes] | None:
    """The mount points below directory ``path`` (not itself); None when that cannot be told (no
    ``/proc``)."""
    found = _read()
    if found is None:
        return None
    prefix = os.fsencode(os.path.realpath(path)).rstrip(b"/") + b"/"
    return [point for point, _ in found if point.startswith(prefix)]


def filesystem_type(path: Path) -> str | None:
    """The type (``ext4``, ``overlay``...) of the filesystem directory ``path`` is on: that of
    the last-mounted deepest mount point above it; None when that cannot be told."""
    found = _read()
    if not found:
        return None
    where = os.fsencode(os.path.realpath(path))
    best: tuple[int, str] | None = None
    for point, fstype in found:  # later lines are later mounts: over earlier ones at one point
        below = where == point or where.startswith(point.rstrip(b"/") + b"/")
        if below and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return None if best is None else best[1]
