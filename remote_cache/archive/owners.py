"""Ownership listings: put a tree's owners back on a copy that lost them, in either direction.

A copy can keep names, modes, times and links but not owners: the Dagger engine's
``Directory.export`` gives every file the exporting process's uid and gid
(``engine/client/filesync.go``, ``FilesyncTarget.DiffCopy``). So the entries not owned by
``0:0`` are listed where the tree still has its owners (BusyBox ``stat -c`` with
:data:`STAT_FORMAT`, run from the tree's root over ``find .``: one ``UID GID ./PATH`` line each)
and :func:`apply_owners` puts them back on the copy.

A path with a newline in its name spreads over several lines; a line that does not start a new
entry continues the previous name. Paths are applied through directory descriptors opened with
``O_NOFOLLOW`` from the copy's root down, so a symlink in the copy never redirects a chown.

The other way, a tree restored here and imported into the engine (``host.directory`` gives
every entry uid and gid 0, ``engine/client/filesync.go`` ``normalizeLocalImportStat``):
:func:`write_owner_lists` writes, beside it, what BusyBox needs to put the owners back in the
engine (``remote_cache.dagger.scripts.PUT_OWNERS``): one file ``owner.UID.GID`` per owner with the
NUL-terminated paths (``./PATH``) it owns, and ``mode.OCTAL`` files for the entries whose
set-user/group-ID bits a chown clears (Linux clears them even for root), to set again after.
The walk never enters a symlink, so no listed path passes through one.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections import defaultdict
from pathlib import Path

__all__ = ["STAT_FORMAT", "apply_owners", "parse_owners", "write_owner_lists"]

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


def write_owner_lists(root: Path, dest: Path) -> int:
    """Write into ``dest`` the lists that give the entries of a copy of ``root`` their owners
    back (see the module docstring); returns how many entries are not owned by 0:0."""
    owners: defaultdict[tuple[int, int], list[bytes]] = defaultdict(list)
    modes: defaultdict[int, list[bytes]] = defaultdict(list)
    top = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if st.st_uid == 0 and st.st_gid == 0:
                continue
            rel = b"./" + os.path.relpath(full, top)
            owners[(st.st_uid, st.st_gid)].append(rel)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                modes[stat.S_IMODE(st.st_mode)].append(rel)
    dest.mkdir(parents=True, exist_ok=True)
    for (uid, gid), paths in owners.items():
        (dest / f"owner.{uid}.{gid}").write_bytes(b"".join(p + b"\0" for p in paths))
    for mode, paths in modes.items():
        (dest / f"mode.{mode:o}").write_bytes(b"".join(p + b"\0" for p in paths))
    return sum(len(paths) for paths in owners.values())
