"""The commands: save, restore, ls, inspect, rm, prune (registered on the app on import)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import CacheMiss, RemoteCacheError
from ..units import counted, format_bytes, parse_duration, parse_size
from .app import (
    Body,
    Common,
    KeyOpt,
    Outcome,
    RefArg,
    RepoArg,
    Writes,
    command,
    entry_reference,
    given,
    open_entry,
    open_repository,
    parsed,
    plain,
    progress_bar,
)
from .exit_codes import ExitCode

log = logging.getLogger("remote_cache")

if TYPE_CHECKING:
    from rich.console import Console

    from ..cache.entries import Freed
    from ..cache.prewalk import PreWalk
    from ..oci.store import Store

__all__: list[str] = []


# -- save's options --------------------------------------------------------------------------

SavePathArg = Annotated[
    Path,
    typer.Argument(metavar="PATH", help="Directory to save.", file_okay=False, dir_okay=True, readable=True),
]
CompressionOpt = Annotated[
    str, typer.Option("--compression", metavar="zstd|gzip", help="Layer compression: zstd or gzip.")
]
LevelOpt = Annotated[
    int | None, typer.Option("--level", metavar="N", help="Compression level (default: the codec's).")
]
PlatformOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--platform",
        metavar="OS/ARCH",
        help="OS/ARCH[/VARIANT] to publish for; repeatable (default amd64+arm64).",
    ),
]
MaxSizeOpt = Annotated[
    str | None,
    typer.Option("--max-size", metavar="SIZE", help="Refuse (exit 5) a directory larger than this, e.g. 2G."),
]
SaveJobsOpt = Annotated[
    int | None, typer.Option("--jobs", "-j", metavar="N", min=1, help="Parallel uploads/compressions.")
]
BaseKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--base-key",
        "--base",
        metavar="KEY",
        help="Also reuse unchanged layers of this entry (e.g. the key a restore fell back to).",
    ),
]
FullOpt = Annotated[
    bool, typer.Option("--full", help="Re-read every file instead of trusting unchanged listings.")
]
ImmutableOpt = Annotated[
    bool, typer.Option("--immutable", help="Never replace an existing entry under the key.")
]
ReadOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--read-only",
        envvar="REMOTE_CACHE_READ_ONLY",
        help="Save nothing, exit 0 (for untrusted runs such as fork PRs); env REMOTE_CACHE_READ_ONLY=1.",
    ),
]
SseOpt = Annotated[
    str | None,
    typer.Option(
        "--sse",
        metavar="AES256|aws:kms",
        help="S3 server-side encryption of what is saved (bucket policies).",
    ),
]
SseKeyOpt = Annotated[
    str | None, typer.Option("--sse-kms-key-id", metavar="KEY-ID", help="The KMS key for --sse aws:kms.")
]
StorageClassOpt = Annotated[
    str | None,
    typer.Option("--storage-class", metavar="CLASS", help="Storage class of saved blobs, e.g. STANDARD_IA."),
]
GraceOpt = Annotated[
    str,
    typer.Option(
        "--grace",
        metavar="DURATION",
        help="Blobs a save used this recently stay (a bucket or layout frees blobs no entry uses).",
    ),
]


def _writes(sse: str | None, kms_key_id: str | None, storage_class: str | None = None) -> Writes:
    """How a bucket's objects are written (checked): encryption, its KMS key, storage class."""
    if sse is not None:
        # Here, not at the top: the object-store package loads obstore, which only --sse needs.
        from ..oci.objectstore.options import ENCRYPTIONS

        if sse not in ENCRYPTIONS:
            raise typer.BadParameter(f"{sse!r}: choose {' or '.join(ENCRYPTIONS)}", param_hint="--sse")
    if kms_key_id and sse != "aws:kms":
        raise typer.BadParameter("a KMS key goes with --sse aws:kms", param_hint="--sse-kms-key-id")
    return Writes(encryption=sse or "", kms_key_id=kms_key_id or "", storage_class=storage_class or "")


def _prewalk(path: Path, ref: str, key: str | None) -> PreWalk | None:
    """A walk of ``path`` begun in a child process for the save under REF's key (none when REF
    is wrong: the save says so)."""
    from ..cache.prewalk import PreWalk
    from ..keys import tag_for_key

    try:
        return PreWalk.start(path, tag_for_key(entry_reference(ref, key)[1]))
    except RemoteCacheError:  # (a usage error, an invalid reference or key)
        return None


@command("save")
def _save(
    path: SavePathArg,
    ref: RefArg,
    key: KeyOpt = None,
    compression: CompressionOpt = "zstd",
    level: LevelOpt = None,
    platform: PlatformOpt = None,
    max_size: MaxSizeOpt = None,
    jobs: SaveJobsOpt = None,
    base_key: BaseKeyOpt = None,
    full: FullOpt = False,
    immutable: ImmutableOpt = False,
    read_only: ReadOnlyOpt = False,
    sse: SseOpt = None,
    sse_kms_key_id: SseKeyOpt = None,
    storage_class: StorageClassOpt = None,
) -> Body:
    """Save PATH under a key (REF = HOST[:PORT]/REPO:KEY, s3://BUCKET/PREFIX:KEY or oci:DIR:KEY)."""
    from ..archive.codecs import LEVELS, check_compression, check_level

    try:
        check_compression(compression)
    except ValueError:
        choices = " or ".join(LEVELS)
        raise typer.BadParameter(f"{compression!r}: choose {choices}", param_hint="--compression") from None
    writes = _writes(sse, sse_kms_key_id, storage_class)
    parsed(lambda lv: check_level(compression, lv), level, "--level")
    from ..oci.descriptor import Platform

    platforms = parsed(lambda ps: tuple(Platform.parse(p) for p in ps), platform or None, "--platform")
    limit = parsed(parse_size, max_size, "--max-size")
    # The save's first walk, on another core while the rest of the tool loads (a child process).
    prewalk = None if full or read_only else _prewalk(path, ref, key)

    async def body(common: Common) -> Outcome:
        from ..cache.save import save

        try:
            async with open_entry(ref, key, common, writes) as (reference, entry_key, store):
                with progress_bar(common, f"save {entry_key}") as bar:
                    result = await save(
                        store,
                        entry_key,
                        path,
                        compression=compression,
                        level=level,
                        max_size=limit,
                        progress=bar,
                        base_key=base_key,
                        full=full,
                        immutable=immutable,
                        read_only=read_only,
                        prewalk=prewalk,
                        **given(platforms=platforms, jobs=jobs),
                    )
        finally:
            if prewalk is not None:
                prewalk.close()
        data = {**result.to_json(), "reference": str(reference)}
        return Outcome(ExitCode.OK, result.summary(), data)

    return body


@command("restore")
def _restore(
    ref: RefArg,
    path: Annotated[
        Path, typer.Argument(metavar="PATH", help="Directory to restore into (replaced; created if absent).")
    ],
    key: KeyOpt = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", metavar="N", min=1, help="Parallel downloads.")
    ] = None,
    restore_key: Annotated[
        list[str] | None,
        typer.Option(
            "--restore-key",
            metavar="PREFIX",
            help="On a miss, restore the newest entry whose key starts with PREFIX; repeatable, "
            "tried in order (as actions/cache restore-keys).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Restore into the current directory even when it is not empty.")
    ] = False,
) -> Body:
    """Restore the entry REF into PATH, replacing PATH atomically; exit 3 when there is no entry.

    With --restore-key, a fallback entry counts as found (exit 0, outcome "fallback", "hit" false).
    """

    async def body(common: Common) -> Outcome:
        from ..cache.restore import restore

        async with open_entry(ref, key, common) as (reference, entry_key, store):
            try:
                with progress_bar(common, f"restore {entry_key}") as bar:
                    result = await restore(
                        store,
                        entry_key,
                        path,
                        restore_keys=tuple(restore_key or ()),
                        progress=bar,
                        force=force,
                        **given(jobs=jobs),
                    )
            except CacheMiss as miss:
                data = {
                    "outcome": "miss",
                    "hit": False,
                    "key": entry_key,
                    "reason": miss.reason,
                    "reference": str(reference),
                }
                return Outcome(ExitCode.MISS, f"restore miss {entry_key}: {miss.reason}", data)
        exact = result.status == "hit"
        data = {**result.to_json(), "hit": exact, "reference": str(reference)}
        return Outcome(ExitCode.OK, result.summary(), data)

    return body


@command("ls")
def _ls(
    repo: RepoArg,
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", metavar="PREFIX", help="Only entries whose key starts with this."),
    ] = None,
) -> Body:
    """List the entries, newest first: key, created, size, files, tag."""

    async def body(common: Common) -> Outcome:
        from ..cache.entries import format_table, list_entries

        async with open_repository(repo, common) as (reference, store):
            entries = await list_entries(store, prefix=prefix or "")
        rows = [e.to_json() for e in entries]

        def show(console: Console) -> None:
            for line in format_table(entries).split("\n"):
                plain(console, line)

        data = {"outcome": "ok", "repository": reference.location, "entries": rows}
        line = f"ls listed {counted(len(rows), 'entry', 'entries')} in {reference.location}"
        return Outcome(ExitCode.OK, line, data, show)

    return body


@command("inspect")
def _inspect(ref: RefArg, key: KeyOpt = None) -> Body:
    """Show an entry: manifest digest, layers, annotations; exit 3 when absent."""

    async def body(common: Common) -> Outcome:
        from ..cache.entries import inspect as inspect_entry
        from ..cache.image import load_image

        async with open_entry(ref, key, common) as (reference, entry_key, store):
            entry = await inspect_entry(store, entry_key)
            image = await load_image(store, entry.digest)
        info = {
            **entry.to_json(with_layers=True),
            "media_type": image.descriptor.media_type,
            "manifest": image.manifest.digest,
            "annotations": dict(image.annotations),
        }

        def show(console: Console) -> None:
            plain(console, f"key:        {info['key']}")
            plain(console, f"digest:     {info['digest']}  ({info['media_type']})")
            plain(console, f"manifest:   {info['manifest']}")
            plain(console, "layers:")
            for layer in image.layers:
                plain(console, f"  {layer.digest}  {format_bytes(layer.size):>10}  {layer.media_type}")
            plain(console, "annotations:")
            for name, value in sorted(image.annotations.items()):
                plain(console, f"  {name}={value}")

        size = format_bytes(sum(layer.size for layer in image.layers))
        line = (
            f"inspect found {entry_key}: {counted(len(image.layers), 'layer')}, {size} compressed, "
            f"in {reference.location}"
        )
        return Outcome(ExitCode.OK, line, {"outcome": "ok", **info}, show)

    return body


@command("rm")
def _rm(
    ref: RefArg,
    key: KeyOpt = None,
    grace: GraceOpt = "1h",
    sse: SseOpt = None,
    sse_kms_key_id: SseKeyOpt = None,
    with_copies: Annotated[
        bool,
        typer.Option(
            "--with-copies",
            help="On a registry, also remove the other tags naming the same manifest (copies made "
            "with skopeo copy): a registry deletes them together, so without this rm refuses (exit 5).",
        ),
    ] = False,
) -> Body:
    """Remove the entry REF; exit 3 when there is none. (``--sse``: for a bucket whose policy wants
    it on every write: the sweep writes a scratch object to read the server's clock.)"""
    grace_period = parsed(parse_duration, grace, "--grace")
    writes = _writes(sse, sse_kms_key_id)

    async def body(common: Common) -> Outcome:
        from ..cache.entries import remove

        async with open_entry(ref, key, common, writes) as (reference, entry_key, store):
            removed = await remove(store, entry_key, collect=False, with_copies=with_copies)
            what = f"{entry_key}{removed.copies_text()}"
            freed = await _swept(store, grace_period, f"{what} was removed")
        data = {
            "outcome": "removed",
            "key": entry_key,
            "copies": list(removed.copies),
            "reference": str(reference),
            **_freed_json(freed),
        }
        line = f"rm removed {what} from {reference.location}{_freed_text(freed, grace)}"
        return Outcome(ExitCode.OK, line, data)

    return body


async def _swept(store: Store, grace: timedelta | None, done: str) -> Freed | None:
    """:func:`~remote_cache.cache.entries.sweep`, saying first what was ``done`` when it fails (the
    error alone reads as if nothing had been)."""
    from ..cache.entries import sweep

    try:
        return await sweep(store, grace)
    except RemoteCacheError:
        log.warning("%s; freeing the blobs no entry uses failed:", done)
        raise


def _freed_json(freed: Freed | None) -> dict[str, int]:
    return {} if freed is None else {"blobs_freed": freed.blobs, "bytes_freed": freed.bytes}


def _freed_text(freed: Freed | None, grace: str) -> str:
    """What the sweep did, for the summary line (nothing for a registry: it frees blobs itself)."""
    if freed is None:
        return ""
    return f"; {freed.summary()} (blobs used within --grace {grace} stay)"


@command("prune")
def _prune(
    repo: RepoArg,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Remove entries created longer ago than this: 30m, 12h, 7d, 2w.",
        ),
    ] = None,
    keep: Annotated[
        int | None, typer.Option("--keep", metavar="N", min=0, help="Always keep this many newest entries.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", metavar="PREFIX", help="Only consider keys starting with this.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be removed; remove nothing.")
    ] = False,
    grace: GraceOpt = "1h",
    sse: SseOpt = None,
    sse_kms_key_id: SseKeyOpt = None,
) -> Body:
    """Remove entries older than --older-than; the newest --keep always stay. Needs one of the two."""
    if older_than is None and keep is None:
        raise typer.BadParameter("give --older-than DURATION and/or --keep N", param_hint="--older-than")
    age = parsed(parse_duration, older_than, "--older-than")
    grace_period = parsed(parse_duration, grace, "--grace")
    writes = _writes(sse, sse_kms_key_id)

    async def body(common: Common) -> Outcome:
        from ..cache.entries import prune

        async with open_repository(repo, common, writes) as (reference, store):
            pruned = await prune(
                store, older_than=age, keep=keep, prefix=prefix or "", dry_run=dry_run, collect=False
            )
            done = f"{counted(len(pruned), 'entry')} removed" if pruned else "nothing removed"
            freed = None if dry_run else await _swept(store, grace_period, done)
        rows = [e.to_json() for e in pruned]
        verb = "would remove" if dry_run else "removed"

        def show(console: Console) -> None:
            for row in rows:
                plain(console, str(row["key"] or row["tag"]))

        data = {
            "outcome": "ok", "dry_run": dry_run, "repository": reference.location, "removed": rows,
            **_freed_json(freed),
        }  # fmt: skip
        line = (
            f"prune {verb} {counted(len(rows), 'entry', 'entries')} from {reference.location}"
            f"{_freed_text(freed, grace)}"
        )
        return Outcome(ExitCode.OK, line, data, show)

    return body
