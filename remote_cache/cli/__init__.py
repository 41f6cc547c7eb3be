"""``remote-cache``: save a directory as an OCI image in a registry or layout, restore it, manage entries.

References are skopeo-style: ``HOST[:PORT]/REPO:KEY`` for a registry (loopback hosts use plain
HTTP automatically) and ``oci:DIR:KEY`` for an OCI image layout. A key containing ``/`` goes in
``--key KEY`` instead. Credentials: ``--username`` with ``--password-stdin`` (the password is never
a command-line argument), or ``REMOTE_CACHE_USERNAME``/``REMOTE_CACHE_PASSWORD``, or the credential
files podman, skopeo and docker write (``--authfile PATH`` to name one). The common options
(``--username``, ``--password-stdin``, ``--authfile``, ``--plain-http``, ``--timeout``, ``--json``,
``--quiet``, ``--fail-open``, ...) go before or after the command.

Output: a progress bar on stderr when it is a terminal and a transfer lasts over a second; one
summary line on stderr (``restore hit npm-linux: 123.4 MB in 2.1 s (58.8 MB/s)``); with ``--json``
one JSON object on stdout and nothing else there. Errors are one line, ``remote-cache: error: ...``.

Exit codes:

    0  ok (and any failure other than a usage error under --fail-open)
    1  error: store, network or integrity failure
    2  usage error: bad option, reference or key
    3  cache miss: restore or inspect of a key that has no entry
    4  authentication error: missing or wrong credentials
    5  refused: e.g. the directory is over --max-size, not enough disk space (or inodes), or
       the store does not allow deletes

``--fail-open`` turns every failure except a usage error (exit 2) into a warning on stderr and
exit 0, a miss included, so an optional cache step never breaks a CI pipeline; the outcome is
still in the summary line and in ``--json``. Set ``REMOTE_CACHE_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (not typing's: see remote_cache/__init__.py)
if TYPE_CHECKING:
    from typer import Typer

__all__ = ["PROG", "SignalledEarly", "application", "main", "stopped_by"]

PROG = "remote-cache"
#: A Ctrl-C's exit code, 128 + SIGINT, written out: the signal module's first import (enum and
#: more, ~10 ms) would be a window before main()'s handling where a Ctrl-C is Python's traceback.
_INTERRUPTED = 130
#: Allocations between two collections of the young generation (CPython's default is 700).
_YOUNG_OBJECTS = 100_000


class SignalledEarly(BaseException):
    """A SIGTERM before the command's own handling (while the tool loads, typer reads the command
    line, or the command starts): ended as a Ctrl-C then is, with its code and one line."""

    signum = 15  # SIGTERM, written out (see _INTERRUPTED)


def stopped_by(stopped: KeyboardInterrupt | SignalledEarly) -> int:
    """The signal behind an early stop: SIGINT's KeyboardInterrupt or SIGTERM's SignalledEarly."""
    return stopped.signum if isinstance(stopped, SignalledEarly) else _INTERRUPTED - 128


def application() -> Typer:
    """The typer application with its commands, imported when asked for: :func:`main` imports
    it under its handling of a Ctrl-C."""
    from . import commands  # noqa: F401 - registers the commands on the app
    from .app import app

    return app


def main() -> None:
    """Console-script entry point: run the command, then leave at once.

    Once the command has returned, every clean-up has run (work directories, state files, the
    stores closed) and only the interpreter's own shutdown is left: tearing down modules and
    thread pools took 0.04-0.06 s of every command. So the streams are flushed and the process
    exits with ``os._exit`` (also never racing a native library's threads at shutdown).

    A Ctrl-C before the command runs (while the tool loads, or typer reads the command line)
    ends it as one during the command does, with exit 130 and the one line (no JSON: the
    options may not be read yet); typer alone exits 130 in silence or lets a traceback out.
    """
    import gc  # (gc, os and sys: loaded with the interpreter)
    import os
    import sys

    # Loading the tool makes tens of thousands of objects that live as long as it does (classes,
    # functions); the cycle collector's default young generation (700) went over each of them
    # twice: 5% of a short command's instructions. Collections still run, less often.
    gc.set_threshold(_YOUNG_OBJECTS)
    _closed_streams_to_null()
    code = 1
    try:
        _terminate_as_interrupted()
        application()(prog_name=PROG)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            sys.stderr.write(done.code + "\n")
        if code == _INTERRUPTED:
            from .app import outcome_settled

            if not outcome_settled():  # typer's own exit for a Ctrl-C
                _interrupted_early(_INTERRUPTED - 128)
    except (KeyboardInterrupt, SignalledEarly) as stopped:
        signum = stopped_by(stopped)
        code = 128 + signum
        _interrupted_early(signum)
    except BaseException as exc:  # reporting failed (stdout on a full disk), or a native panic
        _last_words(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}")
    finally:
        # Every path leaves here: an interpreter exit would also wait for worker threads that a
        # cancelled command abandoned in a stalled request (remote_cache.oci.objectstore.calls).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 1  # a closed or full stdout is a failure to report what happened
        os._exit(code)


def _closed_streams_to_null() -> None:
    """A standard stream closed by the caller (``>&-``, ``2>&-``) is ``/dev/null``, as Python's
    ``print`` treats one (it left ``sys.stdout`` None: a done restore exited 1 with a traceback); and
    so no file the command opens takes its number (a stray write would land in it)."""
    import os
    import sys

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # (the lowest free number: this one)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - lives as long as the process


def _interrupted_early(signum: int) -> None:
    from ..errors import Interrupted

    _last_words(f"{PROG}: {Interrupted(signum)}")


def _terminate_as_interrupted() -> None:
    """SIGTERM raises :class:`SignalledEarly` until the command takes the signals over (it killed
    the tool in silence before); one ignored by the caller stays so. (Imported here, inside
    main's handling: the signal module's first import is a window for a Ctrl-C.)"""
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _signalled_early)


def _signalled_early(_signum: int, _frame: object) -> None:
    raise SignalledEarly


def _last_words(line: str) -> None:
    import contextlib
    import sys

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
