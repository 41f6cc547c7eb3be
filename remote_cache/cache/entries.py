"""List, inspect, remove and prune cache entries in any :class:`~remote_cache.oci.store.Store`.

An entry is a tag. Its key, creation time, size and file count come from our annotations; images
written by other tools (no annotations) are still listed, with the tag as key and what is known.
Removing works where the store supports deletes (a layout always; a registry only with deletes
enabled) and raises :class:`~remote_cache.errors.UnsupportedOperation` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from msgspec import Struct

from ..errors import (
    BlobUnreadable,
    BrokenEntry,
    CacheMiss,
    ImageFormatError,
    IntegrityError,
    RemoteCacheError,
    StoreError,
    UnsupportedOperation,
)
from ..keys import is_valid_tag, printable, tag_for_key, tag_prefix_for, validate_key, validate_restore_keys
from ..oci.descriptor import Descriptor, referenced_by
from ..oci.store import Store
from ..records import hiding, ignoring
from ..tasks import for_each
from ..units import counted, format_bytes, format_time
from .image import (
    ANNOTATION_KEY,
    ANNOTATION_TOOL,
    CacheImage,
    document_annotations,
    load_image,
    read_document,
)

__all__ = [
    "Entry",
    "Freed",
    "Match",
    "Removed",
    "find_entry",
    "format_table",
    "inspect",
    "list_entries",
    "prune",
    "remove",
    "sweep",
]

log = logging.getLogger("remote_cache")


class Entry(Struct, frozen=True):
    """One cache entry. Fields a foreign image lacks are None; ``error`` says why it is unreadable
    (``unread``: because the store would not let it be read, see :func:`_unread`)."""

    key: str
    tag: str
    digest: str
    created: datetime | None = None
    size: int | None = None
    files: int | None = None
    compressed_size: int | None = None
    tool: str | None = None
    layers: tuple[Descriptor, ...] = ()
    error: str | None = None
    unread: BlobUnreadable | None = None

    __eq__, __hash__ = ignoring("layers", "unread")
    __repr__, __rich_repr__ = hiding("unread")

    def to_json(self, *, with_layers: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (``created`` as RFC 3339)."""
        out: dict[str, Any] = {
            "key": self.key,
            "tag": self.tag,
            "digest": self.digest,
            "created": format_time(self.created) if self.created else None,
            "size": self.size,
            "files": self.files,
            "compressed_size": self.compressed_size,
            "tool": self.tool,
        }
        if self.error:
            out["error"] = self.error
        if with_layers:
            out["layers"] = [layer.to_json() for layer in self.layers]
        return out


def _key_of(tag: str, recorded: str | None) -> str:
    """The key of the entry under ``tag``: the tag itself when it is a key's own tag (a key that
    is its own tag takes whatever is there, see :func:`_find_key`: an entry copied to
    ``release-1`` is release-1's), else the key the entry records (else the tag)."""
    return tag if tag_for_key(tag) == tag else (recorded or tag)


def _entry(tag: str, image: CacheImage) -> Entry:
    return Entry(
        key=_key_of(tag, image.key),
        tag=tag,
        digest=image.digest,
        created=image.created,
        size=image.size,
        files=image.files,
        compressed_size=image.compressed_size,
        tool=image.annotations.get(ANNOTATION_TOOL),
        layers=image.layers,
    )


#: Per tag, the digests its top document is or lists (see :func:`_users`), or the error that
#: reading it raised.
_Refs = dict[str, "set[str] | RemoteCacheError"]


def _refs_of(top: tuple[Descriptor, bytes]) -> set[str]:
    return {top[0].digest, *referenced_by(top[1])}


async def _read_entry(store: Store, tag: str, refs: _Refs) -> Entry | None:
    """The entry under ``tag`` (None when gone meanwhile), noting in ``refs`` what it refers to."""
    try:
        top = await read_document(store, tag)  # by tag: one round trip, where resolving it was two
        refs[tag] = _refs_of(top)
    except BrokenEntry as exc:  # a layout's tag whose document is gone
        return Entry(key=tag, tag=tag, digest="", error=exc.listed)
    except CacheMiss:
        return None  # deleted while we listed
    except (ImageFormatError, IntegrityError) as exc:  # there, but not a document we can read
        refs[tag] = exc
        return Entry(key=tag, tag=tag, digest="", error=str(exc))
    except BlobUnreadable as exc:
        refs[tag] = exc
        return _unread(tag, tag, "", exc)
    return await _loaded(store, _key_of(tag, _recorded_key(top)), tag, top)


async def _loaded(store: Store, key: str, tag: str, top: tuple[Descriptor, bytes]) -> Entry:
    """The entry under ``tag`` whose top document is ``top``; one whose other documents are gone
    (a sweep raced its save), unreadable as an image or unread (see :func:`_unread`) is still an
    entry, with its error. A store that fails to answer raises: an entry it hid is not broken,
    and ``prune`` must not rank it as undated (the oldest) and delete it."""
    try:
        return _entry(tag, await load_image(store, tag, top))
    except BrokenEntry as exc:
        return Entry(key=key, tag=tag, digest=top[0].digest, error=exc.listed)
    except (ImageFormatError, IntegrityError) as exc:
        return Entry(key=key, tag=tag, digest=top[0].digest, error=str(exc))
    except BlobUnreadable as exc:
        return _unread(key, tag, top[0].digest, exc)


def _unread(key: str, tag: str, digest: str, exc: BlobUnreadable) -> Entry:
    """The entry under ``tag`` when the store holds one of its documents but would not let it be
    read (a layout's blob this user may not read, a directory in its place): listed as broken,
    removed by ``rm``, but not known to be broken, so ``prune`` stops at it (:func:`_refuse_unread`)."""
    return Entry(key=key, tag=tag, digest=digest, error=exc.listed, unread=exc)


async def list_entries(store: Store, *, prefix: str = "", jobs: int = 8) -> list[Entry]:
    """Every entry whose key starts with ``prefix`` (an entry of unknown key goes by its tag),
    newest first; unknown dates last."""
    return (await _listing(store, prefix, jobs))[0]


async def _listing(store: Store, prefix: str, jobs: int = 8) -> tuple[list[Entry], _Refs]:
    """:func:`list_entries`, and what every tag's top document refers to (prune's copies)."""
    tags = await store.tags()
    found: list[Entry] = []
    refs: _Refs = {}

    async def one(tag: str) -> None:
        entry = await _read_entry(store, tag, refs)
        if entry is not None:
            found.append(entry)

    await for_each(tags, one, jobs=jobs)
    # The key's prefix only: a key a tag cannot hold is stored under a cleaned-up tag
    # (``npm linux`` as ``npm-linux--<hash>``) that must not match another key's prefix.
    selected = [e for e in found if e.key.startswith(prefix)]
    return _newest_first(selected), refs


#: Where an entry with no creation time ranks: the oldest.
_OLDEST = datetime.min.replace(tzinfo=UTC)


def _newest_first(entries: list[Entry]) -> list[Entry]:
    """Newest first, ties as :func:`find_entry` breaks them (the greater key), so that ``prune
    --keep`` keeps the entry a restore key would pick."""
    return sorted(entries, key=lambda e: (e.created or _OLDEST, e.key, e.tag), reverse=True)


class Match(Struct, frozen=True):
    """The entry a lookup chose: by the exact key, or by a restore-key prefix (a fallback)."""

    #: The entry's real key (its ``dev.remote-cache.key`` annotation, else the tag).
    key: str
    tag: str
    #: The manifest/index digest the tag pointed at when matched (restore this, not the tag).
    digest: str
    #: True: the exact key; False: a restore-key (prefix) fallback.
    exact: bool
    #: The entry's image when the lookup read it (``find_entry(read_image=True)``).
    image: CacheImage | None = None

    __eq__, __hash__ = ignoring("image")
    __repr__, __rich_repr__ = hiding("image")


async def _peek(store: Store, tag: str) -> tuple[str, datetime | None, CacheImage] | None:
    """(real key, created, image) of the entry under ``tag``; None when gone or unreadable."""
    try:
        image = await load_image(store, tag)  # by tag: one round trip, where resolving first was two
    except (CacheMiss, ImageFormatError, IntegrityError):
        return None  # deleted meanwhile, or not an image we can read: not a candidate
    # Auth and network errors propagate: a failure must not look like a miss.
    return _key_of(tag, image.key), image.created, image


async def find_entry(
    store: Store, key: str, restore_keys: Sequence[str] = (), *, jobs: int = 8, read_image: bool = False
) -> Match | None:
    """The entry to restore for ``key``, as in actions/cache; None on a miss.

    The exact key wins. Otherwise each restore key in order is a prefix: among entries whose
    real key starts with it, the newest by ``org.opencontainers.image.created`` wins (ties: the
    greater key; undated entries rank oldest). Tags are listed once; only tags that can hold a
    matching key are read, ``jobs`` at a time. ``read_image``: the match carries its image, for
    a caller about to restore it (the exact key's is read by its tag: a registry answers one GET
    where a HEAD and then a GET by digest were two round trips; a fallback's was read to rank it).
    """
    validate_key(key)
    prefixes = validate_restore_keys(restore_keys)
    exact = await _exact(store, key, read_image)
    if exact is not None:
        return exact
    if not prefixes:
        return None
    tags = await store.tags()
    seen: dict[str, tuple[str, datetime | None, CacheImage] | None] = {}

    async def read(candidate: str) -> None:
        seen[candidate] = await _peek(store, candidate)

    for prefix in prefixes:
        start = tag_prefix_for(prefix)
        wanted = [t for t in tags if t.startswith(start) and t not in seen]
        await for_each(wanted, read, jobs=jobs)
        best: tuple[datetime, str, str, CacheImage] | None = None
        for candidate in tags:
            info = seen.get(candidate)
            if info is None or not candidate.startswith(start) or not info[0].startswith(prefix):
                continue
            rank = (info[1] or _OLDEST, info[0], candidate, info[2])
            if best is None or rank[:2] > best[:2]:
                best = rank
        if best is not None:
            _created, real_key, chosen, image = best
            kept = image if read_image else None
            return Match(key=real_key, tag=chosen, digest=image.digest, exact=False, image=kept)
    return None


async def _find_key(store: Store, key: str) -> tuple[str, tuple[Descriptor, bytes]] | None:
    """The tag holding ``key``'s entry and its top document (read by GET: as many round trips as
    resolving it); None when there is none.

    A key that is its own tag takes whatever is there (an entry copied there on purpose). Under a
    tag made by hashing, an entry recording another key is not this key's (a hash collision, or
    a key shaped like that tag saved by a version that used it as its own tag: see
    :mod:`remote_cache.keys`), and such a key's own entries from those versions are found under
    the key itself, when they record it. A tag there whose document is gone or cannot be read
    raises :class:`_Unreadable`.
    """
    tag = tag_for_key(key)
    top = await _top(store, tag, key)
    if top is not None and (tag == key or _recorded_key(top) in (None, key)):
        return tag, top
    if tag != key and is_valid_tag(key):  # where earlier versions saved such a key
        # Whose an entry there is that cannot be read is unknown: as ``ls`` lists it, the key's
        # (an error for restore and inspect, what rm removes), not a miss to fall back from.
        older = await _top(store, key, key)
        if older is not None:
            try:  # (unlike under the key's own tag, an entry that cannot be read is no miss here)
                recorded = document_annotations(*older).get(ANNOTATION_KEY)
            except RemoteCacheError as exc:
                raise _Unreadable(key, exc) from exc
            if recorded == key:
                return key, older
    return None


class _Unreadable(Exception):
    """A top document :func:`_find_key` found under ``tag`` but could not read, or whose document
    is gone (``error``: what restore and inspect raise); ``rm`` deletes that tag."""

    def __init__(self, tag: str, error: RemoteCacheError) -> None:
        super().__init__(tag, error)
        self.tag, self.error = tag, error


async def _top(store: Store, tag: str, key: str) -> tuple[Descriptor, bytes] | None:
    """The top document under ``tag``, looked up for ``key``; None when there is no such tag. A
    tag whose document is gone (a broken entry, named by ``key``) or cannot be read raises
    :class:`_Unreadable`."""
    try:
        return await read_document(store, tag)
    except BrokenEntry as exc:
        raise _Unreadable(tag, exc.for_key(key)) from exc
    except CacheMiss:
        return None
    except (ImageFormatError, IntegrityError, BlobUnreadable) as exc:
        raise _Unreadable(tag, exc) from exc


def _recorded_key(top: tuple[Descriptor, bytes]) -> str | None:
    """The key a top document records; None when it records none or cannot be read (a broken
    entry under a key's own tag is that key's to list and remove)."""
    try:
        return document_annotations(*top).get(ANNOTATION_KEY)
    except RemoteCacheError:
        return None


async def _exact(store: Store, key: str, read_image: bool) -> Match | None:
    """The match for the exact key (see :func:`_find_key`), None when it has no entry."""
    try:
        found = await _find_key(store, key)
    except _Unreadable as exc:
        raise exc.error from exc
    if found is None:
        return None
    tag, top = found
    if not read_image:
        return Match(key=key, tag=tag, digest=top[0].digest, exact=True)
    # Read outside the miss above: a manifest missing under an existing tag is a broken entry
    # (BrokenEntry propagates), not an absent key to fall back from.
    image = await _image_of(store, key, tag, top)
    return Match(key=key, tag=tag, digest=image.digest, exact=True, image=image)


async def _located(store: Store, key: str) -> tuple[str, tuple[Descriptor, bytes]]:
    """:func:`_find_key` for a key that must have an entry (``inspect``, ``rm``): CacheMiss if not
    (and :class:`_Unreadable` as it raises it)."""
    validate_key(key)
    found = await _find_key(store, key)
    if found is None:
        raise CacheMiss(key, store.location)
    return found


async def _image_of(store: Store, key: str, tag: str, top: tuple[Descriptor, bytes]) -> CacheImage:
    """The image of ``key``'s entry, found under ``tag``; BrokenEntry names the key, not the tag."""
    try:
        return await load_image(store, tag, top)
    except BrokenEntry as exc:
        raise exc.for_key(key) from exc


async def inspect(store: Store, key: str) -> Entry:
    """The entry stored under ``key``, with its layers; CacheMiss when there is none (BrokenEntry
    when it names a manifest that is gone)."""
    try:
        tag, top = await _located(store, key)
    except _Unreadable as exc:
        raise exc.error from exc
    return _entry(tag, await _image_of(store, key, tag, top))


async def _delete(store: Store, entry: Entry) -> None:
    """Delete ``entry`` as it was read: a key saved again since keeps its new entry (CacheMiss)."""
    try:
        await store.delete(entry.tag, digest=entry.digest or None)
    except UnsupportedOperation as exc:
        raise UnsupportedOperation(
            f"{store.location} does not allow deleting cache entries ({exc}); enable deletes on the "
            "registry (registry:2: REGISTRY_STORAGE_DELETE_ENABLED=true), or rely on the registry's "
            "own expiry (ttl.sh-style registries expire an image by its tag; others by a retention "
            "policy)"
        ) from exc


class Freed(Struct, frozen=True):
    """What a sweep freed: blobs no entry used any more (and no save relied on lately)."""

    blobs: int
    bytes: int

    def summary(self) -> str:
        """``freed 3 blobs (1.2 MB)``, for the end of an ``rm``/``prune`` line."""
        return f"freed {counted(self.blobs, 'blob')} ({format_bytes(self.bytes)})"


async def sweep(store: Store, grace: timedelta | None = None) -> Freed | None:
    """Free the blobs no entry uses and no save relied on within ``grace`` (default one hour),
    where the store does not do it itself (a layout, a bucket); None for a registry."""
    gc = getattr(store, "gc", None)
    if gc is None:
        return None
    blobs, nbytes = await gc(**({"grace_seconds": grace.total_seconds()} if grace is not None else {}))
    return Freed(blobs, nbytes)


def _users(refs: _Refs, digests: set[str]) -> dict[str, set[str]]:
    """Where a delete takes every tag of a manifest along (a registry): for each of ``digests``,
    the tags whose entry is that manifest or an index listing it (copies: ``skopeo copy --all``
    copies our index, plain ``skopeo copy`` one platform's manifest out of it). Deleting the
    manifest removes or breaks all of them. A tag whose document could not be read might be
    one: its error is raised."""
    users: dict[str, set[str]] = {d: set() for d in digests if d}
    if not users:
        return users
    for tag, found in refs.items():
        if isinstance(found, RemoteCacheError):
            raise found
        for digest in found & users.keys():
            users[digest].add(tag)
    return users


async def _every_tags_refs(store: Store) -> _Refs:
    """What every tag's top document refers to (one GET each); a document that cannot be read
    is kept as its error (a store that fails to answer raises)."""
    refs: _Refs = {}

    async def one(tag: str) -> None:
        try:
            refs[tag] = _refs_of(await store.get_manifest(tag))
        except CacheMiss:  # deleted meanwhile
            pass
        except (ImageFormatError, IntegrityError) as exc:
            refs[tag] = exc

    await for_each(await store.tags(), one, jobs=8)
    return refs


class Removed(Struct, frozen=True):
    """What :func:`remove` deleted: the entry, and the other tags that went with its manifest."""

    entry: Entry
    copies: tuple[str, ...] = ()

    def copies_text(self) -> str:
        """`` with its copies a, b`` for a summary line (nothing without copies)."""
        return f" with its copies {', '.join(self.copies)}" if self.copies else ""


async def remove(
    store: Store,
    key: str,
    *,
    grace: timedelta | None = None,
    collect: bool = True,
    with_copies: bool = False,
) -> Removed:
    """Delete the entry under ``key`` and, with ``collect``, :func:`sweep`; says what went.

    A broken entry (its documents unreadable or gone) is deleted too: ``rm`` is how one gets rid of it.
    Where a delete takes every tag of the manifest along (a registry), an entry whose manifest
    another tag names as well (a copy: ``skopeo copy ...:a ...:b``) is refused
    (UnsupportedOperation) unless ``with_copies``."""
    try:
        entry = await _loaded(store, key, *await _located(store, key))
    except _Unreadable as exc:  # a tag naming what is gone or cannot be read: the tag is all there is
        entry = await _unreadable_entry(store, key, exc.tag, exc.error)
    copies: list[str] = []
    if store.deletes_every_tag and entry.digest:
        copies = await _copies(store, key, entry, with_copies)
    if copies and not with_copies:
        raise UnsupportedOperation(
            f"the manifest of {key} in {store.location} is also the entry of {', '.join(copies)} (or "
            "part of it: a copy), and the registry deletes a manifest with every tag naming it: remove "
            "them together (remote-cache rm --with-copies; the Dagger module's remove --with-copies), "
            "or keep them"
        )
    await _delete(store, entry)
    for tag in copies:  # those naming it went with it; an index that listed it goes too
        with contextlib.suppress(CacheMiss):
            await store.delete(tag)
    if collect:
        await sweep(store, grace)
    return Removed(entry, tuple(copies))


async def _copies(store: Store, key: str, entry: Entry, with_copies: bool) -> list[str]:
    """The other tags whose entry is ``entry``'s manifest or lists it (see :func:`_users`). A tag
    whose document cannot be read might be one: that stops a removal, unless ``with_copies``
    (whatever it is, it goes with the manifest, or is left as broken as it was)."""
    others = {t: r for t, r in (await _every_tags_refs(store)).items() if t != entry.tag}
    unreadable = sorted((t, r) for t, r in others.items() if isinstance(r, RemoteCacheError))
    if unreadable and not with_copies:
        tag, exc = unreadable[0]
        raise type(exc)(
            f"cannot tell whether {tag} is a copy of the manifest of {key} in {store.location} ({exc}); "
            "the registry deletes a manifest with every tag naming it, so nothing was removed: repair or "
            f"delete {tag}, or remove {key} with --with-copies (any copy goes with it)"
        ) from exc
    return sorted(t for t, r in others.items() if isinstance(r, set) and entry.digest in r)


async def _unreadable_entry(store: Store, key: str, tag: str, error: RemoteCacheError) -> Entry:
    """The entry to delete under ``tag``, whose top document could not be read, with the digest
    the tag names where the store still says it: the delete is then of that document only, and
    a registry's copies of it are found (a store that cannot say leaves it blank)."""
    digest = ""
    with contextlib.suppress(RemoteCacheError):
        digest = (await store.resolve(tag)).digest
    reason = error.reason if isinstance(error, CacheMiss) else str(error)
    return Entry(key=key, tag=tag, digest=digest, error=reason)


async def prune(
    store: Store,
    *,
    older_than: timedelta | None = None,
    keep: int | None = None,
    prefix: str = "",
    dry_run: bool = False,
    now: datetime | None = None,
    grace: timedelta | None = None,
    collect: bool = True,
) -> list[Entry]:
    """Delete entries matching ``prefix`` that are outside the ``keep`` newest AND older than ``older_than``.

    A criterion left as None does not protect anything; with neither given, every entry matching
    ``prefix`` goes (a non-empty prefix is then required). Entries with no creation time are
    never removed by age and rank as the oldest for ``keep``; one the store would not let be
    read stops it (:func:`_refuse_unread`). Returns the removed entries; with ``collect``,
    :func:`sweep` follows.
    """
    if older_than is None and keep is None and not prefix:
        raise ValueError("prune needs older_than, keep or a prefix; refusing to delete every entry")
    if keep is not None and keep < 0:
        raise ValueError("keep must be >= 0")
    moment = now or datetime.now(UTC)
    entries, refs = await _listing(store, prefix)
    _refuse_unread(entries, store.location)
    candidates = entries[keep:] if keep is not None else entries
    if older_than is not None:
        cutoff = moment - older_than
        candidates = [e for e in candidates if e.created is not None and e.created < cutoff]
    if store.deletes_every_tag:
        candidates = _without_kept_copies(candidates, _users(refs, {e.digest for e in candidates}))
    if dry_run:
        return candidates
    removed: list[Entry] = []
    gone: set[str] = set()  # manifests a registry deleted: their other tags went with them
    for entry in candidates:
        if store.deletes_every_tag and entry.digest and entry.digest in gone:
            removed.append(entry)
            continue
        try:
            await _delete(store, entry)
        except CacheMiss:
            continue  # someone else removed it first
        gone.add(entry.digest)
        removed.append(entry)
    if removed and collect:
        await sweep(store, grace)
    return removed


def _refuse_unread(entries: list[Entry], where: str) -> None:
    """StoreError, before anything is deleted, for the first of ``entries`` that the store would
    not let be read: its age is unknown, and ranked as undated (the oldest) it could be the
    newest entry deleted; as when a store fails to answer (see :func:`_loaded`), prune stops."""
    for entry in entries:
        if entry.unread is not None:
            raise StoreError(
                f"prune removed nothing: the entry {entry.key} in {where} cannot be read (blob "
                f"{entry.unread.digest}: {entry.unread.why}), so its age is unknown; {entry.unread.fix}, "
                f"or remove the entry (`remote-cache rm` of key {entry.key}), "
                "then prune again"
            ) from entry.unread


def _without_kept_copies(candidates: list[Entry], users: dict[str, set[str]]) -> list[Entry]:
    """``candidates`` less those whose manifest an entry prune keeps uses too (see :func:`_users`:
    deleting it would remove or break that one), each with a warning."""
    chosen = {e.tag for e in candidates}
    out: list[Entry] = []
    for entry in candidates:
        kept = sorted(users.get(entry.digest, set()) - chosen)
        if kept:
            log.warning(
                "prune keeps %s: its manifest is also the entry of %s (or part of it), which this prune "
                "keeps (the registry would delete or break them together)",
                entry.tag,
                ", ".join(kept),
            )
            continue
        out.append(entry)
    return out


def format_table(found: Sequence[Entry]) -> str:
    """Plain aligned columns KEY CREATED SIZE FILES TAG (``-`` for what a foreign image lacks)."""
    rows = [("KEY", "CREATED", "SIZE", "FILES", "TAG")]
    for e in found:
        created = format_time(e.created) if e.created else "-"
        size = format_bytes(e.size) if e.size is not None else "-"
        files = str(e.files) if e.files is not None else "-"
        tag = e.tag + (f"  ({e.error})" if e.error else "")
        rows.append((printable(e.key), created, size, files, printable(tag)))  # (one row each)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows
    )
