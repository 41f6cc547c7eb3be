"""A read-only FUSE filesystem with names longer than 255 bytes, as FUSE (up to 1024), CIFS and
others take: ``python tests/fuse_long_names.py MOUNTPOINT DEPTH`` mounts, in the foreground,
DEPTH nested directories named ``d`` * 200, the deepest holding a 5-byte file named ``n`` * 500.
Used by :func:`tests.mounts.long_names` (the walk's path-length rule)."""

from __future__ import annotations

import errno
import stat
import sys

from fuse import FUSE, FuseOSError, Operations  # fusepy

DIR_NAME, FILE_NAME, DATA = "d" * 200, "n" * 500, b"hello"
_WHEN = 1_700_000_000


class LongNames(Operations):
    def __init__(self, depth: int) -> None:
        self.depth = depth

    def _parts(self, path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        parts = self._parts(path)
        times = {"st_ctime": _WHEN, "st_mtime": _WHEN, "st_atime": _WHEN}
        if len(parts) <= self.depth and all(p == DIR_NAME for p in parts):
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ino": len(parts) + 1, **times}
        if len(parts) == self.depth + 1 and all(p == DIR_NAME for p in parts[:-1]) and parts[-1] == FILE_NAME:
            return {
                "st_mode": stat.S_IFREG | 0o644,
                "st_nlink": 1,
                "st_size": len(DATA),
                "st_ino": 1000,
                **times,
            }
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", DIR_NAME if len(self._parts(path)) < self.depth else FILE_NAME]

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return DATA[offset : offset + size]

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_namemax": 1024, "f_bsize": 4096}


if __name__ == "__main__":
    FUSE(LongNames(int(sys.argv[2])), sys.argv[1], foreground=True, ro=True, nothreads=True)
