"""Machine-local evidence that a planned layer still holds what a stored layer holds.

A layer's *portable* listing (paths, sizes, mtimes, modes, owners, link targets) can be faked by
tools: npm writes every file with a fixed 1985 mtime, so an edit that keeps the size looks
unchanged. A file's ctime cannot be set back by any tool, and changes with every write,
chmod, utime, rename or link. So a save reuses a layer without reading its files only on
evidence recorded on this machine, of one of two kinds:

* a *local listing* (the portable one plus the ctime and inode of every regular file) equal
  to one recorded right after a save that stored exactly those bytes (save -> save);
* a *restore window* (restore -> save): the restore recorded, for its target, the image
  layers carrying a portable listing and the interval ``[start, end)`` during which it
  extracted them, both read from the target filesystem's own clock (:func:`fs_clock_ns`, the
  ctime it gives a probe file in the restore's work directory): ``start`` before extraction,
  ``end`` from :func:`fs_settle` once every file was written, before the staging directory is
  swapped into place. A planned layer whose portable listing equals a recorded layer's, whose
  regular files all have ``start <= ctime < end`` and whose files' directories are the inodes the
  restore wrote them into is that layer, because: the staging directory is 0700 and private
  during the window, so only the extraction wrote files there; a file modified after the swap
  gets a ctime at or after ``end``; a file moved or linked in later gets a new ctime too
  (Linux stamps ctime on rename and link); but a directory moved (two swapped by renames)
  takes its files along with their ctimes, so each layer also records the (path, inode) of
  the directories its files are in (:func:`parents_digest`). The restored directory's device
  and inode are recorded as well, so a different directory moved onto the target path is not
  mistaken for it. A whole-second ctime (a filesystem that keeps no finer ones, maybe mounted
  inside the tree) is compared with the bounds rounded down to their second (a file written
  in ``end``'s second is not trusted).

Whole-tree shortcut (save -> save with nothing changed): after a save, the state also keeps a
*tree fingerprint* (every entry's name, inode, ctime, mode, size and mtime, taken by the scan) with
the entry it produced. A later save whose fingerprint is equal, for the same store, tag and
options, and whose tag still names that digest, is unchanged without scanning or planning: no
change to a file can keep its ctime, and adding, removing or renaming an entry changes its
directory's ctime. An entry changed less than :data:`FRESH_NS` before the walk began voids the
fingerprint (it may still be changing, and coarse timestamps could hide the next change).
Writes through a shared memory mapping may not move a ctime; neither this nor the per-layer
evidence sees them (``--full`` does).

Whole-tree shortcut after a restore (restore -> save with nothing changed): a restore that wrote a
whole entry of ours into a directory it then swapped into place records, with its window, what it
restored (:class:`RestoredTree`) and the names it put in the directory. A later save of that
directory, for the same store, tag, key, compression and platforms, whose walk finds every entry
but the directory itself with a ctime in the window, those same names, the same directory (device
and inode) and the tag still naming the restored digest, is unchanged without planning: only the
extraction wrote in the window, and any later change, addition, removal or rename below the
directory moves some entry's ctime out of it. The directory's own ctime moved at the swap, so its
entries are compared by name; and nothing may be mounted below it (a mount shows other inodes
and moves no ctime: :func:`~remote_cache.archive.mounts.mounts_below`). Only a restore that gave
every entry the mode bits and owner the entry holds records it (a user other than root restoring
root's files does not), and the walk's counts of entries and regular files, their bytes, and the
sums of the modes and mtimes must agree with what the restore gave (a filesystem may keep another
mtime, the kernel clear a set-ID bit).

The restore window's bounds are ctimes the target filesystem gave, never this machine's clock: a
filesystem that stamps ctimes from another clock (a network filesystem's server) gets a window in
its own time, so a change made after the restore lies outside it however far the clocks differ --
where one clock stamps every ctime (not so where each client stamps its own, as some distributed
filesystems let them). A filesystem clock stepped back after a restore stays a limit: a change
could then get a ctime inside the window; the counts, bytes, modes and mtimes (and, per layer, the
listings) catch most such changes, not a same-size edit with its mtime put back. ``--full`` reads
every file. A save's own bound (:func:`clock_ns`, for the local listings and the tree fingerprint)
is this machine's clock: the save writes nothing on the tree's filesystem to read it from. With a
filesystem clock behind it, a file changed twice within one of that filesystem's timestamp ticks
around a save's walk could keep its ctime (where reading a ctime makes the next one finer, as on
Linux 6.13 and later for local filesystems, it cannot).

The evidence of a directory is kept on disk by :mod:`.state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from msgspec import Struct, field

from ..archive.tar import DIR, FILE
from ..oci.descriptor import Descriptor
from ..version import TOOL

if TYPE_CHECKING:  # a restore records evidence without importing the save's walk and planner
    from ..archive.plan import LayerPlan, TreeScan
    from ..archive.tar import Member
    from ..archive.walk import TreeIdentity

__all__ = [
    "FRESH_NS",
    "Evidence",
    "LayerRecord",
    "LocalLayer",
    "RestoreWindow",
    "RestoredTree",
    "TreeRecord",
    "clock_ns",
    "dir_id",
    "entry_shape",
    "facts_digest",
    "fs_clock_ns",
    "fs_settle",
    "local_layers",
    "names_digest",
    "parents_digest",
    "portable_listing",
    "records_for",
    "tree_fingerprint",
    "untouched_since",
    "window_here",
    "window_hits",
]

_SECOND = 1_000_000_000
#: A tree with an entry changed less than this before a save gets no tree fingerprint.
FRESH_NS = 3 * _SECOND
# Kernels stamp ctimes from a clock that may lag the fine clock by a tick (up to 10 ms at
# HZ=100): without the coarse clock itself, subtract a generous margin.
_MARGIN_NS = 50_000_000
_CLOCK_REALTIME_COARSE = 5  # Linux; Python has no constant for it


def clock_ns() -> int:
    """A time no later than any ctime a file changed from now on will get (ns since the epoch)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            return min(time.clock_gettime_ns(_CLOCK_REALTIME_COARSE), time.time_ns())
    return time.time_ns() - _MARGIN_NS


def fs_clock_ns(probe: Path) -> int:
    """The clock ``probe``'s filesystem stamps ctimes with: the ctime it gives ``probe`` (made if
    missing, in a directory of ours) as it is touched now. A file changed from then on gets a
    ctime at or after it, whatever this machine's clock says."""
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.utime(fd)
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)


def fs_settle(probe: Path) -> int:
    """A bound between the ctimes ``probe``'s filesystem gave so far and those it gives later:
    the probe's ctime, touched again until it moves on (a clock tick; at once where reading a
    ctime makes the next one finer). Files written before have ctimes at or below the first
    reading, so when it does not move (a whole-second ctime, or no tick within a second) the first
    reading is the bound: a file stamped with it is not trusted, a later change is not either."""
    first = fs_clock_ns(probe)
    if first % _SECOND == 0:
        return first
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        now = fs_clock_ns(probe)
        if now > first:
            return now
        time.sleep(0.001)
    return first


class LayerRecord(Struct, frozen=True):
    """A stored layer as a state file remembers it: enough to put it in a manifest unread."""

    media_type: str
    digest: str
    size: int
    diff_id: str

    def descriptor(self, annotations: dict[str, str] | None = None) -> Descriptor:
        """The layer descriptor, with ``annotations`` (the portable listing) when given."""
        return Descriptor(self.media_type, self.digest, self.size, annotations=annotations or {})


class LocalLayer(Struct, frozen=True):
    """A planned layer's listings: portable (for the annotation) and local (the state key)."""

    #: SHA-256 of the portable listing (what the ``dev.remote-cache.listing`` annotation holds).
    listing: str
    #: SHA-256 of the portable listing plus each regular file's inode and ctime; None when a
    #: file changed between the scan and its re-stat (the layer is then neither reused nor recorded).
    local: str | None
    #: Every file's ctime (and every entry's mtime, when asked) lies before the bound: the
    #: layer may be recorded, because any later write would change its local listing.
    settled: bool


def portable_listing(plan: LayerPlan) -> str:
    """SHA-256 over a planned layer's listing: per entry the fields its tar header holds."""
    # One encode of the whole listing: the same bytes as encoding each field on its own.
    text = "".join(
        f"{e.path}\0{e.kind} {e.mode:o} {e.uid} {e.gid} {e.size} {e.mtime}\0{e.linkname}\0"
        for e in plan.members
    )
    return "sha256:" + hashlib.sha256(b"remote-cache listing v1\0" + os.fsencode(text)).hexdigest()


def local_layers(scan: TreeScan, bound_ns: int, *, mtime_bound: int | None = None) -> list[LocalLayer]:
    """Compute each layer's :class:`LocalLayer` from the inode and ctime the scan saw.

    ``bound_ns`` must come from :func:`clock_ns` taken *before* the scan.
    ``mtime_bound`` (whole seconds) additionally requires every entry's mtime before it. A
    whole-second ctime is compared with the bound rounded down to its second: a filesystem that
    keeps no finer ones (maybe one mounted inside the tree) gives a file changed again within
    that second the same ctime. No re-stat is needed: a file changed after the scan has a newer
    ctime, so a later scan cannot match.
    """
    coarse_bound = bound_ns - bound_ns % _SECOND
    out: list[LocalLayer] = []
    for plan in scan.layers:
        layer_files = [e for e in plan.members if e.kind == FILE]
        listing = portable_listing(plan)
        h = hashlib.sha256(b"remote-cache local listing v1\0" + listing.encode() + b"\0")
        h.update("".join(f"{e.ino} {e.ctime_ns}\0" for e in layer_files).encode())
        settled = all(
            e.ctime_ns < (coarse_bound if e.ctime_ns % _SECOND == 0 else bound_ns) for e in layer_files
        ) and (mtime_bound is None or all(e.mtime < mtime_bound for e in plan.members))
        out.append(LocalLayer(listing, "sha256:" + h.hexdigest(), settled))
    return out


class TreeRecord(Struct, frozen=True):
    """What the last save of a directory produced, under the tree fingerprint it started from."""

    fingerprint: str
    #: Store location, tag and the options the image depends on (compression, level, platforms).
    location: str
    tag: str
    options: str
    digest: str
    size: int
    files: int
    layers: int
    bytes: int


def tree_fingerprint(identity: TreeIdentity, bound_ns: int) -> str | None:
    """The identity's digest, unless an entry changed shortly before ``bound_ns`` (from
    :func:`clock_ns`, taken before the walk) or after it: such an entry may still be changing,
    and a later change could keep its ctime on a filesystem with coarse timestamps (FAT rounds
    to 2 s, exFAT to 10 ms). So ctimes must be :data:`FRESH_NS` older than the bound."""
    if max(identity.ctimes) >= bound_ns - FRESH_NS:
        return None
    return identity.digest


class RestoredTree(Struct, frozen=True):
    """The entry a restore wrote whole into its directory (see the module docstring)."""

    location: str
    tag: str
    key: str
    #: :func:`entry_shape`: the tool, layer media type and platforms the entry was saved with.
    shape: str
    digest: str
    #: :func:`names_digest` of the names the restore put in the directory.
    names: str
    #: :func:`facts_digest` of the modes and mtimes the restore gave the entries below it.
    facts: str
    #: Entries below the directory (files, directories, symlinks), regular files and their bytes.
    entries: int
    size: int
    files: int
    layers: int
    bytes: int


def entry_shape(media_type: str, platforms: Sequence[str]) -> str:
    """What an entry's image depends on besides the tree, as a save compares it with a restored
    one: this tool, the layers' media type and the index's platforms, in order. (Not the level:
    a save reuses the restored layers whatever level it was asked for.)"""
    return f"{TOOL} {media_type} platforms={','.join(platforms)}"


def names_digest(names: Iterable[str]) -> str:
    """SHA-256 over a directory's entry names, sorted by their bytes."""
    text = b"".join(name + b"\0" for name in sorted(os.fsencode(n) for n in names))
    return "sha256:" + hashlib.sha256(b"remote-cache names v1\0" + text).hexdigest()


def facts_digest(modes: int, mtimes_ns: int) -> str:
    """SHA-256 over the sums of the modes (type and permission bits) and of the mtimes of a tree's
    entries: what a restore gave them, or what a walk finds (whatever order either sees them in)."""
    return "sha256:" + hashlib.sha256(f"remote-cache facts v1\0{modes} {mtimes_ns}".encode()).hexdigest()


class RestoreWindow(Struct, frozen=True):
    """What a restore recorded for its target: the image layers it extracted, and when."""

    #: :func:`fs_clock_ns` before extraction began: every extracted file's ctime is at or after it.
    start_ns: int
    #: :func:`fs_settle` after the last file was written, before the swap: every extracted file
    #: trusted has a ctime before it, every later change one at or after it.
    end_ns: int
    #: (st_dev, st_ino) of the restored directory: the staging directory swapped into place, or
    #: the directory there when the entries moved into it (in place).
    root: tuple[int, int]
    #: (portable listing, media type) -> the image layer with that listing annotation.
    layers: dict[tuple[str, str], LayerRecord]
    #: (portable listing, media type) -> :func:`parents_digest` of the directories the restore
    #: wrote that layer's regular files into.
    parents: dict[tuple[str, str], str]
    #: The whole entry, when the restore wrote one of ours into a directory it swapped in whole.
    tree: RestoredTree | None = None
    #: The generation bounds the entry's layers were cut at (remote_cache.archive.plan, rule 7):
    #: a save under a key with no entry cuts there, so that the restored layers are its own.
    bounds: tuple[int, ...] = ()


def parents_digest(dirs: dict[bytes, int]) -> str:
    """SHA-256 over (path from the root, inode) of the directories a layer's regular files are
    in (the root itself left out: its identity is checked on its own). Directories swapped after
    a restore keep their files' ctimes, not their inodes at those paths."""
    text = b"".join(path + b"\0" + str(ino).encode() + b"\0" for path, ino in sorted(dirs.items()))
    return "sha256:" + hashlib.sha256(b"remote-cache parents v1\0" + text).hexdigest()


def dir_id(path: Path) -> tuple[int, int]:
    """(st_dev, st_ino) of directory ``path``, symlinks followed; raises OSError."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def window_here(path: Path, window: RestoreWindow | None) -> RestoreWindow | None:
    """``window`` when it is the record of the directory now at ``path`` (not of another one
    that was there, nor when ``path`` cannot be read), else None."""
    if window is None:
        return None
    try:
        return window if dir_id(path) == window.root else None
    except OSError:
        return None


def window_hits(
    scan: TreeScan, layers: Sequence[LocalLayer], window: RestoreWindow | None, media_type: str
) -> dict[int, LayerRecord]:
    """Planned layers (by position) that ``window`` vouches for; see the module docstring.

    A layer qualifies when its portable listing equals a recorded layer's (same media type),
    every regular file's ctime lies in the window and its files' directories are the ones the
    restore wrote them into (:attr:`RestoreWindow.parents`). The caller checks that the scanned directory
    is the one restored (:attr:`RestoreWindow.root`) and that the store still has the blob.
    """
    if window is None or not window.layers:
        return {}
    dirs: dict[str, int] | None = None  # the scan's directories' inodes, once a layer needs them
    out: dict[int, LayerRecord] = {}
    for i, (plan, layer) in enumerate(zip(scan.layers, layers, strict=True)):
        key = (layer.listing, media_type)
        rec = window.layers.get(key)
        if rec is None:
            continue
        files = [e for e in plan.members if e.kind == FILE]
        if not _in_window(window, (e.ctime_ns for e in files)):
            continue
        if dirs is None:
            dirs = {m.path: m.ino for plan in scan.layers for m in plan.members if m.kind == DIR}
        if window.parents.get(key) == _parents_of(files, dirs):
            out[i] = rec
    return out


def _in_window(window: RestoreWindow, ctimes: Iterable[int]) -> bool:
    """Whether every ctime lies in ``[start, end)``. Whole-second ctimes against floored bounds:
    a file written in start's second still has ctime >= floor(start); one written in end's
    second may be a later change: not trusted."""
    start, end = window.start_ns, window.end_ns
    cstart, cend = start - start % _SECOND, end - end % _SECOND
    return all((start <= c < end) if c % _SECOND else (cstart <= c < cend) for c in ctimes)


def untouched_since(window: RestoreWindow, identity: TreeIdentity, root: tuple[int, int]) -> bool:
    """Whether the walked tree (``identity``; ``root`` its directory's device and inode) is the
    one the window's restore wrote whole and nothing changed since (see the module docstring)."""
    tree = window.tree
    if tree is None or root != window.root or len(identity.ctimes) - 1 != tree.entries:
        return False  # (the identity's first ctime is the root's own)
    # Counts, bytes, modes and mtimes, though ctimes alone decide where the filesystem's clock
    # only moves on: what the filesystem or kernel did not keep (an mtime out of its range, a
    # set-group-ID bit cleared), and most changes a filesystem clock stepped back after the
    # restore hides (module docstring).
    facts = identity.facts
    modes = facts[0::4]
    sizes = [size for mode, size in zip(modes, facts[1::4], strict=True) if stat.S_ISREG(mode)]
    mtimes = sum(facts[2::4]) * _SECOND + sum(facts[3::4])
    return (
        (len(sizes), sum(sizes)) == (tree.files, tree.size)
        and facts_digest(sum(modes), mtimes) == tree.facts
        and names_digest(identity.top) == tree.names
        and _in_window(window, itertools.islice(identity.ctimes, 1, None))
    )


def _parents_of(files: list[Member], dirs: dict[str, int]) -> str | None:
    """:func:`parents_digest` of the directories ``files`` are in, with the inodes the scan saw."""
    found: dict[bytes, int] = {}
    for path in {e.path.rpartition("/")[0] for e in files}:
        if path:
            ino = dirs.get(path)
            if ino is None:
                return None
            found[os.fsencode(path)] = ino
    return parents_digest(found)


class Evidence(Struct, frozen=True):
    """Everything this machine recorded about one directory (empty when it recorded nothing)."""

    #: (local listing digest, media type) -> the stored layer it was saved as.
    records: dict[tuple[str, str], LayerRecord] = field(default_factory=dict)
    window: RestoreWindow | None = None
    tree: TreeRecord | None = None

    def has_tree_for(self, tag: str) -> bool:
        """Whether a whole tree is recorded for ``tag`` (a save's or a restore's): what the
        unchanged shortcut needs first (:func:`~.reuse.unchanged_tree` checks the rest)."""
        restored = self.window.tree if self.window is not None else None
        return any(record is not None and record.tag == tag for record in (self.tree, restored))


def records_for(
    layers: Sequence[LocalLayer], stored: Sequence[tuple[Descriptor, str] | None]
) -> list[tuple[str, LayerRecord]]:
    """(local listing, record) for each settled layer with a stored counterpart."""
    out: list[tuple[str, LayerRecord]] = []
    for layer, slot in zip(layers, stored, strict=True):
        if slot is None or layer.local is None or not layer.settled:
            continue
        desc, diff_id = slot
        out.append((layer.local, LayerRecord(desc.media_type, desc.digest, desc.size, diff_id)))
    return out
