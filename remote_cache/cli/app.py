"""The ``remote-cache`` application: common options, running a command, reporting its outcome.

Each command (:mod:`.commands`) checks its own options and returns the work to do (a
:data:`Body`); :func:`command` appends the common options to it, and the runner reads the
password, runs the work, maps what happened to an exit code (:mod:`.exit_codes`) and prints the
summary line, the JSON or the table.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypedDict, TypeVar

import typer
import typer.main
from msgspec import Struct
from msgspec.structs import fields, replace
from typer.core import TyperGroup

from ..errors import (
    CacheMiss,
    DeadlineExceeded,
    Interrupted,
    RemoteCacheError,
    credentials_to_hide,
    hidden_in_traceback,
    without_secrets,
)
from ..keys import printable
from ..records import hiding
from ..units import parse_duration
from . import PROG, SignalledEarly, stopped_by
from .exit_codes import EXIT_HELP, ExitCode, UsageError, exit_code_for
from .progress import TransferProgress

# Start-up time matters for a CLI run once per CI step: what only some commands or paths need
# (rich's console, asyncio, the registry client, save/restore/entries) is imported where it is
# used, and here only for the type checker.
if TYPE_CHECKING:
    from anyio import CancelScope
    from rich.console import Console

    from ..oci.certs import TlsOptions
    from ..oci.objectstore import ObjectStoreOptions
    from ..oci.reference import Reference
    from ..oci.store import Store

__all__ = [
    "Body",
    "Common",
    "KeyOpt",
    "Outcome",
    "RefArg",
    "RepoArg",
    "Writes",
    "app",
    "command",
    "entry_reference",
    "given",
    "open_entry",
    "open_repository",
    "parsed",
    "plain",
    "progress_bar",
]

_DEBUG_ENV = "REMOTE_CACHE_DEBUG"
_PASSWORD_ENV = "REMOTE_CACHE_PASSWORD"

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Boolean options that skopeo's users write ``--NAME=false``: click's flags take no value.
_VALUED_FLAGS = {"--tls-verify": "--no-tls-verify"}
#: What Go's strconv.ParseBool (skopeo's flags) takes, in any case.
_TRUE, _FALSE = frozenset({"1", "t", "true"}), frozenset({"0", "f", "false"})


def _flag_values(args: list[str]) -> list[str]:
    """``--tls-verify=false`` as ``--no-tls-verify``, ``--tls-verify=true`` as ``--tls-verify``
    (up to ``--``); any other value is a usage error."""
    spelled: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return spelled + args[index:]
        name, equals, value = arg.partition("=")
        if equals and name in _VALUED_FLAGS:
            if value.lower() not in _TRUE | _FALSE:
                raise typer.BadParameter(f"{name} takes true or false, not {value!r}")
            arg = name if value.lower() in _TRUE else _VALUED_FLAGS[name]
        spelled.append(arg)
    return spelled


#: The settings of the application and of each command's own.
_TYPER_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


class _Commands(MutableMapping[str, Any]):
    """The group's commands by name, in the help's order, each built for click when first looked
    up: typer makes a command's click parameters from its signature (~1 ms a command on a 2-vCPU
    VM), and a run needs the one it names. Its names alone serve click's listing and typer's
    "Did you mean" suggestions."""

    def __init__(self) -> None:
        self._runs: dict[str, Callable[..., None]] = {}
        self._built: dict[str, Any] = {}

    def register(self, name: str, run: Callable[..., None]) -> None:
        self._runs[name] = run

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            one = typer.Typer(**_TYPER_SETTINGS)
            one.command(name, epilog=EXIT_HELP)(self._runs[name])
            self._built[name] = typer.main.get_command(one)  # one command's application: that command
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:  # click's add_command
        self._runs.setdefault(name, command)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._runs[name]
        self._built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


_COMMANDS = _Commands()


class _Group(TyperGroup):
    """The application's group: takes skopeo's ``--tls-verify=BOOL`` spelling wherever it
    appears, and builds a command only when it is looked up (:class:`_Commands`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _COMMANDS

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's own click Context
        return super().parse_args(ctx, _flag_values(args))


app = typer.Typer(name=PROG, cls=_Group, epilog=EXIT_HELP, no_args_is_help=True, **_TYPER_SETTINGS)


# -------------------------------------------------------------------------------------------
# Common options


class Common(Struct, frozen=True):
    """Options every command takes."""

    username: str | None = None
    password_stdin: bool = False
    authfile: str | None = None
    plain_http: bool = False
    tls_verify: bool | None = None
    cert_dir: str | None = None
    timeout: float | None = None
    deadline: str | None = None
    endpoint: str | None = None
    region: str | None = None
    json: bool = False
    quiet: bool = False
    fail_open: bool = False
    password: str | None = None

    __repr__, __rich_repr__ = hiding("password")


class Writes(TypedDict, total=False):
    """How a bucket's objects are written: the ObjectStoreOptions fields save, rm and prune take."""

    encryption: str
    kms_key_id: str
    storage_class: str


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
AuthfileOpt = Annotated[
    str | None,
    typer.Option(
        "--authfile",
        metavar="PATH",
        help="Read registry credentials from this auth.json or config.json only (default: "
        "REGISTRY_AUTH_FILE, else the containers tools' auth.json files, then docker's config.json).",
    ),
]
PlainHttpOpt = Annotated[
    bool,
    typer.Option(
        "--plain-http",
        help="Talk HTTP, not HTTPS (loopback registries do unless --tls-verify or --cert-dir is given).",
    ),
]
TlsVerifyOpt = Annotated[
    bool | None,
    typer.Option(
        "--tls-verify/--no-tls-verify",
        help="Verify registries' TLS certificates (the default). --tls-verify=false (skopeo's "
        "spelling) or --no-tls-verify skips it, and talks HTTP to a registry without TLS.",
    ),
]
CertDirOpt = Annotated[
    str | None,
    typer.Option(
        "--cert-dir",
        metavar="DIR",
        help="Trust the registry CA certificates in DIR (*.crt) and present the client certificate "
        "there (*.cert + *.key), as in containers-certs.d(5) (default: the registry's certs.d directory).",
    ),
]


def _finite(value: float | None) -> float | None:
    """Refuse what a range check lets through (NaN compares false to any bound)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of seconds")
    return value


TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=0.1,
        max=86400.0,  # a day, longer than any stall; 1e308 overflowed the sockets' clocks
        callback=_finite,
        help="Stall timeout: a store that sends nothing for this long has stalled (default 60).",
    ),
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(
        "--deadline",
        metavar="DURATION",
        help="Stop the whole step (cleaning up) after this long, e.g. 10m; exit 1, or 0 with --fail-open.",
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        metavar="URL",
        help="Object store endpoint (MinIO, R2, Ceph, Azurite), e.g. https://minio:9000 "
        "(default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else the provider's).",
    ),
]
RegionOpt = Annotated[
    str | None,
    typer.Option("--region", metavar="REGION", help="S3 region (default: AWS_REGION, AWS_DEFAULT_REGION)."),
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
RefArg = Annotated[
    str,
    typer.Argument(
        metavar="REF", help="HOST[:PORT]/REPO:KEY, s3://BUCKET/PREFIX:KEY (or gs://, az://) or oci:DIR:KEY."
    ),
]
RepoArg = Annotated[
    str,
    typer.Argument(metavar="REPO", help="HOST[:PORT]/REPO, s3://BUCKET/PREFIX (or gs://, az://) or oci:DIR."),
]


def _print_version(asked: bool) -> None:
    """``--version``: print ``remote-cache X.Y.Z`` and exit 0, whatever else the command line holds."""
    if asked:
        from ..version import VERSION

        sys.stdout.write(f"{PROG} {VERSION}\n")
        raise typer.Exit(0)


VersionOpt = Annotated[
    bool,
    typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
]


@app.callback()
def _global_options(
    ctx: typer.Context,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    authfile: AuthfileOpt = None,
    plain_http: PlainHttpOpt = False,
    tls_verify: TlsVerifyOpt = None,
    cert_dir: CertDirOpt = None,
    timeout: TimeoutOpt = None,
    deadline: DeadlineOpt = None,
    endpoint: EndpointOpt = None,
    region: RegionOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    fail_open: FailOpenOpt = False,
    version: VersionOpt = False,
) -> None:
    """Save directories as OCI images in a registry, a bucket or an OCI layout, and restore them.

    The common options work before the command (remote-cache --json ls REPO) or after it.
    """
    ctx.obj = Common(
        username,
        password_stdin,
        authfile,
        plain_http,
        tls_verify,
        cert_dir,
        timeout,
        deadline,
        endpoint,
        region,
        json_,
        quiet,
        fail_open,
    )


#: The common options as parameters (in the order of the fields of Common), declared once above
#: and appended to every command's own (``--version`` is the application's alone).
_COMMON_PARAMS = [
    p for p in inspect.signature(_global_options, eval_str=True).parameters.values() if p.name != "version"
][1:]


def _merged(ctx: typer.Context, given: Common) -> Common:
    """The command's common options, falling back to those given before the command."""
    outer = ctx.obj if isinstance(ctx.obj, Common) else Common()
    unset = {f.name: getattr(outer, f.name) for f in fields(Common) if getattr(given, f.name) == f.default}
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
    from ..oci.reference import masked, parse_reference

    ref = parse_reference(text)
    text = masked(text)  # as the messages below quote it
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


def _registry_options(common: Common) -> list[str]:
    """The registry-only options given: refused for layouts and object stores."""
    given = {"--authfile": common.authfile, "--tls-verify": common.tls_verify, "--cert-dir": common.cert_dir}
    return [option for option, value in given.items() if value is not None]


def _registry_tls(common: Common) -> tuple[TlsOptions, bool | None]:
    """The TLS options, and ``plain_http`` for open_store: a TLS option given explicitly means the
    registry speaks TLS, loopback too (``--tls-verify=false`` finds out, see TlsOptions)."""
    from ..oci.certs import TlsOptions

    cert_dir = Path(common.cert_dir) if common.cert_dir is not None else None
    tls = TlsOptions(verify=common.tls_verify is not False, cert_dir=cert_dir)
    if common.plain_http:
        return tls, True
    return tls, False if (common.tls_verify or cert_dir is not None) else None


def _object_options(ref: Reference, common: Common, writes: Writes | None) -> ObjectStoreOptions | None:
    """How to reach and write a bucket; None for a registry or a layout, which refuse those options."""
    if ref.transport != "object":
        if common.endpoint or common.region or (writes and any(writes.values())):
            raise UsageError(
                "--endpoint, --region, --sse, --sse-kms-key-id and --storage-class are for object stores "
                f"(s3://, gs://, az://), not {ref.location}"
            )
        return None
    from ..oci.objectstore import ObjectStoreOptions

    if common.username is not None:
        raise UsageError(
            f"{ref.location} takes its credentials from the environment (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role), not --username"
        )
    return ObjectStoreOptions(
        endpoint=common.endpoint,
        region=common.region,
        plain_http=common.plain_http,
        **given(stall_seconds=common.timeout),
        **(writes or Writes()),
    )


@asynccontextmanager
async def _store(ref: Reference, common: Common, writes: Writes | None = None) -> AsyncIterator[Store]:
    from ..oci.store import open_store

    if ref.transport != "registry" and (given := _registry_options(common)):
        raise UsageError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for registries, not {ref.location}"
        )
    objects = _object_options(ref, common, writes)
    tls, plain_http = _registry_tls(common)
    store = open_store(
        ref,
        username=common.username,
        password=common.password,
        plain_http=plain_http,
        timeout=common.timeout,
        objects=objects,
        auth_file=Path(common.authfile) if common.authfile is not None else None,
        tls=tls,
    )
    try:
        yield store
    finally:
        import anyio

        with anyio.CancelScope(shield=True):  # closed even when a signal cancelled the command
            await store.aclose()


@asynccontextmanager
async def open_entry(
    text: str, key: str | None, common: Common, writes: Writes | None = None
) -> AsyncIterator[tuple[Reference, str, Store]]:
    """The entry REF (or REF with --key) checked, its key, and its store opened with the common
    options (and, for a bucket, ``writes``: encryption and storage class of what is saved)."""
    ref, entry = entry_reference(text, key)
    async with _store(ref, common, writes) as store:
        yield ref, entry, store


def entry_reference(text: str, key: str | None) -> tuple[Reference, str]:
    """The entry REF (or REF with --key) names, checked, and its key."""
    ref = _reference(text, key, need_key=True)
    assert ref.key is not None
    return ref, ref.key


@asynccontextmanager
async def open_repository(
    text: str, common: Common, writes: Writes | None = None
) -> AsyncIterator[tuple[Reference, Store]]:
    """The repository REPO checked (no key), and its store opened with the common options."""
    ref = _reference(text, None, need_key=False, what="REPO")
    async with _store(ref, common, writes) as store:
        yield ref, store


# -------------------------------------------------------------------------------------------
# Running a command and reporting its outcome


class Outcome(Struct):
    """What a command did: exit code, one summary line for stderr, facts for --json, stdout text."""

    code: ExitCode
    summary: str | None
    data: dict[str, Any]
    stdout: Callable[[Console], None] | None = None


#: A command's work once its options are checked: runs with the common options (password read).
Body = Callable[[Common], Coroutine[Any, Any, Outcome]]


def _stderr_line(text: str) -> None:
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


def _redact(text: str, common: Common) -> str:
    # Belt and braces: the core never puts a secret in a message, and we make sure of it (the
    # password, the environment's and a profile's credentials; what servers said was cut of
    # signatures and tokens where it was quoted: the patterns would cut words of ours here).
    return without_secrets(text, credentials_to_hide([common.password]))


def _debug_traceback(common: Common) -> None:
    """The traceback (REMOTE_CACHE_DEBUG), with every credential cut out: a chained store error
    keeps what the server sent, which may echo a token (AWS's SignatureDoesNotMatch body does)."""
    sys.stderr.write(hidden_in_traceback(traceback.format_exc(), [common.password]))


def _show_warnings() -> None:
    """The core's warnings (``logging``, logger ``remote_cache``) as ``remote-cache: warning:`` lines."""
    import logging

    logger = logging.getLogger("remote_cache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING)


class _Signals:
    """SIGINT and SIGTERM while a command runs (unless ignored from the start): the first
    cancels ``scope`` and is kept in ``received``; a second exits at once (the next run removes
    what is left, see :mod:`remote_cache.archive.workdirs`)."""

    def __init__(self, scope: CancelScope) -> None:
        import asyncio
        import signal

        self._scope = scope
        self._loop = asyncio.get_running_loop()
        # One ignored when the process started stays so (a script's background job starts with
        # SIGINT ignored: its Ctrl-C is not for the job), as Python itself leaves it.
        self._signums = tuple(
            s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN
        )
        self.received: int | None = None

    def __enter__(self) -> _Signals:
        for signum in self._signums:
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import signal

        # The body is over: the settled handlers take over at once, not once the loop is closed
        # (a SIGTERM on the defaults the loop puts back ended a save that was done). Blocking the
        # signals meanwhile would not do: the loop's worker threads would take them.
        for signum in self._signums:
            self._loop.remove_signal_handler(signum)
            signal.signal(signum, _late_signal)
        _settle(signals_so_far=int(self.received is not None))

    def _on_signal(self, signum: int) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        self._scope.cancel()


async def _main(body: Body, common: Common, deadline: float | None) -> Outcome:
    """Run ``body`` under the signals and the deadline.

    SIGINT or SIGTERM cancels it: every clean-up runs (work directories, spool files) and
    :class:`Interrupted` says which signal; a second signal exits at once (see :class:`_Signals`).
    ``deadline`` seconds stop it the same way, as :class:`DeadlineExceeded`.
    """
    import anyio

    with anyio.CancelScope() as scope, _Signals(scope) as signals:
        try:
            with anyio.fail_after(deadline):
                return await body(common)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the step ran longer than --deadline {common.deadline}: stopped and cleaned up"
            ) from None
    assert signals.received is not None  # only a signal cancels the scope
    raise Interrupted(signals.received)


def _run(command: str, common: Common, body: Body) -> NoReturn:
    """Run ``body``, map what happened to an exit code, print the summary/JSON, and exit."""
    import asyncio

    debug = os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    _show_warnings()
    deadline = parsed(_deadline_seconds, common.deadline, "--deadline")  # a usage error, exit 2
    try:
        common = _read_password(common)
        outcome = asyncio.run(_main(body, common, deadline))
    except Interrupted as exc:
        _interrupted(command, common, exc)
    except Exception as exc:
        if debug:
            _debug_traceback(common)
        outcome = _failure(command, exc, common)
    _settle()
    if common.fail_open and outcome.code not in (ExitCode.OK, ExitCode.USAGE):
        outcome = _failed_open(outcome, common)
    raise typer.Exit(int(_report(command, outcome, common)))


def _interrupted(command: str, common: Common, exc: Interrupted) -> NoReturn:
    """Say which signal stopped the command (and, with --json, one object saying so); exit 128+N."""
    _settle()
    code = 128 + exc.signum
    if common.json:
        data = {"command": command, "outcome": "interrupted", "signal": exc.signal, "exit_code": code}
        sys.stdout.write(json.dumps(data) + "\n")
    _stderr_line(f"{PROG}: {exc}")
    raise typer.Exit(code)


_settled = False
_late_signals = 0


def _settle(signals_so_far: int = 0) -> None:
    """The outcome is settled and its report comes next: a signal now would only contradict it
    (the work it reports is done, or its interruption cleaned up), so it is ignored; a second
    signal (counting the one that interrupted the command) still leaves at once. One ignored
    from the start stays so."""
    global _settled, _late_signals
    import signal

    if _settled:
        return
    _late_signals = signals_so_far
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, _late_signal):  # (_Signals hands over its own)
            signal.signal(signum, _late_signal)
    _settled = True


def _late_signal(signum: int, _frame: object) -> None:
    global _late_signals
    _late_signals += 1
    if _late_signals > 1:
        os._exit(128 + signum)


def outcome_settled() -> bool:
    """Whether the command reached its report (an exit of 130 then is its own interruption's,
    reported; else typer's, for a Ctrl-C before the command ran)."""
    return _settled


def _deadline_seconds(text: str) -> float:
    try:
        seconds = parse_duration(text).total_seconds()
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any step can run: give e.g. 10m or 2h") from None
    if seconds <= 0:
        raise ValueError(f"{text!r} leaves the step no time: give it at least 1s, e.g. 10m")
    return seconds


def _report(command: str, outcome: Outcome, common: Common) -> ExitCode:
    """Print the outcome: the JSON object or the command's own stdout, then the summary line; the
    exit code, a failure's when stdout refused the report (see :func:`_unreported`)."""
    code = outcome.code
    try:
        if common.json:
            sys.stdout.write(json.dumps({"command": command, **outcome.data, "exit_code": int(code)}) + "\n")
            sys.stdout.flush()
        elif outcome.stdout is not None:
            outcome.stdout(_stdout_console())
            sys.stdout.flush()
    except OSError as exc:
        code = _unreported(exc, code, common)
    if outcome.summary and not common.quiet:
        _stderr_line(_redact(outcome.summary, common))
    return code


def _stdout_console() -> Console:
    """rich's console on stdout, for which a pipe its reader closed is an OSError as for a plain
    write (rich's own answer is exit 1, in silence)."""
    from rich.console import Console

    class _Stdout(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    # Piped output is for scripts: never wrap or truncate a column to fit 80 characters.
    return _Stdout(soft_wrap=True, width=None if sys.stdout.isatty() else 1_000_000)


def _unreported(exc: OSError, code: ExitCode, common: Common) -> ExitCode:
    """stdout refused the report (a full disk, a pipe closed by its reader): one line says so, and
    the command fails unless it had failed already or --fail-open says to go on. (It was "error:
    unexpected OSError" or, for a closed pipe, typer's silent exit 1, --fail-open or not.)"""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - what is left unwritten goes nowhere, once
    message = f"the report could not be written to stdout ({exc.strerror or exc})"
    if common.fail_open:
        _stderr_line(f"{PROG}: warning: {message} (ignored: --fail-open)")
        return code
    _stderr_line(f"{PROG}: error: {message}")
    return ExitCode.ERROR if code is ExitCode.OK else code


def _failure(command: str, exc: Exception, common: Common) -> Outcome:
    if isinstance(exc, CacheMiss):
        # A miss (inspect/rm of an absent key) is a result, not an error.
        data = {"outcome": "miss", "key": exc.key, "reason": exc.reason}
        return Outcome(ExitCode.MISS, f"{command} miss {exc.key}: {exc.reason}", data)
    code = exit_code_for(exc)
    message = _redact(str(exc) or type(exc).__name__, common)
    if not isinstance(exc, RemoteCacheError | OSError):
        message = f"unexpected {type(exc).__name__}: {message} (set {_DEBUG_ENV}=1 for a traceback)"
    if not common.fail_open or code is ExitCode.USAGE:
        _stderr_line(f"{PROG}: error: {message}")
    data = {"outcome": "error", "error": message, "error_type": type(exc).__name__}
    return Outcome(code, None, data)


def _failed_open(outcome: Outcome, common: Common) -> Outcome:
    reason = outcome.data.get("error") or outcome.data.get("outcome", "failure")
    if outcome.code is not ExitCode.MISS:
        _stderr_line(_redact(f"{PROG}: warning: {reason} (ignored: --fail-open)", common))
    data = {**outcome.data, "failed_open": True, "failed_exit_code": int(outcome.code)}
    return Outcome(ExitCode.OK, outcome.summary, data, outcome.stdout)


def progress_bar(common: Common, description: str) -> TransferProgress:
    """The transfer's progress as the command shows it: a bar, CI log lines, or nothing (--quiet)."""
    return TransferProgress(description, mode="off" if common.quiet else None)


def parsed(parse: Callable[[_T], _R], value: _T | None, option: str) -> _R | None:
    """``parse(value)``, None for None; a ValueError becomes a usage error (exit 2) naming ``option``."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None): for the others the core's own defaults stand."""
    return {name: value for name, value in options.items() if value is not None}


def plain(console: Console, text: str) -> None:
    """One line of a command's own output, its control characters escaped (:func:`printable`)."""
    console.print(printable(text), markup=False, highlight=False)


def command(name: str) -> Callable[[Callable[..., Body]], Callable[..., None]]:
    """Register ``plan`` as command ``name``: its own parameters, then the common options.

    ``plan`` checks its options (raising typer.BadParameter for a usage error) and returns the
    :data:`Body` that :func:`_run` runs with the merged common options; its docstring is the help.
    """

    def register(plan: Callable[..., Body]) -> Callable[..., None]:
        def command(ctx: typer.Context, **options: Any) -> None:
            common = _merged(ctx, Common(*(options.pop(p.name) for p in _COMMON_PARAMS)))
            try:
                _run(name, common, plan(**options))
            except (KeyboardInterrupt, SignalledEarly) as stopped:  # before the loop's handlers are in
                _interrupted(name, common, Interrupted(stopped_by(stopped)))

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        own = inspect.signature(plan, eval_str=True).parameters.values()
        signature = inspect.Signature([context, *own, *_COMMON_PARAMS], return_annotation=None)
        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        command.__name__, command.__doc__ = f"{name}_command", plan.__doc__
        _COMMANDS.register(name, command)
        return command

    return register
