"""A nasty directory tree for round-trip tests, and an exact tree comparison.

``make_tree(root)`` fills ``root`` with what real caches contain and what breaks archivers:
thousands of small files, a 20 MB random file, every kind of symlink, hard-link groups across
directories, nested empty dirs, read-only files and dirs, unicode (NFC and NFD, emoji), very long
names, 60-level nesting, names with spaces, newlines, leading dashes and glob characters.
``assert_same_tree(a, b)`` compares type, mode, mtime (whole seconds, what tar keeps), size,
content, symlink targets, hard-link groups and empty directories. ``holes_work(dir)`` probes
whether files there can be sparse; ``allocated(path)`` is the bytes a file takes on disk;
``staging_dir(target)`` makes a private directory to extract into next to ``target``;
``socket_file(path)`` leaves a UNIX socket there (a special file a save leaves out);
``one_file_tree(root, text)`` is the smallest tree, one file; ``settle_ctimes()`` waits until
what was written so far is before a save's bound.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import socket
import stat
import time
import unicodedata
import zlib
from pathlib import Path

from remote_cache.cache.evidence import clock_ns

__all__ = [
    "allocated",
    "assert_same_tree",
    "holes_work",
    "make_tree",
    "one_file_tree",
    "settle_ctimes",
    "small_tree",
    "snapshot",
    "socket_file",
    "staging_dir",
]

_MTIME = 1_600_000_000


def make_tree(root: Path, *, small_files: int = 2000, big_bytes: int = 20 << 20) -> None:
    """Populate ``root`` (created if missing) with the nasty tree; deterministic content."""
    rng = random.Random(1234)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(small_files):
        d = root / "many" / f"pkg{i % 40:02d}" / ("lib" if i % 3 else "dist")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.js").write_bytes(rng.randbytes(rng.randrange(0, 3000)))
    (root / "big.bin").write_bytes(rng.randbytes(big_bytes))

    # Symlinks: relative, absolute, dangling, to a directory, chained.
    links = root / "links"
    links.mkdir()
    (links / "target.txt").write_text("target\n")
    os.symlink("target.txt", links / "rel")
    os.symlink("/etc/hostname", links / "abs")
    os.symlink("does/not/exist", links / "dangling")
    os.symlink("../many", links / "todir")
    os.symlink("rel", links / "chain")

    # Hard links: groups of 2 and 3 names across directories.
    hl = root / "hard"
    (hl / "x").mkdir(parents=True)
    (hl / "y").mkdir()
    (hl / "x" / "two").write_bytes(b"two names\n")
    os.link(hl / "x" / "two", hl / "y" / "two-again")
    (hl / "y" / "three").write_bytes(rng.randbytes(5000))
    os.link(hl / "y" / "three", hl / "x" / "three-b")
    os.link(hl / "y" / "three", hl / "three-c")

    # Empty directories, nested.
    (root / "empty" / "nested" / "deeper").mkdir(parents=True)
    (root / "empty2").mkdir()

    # Modes: executable, read-only file, read-only directory (set last), odd modes.
    modes = root / "modes"
    modes.mkdir()
    (modes / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (modes / "run.sh").chmod(0o755)
    (modes / "ro.txt").write_text("read only\n")
    (modes / "ro.txt").chmod(0o444)
    (modes / "private").write_text("secret-ish\n")
    (modes / "private").chmod(0o600)
    rodir = modes / "rodir"
    rodir.mkdir()
    (rodir / "inside.txt").write_text("in a read-only dir\n")

    # Unicode: NFC and NFD spellings are different names on Linux.
    uni = root / "unicode"
    uni.mkdir()
    for name in ("café", unicodedata.normalize("NFD", "café"), "emoji-🎉📦", "日本語ファイル", "Ωmega"):
        (uni / name).write_text(name + "\n")
    (uni / "dir-ü").mkdir()
    (uni / "dir-ü" / "ñ.txt").write_text("ñ\n")
    os.symlink("dir-ü/ñ.txt", uni / "link-ü")

    # Long names: >100 and >255 bytes total, components up to 255 bytes.
    longd = root / "long"
    longd.mkdir()
    (longd / ("a" * 150)).write_text("150\n")
    (longd / ("b" * 255)).write_text("255\n")
    sub = longd / ("c" * 200) / ("d" * 200)
    sub.mkdir(parents=True)
    (sub / ("e" * 255)).write_text("deep long\n")
    (sub / ("é" * 120)).write_text("240 bytes of é\n")
    os.symlink("x" * 300, longd / "longlink")
    os.link(sub / ("e" * 255), longd / "hard-to-long")

    # Deep nesting: 60 levels.
    deep = root / "deep"
    for i in range(60):
        deep = deep / f"l{i}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("bottom\n")

    # Awkward names.
    odd = root / "odd"
    odd.mkdir()
    for name in (
        "with space",
        "new\nline",
        "-leading-dash",
        "--",
        "star*",
        "q?",
        "[br]",
        "tab\tx",
        ".hidden",
    ):
        (odd / name).write_text(repr(name) + "\n")
    (odd / "0").write_bytes(b"")

    # Fixed mtimes everywhere (files first, directories last so writes don't bump them).
    dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            p = Path(dirpath) / n
            os.utime(p, (_MTIME, _MTIME + zlib.crc32(os.fsencode(n)) % 1000), follow_symlinks=False)
        dirs.append(Path(dirpath))
    rodir.chmod(0o555)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        os.utime(d, (_MTIME, _MTIME + 7))


def small_tree(root: Path) -> Path:
    """``root`` filled with a small nasty tree (60 small files, a 1 MiB file), for the CLI tests."""
    make_tree(root, small_files=60, big_bytes=1 << 20)
    return root


def one_file_tree(root: Path, text: str | None = None) -> Path:
    """``root``, made, with one file ``f`` holding ``text`` (by default the directory's name)."""
    root.mkdir()
    (root / "f").write_text(root.name if text is None else text)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything assert_same_tree compares, keyed by relative path ("." is the root, excluded)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            m = st.st_mode
            mtime = int(st.st_mtime)
            if stat.S_ISLNK(m):
                out[rel] = ("symlink", os.readlink(p), mtime)
            elif stat.S_ISDIR(m):
                out[rel] = ("dir", stat.S_IMODE(m), mtime, bool(os.listdir(p)))
            elif stat.S_ISREG(m):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(m), mtime, st.st_size, digest)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            else:
                out[rel] = ("other", stat.S_IFMT(m))
    for group in inodes.values():
        for rel in group:
            out[rel] = (*out[rel], tuple(sorted(group)))
    return out


def _without_dir_and_link_times(snap: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {k: (v[:2] + v[3:] if v[0] == "dir" else v[:2]) if v[0] != "file" else v for k, v in snap.items()}


def assert_same_tree(a: Path, b: Path, *, dir_and_link_times: bool = True) -> None:
    """Assert two trees are the same: types, modes, mtimes (s), sizes, contents, links, dirs.

    ``dir_and_link_times=False``: only files' mtimes count (the engine's import sets the others).
    """
    sa, sb = snapshot(a), snapshot(b)
    if not dir_and_link_times:
        sa, sb = _without_dir_and_link_times(sa), _without_dir_and_link_times(sb)
    only_a = sorted(set(sa) - set(sb))
    only_b = sorted(set(sb) - set(sa))
    assert not only_a and not only_b, f"only in {a}: {only_a[:10]}; only in {b}: {only_b[:10]}"
    diffs = [(k, sa[k], sb[k]) for k in sorted(sa) if sa[k] != sb[k]]
    assert not diffs, f"{len(diffs)} entries differ, e.g. {diffs[:5]}"


def allocated(path: Path) -> int:
    """The bytes ``path`` takes on disk (``st_blocks`` counts 512-byte units on Linux)."""
    return path.stat().st_blocks * 512


def holes_work(directory: Path) -> bool:
    """Whether a file in ``directory`` can have holes: one written 1 MiB past its start takes less."""
    probe = directory / ".hole-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, b"x", (1 << 20) - 1)
        os.fsync(fd)  # some filesystems settle st_blocks only once the data is written out
        return allocated(probe) < 1 << 20
    finally:
        os.close(fd)
        probe.unlink()


def staging_dir(target: Path) -> Path:
    """Create a fresh, private (0700) staging directory next to ``target`` (same filesystem)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.staging-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    return path


def socket_file(path: Path) -> Path:
    """Leave a UNIX socket at ``path`` (the file stays once the socket is closed)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def settle_ctimes() -> int:
    """Wait (a clock tick or so) until the clock a save takes its bound from
    (:func:`~remote_cache.cache.evidence.clock_ns`) is past now, and return it: files written so
    far have ctimes before it, files changed later ctimes at or after it."""
    after, deadline = time.time_ns(), time.monotonic() + 1.0
    while (now := clock_ns()) <= after and time.monotonic() < deadline:
        time.sleep(0.002)
    return now
