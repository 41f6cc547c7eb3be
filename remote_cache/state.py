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
  extracted them. ``start`` comes from :func:`clock_ns` before extraction, ``end`` from
  :func:`settle` once every file was written, before the staging directory is swapped into
  place. A planned layer whose portable listing equals a recorded layer's and whose regular
  files all have ``start <= ctime < end`` is that layer, because: the staging directory is
  0700 and private during the window, so only the extraction wrote files there; a file
  modified after the swap gets a ctime at or after ``end``; a file moved or linked in later
  gets a new ctime too (Linux stamps ctime on rename and link). The restored directory's
  device and inode are recorded as well, so a different directory moved onto the target
  path is not mistaken for it. On filesystems with whole-second ctimes the bounds are
  rounded down to their second (a file written in ``end``'s second is not trusted).

Whole-tree shortcut (save -> save with nothing changed): after a save, the state also keeps a
*tree fingerprint* (every entry's name, inode, ctime, mode, size and mtime, taken by the scan) with
the entry it produced. A later save whose fingerprint is equal, for the same store, tag and
options, and whose tag still names that digest, is unchanged without scanning or planning: no
change to a file can keep its ctime, and adding, removing or renaming an entry changes its
directory's ctime. An entry changed less than :data:`FRESH_NS` before the walk began voids the
fingerprint (it may still be changing, and coarse timestamps could hide the next change).
Writes through a shared memory mapping may not move a ctime; neither this nor the per-layer
evidence sees them (``--full`` does).

State lives in ``$REMOTE_CACHE_STATE_DIR``, else ``$XDG_CACHE_HOME/remote-cache``, else
``~/.cache/remote-cache``: one JSON file per target directory, named after the SHA-256 of its
resolved absolute path, written atomically, at most :data:`MAX_RECORDS` local records and one
restore window of at most :data:`MAX_RECORDS` layers. An unreadable, corrupt, foreign or
older-format state file means "no evidence" (the layer is packed), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .layers import KIND_FILE, LayerPlan, TreeIdentity, TreeScan
from .oci import LAYER_TYPES, Descriptor

__all__ = [
    "FRESH_NS",
    "MAX_RECORDS",
    "MAX_STATE_BYTES",
    "STATE_DIR_ENV",
    "LayerRecord",
    "LocalLayer",
    "RestoreWindow",
    "TreeRecord",
    "clock_ns",
    "dir_id",
    "load_state",
    "load_tree",
    "load_window",
    "local_layers",
    "portable_listing",
    "records_for",
    "settle",
    "state_dir",
    "state_path",
    "tree_fingerprint",
    "window_hits",
    "write_state",
    "write_window",
]

STATE_DIR_ENV = "REMOTE_CACHE_STATE_DIR"
#: Records kept per target directory (newest first); each is about 300 bytes of JSON.
MAX_RECORDS = 2048
#: A state file larger than this is ignored (and rewritten by the next restore or save).
MAX_STATE_BYTES = 2 << 20
_FORMAT = "remote-cache-state/2"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
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


def settle(after_ns: int) -> int:
    """Wait (a tick or so) until :func:`clock_ns` is past ``after_ns``; return that bound.

    Files written up to ``after_ns`` then have ctimes strictly before the bound, and any later
    write gets a ctime at or after it, so the two can never be confused.
    """
    deadline = time.monotonic() + 1.0
    while True:
        now = clock_ns()
        if now > after_ns or time.monotonic() > deadline:
            return now
        time.sleep(0.002)


def state_dir() -> Path:
    """Where state files live: ``$REMOTE_CACHE_STATE_DIR``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "remote-cache"
    return Path.home() / ".cache" / "remote-cache"


def state_path(target: Path) -> Path:
    """The state file of directory ``target``: ``<state dir>/<sha256 of its resolved path>.json``."""
    resolved = os.fsencode(os.path.abspath(os.path.realpath(target)))
    return state_dir() / f"{hashlib.sha256(resolved).hexdigest()}.json"


@dataclass(frozen=True)
class LayerRecord:
    """A stored layer as a state file remembers it: enough to put it in a manifest unread."""

    media_type: str
    digest: str
    size: int
    diff_id: str

    def descriptor(self, annotations: dict[str, str] | None = None) -> Descriptor:
        """The layer descriptor, with ``annotations`` (the portable listing) when given."""
        return Descriptor(self.media_type, self.digest, self.size, annotations=annotations or {})


@dataclass(frozen=True)
class LocalLayer:
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
    h = hashlib.sha256(b"remote-cache listing v1\0")
    for e in plan.entries:
        h.update(os.fsencode(e.path) + b"\0")
        h.update(f"{e.kind} {e.mode:o} {e.uid} {e.gid} {e.size} {e.mtime}".encode() + b"\0")
        h.update(os.fsencode(e.linkname) + b"\0")
    return "sha256:" + h.hexdigest()


def local_layers(scan: TreeScan, bound_ns: int, *, mtime_bound: int | None = None) -> list[LocalLayer]:
    """Compute each layer's :class:`LocalLayer` from the inode and ctime the scan saw.

    ``bound_ns`` must come from :func:`clock_ns` (or :func:`settle`) taken *before* the scan.
    ``mtime_bound`` (whole seconds) additionally requires every entry's mtime before it. On a
    filesystem with whole-second ctimes the bound is rounded down to its second. No re-stat is
    needed: a file changed after the scan has a newer ctime, so a later scan cannot match.
    """
    files = [[e for e in plan.entries if e.kind == KIND_FILE] for plan in scan.layers]
    if all(e.ctime_ns % _SECOND == 0 for layer in files for e in layer):
        bound_ns -= bound_ns % _SECOND
    out: list[LocalLayer] = []
    for plan, layer_files in zip(scan.layers, files, strict=True):
        listing = portable_listing(plan)
        h = hashlib.sha256(b"remote-cache local listing v1\0" + listing.encode() + b"\0")
        for e in layer_files:
            h.update(f"{e.ino} {e.ctime_ns}\0".encode())
        settled = all(e.ctime_ns < bound_ns for e in layer_files) and (
            mtime_bound is None or all(e.mtime < mtime_bound for e in plan.entries)
        )
        out.append(LocalLayer(listing, "sha256:" + h.hexdigest(), settled))
    return out


@dataclass(frozen=True)
class TreeRecord:
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tree_fingerprint(identity: TreeIdentity, bound_ns: int) -> str | None:
    """The identity's digest, unless an entry changed shortly before ``bound_ns`` (from
    :func:`clock_ns`, taken before the walk) or after it: such an entry may still be changing,
    and a later change could keep its ctime on a filesystem with coarse timestamps (FAT rounds
    to 2 s, exFAT to 10 ms). So ctimes must be :data:`FRESH_NS` older than the bound."""
    if max(identity.ctimes) >= bound_ns - FRESH_NS:
        return None
    return identity.digest


@dataclass(frozen=True)
class RestoreWindow:
    """What a restore recorded for its target: the image layers it extracted, and when."""

    #: :func:`clock_ns` before extraction began: every extracted file's ctime is at or after it.
    start_ns: int
    #: :func:`settle` after the last file was written, before the swap: every extracted file's
    #: ctime is before it, every later change's at or after it.
    end_ns: int
    #: (st_dev, st_ino) of the restored directory (the staging directory swapped into place).
    root: tuple[int, int]
    #: (portable listing, media type) -> the image layer with that listing annotation.
    layers: dict[tuple[str, str], LayerRecord]


def dir_id(path: Path) -> tuple[int, int]:
    """(st_dev, st_ino) of directory ``path``, symlinks followed; raises OSError."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def window_hits(
    scan: TreeScan, layers: Sequence[LocalLayer], window: RestoreWindow | None, media_type: str
) -> dict[int, LayerRecord]:
    """Planned layers (by position) that ``window`` vouches for; see the module docstring.

    A layer qualifies when its portable listing equals a recorded layer's (same media type) and
    every regular file's ctime lies in the window. The caller checks that the scanned directory
    is the one restored (:attr:`RestoreWindow.root`) and that the store still has the blob.
    """
    if window is None or not window.layers:
        return {}
    start, end = window.start_ns, window.end_ns
    if all(e.ctime_ns % _SECOND == 0 for plan in scan.layers for e in plan.entries if e.kind == KIND_FILE):
        # Whole-second ctimes are floored: a file written in start's second still has ctime >=
        # floor(start); one written in end's second may be a later change, so it is not trusted.
        start -= start % _SECOND
        end -= end % _SECOND
    out: dict[int, LayerRecord] = {}
    for i, (plan, layer) in enumerate(zip(scan.layers, layers, strict=True)):
        rec = window.layers.get((layer.listing, media_type))
        if rec is None:
            continue
        if all(start <= e.ctime_ns < end for e in plan.entries if e.kind == KIND_FILE):
            out[i] = rec
    return out


def _layer_record(item: Any, key: str) -> tuple[str, LayerRecord] | None:
    """(item[key], record) of one JSON layer record; None when anything about it is off."""
    if not isinstance(item, dict):
        return None
    ref, media_type = item.get(key), item.get("mediaType")
    digest, size, diff_id = item.get("digest"), item.get("size"), item.get("diffID")
    if not (
        isinstance(ref, str)
        and _DIGEST.fullmatch(ref)
        and media_type in LAYER_TYPES
        and isinstance(digest, str)
        and _DIGEST.fullmatch(digest)
        and isinstance(diff_id, str)
        and _DIGEST.fullmatch(diff_id)
        and type(size) is int
        and size >= 0
    ):
        return None
    return ref, LayerRecord(str(media_type), digest, size, diff_id)


def _layer_json(key: str, ref: str, rec: LayerRecord) -> dict[str, Any]:
    return {
        key: ref,
        "mediaType": rec.media_type,
        "digest": rec.digest,
        "size": rec.size,
        "diffID": rec.diff_id,
    }


def _int(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def _parse_window(raw: Any) -> RestoreWindow | None:
    if not isinstance(raw, dict):
        return None
    start, end, root, layers = raw.get("start"), raw.get("end"), raw.get("root"), raw.get("layers")
    if not (
        _int(start)
        and _int(end)
        and isinstance(root, list)
        and len(root) == 2
        and all(_int(v) for v in root)
        and isinstance(layers, list)
        and len(layers) <= MAX_RECORDS
        and start < end
    ):
        return None
    out: dict[tuple[str, str], LayerRecord] = {}
    for item in layers:
        parsed = _layer_record(item, "listing")
        if parsed is None:
            return None
        out.setdefault((parsed[0], parsed[1].media_type), parsed[1])
    return RestoreWindow(start, end, (root[0], root[1]), out)


def _parse_tree(raw: Any) -> TreeRecord | None:
    if not isinstance(raw, dict):
        return None
    fields = TreeRecord.__dataclass_fields__
    text = ("fingerprint", "location", "tag", "options", "digest")
    if set(raw) != set(fields) or not all(isinstance(raw[k], str) for k in text):
        return None
    if not all(_int(raw[k]) for k in fields if k not in text):
        return None
    if not (_DIGEST.fullmatch(raw["fingerprint"]) and _DIGEST.fullmatch(raw["digest"])):
        return None
    return TreeRecord(**raw)


_State = tuple[dict[tuple[str, str], LayerRecord], RestoreWindow | None, TreeRecord | None]


def _parse(raw: Any, target: Path) -> _State:
    """Records, restore window and tree record of a state document; empty when anything is off."""
    nothing: _State = ({}, None, None)
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        return nothing
    if raw.get("path") != _resolved(target):
        return nothing  # another directory's state (a copied file, a hash collision)
    layers = raw.get("layers")
    if not isinstance(layers, list):
        return nothing
    out: dict[tuple[str, str], LayerRecord] = {}
    for item in layers:
        parsed = _layer_record(item, "local")
        if parsed is None:
            return nothing  # one bad record: trust none of the file
        out.setdefault((parsed[0], parsed[1].media_type), parsed[1])
    window = None
    if raw.get("window") is not None:
        window = _parse_window(raw["window"])
        if window is None:
            return nothing
    tree = _parse_tree(raw["tree"]) if raw.get("tree") is not None else None
    return out, window, tree


def _resolved(target: Path) -> str:
    return os.fsdecode(os.path.abspath(os.path.realpath(target)))


def _load(target: Path) -> _State:
    try:
        path = state_path(target)
        with open(path, "rb") as fh:
            body = fh.read(MAX_STATE_BYTES + 1)
        if len(body) > MAX_STATE_BYTES:
            return {}, None, None
        return _parse(json.loads(body), target)
    except (OSError, RuntimeError, ValueError, RecursionError):
        return {}, None, None


def load_state(target: Path) -> dict[tuple[str, str], LayerRecord]:
    """The records for ``target``, keyed by (local listing digest, media type); empty if none."""
    return _load(target)[0]


def load_window(target: Path) -> RestoreWindow | None:
    """The restore window recorded for ``target``, if any (and the state file is sound)."""
    return _load(target)[1]


def load_tree(target: Path) -> TreeRecord | None:
    """The tree record of ``target``'s last save, if any (and the state file is sound)."""
    return _load(target)[2]


def write_state(
    target: Path, records: Iterable[tuple[str, LayerRecord]], tree: TreeRecord | None = None
) -> bool:
    """Record local listing -> layer for ``target``, newest first, merged with what was there.

    ``tree`` replaces the tree record (None removes it). The restore window already recorded
    is kept. Written atomically (temporary file, then rename). Returns False, without raising,
    when the state cannot be written (read-only home, full disk): the next save then just packs.
    """
    return _write(target, list(records), None, tree)


def write_window(target: Path, window: RestoreWindow) -> bool:
    """Record ``window`` as ``target``'s restore window (replacing any), keeping local records.

    The tree record goes: the restore replaced the tree. Returns False, without raising, when
    the state cannot be written.
    """
    return _write(target, [], window, None)


def _write(
    target: Path, new: list[tuple[str, LayerRecord]], window: RestoreWindow | None, tree: TreeRecord | None
) -> bool:
    try:
        old, old_window, _old_tree = _load(target)
        if window is None:
            window = old_window
        merged: dict[tuple[str, str], LayerRecord] = {}
        for local, rec in new:
            merged.setdefault((local, rec.media_type), rec)
        for k, rec in old.items():
            if len(merged) >= MAX_RECORDS:
                break
            merged.setdefault(k, rec)
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "path": _resolved(target),
            "updated": int(time.time()),
            "layers": [
                _layer_json("local", local, rec) for (local, _), rec in list(merged.items())[:MAX_RECORDS]
            ],
        }
        if tree is not None:
            doc["tree"] = tree.to_json()
        if window is not None:
            doc["window"] = {
                "start": window.start_ns,
                "end": window.end_ns,
                "root": list(window.root),
                # A malformed annotation is dropped here rather than spoil the whole file.
                "layers": [
                    item
                    for item in (
                        _layer_json("listing", listing, rec) for (listing, _), rec in window.layers.items()
                    )
                    if _layer_record(item, "listing") is not None
                ][:MAX_RECORDS],
            }
        path = state_path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, RuntimeError, ValueError):
        return False
    return True


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
