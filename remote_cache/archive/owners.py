"""Ownership listings: put a tree's owners back on a copy that lost them.

A copy can keep names, modes, times and links but not owners: the Dagger engine's
``Directory.export`` gives every file the exporting process's uid and gid
(``engine/client/filesync.go``, ``FilesyncTarget.DiffCopy``). So the entries not owned by
``0:0`` are listed where the tree still has its owners (BusyBox ``stat -c`` with
:data:`STAT_FORMAT`, run from the tree's root over ``find .``: one ``UID GID ./PATH`` line each)
and :func:`apply_owners` puts them back on the copy.

A path with a newline in its name spreads over several lines; a line that does not start a new
entry continues the previous name. Paths are applied through directory descriptors opened with
``O_NOFOLLOW`` from the copy's root down, so a symlink in the copy never redirects a chown.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = ["STAT_FORMAT", "apply_owners", "parse_owners"]

#: The ``stat -c`` format of a listing line (BusyBox and GNU stat agree on it).
STAT_FORMAT = "%u %g %n"
_LINE = re.compile(r"(\d+) (\d+) \./(.*)", re.DOTALL)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parse_owners(listing: str) -> dict[str, tuple[int, int]]:
    """``{relative path: (uid, gid)}`` from a listing; ``ValueError`` when it is not one."""
    owners: dict[str, tuple[int, int]] = {}
    last: str | None = None
    for line in listing.split("\n"):
        match = _LINE.fullmatch(line)
        if match is None:
            if last is None:
                if not line:
                    continue
                raise ValueError(f"not an ownership listing line: {line[:80]!r}")
            # A name with a newline in it: this line continues the previous entry.
            uid_gid = owners.pop(last)
            last = f"{last}\n{line}"
            owners[last] = uid_gid
            continue
        last = match.group(3)
        owners[last] = (int(match.group(1)), int(match.group(2)))
    # The listing ends with a newline: the empty piece after it is not part of the last name.
    if last is not None and last.endswith("\n"):
        owners[last[:-1]] = owners.pop(last)
    return owners


def apply_owners(root: Path, owners: dict[str, tuple[int, int]]) -> list[str]:
    """Give each listed path under ``root`` its owner (not following symlinks); the paths that
    could not be changed (missing, not permitted), each with why."""
    failed: list[str] = []
    fds: dict[str, int] = {"": os.open(root, _DIR_FLAGS)}
    try:
        for rel, (uid, gid) in owners.items():
            parts = rel.split("/")
            if rel == "" or any(p in ("", ".", "..") for p in parts):
                failed.append(f"{rel!r}: not a path inside the tree")
                continue
            try:
                parent = _dir_fd(fds, parts[:-1])
                os.chown(parts[-1], uid, gid, dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                failed.append(f"{rel}: {os.strerror(exc.errno or errno.EIO)}")
    finally:
        for fd in fds.values():
            os.close(fd)
    return failed


def _dir_fd(fds: dict[str, int], parts: list[str]) -> int:
    """A descriptor of the directory ``parts`` under the root, opened without following links."""
    key = "/".join(parts)
    fd = fds.get(key)
    if fd is None:
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=_dir_fd(fds, parts[:-1]))
        if len(fds) >= 256:  # keep the root; drop the rest
            for k in [k for k in fds if k]:
                os.close(fds.pop(k))
        fds[key] = fd
    return fd
