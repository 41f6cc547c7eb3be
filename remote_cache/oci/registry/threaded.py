"""Registry requests over the standard library's ``http.client``, each in a worker thread.

Receiving a body through httpx on the event loop cost about 3.8 CPU-seconds per GB: every chunk
is a task wake-up that must win the GIL back. ``http.client`` reading with ``readinto`` into a
1 MiB buffer costs about 0.4, and the thread that reads also hashes and writes the bytes (all
three release the GIL). Sending did no better: httpx took 0.17-0.34 CPU-seconds to upload the
43 blobs of a 70 MB cache, this client 0.08-0.11. And importing httpx (and httpcore, and anyio's
sockets when it first connects) cost every command ~0.07 s before any work. So every registry
request is made here: blob bodies (:meth:`ThreadClient.fetch`, into a sink), and everything
else (:meth:`ThreadClient.exchange`, the answer read whole but capped): manifests, tag lists,
``HEAD`` checks, ``/v2/`` pings, token requests, uploads. The registry transport keeps the
rest: it picks the URL and the ``Authorization`` header (answering a 401), retries and resumes,
and maps errors (:mod:`.errors`).

What a request here does, as httpx did: follows redirects of ``GET`` and ``HEAD`` itself
(``Authorization`` never goes to another origin), asks for ``Range: bytes=N-`` when resuming (a
server that ignores it is skipped to N), asks for the stored bytes (``Accept-Encoding:
identity``) but decodes gzip or deflate if a proxy compressed anyway, goes through
``HTTPS_PROXY``/``HTTP_PROXY`` unless ``NO_PROXY`` says otherwise (CONNECT tunnels for https;
TLS to the proxy too when its URL is ``https://``, see :mod:`.proxytls`),
reuses kept-alive connections per origin, and waits at most the stall timeout for each read
and for each ``send`` of a request body (not for the whole body: a slow uplink is not a stall).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import unquote, urlencode, urljoin, urlsplit

from msgspec import Struct, field

from ..certs import default_context

__all__ = [
    "MAX_ERROR_BODY",
    "BadRedirect",
    "ConnectTimedOut",
    "Origin",
    "ProxyFailed",
    "ProxyTimedOut",
    "Stopper",
    "ThreadClient",
    "TunnelConnection",
    "WireAnswer",
    "WriteTimedOut",
    "origin_of",
    "origin_shown",
    "resolved",
    "sent_elsewhere",
    "sent_to",
    "with_query",
]

MAX_ERROR_BODY = 64 << 10
_MAX_REDIRECTS = 5
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})

#: What makes the final answer of a request (:meth:`ThreadClient._run`) out of the response.
_Take = Callable[[http.client.HTTPResponse, str], "WireAnswer | None"]
#: The attribute a failed request's exception gets naming where it went, not the registry.
_SENT_TO = "remote_cache_sent_to"

#: Scheme, lower-case host name and port: where ``Authorization`` may go.
Origin = tuple[str, str, int]


def with_query(url: str, params: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """``url`` with ``params`` appended to its query (what is there stays byte for byte: an
    upload ``Location``'s state is opaque, and a token realm may carry its own parameters)."""
    return url + ("&" if urlsplit(url).query else "?") + urlencode(params)


def origin_of(url: str) -> Origin:
    parts = urlsplit(str(url))
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class ConnectTimedOut(TimeoutError):
    """No connection within the connect timeout (a read that times out raises TimeoutError)."""


class ProxyTimedOut(ConnectTimedOut):
    """The connect timeout ran out before the proxy's tunnel or TLS was up: the proxy (or the
    registry it connects to) did not answer. ``proxy``: its URL as it may be shown."""

    def __init__(self, message: str, *, proxy: str) -> None:
        super().__init__(message)
        self.proxy = proxy


class ProxyFailed(ConnectionError):
    """The proxy from the environment could not be used: not a valid URL or not an HTTP(S) one,
    not reached, not speaking HTTP, not trusted (TLS), or it would not open the tunnel; the
    registry behind it was never asked. ``final``: asking again is no use (refused, not found, a
    4xx to CONNECT, a bad URL, an untrusted certificate)."""

    def __init__(self, message: str, *, final: bool) -> None:
        super().__init__(message)
        self.final = final


class TunnelConnection(http.client.HTTPSConnection):
    """HTTPS through a proxy's CONNECT tunnel, knowing whether the tunnel opened: what fails
    before is the proxy's doing, what fails after (the TLS handshake) the other end's."""

    tunnelled = False

    def _tunnel(self) -> None:  # http.client's step between the proxy's TCP and the TLS
        super()._tunnel()  # type: ignore[misc]
        self.tunnelled = True


class WriteTimedOut(TimeoutError):
    """A request body that the other end took no byte of within the timeout."""


class TooManyRedirects(http.client.HTTPException):
    """More than ``_MAX_REDIRECTS`` redirects: an answer, not a network failure to retry."""


class BadRedirect(http.client.HTTPException):
    """A redirect to something that is not a URL: an answer, not a network failure to retry."""


_BUFFER = 1 << 20  # blob bodies: bytes per read
_SMALL_BUFFER = 64 << 10  # documents, error answers
# Request bodies up to this size go out with the head in one send; bigger ones a slice at a time,
# each send() waiting at most the write timeout (sendall's timeout bounds the whole body, and so
# does an SSLSocket's send(), which writes all it is given under one deadline).
_SMALL_BODY = 64 << 10
_SEND_SLICE = 256 << 10


class _Headers(dict[str, str]):
    """Response headers looked up by any spelling of their names (Go servers send
    ``Www-Authenticate``); repeated headers are joined with ", " as httpx does."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            super().__setitem__(key, f"{super().__getitem__(key)}, {value}" if key in self else value)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


class WireAnswer(Struct):
    """An answer read here: its status, headers, (capped) body, and the URL that gave it."""

    status_code: int
    reason_phrase: str
    headers: Mapping[str, str]
    body: bytes
    #: The URL that answered (after redirects): relative ``Location``/``Link`` resolve against it.
    url: str

    @property
    def origin(self) -> Origin:
        return origin_of(self.url)


class _Conn(Struct):
    """A connection, and how requests go over it (through a plain-HTTP proxy: whole URLs)."""

    http: http.client.HTTPConnection
    absolute: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def target(self, url: str) -> str:
        if self.absolute:
            return url
        parts = urlsplit(url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


_PoolKey = tuple[Origin, str]


class _Pool(Struct):
    """Idle kept-alive connections per origin (and proxy), shared by the worker threads."""

    idle: dict[_PoolKey, list[_Conn]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def take(self, key: _PoolKey) -> _Conn | None:
        with self.lock:
            conns = self.idle.get(key)
            return conns.pop() if conns else None

    def give(self, key: _PoolKey, conn: _Conn) -> None:
        with self.lock:
            if not self.closed:
                self.idle.setdefault(key, []).append(conn)
                return
        conn.http.close()  # an abandoned request that finished after the close

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for conns in self.idle.values():
                for conn in conns:
                    conn.http.close()
            self.idle.clear()


class Stopper:
    """Stops a request from another thread: between reads, and in a read (its socket is shut down).

    A read can wait the whole stall timeout for bytes; a signal must not wait that long. A
    request still connecting (DNS, TCP, TLS: no socket to shut down yet) is abandoned: it may
    finish later, but it will never hand bytes to a sink (see :meth:`deliver`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._started = False
        self._delivering = False
        self._sock: socket.socket | None = None
        #: Set when the fetch has returned or raised, or was stopped before it began: either way
        #: no thread touches the sink any more.
        self.done = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the request: it may not start once stopped (a cancelled worker thread may never
        run it, and then nobody else would set ``done``); ``done`` is set when it ends."""
        with self._lock:
            self.check()
            self._started = True
        try:
            yield
        finally:
            self.done.set()

    def attach(self, conn: http.client.HTTPConnection) -> None:
        """Watch ``conn``'s socket (kept here: http.client drops ``conn.sock`` when an answer says
        ``Connection: close``, while the answer still reads from it)."""
        with self._lock:
            self._sock = conn.sock
            stopped = self._stopped
        if stopped:
            self._shut(conn.sock)

    def deliver(self) -> None:
        """Called before the first byte goes to a sink: not once stopped; once called, a stop
        waits for ``done`` (the sink's owner must know that nothing writes any more)."""
        with self._lock:
            self.check()
            self._delivering = True

    def check(self) -> None:
        """InterruptedError once stopped."""
        if self._stopped:
            raise InterruptedError("the download was stopped")

    def stop(self) -> bool:
        """Stop the request; True when it is handing bytes to a sink (then wait for ``done``,
        which comes soon: its socket is shut down), False when it may simply be abandoned."""
        with self._lock:
            self._stopped = True
            sock = self._sock
            if not self._started:
                self.done.set()
            delivering = self._delivering
        self._shut(sock)
        return delivering

    @staticmethod
    def _shut(sock: socket.socket | None) -> None:
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


#: A kept-alive connection the server has closed meanwhile fails like this on its next request
#: (under TLS, a write into a reset connection is an SSLEOFError).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)


class ThreadClient:
    """Requests to a registry and wherever it redirects, each run whole in the calling (worker)
    thread; the kept-alive connections are shared (see the module docstring)."""

    def __init__(
        self,
        *,
        tls: Callable[[], ssl.SSLContext],
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        user_agent: str,
    ) -> None:
        self._tls = tls  # built on first use: loading CAs costs ~45 ms
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._user_agent = user_agent
        self._pool = _Pool()
        self._proxy_context: ssl.SSLContext | None = None  # an https:// proxy's trust, on first use
        self._proxy_context_lock = threading.Lock()

    def close(self) -> None:
        self._pool.close()

    def fetch(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        offset: int,
        sink: Callable[[memoryview], None],
        stopper: Stopper,
    ) -> WireAnswer | None:
        """GET ``url`` (from ``offset`` on) into ``sink``; None when the body went there whole,
        else the answer that was not a body (an error, a 401 to answer). Network failures raise
        the standard library's exceptions, and ``sink``'s own leave unchanged; ``stopper`` stops
        it from another thread."""

        def take(response: http.client.HTTPResponse, url: str) -> WireAnswer | None:
            if response.status not in (200, 206):
                return _answer(response, url, response.read(MAX_ERROR_BODY))
            skip = offset if response.status == 200 else _resumed_skip(response, offset)
            stopper.deliver()
            _copy(response, skip, sink, stopper.check)
            return None

        send = dict(headers)
        if offset:
            send["Range"] = f"bytes={offset}-"
        with stopper.running():
            return self._run("GET", url, send, None, stopper, take)

    def exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        content: bytes | None = None,
        limit: int,
        stopper: Stopper,
    ) -> WireAnswer:
        """One request and its answer, the body read whole up to ``limit + 1`` bytes (more is not
        read: the caller sees it is over). Redirects of GET and HEAD are followed. Failures raise
        as in :meth:`fetch`."""

        def take(response: http.client.HTTPResponse, url: str) -> WireAnswer:
            return _answer(response, url, _read_capped(response, limit + 1, stopper.check))

        with stopper.running():
            answer = self._run(method, url, dict(headers), content, stopper, take)
        assert answer is not None
        return answer

    def _run(
        self,
        method: str,
        url: str,
        send: dict[str, str],
        content: bytes | None,
        stopper: Stopper,
        take: _Take,
    ) -> WireAnswer | None:
        """Send, following redirects of GET and HEAD, and hand the final answer to ``take``; its
        connection goes back to the pool when ``take`` read the answer to its end."""
        home = origin_of(url)
        send.update({"User-Agent": self._user_agent, "Accept-Encoding": "identity"})
        for _hop in range(_MAX_REDIRECTS + 1):
            away = origin_of(url) != home
            if away:
                send.pop("Authorization", None)  # never to another origin
            try:
                answer, onward = self._hop(method, url, send, content, stopper, take)
            except (OSError, http.client.HTTPException) as exc:
                if away:  # the registry answered; the place it sent the request to did not
                    sent_elsewhere(exc, url)
                raise
            if onward is None:
                return answer
            url = onward
        raise TooManyRedirects(f"redirected more than {_MAX_REDIRECTS} times, the last time to {_shown(url)}")

    def _hop(
        self,
        method: str,
        url: str,
        send: dict[str, str],
        content: bytes | None,
        stopper: Stopper,
        take: _Take,
    ) -> tuple[WireAnswer | None, str | None]:
        """One request of :meth:`_run`: the answer ``take`` made of it, or the URL a redirect
        sends it on to. Its connection goes back to the pool when the answer was read to its end."""
        stopper.check()
        try:
            key, conn, response = self._send(method, url, send, content, stopper)
        except http.client.InvalidURL:  # its message quotes the URL, a signed query too
            raise http.client.InvalidURL(f"cannot send a request to {_shown(url)}: not a valid URL") from None
        read_whole = False
        try:
            location = response.getheader("Location")
            if method in ("GET", "HEAD") and response.status in _REDIRECT_STATUS and location:
                response.read(MAX_ERROR_BODY)
                read_whole = True
                onward = resolved(url, location)
                if onward is None:  # (not quoted: it may hold a signature, and cannot be split)
                    raise BadRedirect("redirected to something that is not a valid URL")
                return None, onward
            answer = take(response, url)
            read_whole = True
            return answer, None
        finally:
            # A body cut short is closed by http.client too: only an answer read to its end
            # leaves a connection fit for the next request.
            if read_whole and response.isclosed() and not response.will_close:
                self._pool.give(key, conn)
            else:
                conn.http.close()

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], content: bytes | None, stopper: Stopper
    ) -> tuple[_PoolKey, _Conn, http.client.HTTPResponse]:
        """Send on a kept-alive connection, or a new one when that one has gone stale."""
        key = self._key(url)
        pooled = self._pool.take(key)
        if pooled is not None:
            try:
                return key, pooled, self._request(pooled, method, url, headers, content, stopper)
            except _STALE:
                pass  # closed: a new connection it is
        conn = self._connect(url, key)
        return key, conn, self._request(conn, method, url, headers, content, stopper)

    def _request(
        self,
        conn: _Conn,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        stopper: Stopper,
    ) -> http.client.HTTPResponse:
        """The answer (its head read) to a request over ``conn``; ``conn`` closed if that fails."""
        stopper.attach(conn.http)
        sending = {**headers, **conn.headers}
        try:
            if content is None or len(content) <= _SMALL_BODY:
                conn.http.request(method, conn.target(url), body=content, headers=sending)
            else:
                names = {name.lower() for name in sending}
                conn.http.putrequest(
                    method, conn.target(url), skip_accept_encoding="accept-encoding" in names
                )
                for name, value in sending.items():
                    conn.http.putheader(name, value)
                conn.http.putheader("Content-Length", str(len(content)))
                conn.http.endheaders()
                _send_body(conn.http, content, stopper, self._write_timeout)
            return conn.http.getresponse()
        except BaseException:
            conn.http.close()
            raise

    # -- connections ----------------------------------------------------------------------------

    @staticmethod
    def _key(url: str) -> _PoolKey:
        scheme, host, port = origin_of(url)
        return (scheme, host, port), _proxy_for(scheme, host, port) or ""

    def _connect(self, url: str, key: _PoolKey) -> _Conn:
        """A new connection to ``url``'s origin (through ``key``'s proxy, if any), connected."""
        (scheme, host, port), proxy = key
        conn: _Conn
        if proxy:
            conn = self._through(proxy, scheme, host, port)  # may load the proxy's trust
        elif scheme == "https":
            conn = _Conn(
                http.client.HTTPSConnection(host, port, timeout=self._connect_timeout, context=self._tls())
            )
        else:
            conn = _Conn(http.client.HTTPConnection(host, port, timeout=self._connect_timeout))
        try:
            conn.http.connect()
        except BaseException as exc:
            conn.http.close()
            before_tunnel = bool(proxy) and not getattr(conn.http, "tunnelled", False)
            if isinstance(exc, TimeoutError):
                if before_tunnel:
                    shown = _shown(proxy)
                    raise ProxyTimedOut(f"timed out connecting through {shown}", proxy=shown) from exc
                raise ConnectTimedOut(f"timed out connecting to {_shown(url)}") from exc
            if before_tunnel and isinstance(exc, OSError | http.client.HTTPException):
                raise _proxy_failure(exc, proxy, f"{host}:{port}") from exc
            raise
        sock = conn.http.sock
        assert sock is not None
        # After the connect: each read (and the send of a head) waits this long; a big body's
        # sends wait the write timeout (_send_body). http.client's connect set TCP_NODELAY, so a
        # body sent after its head does not wait for an ACK.
        sock.settimeout(self._read_timeout)
        return conn

    def _through(self, proxy: str, scheme: str, host: str, port: int) -> _Conn:
        """A connection (not yet connected) to ``host`` through ``proxy``: a CONNECT tunnel for
        HTTPS, absolute-form requests for plain HTTP; TLS to the proxy itself when its URL says
        ``https://`` (its certificate checked against the default trust, not ``--cert-dir``)."""
        parts = urlsplit(proxy)
        # No port in the proxy's URL: its scheme's, as httpx, curl and urllib take it.
        proxy_host = parts.hostname or ""
        proxy_tls = parts.scheme.lower() == "https"
        proxy_port = parts.port or (443 if proxy_tls else 80)
        auth = _proxy_authorization(parts.username, parts.password)
        timeout = self._connect_timeout
        if scheme != "https":  # a plain-HTTP registry: absolute-form requests to the proxy
            to_proxy: http.client.HTTPConnection
            if proxy_tls:
                to_proxy = http.client.HTTPSConnection(
                    proxy_host, proxy_port, timeout=timeout, context=self._proxy_tls()
                )
            else:
                to_proxy = http.client.HTTPConnection(proxy_host, proxy_port, timeout=timeout)
            return _Conn(to_proxy, absolute=True, headers=auth)
        tunnel: TunnelConnection
        if proxy_tls:
            from .proxytls import ProxyTunnelConnection

            tunnel = ProxyTunnelConnection(
                proxy_host, proxy_port, timeout=timeout, context=self._tls(), proxy_context=self._proxy_tls()
            )
        else:
            tunnel = TunnelConnection(proxy_host, proxy_port, timeout=timeout, context=self._tls())
        tunnel.set_tunnel(host, port, headers=auth)
        return _Conn(tunnel)

    def _proxy_tls(self) -> ssl.SSLContext:
        """The trust an ``https://`` proxy's certificate is checked against, loaded once."""
        with self._proxy_context_lock:
            if self._proxy_context is None:
                self._proxy_context = default_context()
            return self._proxy_context


def _send_body(conn: http.client.HTTPConnection, content: bytes, stopper: Stopper, timeout: float) -> None:
    """``content`` over ``conn``'s socket, a ``send`` at a time: ``timeout`` bounds each wait for
    room, not the whole body (sendall's would: a slow uplink is not a stall)."""
    sock = conn.sock
    assert sock is not None
    view = memoryview(content)
    sent = 0
    reading = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        while sent < len(view):
            stopper.check()
            try:
                sent += sock.send(view[sent : sent + _SEND_SLICE])
            except TimeoutError as exc:
                raise WriteTimedOut(f"no byte of the request body was taken for {timeout:g}s") from exc
    finally:
        sock.settimeout(reading)


def _answer(response: http.client.HTTPResponse, url: str, body: bytes) -> WireAnswer:
    return WireAnswer(response.status, response.reason, _Headers(response.getheaders()), body, url)


class _Enough(Exception):
    """Raised by :func:`_read_capped`'s sink to stop reading."""


def _read_capped(response: http.client.HTTPResponse, cap: int, cancelled: Callable[[], None]) -> bytes:
    """At most ``cap`` bytes of the body (decoded as :func:`_copy` decodes it)."""
    parts: list[bytes] = []
    size = 0

    def keep(chunk: memoryview) -> None:
        nonlocal size
        parts.append(bytes(chunk))
        size += len(chunk)
        if size >= cap:
            raise _Enough()

    with contextlib.suppress(_Enough):
        _copy(response, 0, keep, cancelled, _SMALL_BUFFER)
    return b"".join(parts)[:cap]


def _proxy_for(scheme: str, host: str, port: int) -> str | None:
    """The proxy URL for ``scheme://host:port`` from the environment, as httpx read it:
    ``HTTPS_PROXY``/``HTTP_PROXY``, else ``ALL_PROXY``, unless ``NO_PROXY`` names the host, the
    host with this port, or a domain of it (IP networks are not read)."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None  # what urllib reads proxies from; without any, importing it is the only cost
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # proxy_bypass tries both forms
    if not proxy or urllib.request.proxy_bypass(netloc):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    try:
        parts = urlsplit(proxy)
        parts.port  # noqa: B018 - raises on what is not a URL
    except ValueError:
        # Never repeat it: the "port" urllib complains about is often part of a password.
        raise ProxyFailed(
            "through a proxy whose URL (HTTP(S)_PROXY or ALL_PROXY) is not valid: percent-encode any "
            "'/', '#', '?' or '@' in its user name and password",
            final=True,
        ) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ProxyFailed(
            f"through the proxy {_shown(proxy)}: {parts.scheme}:// proxies are not supported; "
            "HTTP(S)_PROXY and ALL_PROXY take an http:// or https:// proxy",
            final=True,
        )
    return proxy


def _proxy_failure(exc: OSError | http.client.HTTPException, proxy: str, target: str) -> ProxyFailed:
    """What a failure to connect through ``proxy`` (to ``target``), before any tunnel opened, says."""
    shown = _shown(proxy)
    if str(exc).startswith("Tunnel connection failed: 4"):  # http.client's words for a 4xx
        answer = str(exc).removeprefix("Tunnel connection failed: ")
        return ProxyFailed(
            f"through the proxy {shown}: it refused a tunnel to {target} ({answer}); the proxy must "
            "allow it (and take credentials in the proxy URL if it asks for them), or NO_PROXY exempt it",
            final=True,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):  # an https:// proxy's own certificate
        if exc.verify_code in _NAME_MISMATCH:
            return ProxyFailed(
                f"through the proxy {shown}: its certificate is not for the name or address in the "
                f"proxy URL ({exc.verify_message}); use the name it was issued for in HTTP(S)_PROXY",
                final=True,
            )
        return ProxyFailed(
            f"through the proxy {shown}: its certificate is not trusted ({exc.verify_message}); put the "
            "proxy's CA certificate in SSL_CERT_FILE (or SSL_CERT_DIR), or fix HTTP(S)_PROXY",
            final=True,
        )
    if isinstance(exc, ssl.SSLError):  # TLS with an https:// proxy failed: asking again is no use
        plain = exc.reason in _PLAIN_HTTP_ANSWER
        return ProxyFailed(
            f"through the proxy {shown}: TLS with it failed ({exc.reason or exc}); "
            + (
                "it seems to speak plain HTTP: write http:// in the proxy URL"
                if plain
                else "check that it speaks TLS, or write http:// in the proxy URL if it does not"
            ),
            final=True,
        )
    said = str(exc) if str(exc).isprintable() else repr(str(exc))  # one line, whatever it sent
    return ProxyFailed(
        f"through the proxy {shown} ({type(exc).__name__}: {said}): check that the proxy runs and "
        "speaks HTTP, or HTTP(S)_PROXY, ALL_PROXY and NO_PROXY",
        final=isinstance(exc, ConnectionRefusedError | socket.gaierror),
    )


#: OpenSSL's verify codes for a certificate valid but issued for another host name or address.
_NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
#: What OpenSSL says when the other end answered the TLS hello in plain HTTP.
_PLAIN_HTTP_ANSWER = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE"})


def resolved(base: str, reference: str) -> str | None:
    """``reference`` (a ``Location`` or ``Link`` in the answer from ``base``) as an absolute URL;
    None when it is none (a port that is no number, a broken IPv6 address)."""
    try:
        url = urljoin(base, reference)
        origin_of(url)
    except ValueError:
        return None
    return url


def sent_elsewhere(exc: BaseException, url: str) -> None:
    """Record on ``exc`` that the request it ended went to ``url``, not to the registry (a place
    a redirect, an upload ``Location`` or a ``Link`` named); the first place recorded stays."""
    if sent_to(exc) is None:
        setattr(exc, _SENT_TO, origin_shown(url))


def sent_to(exc: BaseException) -> str | None:
    """Where (``scheme://host[:port]``) the request that failed with ``exc`` went when that was
    not the registry (its blob storage, see :func:`sent_elsewhere`); None when it was."""
    where = getattr(exc, _SENT_TO, None)
    return where if isinstance(where, str) else None


def origin_shown(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, as written there (an IPv6 address in brackets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _shown(url: str) -> str:
    """``url`` without user info and query: a presigned storage URL's query holds its signature."""
    return f"{origin_shown(url)}{urlsplit(url).path}"


def _proxy_authorization(user: str | None, password: str | None) -> dict[str, str]:
    if user is None:
        return {}
    token = base64.b64encode(f"{unquote(user)}:{unquote(password or '')}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")


def _resumed_skip(response: http.client.HTTPResponse, offset: int) -> int:
    """How many bytes of a 206 answer to ``Range: bytes=offset-`` come before ``offset``: storage
    may answer from an earlier byte than asked, and says so in ``Content-Range``. An answer from a
    later byte (or one that does not say) cannot continue the body: the connection's fault."""
    if not offset:
        return 0
    header = response.getheader("Content-Range") or ""
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match.group(1)) > offset:
        raise http.client.HTTPException(
            f"a resume from byte {offset} was answered with Content-Range {header[:80]!r}"
        )
    return offset - int(match.group(1))


def _copy(
    response: http.client.HTTPResponse,
    skip: int,
    sink: Callable[[memoryview], None],
    cancelled: Callable[[], None],
    buffer_size: int = _BUFFER,
) -> None:
    """The body into ``sink`` (decoded if a proxy compressed it), minus its first ``skip`` bytes."""
    encoding = (response.getheader("Content-Encoding") or "identity").lower()
    decoder = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by the header
    elif encoding != "identity":
        raise http.client.HTTPException(f"the answer is {encoding}-encoded, which cannot be decoded here")
    buffer = bytearray(buffer_size)
    view = memoryview(buffer)
    while True:
        cancelled()
        n = response.readinto(buffer)
        if not n:
            if response.length:  # a connection closed before Content-Length bytes came: a cut
                raise http.client.IncompleteRead(b"", response.length)
            break
        data = memoryview(decoder.decompress(view[:n])) if decoder is not None else view[:n]
        if skip:
            cut = min(skip, len(data))
            data, skip = data[cut:], skip - cut
        if data:
            sink(data)
    if decoder is not None:
        rest = memoryview(decoder.flush())
        if rest[skip:]:
            sink(rest[skip:])
