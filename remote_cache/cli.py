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

import inspect
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from .errors import (
    CacheMiss,
    InvalidKey,
    InvalidReference,
    RegistryAuthError,
    RemoteCacheError,
    UnsupportedOperation,
)
from .progress import TransferProgress, format_bytes, format_rate, parse_duration, parse_size

# Start-up time matters for a CLI run once per CI step: what only some commands or paths need
# (rich's console and table, asyncio, the registry client, save/restore/entries) is imported
# where it is used, and here only for the type checker.
if TYPE_CHECKING:
    from rich.console import Console

    from .reference import Reference
    from .store import Store

__all__ = ["ExitCode", "app", "exit_code_for", "main"]

_PROG = "remote-cache"
_DEBUG_ENV = "REMOTE_CACHE_DEBUG"
_PASSWORD_ENV = "REMOTE_CACHE_PASSWORD"

_T = TypeVar("_T")
_R = TypeVar("_R")


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
    if isinstance(exc, UnsupportedOperation) or _is_too_large(exc):
        return ExitCode.REFUSED
    return ExitCode.ERROR


def _is_too_large(exc: BaseException) -> bool:
    # A CacheTooLarge can only exist once remote_cache.save is imported: don't import it to ask.
    save_module = sys.modules.get("remote_cache.save")
    return save_module is not None and isinstance(exc, save_module.CacheTooLarge)


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
RefArg = Annotated[str, typer.Argument(metavar="REF", help="HOST[:PORT]/REPO:KEY or oci:DIR:KEY.")]
RepoArg = Annotated[str, typer.Argument(metavar="REPO", help="HOST[:PORT]/REPO or oci:DIR.")]


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


#: The common options as parameters (in the order of the fields of Common), declared once above
#: and appended to every command's own.
_COMMON_PARAMS = list(inspect.signature(_global_options, eval_str=True).parameters.values())[1:]


def _merged(ctx: typer.Context, given: Common) -> Common:
    """The command's common options, falling back to those given before the command."""
    outer = ctx.obj if isinstance(ctx.obj, Common) else Common()
    given_values = {f.name: getattr(given, f.name) for f in fields(Common)}
    unset = {
        name: getattr(outer, name) for name, value in given_values.items() if value is None or value is False
    }
    return replace(given, **unset)


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
    from .reference import parse_reference

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
async def _store(ref: Reference, common: Common) -> AsyncIterator[Store]:
    from .stores import open_store

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


@asynccontextmanager
async def _entry(text: str, key: str | None, common: Common) -> AsyncIterator[tuple[Reference, str, Store]]:
    """The entry REF (or REF with --key) checked, its key, and its store opened with the common options."""
    ref = _reference(text, key, need_key=True)
    assert ref.key is not None
    async with _store(ref, common) as store:
        yield ref, ref.key, store


@asynccontextmanager
async def _repository(text: str, common: Common) -> AsyncIterator[tuple[Reference, Store]]:
    """The repository REPO checked (no key), and its store opened with the common options."""
    ref = _reference(text, None, need_key=False, what="REPO")
    async with _store(ref, common) as store:
        yield ref, store


# -------------------------------------------------------------------------------------------
# Running a command and reporting its outcome


@dataclass
class Outcome:
    """What a command did: exit code, one summary line for stderr, facts for --json, stdout text."""

    code: ExitCode
    summary: str | None
    data: dict[str, Any]
    stdout: Callable[[Console], None] | None = None


#: A command's work once its options are checked: runs with the common options (password read).
Body = Callable[[Common], Coroutine[Any, Any, Outcome]]


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _redact(text: str, common: Common) -> str:
    # Belt and braces: the core never puts a secret in a message, and we make sure of it.
    if common.password:
        text = text.replace(common.password, "***")
    return text


def _run(command: str, common: Common, body: Body) -> NoReturn:
    """Run ``body``, map what happened to an exit code, print the summary/JSON, and exit."""
    import asyncio

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
        from rich.console import Console

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


def _parsed(parse: Callable[[_T], _R], value: _T | None, option: str) -> _R | None:
    """``parse(value)``, None for None; a ValueError becomes a usage error (exit 2) naming ``option``."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None): for the others the core's own defaults stand."""
    return {name: value for name, value in options.items() if value is not None}


def _plain(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _command(name: str) -> Callable[[Callable[..., Body]], Callable[..., None]]:
    """Register ``plan`` as command ``name``: its own parameters, then the common options.

    ``plan`` checks its options (raising typer.BadParameter for a usage error) and returns the
    :data:`Body` that :func:`_run` runs with the merged common options; its docstring is the help.
    """

    def register(plan: Callable[..., Body]) -> Callable[..., None]:
        def command(ctx: typer.Context, **options: Any) -> None:
            given = Common(*(options.pop(p.name) for p in _COMMON_PARAMS))
            body = plan(**options)
            _run(name, _merged(ctx, given), body)

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        own = inspect.signature(plan, eval_str=True).parameters.values()
        signature = inspect.Signature([context, *own, *_COMMON_PARAMS], return_annotation=None)
        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        command.__name__, command.__doc__ = f"{name}_command", plan.__doc__
        app.command(name, epilog=_EXIT_HELP)(command)
        return command

    return register


# -------------------------------------------------------------------------------------------
# Commands


@_command("save")
def _save(
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
    ref: RefArg,
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
) -> Body:
    """Save PATH under a key (REF = HOST[:PORT]/REPO:KEY or oci:DIR:KEY)."""
    if compression not in ("zstd", "gzip"):
        raise typer.BadParameter(f"{compression!r}: choose zstd or gzip", param_hint="--compression")
    from .oci import Platform

    platforms = _parsed(lambda ps: tuple(Platform.parse(p) for p in ps), platform or None, "--platform")
    limit = _parsed(parse_size, max_size, "--max-size")

    async def body(common: Common) -> Outcome:
        from .save import save

        async with _entry(ref, key, common) as (reference, entry_key, store):
            with _progress(common, f"save {entry_key}") as bar:
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
                    **_given(platforms=platforms, jobs=jobs),
                )
        outcome = result.status
        data = {**result.to_json(), "outcome": outcome, "reference": str(reference)}
        if result.skipped:
            return Outcome(ExitCode.OK, f"save skipped {entry_key}: {result.skipped}", data)
        sent, secs = result.bytes_uploaded, result.seconds
        reused = f", {result.layers_reused} layers reused" if result.layers_reused else ""
        line = (
            f"save {outcome} {entry_key}: {format_bytes(sent)} uploaded "
            f"({format_bytes(result.bytes_total)} compressed, {format_bytes(result.size)} in {result.files} "
            f"files{reused}) in {secs:.1f} s ({format_rate(sent, secs)})"
        )
        return Outcome(ExitCode.OK, line, data)

    return body


@_command("restore")
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
) -> Body:
    """Restore the entry REF into PATH, replacing PATH atomically; exit 3 when there is no entry.

    With --restore-key, a fallback entry counts as found (exit 0, outcome "fallback", "hit" false).
    """

    async def body(common: Common) -> Outcome:
        from .restore import restore

        async with _entry(ref, key, common) as (reference, entry_key, store):
            try:
                with _progress(common, f"restore {entry_key}") as bar:
                    result = await restore(
                        store,
                        entry_key,
                        path,
                        restore_keys=tuple(restore_key or ()),
                        progress=bar,
                        **_given(jobs=jobs),
                    )
            except CacheMiss:
                data = {"outcome": "miss", "hit": False, "key": entry_key, "reference": str(reference)}
                return Outcome(ExitCode.MISS, f"restore miss {entry_key}: no entry in {store.location}", data)
        exact = result.status == "hit"
        data = {**result.to_json(), "outcome": result.status, "hit": exact, "reference": str(reference)}
        got, secs = result.bytes, result.seconds
        how = f"hit {entry_key}" if exact else f"fallback {entry_key} from {result.matched_key}"
        line = (
            f"restore {how}: {format_bytes(got)} in {secs:.1f} s ({format_rate(got, secs)}); "
            f"{format_bytes(result.size)} in {result.files} files"
        )
        return Outcome(ExitCode.OK, line, data)

    return body


@_command("ls")
def _ls(
    repo: RepoArg,
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", metavar="PREFIX", help="Only entries whose key starts with this."),
    ] = None,
) -> Body:
    """List the entries of a repository: key, tag, size, files, created."""

    async def body(common: Common) -> Outcome:
        from .entries import list_entries

        async with _repository(repo, common) as (reference, store):
            entries = await list_entries(store, prefix=prefix or "")
        rows = [e.to_json() for e in entries]

        def show(console: Console) -> None:
            from rich.table import Table
            from rich.text import Text

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

    return body


@_command("inspect")
def _inspect(ref: RefArg, key: KeyOpt = None) -> Body:
    """Show an entry: manifest digest, layers, annotations; exit 3 when absent."""

    async def body(common: Common) -> Outcome:
        from .entries import inspect as inspect_entry
        from .image import load_image

        async with _entry(ref, key, common) as (_, entry_key, store):
            entry = await inspect_entry(store, entry_key)
            image = await load_image(store, entry.digest)
        info = {
            **entry.to_json(with_layers=True),
            "media_type": image.descriptor.media_type,
            "manifest": image.manifest.digest,
            "annotations": dict(image.annotations),
        }

        def show(console: Console) -> None:
            _plain(console, f"key:        {info['key']}")
            _plain(console, f"digest:     {info['digest']}  ({info['media_type']})")
            _plain(console, f"manifest:   {info['manifest']}")
            _plain(console, "layers:")
            for layer in image.layers:
                _plain(console, f"  {layer.digest}  {format_bytes(layer.size):>10}  {layer.media_type}")
            _plain(console, "annotations:")
            for name, value in sorted(image.annotations.items()):
                _plain(console, f"  {name}={value}")

        return Outcome(ExitCode.OK, None, {"outcome": "ok", **info}, show)

    return body


@_command("rm")
def _rm(ref: RefArg, key: KeyOpt = None) -> Body:
    """Remove the entry REF; exit 3 when there is none."""

    async def body(common: Common) -> Outcome:
        from .entries import remove

        async with _entry(ref, key, common) as (reference, entry_key, store):
            await remove(store, entry_key)
        data = {"outcome": "removed", "key": entry_key, "reference": str(reference)}
        return Outcome(ExitCode.OK, f"rm removed {entry_key} from {reference.location}", data)

    return body


@_command("prune")
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
) -> Body:
    """Remove entries older than --older-than; the newest --keep always stay. Needs one of the two."""
    if older_than is None and keep is None:
        raise typer.BadParameter("give --older-than DURATION and/or --keep N", param_hint="--older-than")
    age = _parsed(parse_duration, older_than, "--older-than")

    async def body(common: Common) -> Outcome:
        from .entries import prune

        async with _repository(repo, common) as (reference, store):
            pruned = await prune(store, older_than=age, keep=keep, prefix=prefix or "", dry_run=dry_run)
        rows = [e.to_json() for e in pruned]
        verb = "would remove" if dry_run else "removed"

        def show(console: Console) -> None:
            for row in rows:
                _plain(console, str(row["key"] or row["tag"]))

        data = {"outcome": "ok", "dry_run": dry_run, "repository": reference.location, "removed": rows}
        line = f"prune {verb} {len(rows)} entr{'y' if len(rows) == 1 else 'ies'} from {reference.location}"
        return Outcome(ExitCode.OK, line, data, show)

    return body


def main() -> None:
    """Console-script entry point."""
    app(prog_name=_PROG)
