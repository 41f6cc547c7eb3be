"""``remote-cache``: save a directory as an OCI image in a registry or layout, restore it, manage entries.

References are skopeo-style: ``HOST[:PORT]/REPO:KEY`` for a registry (loopback hosts use plain
HTTP automatically) and ``oci:DIR:KEY`` for an OCI image layout. A key containing ``/`` goes in
``--key KEY`` instead. Credentials: ``--username`` with ``--password-stdin`` (the password is never
a command-line argument), or ``REMOTE_CACHE_USERNAME``/``REMOTE_CACHE_PASSWORD``, or docker's
``config.json``. The common options (``--username``, ``--password-stdin``, ``--plain-http``,
``--timeout``, ``--json``, ``--quiet``, ``--fail-open``) go before or after the command.

Output: a progress bar on stderr when it is a terminal and a transfer lasts over a second; one
summary line on stderr (``restore hit npm-linux: 123.4 MB in 2.1 s (58.8 MB/s)``); with ``--json``
one JSON object on stdout and nothing else there. Errors are one line, ``remote-cache: error: ...``.

Exit codes:

    0  ok (and any failure other than a usage error under --fail-open)
    1  error: store, network or integrity failure
    2  usage error: bad option, reference or key
    3  cache miss: restore or inspect of a key that has no entry
    4  authentication error: missing or wrong credentials
    5  refused: e.g. the directory is over --max-size, or the store does not allow deletes

``--fail-open`` turns every failure except a usage error (exit 2) into a warning on stderr and
exit 0, a miss included, so an optional cache step never breaks a CI pipeline; the outcome is
still in the summary line and in ``--json``. Set ``REMOTE_CACHE_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .entries import Entry, list_entries, prune, remove
from .entries import inspect as inspect_entry
from .errors import (
    CacheMiss,
    InvalidKey,
    InvalidReference,
    RegistryAuthError,
    RemoteCacheError,
    UnsupportedOperation,
)
from .image import load_image
from .oci import Platform
from .progress import TransferProgress, format_bytes, format_rate, parse_duration, parse_size
from .reference import Reference, parse_reference
from .restore import restore
from .save import CacheTooLarge, save
from .store import Store
from .stores import open_store

__all__ = ["ExitCode", "app", "exit_code_for", "main"]

_PROG = "remote-cache"
_DEBUG_ENV = "REMOTE_CACHE_DEBUG"
_PASSWORD_ENV = "REMOTE_CACHE_PASSWORD"


class ExitCode(IntEnum):
    """The documented exit codes (see the module docstring); :func:`exit_code_for` maps errors."""

    OK = 0
    ERROR = 1
    USAGE = 2
    MISS = 3
    AUTH = 4
    REFUSED = 5


class UsageError(RemoteCacheError):
    """A command line that cannot mean anything (exit 2), found after typer's own parsing."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception: the single place where errors meet exit codes."""
    if isinstance(exc, CacheMiss):
        return ExitCode.MISS
    if isinstance(exc, UsageError | InvalidKey | InvalidReference | typer.BadParameter):
        return ExitCode.USAGE
    if isinstance(exc, RegistryAuthError):
        return ExitCode.AUTH
    if isinstance(exc, CacheTooLarge | UnsupportedOperation):
        return ExitCode.REFUSED
    return ExitCode.ERROR


_EXIT_HELP = (
    "Exit codes: 0 ok; 1 error (store, network, integrity); 2 usage error; 3 cache miss; "
    "4 authentication error; 5 refused (over --max-size, deletes not allowed). "
    "--fail-open makes every failure but a usage error a warning with exit 0."
)

app = typer.Typer(
    name=_PROG,
    epilog=_EXIT_HELP,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# -------------------------------------------------------------------------------------------
# Common options


@dataclass(frozen=True)
class Common:
    """Options every command takes."""

    username: str | None = None
    password_stdin: bool = False
    plain_http: bool = False
    timeout: float | None = None
    json: bool = False
    quiet: bool = False
    fail_open: bool = False
    password: str | None = field(default=None, repr=False)


UsernameOpt = Annotated[
    str | None,
    typer.Option(
        "--username", "-u", metavar="USER", help="Registry username (the password comes from stdin/env)."
    ),
]
PasswordStdinOpt = Annotated[
    bool,
    typer.Option("--password-stdin", help=f"Read the registry password from stdin (or set {_PASSWORD_ENV})."),
]
PlainHttpOpt = Annotated[
    bool, typer.Option("--plain-http", help="Talk HTTP, not HTTPS (loopback registries always do).")
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout", metavar="SECONDS", min=0.1, help="Network timeout in seconds for each request."
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout (and nothing else there).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary line.")]
FailOpenOpt = Annotated[
    bool,
    typer.Option("--fail-open", help="Turn any failure but a usage error into a warning and exit 0."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key", "-k", metavar="KEY", help="The cache key, when it cannot go in REF (e.g. has '/')."
    ),
]


@app.callback()
def _global_options(
    ctx: typer.Context,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Save directories as OCI images in a registry or an OCI layout, and restore them.

    The common options work before the command (remote-cache --json ls REPO) or after it.
    """
    ctx.obj = Common(username, password_stdin, plain_http, timeout, json_, quiet, fail_open)


def _common(
    ctx: typer.Context,
    username: str | None,
    password_stdin: bool,
    plain_http: bool,
    timeout: float | None,
    json_: bool,
    quiet: bool,
    fail_open: bool,
) -> Common:
    """The command's common options, falling back to those given before the command."""
    outer = ctx.obj if isinstance(ctx.obj, Common) else Common()
    return Common(
        username if username is not None else outer.username,
        password_stdin or outer.password_stdin,
        plain_http or outer.plain_http,
        timeout if timeout is not None else outer.timeout,
        json_ or outer.json,
        quiet or outer.quiet,
        fail_open or outer.fail_open,
    )


def _read_password(common: Common) -> Common:
    """Fill in the password: from stdin with --password-stdin, else from the environment."""
    if common.password_stdin:
        if common.username is None:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("--password-stdin was given but stdin held no password")
        return _with_password(common, password)
    if common.username is not None:
        env_password = os.environ.get(_PASSWORD_ENV)
        if not env_password:
            raise UsageError(
                f"--username needs a password: pipe it to --password-stdin or set {_PASSWORD_ENV}"
            )
        return _with_password(common, env_password)
    return common


def _with_password(common: Common, password: str) -> Common:
    return replace(common, password=password)


def _reference(text: str, key: str | None, *, need_key: bool, what: str = "REF") -> Reference:
    ref = parse_reference(text)
    if ref.digest is not None:
        raise UsageError(f"{what} {text!r} pins a digest; name the entry by key instead (drop '@sha256:...')")
    if key is not None:
        if ref.key is not None:
            raise UsageError(f"the key is given twice (in {what} {text!r} and in --key): keep one")
        ref = ref.with_key(key)
    if need_key and ref.key is None:
        raise UsageError(f"{what} {text!r} has no key: write HOST/REPO:KEY or oci:DIR:KEY, or pass --key KEY")
    if not need_key and ref.key is not None:
        raise UsageError(f"{what} {text!r} names an entry; this command takes a repository without ':KEY'")
    return ref


@asynccontextmanager
async def _opened(ref: Reference, common: Common) -> AsyncIterator[Store]:
    store = open_store(
        ref,
        username=common.username,
        password=common.password,
        plain_http=True if common.plain_http else None,
        timeout=common.timeout,
    )
    try:
        yield store
    finally:
        await store.aclose()


# -------------------------------------------------------------------------------------------
# Running a command and reporting its outcome


@dataclass
class Outcome:
    """What a command did: exit code, one summary line for stderr, facts for --json, stdout text."""

    code: ExitCode
    summary: str | None
    data: dict[str, Any]
    stdout: Callable[[Console], None] | None = None


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _redact(text: str, common: Common) -> str:
    # Belt and braces: the core never puts a secret in a message, and we make sure of it.
    if common.password:
        text = text.replace(common.password, "***")
    return text


def _run(command: str, common: Common, body: Callable[[Common], Coroutine[Any, Any, Outcome]]) -> NoReturn:
    """Run ``body``, map what happened to an exit code, print the summary/JSON, and exit."""
    debug = os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    try:
        common = _read_password(common)
        outcome = asyncio.run(body(common))
    except KeyboardInterrupt:
        _stderr_line(f"{_PROG}: interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        outcome = _failure(command, exc, common)
    if outcome.code is not ExitCode.OK and common.fail_open and outcome.code is not ExitCode.USAGE:
        outcome = _failed_open(outcome, common)
    if common.json:
        sys.stdout.write(
            json.dumps({"command": command, **outcome.data, "exit_code": int(outcome.code)}) + "\n"
        )
        sys.stdout.flush()
    elif outcome.stdout is not None:
        # Piped output is for scripts: never wrap or truncate a column to fit 80 characters.
        outcome.stdout(Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1_000_000))
    if outcome.summary and not common.quiet:
        _stderr_line(_redact(outcome.summary, common))
    raise typer.Exit(int(outcome.code))


def _failure(command: str, exc: Exception, common: Common) -> Outcome:
    code = exit_code_for(exc)
    message = _redact(str(exc) or type(exc).__name__, common)
    if not isinstance(exc, RemoteCacheError | OSError):
        message = f"unexpected {type(exc).__name__}: {message} (set {_DEBUG_ENV}=1 for a traceback)"
    if isinstance(exc, CacheMiss):
        # A miss (inspect/rm of an absent key) is a result, not an error.
        where = f"no entry in {exc.where}" if exc.where else "no entry"
        return Outcome(
            ExitCode.MISS, f"{command} miss {exc.key}: {where}", {"outcome": "miss", "key": exc.key}
        )
    if not common.fail_open or code is ExitCode.USAGE:
        _stderr_line(f"{_PROG}: error: {message}")
    data = {"outcome": "error", "error": message, "error_type": type(exc).__name__}
    return Outcome(code, None, data)


def _failed_open(outcome: Outcome, common: Common) -> Outcome:
    reason = outcome.data.get("error") or outcome.data.get("outcome", "failure")
    if outcome.code is not ExitCode.MISS:
        _stderr_line(_redact(f"{_PROG}: warning: {reason} (ignored: --fail-open)", common))
    data = {**outcome.data, "failed_open": True, "failed_exit_code": int(outcome.code)}
    return Outcome(ExitCode.OK, outcome.summary, data, outcome.stdout)


def _progress(common: Common, description: str) -> TransferProgress:
    return TransferProgress(description, enabled=(not common.quiet and sys.stderr.isatty()))


# -------------------------------------------------------------------------------------------
# Commands


@app.command("save", epilog=_EXIT_HELP)
def save_command(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="Directory to save.",
            exists=True,
            file_okay=False,
            dir_okay=True,
            readable=True,
        ),
    ],
    ref: Annotated[str, typer.Argument(metavar="REF", help="HOST[:PORT]/REPO:KEY or oci:DIR:KEY.")],
    key: KeyOpt = None,
    compression: Annotated[
        str, typer.Option("--compression", metavar="zstd|gzip", help="Layer compression: zstd or gzip.")
    ] = "zstd",
    level: Annotated[
        int | None, typer.Option("--level", metavar="N", help="Compression level (default: the codec's).")
    ] = None,
    platform: Annotated[
        list[str] | None,
        typer.Option(
            "--platform",
            metavar="OS/ARCH",
            help="OS/ARCH[/VARIANT] to publish for; repeatable (default amd64+arm64).",
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size", metavar="SIZE", help="Refuse (exit 5) a directory larger than this, e.g. 2G."
        ),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", metavar="N", min=1, help="Parallel uploads/compressions.")
    ] = None,
    base_key: Annotated[
        str | None,
        typer.Option(
            "--base-key",
            "--base",
            metavar="KEY",
            help="Also reuse unchanged layers of this entry (e.g. the key a restore fell back to).",
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Re-read every file instead of trusting unchanged listings.")
    ] = False,
    immutable: Annotated[
        bool, typer.Option("--immutable", help="Never replace an existing entry under the key.")
    ] = False,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only",
            envvar="REMOTE_CACHE_READ_ONLY",
            help="Save nothing, exit 0 (for untrusted runs such as fork PRs); env REMOTE_CACHE_READ_ONLY=1.",
        ),
    ] = False,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Save PATH under a key (REF = HOST[:PORT]/REPO:KEY or oci:DIR:KEY)."""
    if compression not in ("zstd", "gzip"):
        raise typer.BadParameter(f"{compression!r}: choose zstd or gzip", param_hint="--compression")
    try:
        platforms = tuple(Platform.parse(p) for p in platform) if platform else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--platform") from exc
    try:
        limit = parse_size(max_size) if max_size is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--max-size") from exc
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(ref, key, need_key=True)
        assert reference.key is not None
        async with _opened(reference, common) as store:
            options: dict[str, Any] = {}
            if platforms:
                options["platforms"] = platforms
            if jobs is not None:
                options["jobs"] = jobs
            with _progress(common, f"save {reference.key}") as bar:
                result = await save(
                    store,
                    reference.key,
                    path,
                    compression=compression,
                    level=level,
                    max_size=limit,
                    progress=bar,
                    base_key=base_key,
                    full=full,
                    immutable=immutable,
                    read_only=read_only,
                    **options,
                )
        outcome = result.status
        data = {**result.to_json(), "outcome": outcome, "reference": str(reference)}
        if result.skipped:
            return Outcome(ExitCode.OK, f"save skipped {reference.key}: {result.skipped}", data)
        sent, secs = result.bytes_uploaded, result.seconds
        reused = f", {result.layers_reused} layers reused" if result.layers_reused else ""
        line = (
            f"save {outcome} {reference.key}: {format_bytes(sent)} uploaded "
            f"({format_bytes(result.bytes_total)} compressed, {format_bytes(result.size)} in {result.files} "
            f"files{reused}) in {secs:.1f} s ({format_rate(sent, secs)})"
        )
        return Outcome(ExitCode.OK, line, data)

    _run("save", common, body)


@app.command("restore", epilog=_EXIT_HELP)
def restore_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="HOST[:PORT]/REPO:KEY or oci:DIR:KEY.")],
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
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Restore the entry REF into PATH, replacing PATH atomically; exit 3 when there is no entry.

    With --restore-key, a fallback entry counts as found (exit 0, outcome "fallback", "hit" false).
    """
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(ref, key, need_key=True)
        assert reference.key is not None
        async with _opened(reference, common) as store:
            try:
                with _progress(common, f"restore {reference.key}") as bar:
                    result = await restore(
                        store,
                        reference.key,
                        path,
                        restore_keys=tuple(restore_key or ()),
                        progress=bar,
                        **({"jobs": jobs} if jobs is not None else {}),
                    )
            except CacheMiss:
                data = {"outcome": "miss", "hit": False, "key": reference.key, "reference": str(reference)}
                return Outcome(
                    ExitCode.MISS, f"restore miss {reference.key}: no entry in {store.location}", data
                )
        exact = result.status == "hit"
        data = {**result.to_json(), "outcome": result.status, "hit": exact, "reference": str(reference)}
        got, secs = result.bytes, result.seconds
        how = f"hit {reference.key}" if exact else f"fallback {reference.key} from {result.matched_key}"
        line = (
            f"restore {how}: {format_bytes(got)} in {secs:.1f} s ({format_rate(got, secs)}); "
            f"{format_bytes(result.size)} in {result.files} files"
        )
        return Outcome(ExitCode.OK, line, data)

    _run("restore", common, body)


@app.command("ls", epilog=_EXIT_HELP)
def ls_command(
    ctx: typer.Context,
    repo: Annotated[str, typer.Argument(metavar="REPO", help="HOST[:PORT]/REPO or oci:DIR.")],
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", metavar="PREFIX", help="Only entries whose key starts with this."),
    ] = None,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """List the entries of a repository: key, tag, size, files, created."""
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(repo, None, need_key=False, what="REPO")
        async with _opened(reference, common) as store:
            entries = await list_entries(store, prefix=prefix or "")
        rows = [e.to_json() for e in entries]

        def show(console: Console) -> None:
            table = Table(box=None, pad_edge=False)
            for column in ("KEY", "TAG", "SIZE", "FILES", "CREATED"):
                table.add_column(column, justify="right" if column in ("SIZE", "FILES") else "left")
            for row in rows:
                table.add_row(
                    Text(str(row["key"])),  # Text: a key such as "[x]" is not rich markup
                    Text(str(row["tag"])),
                    format_bytes(row["size"]) if row["size"] is not None else "-",
                    str(row["files"]) if row["files"] is not None else "-",
                    "unreadable (see --json)" if row.get("error") else str(row["created"] or "-"),
                )
            console.print(table)

        data = {"outcome": "ok", "repository": reference.location, "entries": rows}
        return Outcome(ExitCode.OK, None, data, show)

    _run("ls", common, body)


@app.command("inspect", epilog=_EXIT_HELP)
def inspect_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="HOST[:PORT]/REPO:KEY or oci:DIR:KEY.")],
    key: KeyOpt = None,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Show an entry: manifest digest, layers, annotations; exit 3 when absent."""
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(ref, key, need_key=True)
        assert reference.key is not None
        async with _opened(reference, common) as store:
            entry: Entry = await inspect_entry(store, reference.key)
            image = await load_image(store, entry.digest)
        info = {
            **entry.to_json(with_layers=True),
            "media_type": image.descriptor.media_type,
            "manifest": image.manifest.digest,
            "annotations": dict(image.annotations),
        }

        def show(console: Console) -> None:
            console.print(f"key:        {info['key']}", markup=False, highlight=False)
            console.print(
                f"digest:     {info['digest']}  ({info['media_type']})", markup=False, highlight=False
            )
            console.print(f"manifest:   {info['manifest']}", markup=False, highlight=False)
            console.print("layers:", markup=False, highlight=False)
            for layer in image.layers:
                console.print(
                    f"  {layer.digest}  {format_bytes(layer.size):>10}  {layer.media_type}",
                    markup=False,
                    highlight=False,
                )
            console.print("annotations:", markup=False, highlight=False)
            for name, value in sorted(image.annotations.items()):
                console.print(f"  {name}={value}", markup=False, highlight=False)

        return Outcome(ExitCode.OK, None, {"outcome": "ok", **info}, show)

    _run("inspect", common, body)


@app.command("rm", epilog=_EXIT_HELP)
def rm_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="HOST[:PORT]/REPO:KEY or oci:DIR:KEY.")],
    key: KeyOpt = None,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Remove the entry REF; exit 3 when there is none."""
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(ref, key, need_key=True)
        assert reference.key is not None
        async with _opened(reference, common) as store:
            await remove(store, reference.key)
        data = {"outcome": "removed", "key": reference.key, "reference": str(reference)}
        return Outcome(ExitCode.OK, f"rm removed {reference.key} from {reference.location}", data)

    _run("rm", common, body)


@app.command("prune", epilog=_EXIT_HELP)
def prune_command(
    ctx: typer.Context,
    repo: Annotated[str, typer.Argument(metavar="REPO", help="HOST[:PORT]/REPO or oci:DIR.")],
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
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    plain_http: PlainHttpOpt = False,
    timeout: TimeoutOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
) -> None:
    """Remove entries older than --older-than; the newest --keep always stay. Needs one of the two."""
    if older_than is None and keep is None:
        raise typer.BadParameter("give --older-than DURATION and/or --keep N", param_hint="--older-than")
    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from exc
    common = _common(ctx, username, password_stdin, plain_http, timeout, json_, quiet, fail_open)

    async def body(common: Common) -> Outcome:
        reference = _reference(repo, None, need_key=False, what="REPO")
        async with _opened(reference, common) as store:
            pruned = await prune(store, older_than=age, keep=keep, prefix=prefix or "", dry_run=dry_run)
        rows = [e.to_json() for e in pruned]
        verb = "would remove" if dry_run else "removed"

        def show(console: Console) -> None:
            for row in rows:
                console.print(str(row["key"] or row["tag"]), markup=False, highlight=False)

        data = {"outcome": "ok", "dry_run": dry_run, "repository": reference.location, "removed": rows}
        line = f"prune {verb} {len(rows)} entr{'y' if len(rows) == 1 else 'ies'} from {reference.location}"
        return Outcome(ExitCode.OK, line, data, show)

    _run("prune", common, body)


def main() -> None:
    """Console-script entry point."""
    app(prog_name=_PROG)
