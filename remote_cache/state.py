"""Machine-local evidence that a planned layer still holds what a stored layer holds.

A layer's *portable* listing (paths, sizes, mtimes, modes, owners, link targets) can be faked by
tools: npm writes every file with a fixed 1985 mtime, so an edit that keeps the size looks
unchanged. A file's ctime cannot be set back by any tool, and changes with every write,
chmod or utime. So a save reuses a layer without reading its files only when its *local*
listing (the portable one plus the ctime and inode of every regular file) equals one recorded
on this machine right after a restore or save that stored exactly those bytes.

State lives in ``$REMOTE_CACHE_STATE_DIR``, else ``$XDG_CACHE_HOME/remote-cache``, else
``~/.cache/remote-cache``: one JSON file per target directory, named after the SHA-256 of its
resolved absolute path, written atomically, at most :data:`MAX_RECORDS` records. An unreadable,
corrupt or foreign state file means "no evidence" (the layer is packed), never an error.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layers import KIND_FILE, LayerPlan, TreeScan
from .oci import LAYER_TYPES, Descriptor

__all__ = [
    "MAX_RECORDS",
    "MAX_STATE_BYTES",
    "STATE_DIR_ENV",
    "LayerRecord",
    "LocalLayer",
    "clock_ns",
    "load_state",
    "local_layers",
    "portable_listing",
    "records_for",
    "settle",
    "state_dir",
    "state_path",
    "write_state",
]

STATE_DIR_ENV = "REMOTE_CACHE_STATE_DIR"
#: Records kept per target directory (newest first); each is about 300 bytes of JSON.
MAX_RECORDS = 2048
#: A state file larger than this is ignored (and rewritten by the next restore or save).
MAX_STATE_BYTES = 2 << 20
_FORMAT = "remote-cache-state/1"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_SECOND = 1_000_000_000
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
    out: list[LocalLayer] = []
    stats: list[list[tuple[int, int] | None]] = []
    whole_seconds = True
    for plan in scan.layers:
        row: list[tuple[int, int] | None] = []
        for e in plan.entries:
            if e.kind != KIND_FILE:
                row.append(None)
                continue
            row.append((e.ino, e.ctime_ns))
            if e.ctime_ns % _SECOND:
                whole_seconds = False
        stats.append(row)
    if whole_seconds:
        bound_ns -= bound_ns % _SECOND
    for plan, row in zip(scan.layers, stats, strict=True):
        listing = portable_listing(plan)
        h = hashlib.sha256(b"remote-cache local listing v1\0" + listing.encode() + b"\0")
        stable = True
        settled = True
        for e, seen in zip(plan.entries, row, strict=True):
            if mtime_bound is not None and e.mtime >= mtime_bound:
                settled = False
            if seen is None:
                continue
            ino, ctime_ns = seen
            if ino < 0:
                stable = False
                break
            if ctime_ns >= bound_ns:
                settled = False
            h.update(f"{ino} {ctime_ns}\0".encode())
        local = "sha256:" + h.hexdigest() if stable else None
        out.append(LocalLayer(listing, local, settled and stable))
    return out


def _parse(raw: Any) -> dict[tuple[str, str], LayerRecord]:
    """Records of a state document; empty when anything about it is off."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        return {}
    layers = raw.get("layers")
    if not isinstance(layers, list):
        return {}
    out: dict[tuple[str, str], LayerRecord] = {}
    for item in layers:
        if not isinstance(item, dict):
            return {}
        local, media_type = item.get("local"), item.get("mediaType")
        digest, size, diff_id = item.get("digest"), item.get("size"), item.get("diffID")
        if not (
            isinstance(local, str)
            and _DIGEST.fullmatch(local)
            and media_type in LAYER_TYPES
            and isinstance(digest, str)
            and _DIGEST.fullmatch(digest)
            and isinstance(diff_id, str)
            and _DIGEST.fullmatch(diff_id)
            and type(size) is int
            and size >= 0
        ):
            return {}  # one bad record: trust none of the file
        out.setdefault((local, str(media_type)), LayerRecord(str(media_type), digest, size, diff_id))
    return out


def load_state(target: Path) -> dict[tuple[str, str], LayerRecord]:
    """The records for ``target``, keyed by (local listing digest, media type); empty if none."""
    try:
        path = state_path(target)
        with open(path, "rb") as fh:
            body = fh.read(MAX_STATE_BYTES + 1)
        if len(body) > MAX_STATE_BYTES:
            return {}
        return _parse(json.loads(body))
    except (OSError, RuntimeError, ValueError, RecursionError):
        return {}


def write_state(target: Path, records: Iterable[tuple[str, LayerRecord]]) -> bool:
    """Record local listing -> layer for ``target``, newest first, merged with what was there.

    Written atomically (temporary file, then rename). Returns False, without raising, when the
    state cannot be written (read-only home, full disk): the next save then just packs.
    """
    new = list(records)
    try:
        merged: dict[tuple[str, str], LayerRecord] = {}
        for local, rec in new:
            merged.setdefault((local, rec.media_type), rec)
        for k, rec in load_state(target).items():
            if len(merged) >= MAX_RECORDS:
                break
            merged.setdefault(k, rec)
        doc = {
            "format": _FORMAT,
            "path": os.fsdecode(os.path.abspath(os.path.realpath(target))),
            "updated": int(time.time()),
            "layers": [
                {
                    "local": local,
                    "mediaType": rec.media_type,
                    "digest": rec.digest,
                    "size": rec.size,
                    "diffID": rec.diff_id,
                }
                for (local, _), rec in list(merged.items())[:MAX_RECORDS]
            ],
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
