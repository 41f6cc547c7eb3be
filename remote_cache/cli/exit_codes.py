"""The documented exit codes, and the one place where errors meet them."""

from __future__ import annotations

from enum import IntEnum

import typer

from ..errors import (
    CacheMiss,
    CacheTooLarge,
    InvalidConfigFile,
    InvalidKey,
    InvalidReference,
    NoSpace,
    RemoteCacheError,
    StoreAuthError,
    TreeTooDeep,
    UnsuitableTarget,
    UnsupportedOperation,
)

__all__ = ["EXIT_HELP", "ExitCode", "UsageError", "exit_code_for"]

EXIT_HELP = (
    "Exit codes: 0 ok; 1 error (store, network, integrity, --deadline, no directory to save); "
    "2 usage error (also a target that cannot be restored into); 3 cache miss; 4 authentication "
    "error; 5 refused (over --max-size or nested too deep, not enough disk space, deletes not "
    "allowed, rm of an entry other tags share without --with-copies); 130/143 interrupted by "
    "SIGINT/SIGTERM. "
    "--fail-open makes every failure but a usage error or an interruption a warning with exit 0."
)


class ExitCode(IntEnum):
    """The documented exit codes (see :data:`EXIT_HELP`); :func:`exit_code_for` maps errors."""

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
    if isinstance(
        exc,
        UsageError
        | InvalidKey
        | InvalidReference
        | InvalidConfigFile
        | UnsuitableTarget
        | typer.BadParameter,
    ):
        return ExitCode.USAGE
    if isinstance(exc, StoreAuthError):
        return ExitCode.AUTH
    if isinstance(exc, UnsupportedOperation | CacheTooLarge | TreeTooDeep | NoSpace):
        return ExitCode.REFUSED
    return ExitCode.ERROR
