"""This machine's evidence about directories (:mod:`.evidence`), kept in one small file per directory.

State lives in ``$REMOTE_CACHE_STATE_DIR``, else ``$XDG_STATE_HOME/remote-cache``, else
``~/.local/state/remote-cache`` (not under ``~/.cache``, which users save whole: each save would
write into the tree it saved): one JSON file per target directory, named after the SHA-256 of its
resolved absolute path, written atomically, at most :data:`MAX_RECORDS` local records and one
restore window of at most :data:`MAX_RECORDS` layers. An unreadable, corrupt, foreign or
older-format state file, or one that is no regular file, another user owns or others can write,
means "no evidence" (the layer is packed), never an error; a state that cannot be written
(read-only home, full disk) only means the next save packs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from msgspec.structs import asdict, replace

from ..errors import os_reason
from ..home import home
from ..oci.digest import is_digest
from ..oci.media import LAYER_TYPES
from .evidence import Evidence, LayerRecord, RestoredTree, RestoreWindow, TreeRecord
from .image import checked_bounds

__all__ = [
    "MAX_RECORDS",
    "MAX_STATE_BYTES",
    "STATE_DIR_ENV",
    "load",
    "record_restore",
    "record_save",
    "state_dir",
    "state_path",
]

log = logging.getLogger("remote_cache")
_R = TypeVar("_R", TreeRecord, RestoredTree)

STATE_DIR_ENV = "REMOTE_CACHE_STATE_DIR"
#: Records kept per target directory (newest first); each is about 300 bytes of JSON.
MAX_RECORDS = 2048
#: A state file larger than this is ignored (and rewritten by the next restore or save).
MAX_STATE_BYTES = 2 << 20
#: /3: a restore window records each layer's directories (``parents``), and a whole-second ctime
#: settles against the bound floored to its second: a /2 file's records may have been made under
#: the old rule, so older files are ignored whole. /4: a restore window's bounds are the target
#: filesystem's ctimes; a /3 window's came from the machine's clock and could hold a later edit.
_FORMAT = "remote-cache-state/4"


def state_dir() -> Path:
    """Where state files live: ``$REMOTE_CACHE_STATE_DIR``, else under ``$XDG_STATE_HOME`` or
    ``~/.local/state``."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "remote-cache"
    user = home()
    if user is None:  # (the state is then not written, with one warning)
        raise OSError(errno.ENOENT, "no home directory")
    return user / ".local" / "state" / "remote-cache"


def state_path(target: Path) -> Path:
    """The state file of directory ``target``: ``<state dir>/<sha256 of its resolved path>.json``."""
    resolved = os.fsencode(os.path.abspath(os.path.realpath(target)))
    return state_dir() / f"{hashlib.sha256(resolved).hexdigest()}.json"


def _resolved(target: Path) -> str:
    return os.fsdecode(os.path.abspath(os.path.realpath(target)))


# -- reading --------------------------------------------------------------------------------


def _layer_record(item: Any, key: str) -> tuple[str, LayerRecord] | None:
    """(item[key], record) of one JSON layer record; None when anything about it is off."""
    if not isinstance(item, dict):
        return None
    ref, media_type = item.get(key), item.get("mediaType")
    digest, size, diff_id = item.get("digest"), item.get("size"), item.get("diffID")
    if not (
        isinstance(ref, str)
        and is_digest(ref)
        and media_type in LAYER_TYPES
        and isinstance(digest, str)
        and is_digest(digest)
        and isinstance(diff_id, str)
        and is_digest(diff_id)
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
    parents: dict[tuple[str, str], str] = {}
    for item in layers:
        parsed = _layer_record(item, "listing")
        dirs = item.get("parents") if isinstance(item, dict) else None
        if parsed is None or not (isinstance(dirs, str) and is_digest(dirs)):
            return None
        key = (parsed[0], parsed[1].media_type)
        if key not in out:
            out[key], parents[key] = parsed[1], dirs
    tree = None
    if raw.get("tree") is not None and (tree := _parse_restored(raw["tree"])) is None:
        return None
    bounds = raw.get("bounds", [])  # (a cut hint, no evidence: ignored when not as written)
    bounds = checked_bounds(bounds) if isinstance(bounds, list) else ()
    return RestoreWindow(start, end, (root[0], root[1]), out, parents, tree, bounds)


def _parse_record(raw: Any, cls: type[_R], digests: tuple[str, ...]) -> _R | None:
    """A record of class ``cls`` from JSON: exactly its fields, each a string where the class
    says ``str`` (``digests`` digests) and a non-negative int elsewhere; None when anything is off."""
    names = cls.__struct_fields__
    if not isinstance(raw, dict) or set(raw) != set(names):
        return None
    text = {n for n in names if cls.__annotations__[n] == "str"}  # annotations as written: postponed
    if not all(isinstance(raw[k], str) if k in text else _int(raw[k]) for k in raw):
        return None
    if not all(is_digest(raw[k]) for k in digests):
        return None
    return cls(**raw)


def _parse_tree(raw: Any) -> TreeRecord | None:
    return _parse_record(raw, TreeRecord, ("fingerprint", "digest"))


def _parse_restored(raw: Any) -> RestoredTree | None:
    return _parse_record(raw, RestoredTree, ("digest", "names", "facts"))


def _parse(raw: Any, target: Path) -> Evidence:
    """The evidence in a state document; none at all when anything about it is off."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        return Evidence()
    if raw.get("path") != _resolved(target):
        return Evidence()  # another directory's state (a copied file, a hash collision)
    layers = raw.get("layers")
    if not isinstance(layers, list):
        return Evidence()
    records: dict[tuple[str, str], LayerRecord] = {}
    for item in layers:
        parsed = _layer_record(item, "local")
        if parsed is None:
            return Evidence()  # one bad record: trust none of the file
        records.setdefault((parsed[0], parsed[1].media_type), parsed[1])
    window = None
    if raw.get("window") is not None:
        window = _parse_window(raw["window"])
        if window is None:
            return Evidence()
    tree = _parse_tree(raw["tree"]) if raw.get("tree") is not None else None
    return Evidence(records, window, tree)


def load(target: Path) -> Evidence:
    """What this machine recorded about directory ``target`` (empty when nothing usable)."""
    try:
        # Without blocking (a FIFO there would wait for a writer), following a link or taking
        # a terminal: a save writes only regular files, 0600. In a shared state directory
        # another user could plant evidence for layers whose files changed since: only this
        # user's own files that no one else can write count (a file others can write, they
        # may also hard-link: Linux's protected_hardlinks allows it).
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(state_path(target), flags)
        with open(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return Evidence()
            body = fh.read(MAX_STATE_BYTES + 1)
        if len(body) > MAX_STATE_BYTES:
            return Evidence()
        return _parse(json.loads(body), target)
    except (OSError, RuntimeError, ValueError, RecursionError):
        return Evidence()


# -- writing --------------------------------------------------------------------------------


def _document(target: Path, evidence: Evidence) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": _FORMAT,
        "path": _resolved(target),
        "updated": int(time.time()),
        "layers": [
            _layer_json("local", local, rec)
            for (local, _), rec in list(evidence.records.items())[:MAX_RECORDS]
        ],
    }
    if evidence.tree is not None:
        doc["tree"] = asdict(evidence.tree)
    window = evidence.window
    if window is not None:
        doc["window"] = {
            "start": window.start_ns,
            "end": window.end_ns,
            "root": list(window.root),
            # A malformed annotation is dropped here rather than spoil the whole file.
            "layers": [
                {**item, "parents": window.parents[key]}
                for key, item in (
                    (key, _layer_json("listing", key[0], rec)) for key, rec in window.layers.items()
                )
                if _layer_record(item, "listing") is not None and key in window.parents
            ][:MAX_RECORDS],
        }
        if window.tree is not None:
            doc["window"]["tree"] = asdict(window.tree)
        if window.bounds:
            doc["window"]["bounds"] = list(window.bounds)
    return doc


def _write(target: Path, evidence: Evidence) -> bool:
    """Replace ``target``'s state file atomically; False, with one warning, when it cannot be written."""
    where = "the state directory"
    try:
        path = state_path(target)
        where = str(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(_document(target, evidence), fh, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, RuntimeError, ValueError) as exc:
        # Silent, this left users wondering why every save read every file (a state directory
        # made by root under sudo, a read-only home); pip warns about its cache the same way.
        log.warning(
            "cannot record what this run learned about %s in %s (%s): the next save of it reads "
            "every file; set %s to a directory you can write",
            target,
            where,
            os_reason(exc),
            STATE_DIR_ENV,
        )
        return False
    return True


def record_save(
    target: Path,
    before: Evidence,
    records: Iterable[tuple[str, LayerRecord]],
    tree: TreeRecord | None = None,
) -> bool:
    """After a save: ``records`` (local listing -> layer) first, then those of ``before``, and ``tree``.

    ``before`` is what :func:`load` gave at the start of the save (its restore window is kept);
    ``tree`` replaces the tree record (None removes it). False when the state cannot be written.
    """
    merged: dict[tuple[str, str], LayerRecord] = {}
    for local, rec in records:
        merged.setdefault((local, rec.media_type), rec)
    for k, rec in before.records.items():
        if len(merged) >= MAX_RECORDS:
            break
        merged.setdefault(k, rec)
    return _write(target, replace(before, records=merged, tree=tree))


def record_restore(target: Path, window: RestoreWindow) -> bool:
    """After a restore: ``window`` replaces any recorded one, local records stay, the tree record goes
    (the restore replaced the tree). False when the state cannot be written."""
    return _write(target, replace(load(target), window=window, tree=None))
