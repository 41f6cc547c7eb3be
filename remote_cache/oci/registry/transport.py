"""HTTP to one registry host: scheme, timeouts, the auth handshake, redirects, retries, error mapping.

One :class:`RegistryTransport` talks to one registry host over ``http.client`` in worker
threads (:mod:`.threaded`: no GIL-bound event-loop hop per chunk; why, measured, is there).
Each request is answered with a :class:`~.threaded.WireAnswer`, and everything else is done
once, here:

* **Scheme**: https, unless the host is loopback or ``plain_http=True`` was asked. Under
  ``TlsOptions(verify=False)`` (skopeo's ``--tls-verify=false``) the first request finds out, as
  skopeo does: https if the registry speaks it, else plain http.
* **Certificates** (:mod:`..certs`): httpx 0.28's default trust (``SSL_CERT_FILE``/``SSL_CERT_DIR``,
  else certifi) plus the CAs of ``--cert-dir`` or the host's certs.d directory, whose client
  certificates are presented too; or no verification.
* **Timeouts** on every phase (connect/read/write), see :mod:`.timeouts`.
* **Auth** (:mod:`.auth`): the request goes out, a 401's challenge is answered, and the request
  is sent once more with the new credentials.
* **Redirects** (blob GETs to object storage) are followed by hand; ``Authorization`` is never
  sent to another origin.
* **Retries** (:mod:`.retry`) wrap each whole exchange, auth included. Request bodies are always
  ``bytes``, so a retried request resends exactly the same body; callers turn retries off
  (``retry=False``) for steps of an upload session that cannot be replayed.
* **Errors** (:mod:`.errors`): an answer outside ``ok`` raises the mapped error; the clients'
  exceptions become :class:`~remote_cache.errors.RegistryUnreachable`. Nothing of the client
  leaves this package.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar
from urllib.parse import urljoin

import anyio
import anyio.to_thread

from ...errors import ImageFormatError, RegistryError, RegistryUnreachable, StoreError
from ...version import TOOL
from ..certs import TlsOptions, default_context, tls_context
from ..credentials import Credentials
from ..media import MAX_DOCUMENT_BYTES
from ..reference import is_loopback
from ..stalls import Stalls
from ..store import guarded, sink_failures_as_themselves
from .auth import Authenticator
from .errors import check_stalls, error_from_elsewhere, translated
from .retry import RetryPolicy
from .threaded import (
    MAX_ERROR_BODY,
    Origin,
    Stopper,
    ThreadClient,
    WireAnswer,
    origin_of,
    resolved,
    with_query,
)
from .timeouts import Timeouts

__all__ = ["RegistryTransport"]

_T = TypeVar("_T")

#: Sends one request with the given ``Authorization`` header (or none): its answer, or None
#: when a body went to its sink whole.
_Send = Callable[[dict[str, str]], Awaitable[WireAnswer | None]]


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
        self.retry = RetryPolicy(max(0, retries), backoff, max_backoff, max_retry_after)
        self._tls_context = tls_context(host, self.tls)  # None: the default trust, built when needed
        self._tls_lock = threading.Lock()
        self._threads = ThreadClient(
            tls=self._tls,
            connect_timeout=self.timeouts.connect,
            read_timeout=self.timeouts.read,
            write_timeout=self.timeouts.write,
            user_agent=TOOL,
        )
        self.auth = Authenticator(
            host, credentials, plain_http=self.plain_http, send=self._send_token, timeouts=self.timeouts
        )

    def url(self, path: str) -> str:
        """Absolute URL for ``path`` (``/v2/...``), or ``path`` itself if already absolute."""
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.base_url + "/", path.lstrip("/"))

    async def aclose(self) -> None:
        """Close the connection pools."""
        self._threads.close()

    async def fetch_body(
        self,
        path: str,
        *,
        scopes: Iterable[str],
        action: str,
        offset: int,
        sink: Callable[[memoryview], None],
    ) -> None:
        """GET a blob's body (from ``offset`` on) into ``sink``, in a worker thread (:mod:`.threaded`).

        One attempt, as :meth:`request` makes: the auth handshake (a 401 is answered), the stall
        budget, and errors mapped at the one boundary. ``sink`` is called in the worker thread;
        its own exceptions leave unchanged. The caller retries and resumes.
        """
        await self._settle_scheme()
        url, stalls = self.url(path), self.stalls

        def arrived(chunk: memoryview) -> None:
            stalls.progressed()  # bytes are moving: a later stall starts a fresh budget
            sink(chunk)

        def send(headers: dict[str, str]) -> Awaitable[WireAnswer | None]:
            fetch = functools.partial(self._threads.fetch, url, headers, offset=offset, sink=guarded(arrived))
            return self._in_thread(fetch, url)

        answer = await self._answered(url, list(scopes), action, send)
        if answer is not None:
            raise self._error(answer, action)

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
        what: str | None = None,
    ) -> WireAnswer:
        """Send a request and read its (small) body; the mapped error unless its status is in
        ``ok``, ImageFormatError when an ``ok`` body is over the document limit (``what`` names
        it in the message)."""
        ok_set, scope_list = frozenset(ok), list(scopes)

        async def attempt() -> WireAnswer:
            await self._settle_scheme()
            url = self.url(path)
            target = with_query(url, params) if params else url

            def send(auth: dict[str, str]) -> Awaitable[WireAnswer | None]:
                exchange = functools.partial(
                    self._threads.exchange,
                    method,
                    target,
                    {**(headers or {}), **auth},
                    content=content,
                    limit=MAX_DOCUMENT_BYTES,
                )
                return self._in_thread(exchange, target)

            answer = await self._answered(url, scope_list, action, send)
            assert answer is not None  # only a body fetch hands its body elsewhere
            if answer.status_code not in ok_set:
                raise self._error(answer, action)
            return answer

        answer = await (self.retry.call(attempt) if retry else attempt())
        if len(answer.body) > MAX_DOCUMENT_BYTES:
            raise ImageFormatError(
                f"{what or f'the answer to {action}'} from registry {self.host} is larger than "
                f"{MAX_DOCUMENT_BYTES} bytes"
            )
        return answer

    def _error(self, answer: WireAnswer, action: str) -> StoreError:
        """The error for an answer that is not the one wanted: the registry's, or that of the
        place it sent the request to (a redirect's, a host a ``Location`` or ``Link`` named)."""
        if answer.origin != self._home():
            return error_from_elsewhere(answer, host=self.host, action=action)
        return self.auth.error(answer, action)

    def _home(self) -> Origin:
        """The registry's own origin: where credentials go (``base_url`` may move to plain HTTP)."""
        return origin_of(self.base_url)

    def resolve(self, base: str, reference: str, what: str) -> str:
        """``reference``, a ``Location`` or ``Link`` in the answer from ``base``, as an absolute
        URL; a RegistryError naming ``what`` it was when it is none (not quoted: it may hold a
        signature)."""
        url = resolved(base, reference)
        if url is None:
            raise RegistryError(f"registry {self.host} named something that is not a valid URL as {what}")
        return url

    async def _answered(self, url: str, scopes: list[str], action: str, send: _Send) -> WireAnswer | None:
        """``send`` with the credentials for ``scopes`` when ``url`` is the registry's own (an
        absolute ``Link`` or upload ``Location`` may name another host: it gets none); a 401 from
        the registry itself is answered (a token fetched, or Basic) and the request sent once more."""
        home = self._home()
        ours = origin_of(url) == home
        for challenge in (True, False):
            check_stalls(self.host, self.stalls)
            sent = self.auth.header(scopes) if ours else None
            answer = await send({"Authorization": sent} if sent is not None else {})
            challenged = answer is not None and answer.status_code == 401 and answer.origin == home
            if challenged and challenge:
                assert answer is not None
                if await self.auth.answer(answer.headers.get("WWW-Authenticate") or "", scopes, sent, action):
                    continue
            return answer
        raise AssertionError("unreachable: the second pass returns")

    async def _in_thread(self, call: Callable[..., _T], url: str | None = None) -> _T:
        """``call(stopper=...)`` in a worker thread, its network errors translated (naming ``url``'s
        host when that is not the registry's); a sink's own failure leaves as itself."""
        elsewhere = url if url is not None and origin_of(url) != self._home() else None
        with (
            sink_failures_as_themselves(),
            translated(self.host, self.timeouts, self.stalls, elsewhere=elsewhere),
        ):
            return await _run_stoppable(call)

    async def _send_token(
        self, method: str, url: str, headers: Mapping[str, str], form: bytes | None, cap: int
    ) -> WireAnswer:
        """A token request for :mod:`.auth`, which translates its errors (naming the realm)."""
        exchange = functools.partial(self._threads.exchange, method, url, headers, content=form, limit=cap)
        return await _run_stoppable(exchange)

    def _tls(self) -> ssl.SSLContext:
        """This host's TLS context: :func:`~..certs.tls_context`'s, else the default trust, built
        at the first TLS connection (from worker threads)."""
        with self._tls_lock:
            if self._tls_context is None:
                self._tls_context = default_context()
            return self._tls_context

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
        ping = functools.partial(self._threads.exchange, "GET", f"{base_url}/v2/", {}, limit=MAX_ERROR_BODY)
        answer = await self._in_thread(ping)
        return answer.status_code


async def _run_stoppable(call: Callable[..., _T]) -> _T:
    """``call(stopper=...)`` in a worker thread; cancelled (a signal, a deadline), stop it at once —
    its socket shut down, not waited on for a stall timeout — and, if it was handing bytes to a
    sink, wait until it no longer does (one still connecting is abandoned: it writes nothing)."""
    stopper = Stopper()
    try:
        return await anyio.to_thread.run_sync(
            functools.partial(call, stopper=stopper), abandon_on_cancel=True
        )
    except anyio.get_cancelled_exc_class():
        if stopper.stop():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(stopper.done.wait)
        raise
