"""What every backend answers the same way, given an open core store: which entry a key
resolves to, and the housekeeping functions (``entries``, ``remove``, ``prune``)."""

from __future__ import annotations

import json
from datetime import timedelta

from remote_cache.cache import entries as core_entries
from remote_cache.errors import RemoteCacheError
from remote_cache.oci.store import Store
from remote_cache.units import parse_duration

__all__ = ["duration", "listed", "pruned", "removed", "resolved"]


def duration(name: str, text: str) -> timedelta | None:
    """A duration argument (``7d``, ``12h``; empty: none), with the argument's name in errors."""
    try:
        return parse_duration(text) if text else None
    except ValueError as exc:
        raise RemoteCacheError(f"remote-cache: {name}: {exc}") from exc


async def resolved(store: Store, key: str, restore_keys: list[str]) -> str:
    """The key of the entry to restore: ``key``, a restore key's newest match, or "" (a miss)."""
    try:
        match = await core_entries.find_entry(store, key, restore_keys)
    except RemoteCacheError as exc:
        raise RemoteCacheError(f"remote-cache: cannot look up {key!r} in {store.location}: {exc}") from exc
    return "" if match is None else match.key


async def listed(store: Store, prefix: str, json_: bool) -> str:
    """The entries newest first, as the CLI's table (or JSON lines)."""
    try:
        found = await core_entries.list_entries(store, prefix=prefix)
    except RemoteCacheError as exc:
        raise RemoteCacheError(f"remote-cache: cannot list {store.location}: {exc}") from exc
    if json_:
        return "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in found)
    if not found:
        return f"no entries in {store.location}" + (f" starting with {prefix!r}" if prefix else "")
    return core_entries.format_table(found)


async def removed(store: Store, key: str, grace: timedelta | None, *, with_copies: bool = False) -> str:
    """Delete the entry under ``key`` (and its copies, ``with_copies``), then free what no entry
    uses (where the store must)."""
    # The core checks the key first; a miss passes as it is.
    gone = await core_entries.remove(store, key, collect=False, with_copies=with_copies)
    copies = gone.copies_text()
    try:
        freed = await core_entries.sweep(store, grace)
    except RemoteCacheError as exc:
        raise RemoteCacheError(
            f"remote-cache: removed {key!r}{copies}, then cannot free its blobs: {exc}"
        ) from exc
    line = f"removed {gone.entry.key} (tag {gone.entry.tag}, {gone.entry.digest}){copies}"
    return line if freed is None else f"{line}; {freed.summary()}"


async def pruned(
    store: Store,
    *,
    older_than: timedelta | None,
    keep: int,
    prefix: str,
    dry_run: bool,
    grace: timedelta | None,
) -> str:
    """Delete the entries outside the ``keep`` newest AND older than ``older_than``; a table of them."""
    try:
        gone = await core_entries.prune(
            store, older_than=older_than, keep=keep or None, prefix=prefix, dry_run=dry_run, collect=False
        )
    except ValueError as exc:  # the core refuses a prune with no rule, or a negative keep
        raise RemoteCacheError(f"remote-cache: {exc}") from exc
    freed = None if dry_run else await core_entries.sweep(store, grace)
    verb = "would remove" if dry_run else "removed"
    head = f"{verb} {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} from {store.location}"
    if freed is not None:
        head += f"; {freed.summary()}"
    return head if not gone else f"{head}:\n{core_entries.format_table(gone)}"
