"""Registry errors on the wire, and the one boundary where the HTTP clients' exceptions become ours.

* :func:`error_for_response` turns an error response into the one right exception: 401/403 ->
  :class:`~remote_cache.errors.RegistryAuthError` (saying how to pass credentials), anything else
  -> :class:`~remote_cache.errors.RegistryError` carrying the status, the spec's error code
  (``MANIFEST_UNKNOWN``, ``DENIED``, ... from the ``{"errors": [...]}`` body) and ``Retry-After``.
* :func:`unreachable` turns a connection, DNS, TLS (an untrusted server certificate, a refused
  client certificate) or timeout failure into :class:`~remote_cache.errors.RegistryUnreachable`,
  temporary unless retrying cannot help soon; :func:`translated` applies it to a block. Every
  call of the client (``http.client`` in :mod:`.threaded`) runs inside :func:`translated`, in
  the transport or :mod:`.auth`.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ...errors import (
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    StoreError,
    causes,
    unsigned,
    without_secrets,
)
from ..credentials import PASS_CREDENTIALS, Credentials
from ..descriptor import parse_json
from ..stalls import Stalls
from .threaded import (
    BadRedirect,
    ConnectTimedOut,
    ProxyFailed,
    ProxyTimedOut,
    TooManyRedirects,
    WireAnswer,
    WriteTimedOut,
    origin_shown,
    sent_elsewhere,
    sent_to,
)
from .timeouts import Timeouts

__all__ = ["check_stalls", "error_for_response", "error_from_elsewhere", "translated", "unreachable"]


def _spec_errors(body: bytes) -> list[tuple[str, str]]:
    """``(code, message)`` pairs of a spec error body ``{"errors": [{"code", "message"}]}``."""
    try:
        data = parse_json(body)
        return [
            (str(e.get("code", "")), str(e.get("message", "")))
            for e in data.get("errors", [])
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError, TypeError):
        return []


def error_for_response(
    response: WireAnswer,
    *,
    host: str,
    credentials: Credentials | None,
    action: str,
    secrets: Iterable[str],
    place: str = "",
) -> StoreError:
    """The exception for an error response: auth (401/403), or RegistryError(status, code).

    ``action`` says what we tried (``"read manifest team/cache:npm"``) and starts the message;
    what the registry said goes in without ``secrets`` (it may echo the request). ``place`` names
    who answered when not the registry itself (its token realm).
    """
    status = response.status_code
    errors = _spec_errors(response.body)
    code = errors[0][0] if errors else ""
    said = _said(errors) or response.reason_phrase or ""
    detail = without_secrets(said, secrets)
    if status in (401, 403):
        if credentials is None:
            return RegistryAuthError(
                f"cannot {action}: registry {host} requires credentials ({status} {detail}); "
                f"pass {PASS_CREDENTIALS}, set REMOTE_CACHE_USERNAME/REMOTE_CACHE_PASSWORD "
                f"or run `docker login {host}`"
            )
        who = credentials.username or "<identity token>"
        if status == 403 or code == "DENIED":
            return RegistryAuthError(
                f"cannot {action}: registry {host} denied user {who!r} ({status} {detail}); "
                "check that this user may pull/push this repository"
            )
        return RegistryAuthError(
            f"cannot {action}: registry {host} refused the credentials for user {who!r} "
            f"({status} {detail}): check the username and password or token, or `docker login {host}`"
        )
    return RegistryError(
        f"cannot {action}: {place or f'registry {host}'} answered {status} {detail}",
        status=status,
        code=code,
        retry_after=response.headers.get("Retry-After"),
    )


#: An object store's XML error (S3, GCS, Azure): its code and message.
_STORAGE_ERROR = re.compile(rb"<Code>([^<]{1,100})</Code>(?:.*?<Message>([^<]*)</Message>)?", re.S)
#: What of a message from elsewhere is shown, at most.
_SHOWN_CHARS = 300


def error_from_elsewhere(response: WireAnswer, *, host: str, action: str) -> RegistryError:
    """The exception for an error answer from a place other than the registry that the registry
    sent the request to (its blob storage by a redirect; a host an upload ``Location`` or a
    ``Link`` named): it names that place and what it said, and gives no credential advice (ours
    go to the registry only). The status and a spec error code stay, so retries and missing
    blobs are told as from the registry."""
    status = response.status_code
    errors = _spec_errors(response.body)
    found = None if errors else _STORAGE_ERROR.search(response.body)
    if found is not None:
        said = ": ".join(part.decode(errors="replace") for part in found.groups() if part)
    else:
        said = _said(errors) or response.reason_phrase
    hint = (
        "; this tool's credentials go to the registry only (a URL the registry signed may have "
        "expired: is this machine's clock right?)"
        if status in (400, 401, 403)
        else ""
    )
    return RegistryError(
        # (What storage says may quote the signed URL it was sent: its signature is cut.)
        f"cannot {action}: {_elsewhere(origin_shown(response.url), host)} answered {status} "
        f"{_printable(unsigned(said))}{hint}",
        status=status,
        code=errors[0][0] if errors else "",
        retry_after=response.headers.get("Retry-After"),
    )


def _said(errors: list[tuple[str, str]]) -> str:
    """Spec errors as ``CODE: message; CODE`` ("" for none)."""
    return "; ".join(f"{c}: {m}" if m else c for c, m in errors)


def _elsewhere(place: str, host: str, sent: str = "the request") -> str:
    """A place registry ``host`` sent requests to, named in a message: ``X (where registry H sent
    the request)``."""
    return f"{place} (where registry {host} sent {sent})"


def _printable(text: str) -> str:
    """``text`` on one line of printable characters (a terminal's escapes, line breaks become
    spaces), cut to :data:`_SHOWN_CHARS` with "..." when longer."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= _SHOWN_CHARS else flat[: _SHOWN_CHARS - 3] + "..."


def unreachable(host: str, exc: BaseException, *, timeouts: Timeouts) -> RegistryUnreachable:
    """A :class:`RegistryUnreachable` naming ``host`` and the cause of ``exc`` — or, when the
    registry had redirected the request and it failed there (its blob storage), that place."""
    where = sent_to(exc)
    if where is None:
        return _unreachable(f"registry {host}", exc, timeouts)
    return _unreachable(
        _elsewhere(where, host),
        exc,
        timeouts,
        f"this machine must reach {where} too (a firewall or proxy letting the registry through may stop it)",
    )


def _unreachable(
    who: str, exc: BaseException, timeouts: Timeouts, reach: str | None = None
) -> RegistryUnreachable:
    """The error for ``who`` (``registry HOST``, or a place it redirected to); ``reach``: the
    advice when connecting there failed (a redirect's), if not the registry's own."""
    cause = str(exc) or type(exc).__name__
    phase = _timed_out(exc)
    if isinstance(exc, ProxyTimedOut):
        return RegistryUnreachable(
            f"cannot connect to {who} through the proxy {exc.proxy}: no answer within "
            f"{timeouts.connect:g}s (from the proxy, or from the place it connects to); check that "
            "the proxy runs, or HTTP(S)_PROXY, ALL_PROXY and NO_PROXY"
        )
    if phase is not None:
        message = _TIMEOUT_MESSAGES[phase].format(who=who, seconds=getattr(timeouts, phase))
        return RegistryUnreachable(f"{message}; {reach}" if phase == "connect" and reach else message)
    if isinstance(exc, ProxyFailed):  # its message says what to check
        return RegistryUnreachable(f"cannot connect to {who} {cause}", temporary=not exc.final)
    if isinstance(exc, ssl.SSLError | ConnectionRefusedError | socket.gaierror):
        # Refused, DNS, TLS: trying again only delays a clear error.
        if _is_client_certificate_refused(exc):
            return RegistryUnreachable(
                f"{who} refused the TLS connection ({cause}): it wants a client certificate "
                "it trusts; put it in the --cert-dir directory as NAME.cert with its key as NAME.key",
                temporary=False,
            )
        if _is_certificate_error(exc):
            return RegistryUnreachable(
                f"the TLS certificate of {who} is not trusted ({cause}); give its CA "
                "certificate with --cert-dir DIR (a directory of *.crt files), or skip verification "
                "with --tls-verify=false",
                temporary=False,
            )
        if _is_tls_error(exc):
            return RegistryUnreachable(
                f"TLS handshake with {who} failed ({cause}); if it serves plain HTTP, "
                "pass --plain-http (or --tls-verify=false)",
                temporary=False,
            )
        advice = reach or "check the address and that it is running"
        return RegistryUnreachable(f"cannot connect to {who} ({cause}); {advice}", temporary=False)
    # A URL http.client will not send (a redirect's): asking again gets the same URL.
    temporary = isinstance(exc, ConnectionError | http.client.HTTPException) and not isinstance(
        exc, http.client.InvalidURL
    )
    return RegistryUnreachable(
        f"connection to {who} failed ({type(exc).__name__}: {cause})", temporary=temporary
    )


#: What each wait that ran out says (the seconds are the :class:`Timeouts` field of that name).
_TIMEOUT_MESSAGES = {
    "connect": "{who}: connecting timed out after {seconds:g}s; is it up?",
    "read": "{who} stopped sending data for {seconds:g}s (read timeout)",
    "write": "{who} stopped accepting data for {seconds:g}s (write timeout)",
}


def _timed_out(exc: BaseException) -> str | None:
    """Which wait ``exc`` says ran out (a key of :data:`_TIMEOUT_MESSAGES`); None if no timeout."""
    if isinstance(exc, ConnectTimedOut):
        return "connect"
    if isinstance(exc, WriteTimedOut):
        return "write"
    return "read" if isinstance(exc, TimeoutError) else None  # a socket read in threaded.py


@contextmanager
def translated(
    host: str, timeouts: Timeouts, stalls: Stalls | None = None, *, elsewhere: str | None = None
) -> Iterator[None]:
    """Run a block of client calls; a client's error (a TLS alert included: a refused client
    certificate) leaves it as :func:`unreachable`'s exception.

    With ``stalls``, a timeout counts against the host's stall budget (:mod:`..stalls`): over
    it, the error is final; a block that completes is progress. ``elsewhere``: the URL the block
    sends to, when not the registry's (an upload ``Location`` or a ``Link`` naming another host).
    """
    try:
        yield
    except BaseException as exc:
        if elsewhere is not None and isinstance(exc, OSError | http.client.HTTPException):
            sent_elsewhere(exc, elsewhere)
        if _timed_out(exc) is not None:
            raise _stalled(host, exc, timeouts, stalls) from exc
        if isinstance(exc, TooManyRedirects | BadRedirect):  # final: asking again gets the same
            raise RegistryError(f"registry {host} {exc}") from exc
        if isinstance(exc, ssl.SSLError | OSError | http.client.HTTPException):
            # http.client's, in threaded.py (a sink's own errors come wrapped by
            # oci.store.guarded, which passes through).
            raise unreachable(host, exc, timeouts=timeouts) from exc
        raise
    if stalls is not None:
        stalls.progressed()


def _stalled(host: str, exc: BaseException, timeouts: Timeouts, stalls: Stalls | None) -> RegistryUnreachable:
    """A timeout as :func:`unreachable` says it; final once the host is over its stall budget."""
    error = unreachable(host, exc, timeouts=timeouts)
    if stalls is not None and not stalls.stalled(sent_to(exc)):
        error = RegistryUnreachable(stalls.gave_up(str(error)), temporary=False)
    return error


def check_stalls(host: str, stalls: Stalls) -> None:
    """Before a request: fail at once when the host has been stalled past its budget."""
    who = f"registry {host}" if stalls.place is None else _elsewhere(stalls.place, host, "requests")
    refusal = stalls.refusal(who)
    if refusal is not None:
        raise RegistryUnreachable(refusal, temporary=False)


#: TLS alerts a server sends when it wants a client certificate it trusts.
_CLIENT_CERTIFICATE_ALERTS = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED", "ALERT_UNKNOWN_CA")


def _is_client_certificate_refused(exc: BaseException) -> bool:
    return any(alert in str(e) for e in causes(exc) for alert in _CLIENT_CERTIFICATE_ALERTS)


def _is_certificate_error(exc: BaseException) -> bool:
    found = any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc))
    return found or "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _is_tls_error(exc: BaseException) -> bool:
    if any(isinstance(e, ssl.SSLError) for e in causes(exc)):
        return True
    text = str(exc).lower()
    return "ssl" in text or "certificate" in text or "tls" in text
