"""Garbage collection of an OCI image layout: delete blobs no tagged entry references.

A blob touched within the grace period is kept whatever it is: it may belong to a save that has
uploaded its blobs but not moved its tag yet (a save refreshes the mtime of every blob it reuses,
see ``LayoutStore.has_blob``). The sweep runs under the index lock, so no tag moves meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from ...errors import RM_A_BROKEN_ENTRY, StoreError
from ..descriptor import JSONTooDeep, media_type_of, parse_json, references
from ..media import LEAF_TYPES, MAX_DOCUMENT_BYTES
from .directory import LayoutDirectory, read_regular, tag_of, unreadable_reason

_SHA512 = re.compile(r"sha512:([a-f0-9]{128})")

__all__ = ["collect_garbage", "reachable"]

log = logging.getLogger("remote_cache")


def reachable(layout: LayoutDirectory) -> set[str]:
    """Every digest reachable from ``index.json``. A blob that is gone or too large to be a
    document is a leaf; one that is not JSON refers to nothing. StoreError when a document that
    is there cannot be read, or is JSON nested too deeply to parse: not knowing what it refers
    to, a sweep must delete nothing. A layer or config (by its descriptor's media type) that
    cannot be read is a leaf: it refers to nothing (one that can be read is followed all the
    same, should a foreign tool's descriptor have called a document that)."""
    seen: set[str] = set()
    done: set[str] = set()  # read, or known to be gone
    # (descriptor, the index.json entry it belongs to: named in an error)
    stack: list[tuple[dict[str, Any], dict[str, Any]]] = [(m, m) for m in layout.entries()]
    while stack:
        desc, entry = stack.pop()
        digest = str(desc.get("digest"))
        seen.add(digest)
        if digest in done or (path := _document_path(layout, digest)) is None:
            continue
        try:
            children = _references_in(path)
        except (OSError, StoreError, JSONTooDeep) as exc:
            if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):  # not a link to nothing
                done.add(digest)
            elif media_type_of(desc) not in LEAF_TYPES:
                raise _unreadable(layout, digest, entry, exc) from exc
            continue
        done.add(digest)
        stack.extend((child, entry) for child in children)
    return seen


def _references_in(path: Path) -> list[dict[str, Any]]:
    """The descriptors the blob at ``path`` refers to: none when it is too large to be a document
    (a layer, most likely: not read) or is not JSON. OSError or StoreError when it cannot be
    read, JSONTooDeep when it nests too deeply to parse (it may refer to anything)."""
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        return []
    data = read_regular(path, MAX_DOCUMENT_BYTES)
    try:
        return references(parse_json(data)) if data is not None else []
    except JSONTooDeep:
        raise
    except ValueError:  # not JSON: refers to nothing
        return []


def _document_path(layout: LayoutDirectory, digest: str) -> Path | None:
    """Where a blob of ``digest`` would be; None for a malformed digest (no file has that name).
    Foreign tools may store documents under sha512 (``blobs/sha512``): those are read too."""
    match = _SHA512.fullmatch(digest)
    if match is not None:
        return layout.root / "blobs" / "sha512" / match.group(1)
    try:
        return layout.blob_path(digest)
    except StoreError:
        return None


def _unreadable(layout: LayoutDirectory, digest: str, entry: dict[str, Any], exc: Exception) -> StoreError:
    tag = tag_of(entry)
    whose, fix = (
        (
            f"the entry tagged {tag}",
            f"remove that entry ({RM_A_BROKEN_ENTRY})",
        )
        if tag
        else (f"an untagged entry of index.json ({entry.get('digest')})", "remove that entry from index.json")
    )
    return StoreError(
        f"blob {digest} in oci:{layout.root}, which {whose} uses, cannot be read ({unreadable_reason(exc)}); "
        "the sweep deletes nothing while it cannot tell what that blob refers to (make it readable; if "
        f"it is damaged, {fix})"
    )


def collect_garbage(layout: LayoutDirectory, grace: float) -> tuple[int, int]:
    """Delete unreferenced blobs untouched for ``grace`` seconds; (blobs removed, bytes freed).

    What is neither a file nor a link (a directory, a FIFO) is no blob a save wrote: it is
    left where it is, named in one warning."""
    blobs = layout.root / "blobs" / "sha256"
    if not blobs.is_dir():
        return 0, 0
    removed = freed = 0
    strays: list[str] = []
    now = time.time()
    with layout.locked():
        keep = {d.removeprefix("sha256:") for d in reachable(layout)}
        for path in blobs.iterdir():
            if path.name in keep:
                continue
            try:
                st = path.lstat()  # a link is not followed (nor is it ever marked: see has_blob)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    strays.append(path.name)
                    continue
                if now - st.st_mtime < grace:
                    continue  # possibly part of a save that has not tagged yet
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += st.st_size
    if strays:
        log.warning(
            "the sweep left %s in %s: not blobs (no save writes a directory or a FIFO there), so not "
            "its to delete; remove them if nothing else uses them",
            ", ".join(sorted(strays)),
            blobs,
        )
    return removed, freed
