"""The HTTP layer of the registry client: scheme, timeouts, retries, auth handshake, redirects, errors.

One :class:`RegistryTransport` talks to one registry host over a pooled ``httpx.AsyncClient``:

* **Scheme**: https, unless the host is loopback or ``plain_http=True`` was asked.
* **Timeouts** on every phase (connect/read/write/pool), see :class:`Timeouts`.
* **Retries** (its own layer, under auth): 408/429/5xx and broken or timed-out connections are
  retried with exponential backoff and jitter, honouring ``Retry-After``, at most ``retries``
  times. Refused connections, DNS and TLS failures are not retried: they fail fast. Request
  bodies are always ``bytes``, so a retried request resends exactly the same body; callers
  turn retries off (``retry=False``) for steps of an upload session that cannot be replayed.
* **Auth** as challenge-response (like ``httpx.Auth``): the first request goes anonymous (or
  with a cached token); a 401's ``WWW-Authenticate`` selects ``Basic`` (credentials sent from
  then on) or ``Bearer realm,service,scope`` (a token fetched from the realm with the basic
  credentials, size-capped, cached per scope until it expires, refreshed on a second 401).
* **Redirects** (blob GETs to object storage) are followed by hand; ``Authorization`` is
  never sent to another origin.
* **Errors**: :func:`error_for_response` turns any error response into the one right
  exception (spec error codes such as ``MANIFEST_UNKNOWN``, ``DENIED``); :func:`unreachable`
  turns connection/DNS/TLS/timeout failures into :class:`RegistryUnreachable`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

import httpx

from . import __version__
from .credentials import PASS_CREDENTIALS, Credentials
from .errors import RegistryAuthError, RegistryError, RegistryUnreachable, StoreError
from .reference import is_loopback

__all__ = [
    "DEFAULT_TIMEOUTS",
    "RegistryTransport",
    "Timeouts",
    "error_for_response",
    "parse_challenge",
    "unreachable",
]

USER_AGENT = f"remote-cache/{__version__}"
_MAX_TOKEN_BODY = 1 << 20  # a token response is a few KiB; refuse to buffer more than 1 MiB
_MAX_ERROR_BODY = 64 << 10
_MAX_REDIRECTS = 5
_BODY_PIECE = 128 << 10  # request bodies bigger than this go out in slices this big
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_TOKEN_MARGIN = 10.0  # refresh a token this many seconds before it expires
_DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default when expires_in is absent


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed per phase of a request; ``read`` bounds each wait for more bytes."""

    connect: float = 10.0
    read: float = 60.0
    write: float = 60.0
    pool: float = 60.0

    @classmethod
    def of(cls, value: float | Timeouts | None) -> Timeouts:
        """``None`` -> defaults; a number -> that many seconds for every phase."""
        if value is None:
            return DEFAULT_TIMEOUTS
        if isinstance(value, Timeouts):
            return value
        return cls(connect=float(value), read=float(value), write=float(value), pool=float(value))

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


DEFAULT_TIMEOUTS = Timeouts()


# ------------------------------------------------------------------------------------------
# Errors


def _spec_errors(body: bytes) -> list[tuple[str, str]]:
    """``(code, message)`` pairs of a spec error body ``{"errors": [{"code", "message"}]}``."""
    try:
        data = json.loads(body)
        return [
            (str(e.get("code", "")), str(e.get("message", "")))
            for e in data.get("errors", [])
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError, TypeError):
        return []


def error_for_response(
    response: httpx.Response,
    body: bytes,
    *,
    host: str,
    credentials: Credentials | None,
    action: str,
) -> StoreError:
    """The exception for an error response: auth (401/403), or RegistryError(status, code).

    ``action`` says what we tried (``"read manifest team/cache:npm"``) and starts the message.
    """
    status = response.status_code
    errors = _spec_errors(body)
    code = errors[0][0] if errors else ""
    detail = "; ".join(f"{c}: {m}" if m else c for c, m in errors) or response.reason_phrase or ""
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
        f"cannot {action}: registry {host} answered {status} {detail}", status=status, code=code
    )


def unreachable(host: str, exc: BaseException, *, timeouts: Timeouts | None = None) -> RegistryUnreachable:
    """A :class:`RegistryUnreachable` naming ``host`` and the cause of ``exc``."""
    cause = str(exc) or type(exc).__name__
    t = timeouts or DEFAULT_TIMEOUTS
    if isinstance(exc, httpx.ConnectTimeout):
        return RegistryUnreachable(f"registry {host}: connecting timed out after {t.connect:g}s; is it up?")
    if isinstance(exc, httpx.ReadTimeout):
        return RegistryUnreachable(f"registry {host} stopped sending data for {t.read:g}s (read timeout)")
    if isinstance(exc, httpx.WriteTimeout):
        return RegistryUnreachable(f"registry {host} stopped accepting data for {t.write:g}s (write timeout)")
    if isinstance(exc, httpx.PoolTimeout):
        return RegistryUnreachable(f"registry {host}: no free connection within {t.pool:g}s (pool timeout)")
    if isinstance(exc, httpx.ConnectError):
        if _is_tls_error(exc):
            return RegistryUnreachable(
                f"TLS handshake with registry {host} failed ({cause}); if it serves plain HTTP, "
                "pass --plain-http"
            )
        return RegistryUnreachable(
            f"cannot connect to registry {host} ({cause}); check the address and that it is running"
        )
    return RegistryUnreachable(f"connection to registry {host} failed ({type(exc).__name__}: {cause})")


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    return "ssl" in text or "certificate" in text or "tls" in text


def _is_retryable_exception(exc: httpx.HTTPError) -> bool:
    if isinstance(exc, httpx.ConnectError):
        return False  # refused, DNS, TLS: retrying only delays a clear error
    return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


# ------------------------------------------------------------------------------------------
# Auth challenges and tokens


_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="...",service="..."`` into ``("bearer", {"realm": ..., ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3) or "").replace('\\"', '"')
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires_at: float


def _scope_key(scopes: Iterable[str]) -> str:
    return " ".join(sorted(set(scopes)))


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    parts = urlsplit(str(url))
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


# ------------------------------------------------------------------------------------------
# Transport


class _LazyTLS(httpx.AsyncBaseTransport):
    """The HTTPS transport of a client for a plain-HTTP registry, built on first use.

    httpx loads its CA bundle when a transport is made (~45 ms), a cost every command against a
    plain-HTTP registry paid for a redirect to HTTPS storage that rarely comes. This builds
    httpx's own default transport (same trust: SSL_CERT_FILE, SSL_CERT_DIR, else certifi, and
    the same verify flags) at the first HTTPS request, on the event loop (no await in between,
    so no race).
    """

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = httpx.AsyncHTTPTransport(limits=self._limits)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


async def _pieces(content: bytes) -> AsyncIterator[memoryview]:
    """``content`` in slices that a socket mostly takes whole.

    Handed one big buffer, asyncio sends what the socket takes, then copies the rest into its
    write buffer and shifts that buffer after every later send: copies under the GIL that
    measured ~1/5 of the main thread's time during a save's uploads.
    """
    view = memoryview(content)
    for start in range(0, len(view), _BODY_PIECE):
        yield view[start : start + _BODY_PIECE]


def _no_trust() -> ssl.SSLContext:
    # For the plain-HTTP transport, which never sees an https:// URL (those go to _LazyTLS):
    # a verifying context that trusts nothing, so it would fail closed if it ever did.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class RegistryTransport:
    """Authenticated, retrying HTTP to one registry host; safe for concurrent use.

    ``scopes`` passed per request are token scopes such as ``repository:team/cache:pull``;
    they only matter for Bearer registries.
    """

    def __init__(
        self,
        host: str,
        *,
        credentials: Credentials | None = None,
        plain_http: bool | None = None,
        timeout: float | Timeouts | None = None,
        retries: int = 3,
        client: httpx.AsyncClient | None = None,
        max_connections: int = 16,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_retry_after: float = 60.0,
    ) -> None:
        self.host = host
        self.credentials = credentials
        self.plain_http = is_loopback(host) if plain_http is None else plain_http
        self.scheme = "http" if self.plain_http else "https"
        self.base_url = f"{self.scheme}://{host}"
        self.timeouts = Timeouts.of(timeout)
        self._httpx_timeout = self.timeouts.to_httpx()  # per request, so an injected client obeys it too
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self._own_client = client is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        lazy_tls: dict[str, Any] = {}
        if self.plain_http:
            lazy_tls = {"verify": _no_trust(), "mounts": {"https://": _LazyTLS(limits)}}
        self._client = client or httpx.AsyncClient(
            timeout=self.timeouts.to_httpx(),
            limits=limits,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            **lazy_tls,
        )
        self._basic = False  # the registry asked for Basic: send it up front from now on
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        #: Number of tokens fetched from a realm (observable for tests and debugging).
        self.tokens_fetched = 0

    def url(self, path: str) -> str:
        """Absolute URL for ``path`` (``/v2/...``), or ``path`` itself if already absolute."""
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.base_url + "/", path.lstrip("/"))

    async def aclose(self) -> None:
        """Close the connection pool (only if this transport created the client)."""
        if self._own_client:
            await self._client.aclose()

    # -- public request API ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        scopes: Iterable[str] = (),
        action: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        ok: Iterable[int] = (200,),
        retry: bool = True,
    ) -> httpx.Response:
        """Send a request and read its body; raise the mapped error unless the status is in ``ok``."""
        async with self.stream(
            method,
            path,
            scopes=scopes,
            action=action,
            headers=headers,
            params=params,
            content=content,
            ok=ok,
            retry=retry,
        ) as response:
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                raise unreachable(self.host, exc, timeouts=self.timeouts) from exc
            return response

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        scopes: Iterable[str] = (),
        action: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        ok: Iterable[int] = (200,),
        retry: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """Like :meth:`request` but yields the response with its body unread (for blobs).

        Errors while reading the body are the caller's: translate them with :func:`unreachable`.
        """
        ok_set = frozenset(ok)
        scope_list = list(scopes)
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self._send_authenticated(
                    method, self.url(path), scope_list, action, headers, params, content
                )
            except httpx.HTTPError as exc:
                if last or not _is_retryable_exception(exc):
                    raise unreachable(self.host, exc, timeouts=self.timeouts) from exc
                await asyncio.sleep(self.backoff_delay(attempt, None))
                continue
            if response.status_code in ok_set:
                try:
                    yield response
                finally:
                    await response.aclose()
                return
            if response.status_code in _RETRY_STATUS and not last:
                delay = self.backoff_delay(attempt, response.headers.get("Retry-After"))
                await response.aclose()
                await asyncio.sleep(delay)
                continue
            body = await self._read_capped(response, _MAX_ERROR_BODY)
            raise error_for_response(
                response, body, host=self.host, credentials=self.credentials, action=action
            )
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises

    # -- retry ------------------------------------------------------------------------------

    def backoff_delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): ``Retry-After`` or backoff with jitter."""
        if retry_after:
            seconds: float | None = None
            try:
                seconds = float(retry_after)
            except ValueError:
                try:
                    seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
                except (TypeError, ValueError):
                    seconds = None
            if seconds is not None:
                return min(max(seconds, 0.0), self.max_retry_after)
        base = min(self.max_backoff, self.backoff * (2.0**attempt))
        return base * (0.5 + random.random() / 2)  # jitter: 50-100 % of the backoff

    # -- auth -------------------------------------------------------------------------------

    def _cached_token(self, scopes: list[str]) -> str | None:
        keys = [_scope_key(scopes)]
        # A pull,push token also serves pulls of the same repository.
        if len(scopes) == 1 and scopes[0].endswith(":pull"):
            keys.append(_scope_key([scopes[0] + ",push"]))
        now = time.monotonic()
        for key in keys:
            token = self._tokens.get(key)
            if token is not None and token.expires_at > now:
                return token.value
        return None

    def _auth_header(self, scopes: list[str]) -> str | None:
        token = self._cached_token(scopes)
        if token is not None:
            return f"Bearer {token}"
        if self._basic and self.credentials is not None and self.credentials.username:
            return self._basic_header()
        return None

    def _basic_header(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    async def _send_authenticated(
        self,
        method: str,
        url: str,
        scopes: list[str],
        action: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        content: bytes | None,
    ) -> httpx.Response:
        sent_auth = self._auth_header(scopes)
        response = await self._send(method, url, headers, params, content, sent_auth)
        if response.status_code != 401 or _origin(response.url) != _origin(self.base_url):
            return response
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, params_ = parse_challenge(challenge)
        if scheme == "basic":
            if (
                self.credentials is None
                or not self.credentials.username
                or (sent_auth is not None and sent_auth.startswith("Basic "))
            ):
                return response  # nothing (new) to offer: the caller maps the 401
            self._basic = True
        elif scheme == "bearer":
            realm = params_.get("realm")
            if not realm:
                return response
            await response.aclose()
            wanted = scopes or ([params_["scope"]] if params_.get("scope") else [])
            # A token we sent was refused (expired or revoked): fetch a fresh one.
            stale = sent_auth if sent_auth and sent_auth.startswith("Bearer ") else None
            await self._fetch_token(realm, params_.get("service", ""), wanted, action, stale)
        else:
            return response
        await response.aclose()
        return await self._send(method, url, headers, params, content, self._auth_header(scopes))

    async def _fetch_token(
        self, realm: str, service: str, scopes: list[str], action: str, stale: str | None
    ) -> None:
        key = _scope_key(scopes)
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            current = self._tokens.get(key)
            fresh = current is not None and current.expires_at > time.monotonic()
            if fresh and current is not None and (stale is None or f"Bearer {current.value}" != stale):
                return  # another task fetched or refreshed it while we waited
            self._tokens.pop(key, None)
            if urlsplit(realm).scheme not in ("http", "https"):
                raise RegistryAuthError(f"registry {self.host} sent an unusable token realm {realm!r}")
            if urlsplit(realm).scheme == "http" and not (
                self.plain_http or is_loopback(urlsplit(realm).netloc)
            ):
                raise RegistryAuthError(
                    f"registry {self.host} wants credentials sent to a plain-HTTP realm {realm}; refusing"
                )
            query: list[tuple[str, str | int | float | bool | None]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", s) for s in scopes)
            creds = self.credentials
            realm_host = urlsplit(realm).netloc
            try:
                if creds is not None and creds.identity_token:
                    form = {k: str(v) for k, v in query}
                    form.update(
                        grant_type="refresh_token",
                        refresh_token=creds.identity_token,
                        client_id="remote-cache",
                    )
                    form["scope"] = " ".join(scopes)
                    request = self._client.build_request(
                        "POST", realm, data=form, timeout=self._httpx_timeout
                    )
                else:
                    headers = {}
                    if creds is not None and creds.username:
                        headers["Authorization"] = self._basic_header()
                    request = self._client.build_request(
                        "GET", realm, params=query, headers=headers, timeout=self._httpx_timeout
                    )
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise unreachable(
                    f"{self.host} (token realm {realm_host})", exc, timeouts=self.timeouts
                ) from exc
            try:
                body = await self._read_capped(response, _MAX_TOKEN_BODY + 1)
            except StoreError:
                raise
            finally:
                await response.aclose()
            if response.status_code != 200:
                raise error_for_response(
                    response, body, host=self.host, credentials=self.credentials, action=action
                )
            if len(body) > _MAX_TOKEN_BODY:
                raise RegistryAuthError(f"the token realm of registry {self.host} sent an oversized answer")
            try:
                data: Any = json.loads(body)
                value = data.get("token") or data.get("access_token")
                expires_in = int(data.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
            except (ValueError, AttributeError, TypeError) as exc:
                raise RegistryAuthError(
                    f"the token realm of registry {self.host} sent no usable token"
                ) from exc
            if not isinstance(value, str) or not value:
                raise RegistryAuthError(f"the token realm of registry {self.host} sent no usable token")
            self.tokens_fetched += 1
            lifetime = max(expires_in - _TOKEN_MARGIN, 1.0)
            self._tokens[key] = _Token(value, time.monotonic() + lifetime)

    async def _read_capped(self, response: httpx.Response, cap: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                total += len(chunk)
                if total >= cap:
                    break
        except httpx.HTTPError as exc:
            raise unreachable(self.host, exc, timeouts=self.timeouts) from exc
        return b"".join(chunks)[:cap]

    # -- one exchange, following redirects ---------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        content: bytes | None,
        authorization: str | None,
    ) -> httpx.Response:
        home = _origin(self.base_url)
        hdrs = dict(headers or {})
        current = url
        for _hop in range(_MAX_REDIRECTS + 1):
            send_headers = dict(hdrs)
            if authorization is not None and _origin(current) == home:
                send_headers["Authorization"] = authorization
            body: bytes | AsyncIterator[bytes] | None = content
            if content is not None and len(content) > _BODY_PIECE:
                body = cast(AsyncIterator[bytes], _pieces(content))  # memoryviews do as bytes
                send_headers["Content-Length"] = str(len(content))
            request = self._client.build_request(
                method,
                current,
                headers=send_headers,
                params=params,
                content=body,
                timeout=self._httpx_timeout,
            )
            response = await self._client.send(request, stream=True)
            location = response.headers.get("Location")
            if response.status_code in _REDIRECT_STATUS and location and method in ("GET", "HEAD"):
                await response.aclose()
                current = urljoin(str(response.url), location)
                params = None  # the Location carries its own query
                continue
            return response
        raise RegistryError(f"registry {self.host} redirected more than {_MAX_REDIRECTS} times for {url}")
