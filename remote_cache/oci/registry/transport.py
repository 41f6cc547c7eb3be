"""HTTP to one registry host: scheme, timeouts, the auth handshake, redirects, retries, error mapping.

One :class:`RegistryTransport` talks to one registry host over a pooled ``httpx.AsyncClient``:

* **Scheme**: https, unless the host is loopback or ``plain_http=True`` was asked. Under
  ``TlsOptions(verify=False)`` (skopeo's ``--tls-verify=false``) the first request finds out, as
  skopeo does: https if the registry speaks it, else plain http.
* **Certificates** (:mod:`..certs`): httpx's default trust (``SSL_CERT_FILE``/``SSL_CERT_DIR``,
  else certifi) plus the CAs of ``--cert-dir`` or the host's certs.d directory, whose client
  certificates are presented too; or no verification.
* **Timeouts** on every phase (connect/read/write/pool), see :mod:`.timeouts`.
* **Auth** (:mod:`.auth`): the request goes out, a 401's challenge is answered, and the request
  is sent once more with the new credentials.
* **Redirects** (blob GETs to object storage) are followed by hand; ``Authorization`` is never
  sent to another origin.
* **Retries** (:mod:`.retry`) wrap each whole exchange, auth included. Request bodies are always
  ``bytes``, so a retried request resends exactly the same body; callers turn retries off
  (``retry=False``) for steps of an upload session that cannot be replayed.
* **Errors** (:mod:`.errors`): an answer outside ``ok`` raises the mapped error; httpx's
  exceptions, on sending and on reading a body (:class:`RegistryResponse`), become
  :class:`~remote_cache.errors.RegistryUnreachable`. Nothing of httpx leaves this module.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urljoin, urlsplit

import anyio
import anyio.to_thread
import httpx

from ...errors import ImageFormatError, RegistryError, RegistryUnreachable
from ...version import TOOL
from ..certs import TlsOptions, find_cert_dir
from ..credentials import Credentials
from ..media import MAX_DOCUMENT_BYTES
from ..reference import is_loopback
from ..stalls import Stalls
from ..store import SinkFailed
from .auth import Authenticator, read_capped
from .errors import check_stalls, error_for_response, translated
from .retry import RetryPolicy
from .timeouts import Timeouts

if TYPE_CHECKING:
    from .bodies import BodyClient, Stopper

__all__ = ["RegistryResponse", "RegistryTransport"]

_T = TypeVar("_T")

_BODY_PIECE = 128 << 10  # request bodies bigger than this go out in slices this big

# Redirects and error answers, read the same way by :mod:`.bodies`.
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 5
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})

#: Scheme, lower-case host name and port: where ``Authorization`` may go.
Origin = tuple[str, str, int]


def origin_of(url: str | httpx.URL) -> Origin:
    parts = urlsplit(str(url))
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class _LazyTLS(httpx.AsyncBaseTransport):
    """The HTTPS transport of a client for a plain-HTTP registry, built on first use.

    httpx loads its CA bundle when a transport is made (~45 ms), a cost every command against a
    plain-HTTP registry paid for a redirect to HTTPS storage that rarely comes. This builds
    httpx's own default transport (same trust: SSL_CERT_FILE, SSL_CERT_DIR, else certifi, and
    the same verify flags) at the first HTTPS request, on the event loop (no await in between,
    so no race).
    """

    def __init__(self, limits: httpx.Limits, verify: ssl.SSLContext | bool) -> None:
        self._limits = limits
        self._verify = verify
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = httpx.AsyncHTTPTransport(limits=self._limits, verify=self._verify)
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


def _verify(host: str, tls: TlsOptions) -> ssl.SSLContext | bool:
    """What httpx verifies with: True (its default trust, built by httpx) when nothing is added;
    else that same trust (or none) plus the host's certificate directory."""
    certs = find_cert_dir(host, tls)
    if certs is None and tls.verify:
        return True
    context = httpx.create_ssl_context(verify=tls.verify)
    if certs is not None:
        certs.load_into(context)
    return context


def _no_trust() -> ssl.SSLContext:
    # For the plain-HTTP transport, which never sees an https:// URL (those go to _LazyTLS):
    # a verifying context that trusts nothing, so it would fail closed if it ever did.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class RegistryResponse:
    """A registry's answer whose body reads raise only our errors (see the module docstring)."""

    def __init__(self, response: httpx.Response, transport: RegistryTransport) -> None:
        self._response = response
        self._transport = transport
        self.status: int = response.status_code
        self.headers: Mapping[str, str] = response.headers
        #: The URL that answered (after redirects): relative ``Location``/``Link`` resolve against it.
        self.url = str(response.url)
        self.content = b""

    async def read(self, *, limit: int = MAX_DOCUMENT_BYTES, what: str = "the answer") -> bytes:
        """The whole body; ImageFormatError when it is over ``limit`` bytes."""
        with translated(self._transport.host, self._transport.timeouts, self._transport.stalls):
            body = await read_capped(self._response, limit + 1)
        if len(body) > limit:
            raise ImageFormatError(
                f"{what} from registry {self._transport.host} is larger than {limit} bytes"
            )
        self.content = body
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, as stored: raw bytes, decoded only if the server encoded them anyway."""
        encoded = self.headers.get("Content-Encoding", "identity") != "identity"
        with translated(self._transport.host, self._transport.timeouts, self._transport.stalls):
            async for chunk in self._response.aiter_bytes() if encoded else self._response.aiter_raw():
                yield chunk


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
        tls: TlsOptions | None = None,
    ) -> None:
        self.host = host
        self.tls = tls or TlsOptions()
        #: --tls-verify=false: whether the registry speaks TLS is found out by the first request.
        self._scheme_unknown = not self.tls.verify and plain_http is not True
        self._scheme_lock = asyncio.Lock()
        if self._scheme_unknown:
            self.plain_http = False
        else:
            self.plain_http = is_loopback(host) if plain_http is None else plain_http
        self.base_url = f"{'http' if self.plain_http else 'https'}://{host}"
        self.timeouts = Timeouts.of(timeout)
        #: The host's stall budget, shared by every request (see :mod:`..stalls`).
        self.stalls = Stalls(self.timeouts.read)
        self._httpx_timeout = self.timeouts.to_httpx()  # per request, so an injected client obeys it too
        self.retry = RetryPolicy(max(0, retries), backoff, max_backoff, max_retry_after)
        self._own_client = client is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        verify = _verify(host, self.tls)
        tls_setup: dict[str, Any] = {"verify": verify}
        if self.plain_http:
            tls_setup = {"verify": _no_trust(), "mounts": {"https://": _LazyTLS(limits, verify)}}
        self._client = client or httpx.AsyncClient(
            timeout=self._httpx_timeout,
            limits=limits,
            follow_redirects=False,
            headers={"User-Agent": TOOL},
            **tls_setup,
        )
        self.auth = Authenticator(
            host, credentials, plain_http=self.plain_http, client=self._client, timeouts=self.timeouts
        )
        self._verify_with = verify
        self._bodies: BodyClient | None = None

    @property
    def credentials(self) -> Credentials | None:
        """The credentials requests are made with, if any."""
        return self.auth.credentials

    def url(self, path: str) -> str:
        """Absolute URL for ``path`` (``/v2/...``), or ``path`` itself if already absolute."""
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.base_url + "/", path.lstrip("/"))

    async def aclose(self) -> None:
        """Close the connection pools (httpx's only if this transport created the client)."""
        if self._bodies is not None:
            self._bodies.close()
        if self._own_client:
            await self._client.aclose()

    async def fetch_body(
        self,
        path: str,
        *,
        scopes: Iterable[str],
        action: str,
        offset: int,
        sink: Callable[[memoryview], None],
    ) -> None:
        """GET a blob's body (from ``offset`` on) into ``sink``, in a worker thread (:mod:`.bodies`).

        One attempt, as :meth:`stream` makes: the auth handshake (a 401 is answered here, with the
        httpx client), the stall budget, and errors mapped at the one boundary. ``sink`` is called
        in the worker thread; its own exceptions leave unchanged. The caller retries and resumes.
        """
        from .bodies import Stopper  # here: only a restore needs bodies.py

        await self._settle_scheme()
        url, scope_list = self.url(path), list(scopes)
        home = origin_of(self.base_url)
        stalls = self.stalls

        def arrived(chunk: memoryview) -> None:
            stalls.progressed()  # bytes are moving: a later stall starts a fresh budget
            try:
                sink(chunk)
            except BaseException as exc:  # past translated() below as itself, not as the network's
                raise SinkFailed() from exc

        for challenge in (True, False):
            check_stalls(self.host, self.stalls)
            sent = self.auth.header(scope_list)
            stopper = Stopper()
            fetch = functools.partial(
                self._body_client().fetch,
                url,
                {"Authorization": sent} if sent is not None else {},
                offset=offset,
                sink=arrived,
                stopper=stopper,
            )
            sink_error: BaseException | None = None
            with translated(self.host, self.timeouts, self.stalls):
                try:
                    answer = await _run_stoppable(fetch, stopper)
                except SinkFailed as exc:
                    sink_error = exc.__cause__
            if sink_error is not None:
                raise sink_error
            if answer is None:
                return
            if answer.status_code == 401 and challenge and answer.origin == home:
                challenge_header = answer.headers.get("WWW-Authenticate") or ""
                if await self.auth.answer(challenge_header, scope_list, sent, action):
                    continue
            raise error_for_response(
                answer, answer.body, host=self.host, credentials=self.credentials, action=action
            )

    def _body_client(self) -> BodyClient:
        from .bodies import BodyClient

        if self._bodies is None:
            verify = self._verify_with

            def tls() -> ssl.SSLContext:
                # The same trust as httpx's transport for this host (see _verify).
                return verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context()

            self._bodies = BodyClient(
                tls=tls,
                connect_timeout=self.timeouts.connect,
                read_timeout=self.timeouts.read,
                user_agent=TOOL,
            )
        return self._bodies

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
    ) -> RegistryResponse:
        """Send a request and read its (small) body into ``content``; the mapped error unless in ``ok``."""
        async with self.stream(
            method, path, scopes=scopes, action=action, headers=headers, params=params,
            content=content, ok=ok, retry=retry,
        ) as response:  # fmt: skip
            await response.read(what=f"the answer to {action}")
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
    ) -> AsyncIterator[RegistryResponse]:
        """Like :meth:`request` but yields the response with its body unread (for blobs)."""
        ok_set, scope_list = frozenset(ok), list(scopes)

        async def exchange() -> httpx.Response:
            await self._settle_scheme()
            url = self.url(path)
            return await self._exchange(method, url, scope_list, action, headers, params, content, ok_set)

        response = await (self.retry.call(exchange) if retry else exchange())
        try:
            yield RegistryResponse(response, self)
        finally:
            await response.aclose()

    async def _settle_scheme(self) -> None:
        """Under --tls-verify=false, once: keep https if the registry answers over TLS, else use
        plain http if a registry answers there (``/v2/`` with 200 or 401, as skopeo checks)."""
        if not self._scheme_unknown:
            return
        async with self._scheme_lock:
            if not self._scheme_unknown:
                return
            try:
                await self._ping(self.base_url)
            except RegistryUnreachable as over_tls:
                plain = f"http://{self.host}"
                try:
                    status = await self._ping(plain)
                except RegistryUnreachable:
                    raise over_tls from None
                if status not in (200, 401):
                    raise over_tls from None
                self.plain_http = self.auth.plain_http = True
                self.base_url = plain
            self._scheme_unknown = False

    async def _ping(self, base_url: str) -> int:
        """The status of ``GET /v2/`` at ``base_url``; RegistryUnreachable when nothing answers."""
        check_stalls(self.host, self.stalls)
        with translated(self.host, self.timeouts, self.stalls):
            request = self._client.build_request("GET", f"{base_url}/v2/", timeout=self._httpx_timeout)
            response = await self._client.send(request, stream=True)
            await response.aclose()
        return response.status_code

    async def _exchange(
        self,
        method: str,
        url: str,
        scopes: list[str],
        action: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        content: bytes | None,
        ok: frozenset[int],
    ) -> httpx.Response:
        """One attempt: send, answer an auth challenge once; the open response if its status is ``ok``."""
        check_stalls(self.host, self.stalls)
        with translated(self.host, self.timeouts, self.stalls):
            sent = self.auth.header(scopes)
            response = await self._send(method, url, headers, params, content, sent)
            if response.status_code == 401 and origin_of(response.url) == origin_of(self.base_url):
                # Read and release the 401 first: fetching a token must not hold a pooled connection.
                body = await self._drain(response)
                if not await self.auth.answer(
                    response.headers.get("WWW-Authenticate", ""), scopes, sent, action
                ):
                    raise error_for_response(
                        response, body, host=self.host, credentials=self.credentials, action=action
                    )
                response = await self._send(method, url, headers, params, content, self.auth.header(scopes))
            if response.status_code in ok:
                return response
            body = await self._drain(response)
        raise error_for_response(response, body, host=self.host, credentials=self.credentials, action=action)

    @staticmethod
    async def _drain(response: httpx.Response) -> bytes:
        """The (capped) body of an answer we will not use further, then the answer closed."""
        try:
            return await read_capped(response, MAX_ERROR_BODY)
        finally:
            await response.aclose()

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        content: bytes | None,
        authorization: str | None,
    ) -> httpx.Response:
        """One exchange, following redirects of GET and HEAD (``Authorization`` stays home)."""
        home = origin_of(self.base_url)
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers or {})
            if authorization is not None and origin_of(current) == home:
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
            if response.status_code in REDIRECT_STATUS and location and method in ("GET", "HEAD"):
                await response.aclose()
                current = urljoin(str(response.url), location)
                params = None  # the Location carries its own query
                continue
            return response
        raise RegistryError(f"registry {self.host} redirected more than {MAX_REDIRECTS} times for {url}")


async def _run_stoppable(fetch: Callable[[], _T], stopper: Stopper) -> _T:
    """``fetch()`` in a worker thread; cancelled (a signal, a deadline), stop it at once — its
    socket shut down, not waited on for a stall timeout — and wait until it no longer writes."""
    try:
        return await anyio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stopper.stop()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stopper.done.wait)
        raise
