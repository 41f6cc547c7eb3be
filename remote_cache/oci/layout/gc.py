"""Garbage collection of an OCI image layout: delete blobs no tagged entry references.

A blob touched within the grace period is kept whatever it is: it may belong to a save that has
uploaded its blobs but not moved its tag yet (a save refreshes the mtime of every blob it reuses,
see ``LayoutStore.has_blob``). The sweep runs under the index lock, so no tag moves meanwhile.
"""

from __future__ import annotations

import time

from ...errors import StoreError
from ..descriptor import referenced_by
from ..media import MAX_DOCUMENT_BYTES
from .directory import LayoutDirectory, read_regular

__all__ = ["collect_garbage", "reachable"]


def reachable(layout: LayoutDirectory) -> set[str]:
    """Every digest reachable from ``index.json``; a blob that is gone or too large to be a
    document is a leaf. StoreError when one that is there cannot be read: not knowing what it
    refers to, a sweep must delete nothing."""
    seen: set[str] = set()
    stack = [str(m.get("digest")) for m in layout.entries()]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            path = layout.blob_path(digest)
        except StoreError:
            continue  # not a sha256 digest: no blob of blobs/sha256 has that name
        try:
            if path.stat().st_size > MAX_DOCUMENT_BYTES:
                continue  # a layer, most likely: not read
            data = read_regular(path, MAX_DOCUMENT_BYTES)
        except FileNotFoundError:
            continue  # gone: its entry is broken, nothing more to keep
        except (OSError, StoreError) as exc:
            raise _unreadable(layout, digest, exc) from exc
        if data is not None:
            stack.extend(referenced_by(data))
    return seen


def _unreadable(layout: LayoutDirectory, digest: str, exc: Exception) -> StoreError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StoreError(
        f"blob {digest} in oci:{layout.root}, which an entry uses, cannot be read ({why}); the sweep "
        "deletes nothing while it cannot tell what that blob refers to (make it readable; if it is "
        "damaged, move it out of blobs/sha256, then `remote-cache rm` the entries that used it)"
    )


def collect_garbage(layout: LayoutDirectory, grace: float) -> tuple[int, int]:
    """Delete unreferenced blobs untouched for ``grace`` seconds; (blobs removed, bytes freed)."""
    blobs = layout.root / "blobs" / "sha256"
    if not blobs.is_dir():
        return 0, 0
    removed = freed = 0
    now = time.time()
    with layout.locked():
        keep = {d.removeprefix("sha256:") for d in reachable(layout)}
        for path in blobs.iterdir():
            if path.name in keep:
                continue
            try:
                st = path.lstat()  # a link is not followed (nor is it ever marked: see has_blob)
                if now - st.st_mtime < grace:
                    continue  # possibly part of a save that has not tagged yet
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += st.st_size
    return removed, freed
