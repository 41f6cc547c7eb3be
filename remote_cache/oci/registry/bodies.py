"""Blob bodies over the standard library's ``http.client``, read in a worker thread.

Receiving a body through httpx on the event loop costs about 3.8 CPU-seconds per GB: every chunk
is a task wake-up that must win the GIL back. ``http.client`` reading with ``readinto`` into a
1 MiB buffer costs about 0.4, and the thread that reads also hashes and writes the bytes (all
three release the GIL). So the registry transport fetches blob bodies here, in a worker thread,
and keeps everything else: it picks the URL and the ``Authorization`` header (answering a 401
on its own path), retries and resumes, and maps errors (:mod:`.errors`).

What a request here does, as httpx did: follows redirects itself (``Authorization`` never goes
to another origin), asks for ``Range: bytes=N-`` when resuming (a server that ignores it is
skipped to N), asks for the stored bytes (``Accept-Encoding: identity``) but decodes gzip or
deflate if a proxy compressed anyway, goes through ``HTTPS_PROXY``/``HTTP_PROXY`` unless
``NO_PROXY`` says otherwise (CONNECT tunnels for https), reuses kept-alive connections per origin,
and waits at most the stall timeout for each read.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from .transport import MAX_ERROR_BODY, MAX_REDIRECTS, REDIRECT_STATUS, Origin, origin_of

__all__ = ["BodyAnswer", "BodyClient", "Stopper"]

_BUFFER = 1 << 20


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


@dataclass
class BodyAnswer:
    """An answer that was not a body: its status, headers and (capped) text, and where it came from."""

    status_code: int  # named as on httpx's answers: errors.error_for_response reads either
    reason_phrase: str
    headers: Mapping[str, str]
    body: bytes
    origin: Origin


@dataclass
class _Conn:
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


@dataclass
class _Pool:
    """Idle kept-alive connections per origin (and proxy), shared by the worker threads."""

    idle: dict[_PoolKey, list[_Conn]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: _PoolKey) -> _Conn | None:
        with self.lock:
            conns = self.idle.get(key)
            return conns.pop() if conns else None

    def give(self, key: _PoolKey, conn: _Conn) -> None:
        with self.lock:
            self.idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self.lock:
            for conns in self.idle.values():
                for conn in conns:
                    conn.http.close()
            self.idle.clear()


class Stopper:
    """Stops a fetch from another thread: between reads, and in a read (its socket is shut down).

    A read can wait the whole stall timeout for bytes; a signal must not wait that long.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._started = False
        self._sock: socket.socket | None = None
        #: Set when the fetch has returned or raised, or was stopped before it began: either way
        #: no thread touches the sink any more.
        self.done = threading.Event()

    def begin(self) -> None:
        """Called by the fetch as it starts: it may not start once stopped (a cancelled worker
        thread may never run it, and then nobody else would set ``done``)."""
        with self._lock:
            if self._stopped:
                raise InterruptedError("the download was stopped")
            self._started = True

    def attach(self, conn: http.client.HTTPConnection) -> None:
        """Watch ``conn``'s socket (kept here: http.client drops ``conn.sock`` when an answer says
        ``Connection: close``, while the answer still reads from it)."""
        with self._lock:
            self._sock = conn.sock
            stopped = self._stopped
        if stopped:
            self._shut(conn.sock)

    def check(self) -> None:
        if self._stopped:
            raise InterruptedError("the download was stopped")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sock = self._sock
            if not self._started:
                self.done.set()
        self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket | None) -> None:
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


#: A kept-alive connection the server has closed meanwhile fails like this on its next request.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class BodyClient:
    """GETs of blob bodies, one per worker thread at a time (see the module docstring)."""

    def __init__(
        self,
        *,
        tls: Callable[[], ssl.SSLContext],
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self._tls = tls
        self._tls_context: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._user_agent = user_agent
        self._pool = _Pool()

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
    ) -> BodyAnswer | None:
        """GET ``url`` (from ``offset`` on) into ``sink``; None when the body went there whole,
        else the answer that was not a body (an error, a 401 to answer). Network failures raise
        the standard library's exceptions, and ``sink``'s own leave unchanged; ``stopper`` stops
        it from another thread."""
        stopper.begin()
        try:
            return self._fetch(url, headers, offset, sink, stopper)
        finally:
            stopper.done.set()

    def _fetch(
        self,
        url: str,
        headers: Mapping[str, str],
        offset: int,
        sink: Callable[[memoryview], None],
        stopper: Stopper,
    ) -> BodyAnswer | None:
        home = origin_of(url)
        send = {**headers, "User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        if offset:
            send["Range"] = f"bytes={offset}-"
        for _hop in range(MAX_REDIRECTS + 1):
            here = origin_of(url)
            if here != home:
                send.pop("Authorization", None)  # never to another origin
            stopper.check()
            key, conn, response = self._send(url, send, stopper)
            reusable = False
            try:
                location = response.getheader("Location")
                if response.status in REDIRECT_STATUS and location:
                    response.read(MAX_ERROR_BODY)
                    reusable = response.isclosed() and not response.will_close
                    url = urljoin(url, location)
                    continue
                if response.status not in (200, 206):
                    body = response.read(MAX_ERROR_BODY)
                    reusable = response.isclosed() and not response.will_close
                    return BodyAnswer(
                        response.status, response.reason, _Headers(response.getheaders()), body, here
                    )
                _copy(response, offset if response.status == 200 else 0, sink, stopper.check)
                reusable = not response.will_close
                return None
            finally:
                if reusable:
                    self._pool.give(key, conn)
                else:
                    conn.http.close()
        raise http.client.HTTPException(f"more than {MAX_REDIRECTS} redirects, the last to {_shown(url)}")

    def _send(
        self, url: str, headers: Mapping[str, str], stopper: Stopper
    ) -> tuple[_PoolKey, _Conn, http.client.HTTPResponse]:
        """Send the GET on a kept-alive connection, or a new one when that one has gone stale."""
        key = self._key(url)
        pooled = self._pool.take(key)
        if pooled is not None:
            try:
                return key, pooled, _get(pooled, url, headers, stopper)
            except _STALE:
                pass  # closed: a new connection it is
        conn = self._connect(url)
        return key, conn, _get(conn, url, headers, stopper)

    # -- connections ----------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls_context is None:
                self._tls_context = self._tls()  # built on first use: loading CAs costs ~45 ms
            return self._tls_context

    @staticmethod
    def _key(url: str) -> _PoolKey:
        scheme, host, port = origin_of(url)
        return (scheme, host, port), _proxy_for(scheme, host) or ""

    def _connect(self, url: str) -> _Conn:
        (scheme, host, port), proxy = self._key(url)
        conn: _Conn
        if proxy:
            parts = urlsplit(proxy)
            proxy_host, proxy_port = parts.hostname or "", parts.port or 8080
            auth = _proxy_authorization(parts.username, parts.password)
            if scheme == "https":
                tunnel = http.client.HTTPSConnection(
                    proxy_host, proxy_port, timeout=self._connect_timeout, context=self._context()
                )
                tunnel.set_tunnel(host, port, headers=auth)
                conn = _Conn(tunnel)
            else:
                plain = http.client.HTTPConnection(proxy_host, proxy_port, timeout=self._connect_timeout)
                conn = _Conn(plain, absolute=True, headers=auth)
        elif scheme == "https":
            conn = _Conn(
                http.client.HTTPSConnection(
                    host, port, timeout=self._connect_timeout, context=self._context()
                )
            )
        else:
            conn = _Conn(http.client.HTTPConnection(host, port, timeout=self._connect_timeout))
        conn.http.connect()
        assert conn.http.sock is not None
        conn.http.sock.settimeout(self._read_timeout)  # after the connect: each read waits this long
        return conn


def _get(conn: _Conn, url: str, headers: Mapping[str, str], stopper: Stopper) -> http.client.HTTPResponse:
    """The answer (its head read) to a GET of ``url`` over ``conn``; ``conn`` closed if that fails."""
    stopper.attach(conn.http)
    try:
        conn.http.request("GET", conn.target(url), headers={**headers, **conn.headers})
        return conn.http.getresponse()
    except BaseException:
        conn.http.close()
        raise


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL for ``scheme://host`` from the environment, as httpx reads it for every other
    request: ``HTTPS_PROXY``/``HTTP_PROXY``, else ``ALL_PROXY``, unless ``NO_PROXY`` names the
    host or a domain of it (neither reads IP networks there)."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _shown(url: str) -> str:
    """``url`` without user info and query: a presigned storage URL's query holds its signature."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _proxy_authorization(user: str | None, password: str | None) -> dict[str, str]:
    if user is None:
        return {}
    token = base64.b64encode(f"{unquote(user)}:{unquote(password or '')}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


def _copy(
    response: http.client.HTTPResponse,
    skip: int,
    sink: Callable[[memoryview], None],
    cancelled: Callable[[], None],
) -> None:
    """The body into ``sink`` (decoded if a proxy compressed it), minus its first ``skip`` bytes."""
    encoding = (response.getheader("Content-Encoding") or "identity").lower()
    decoder = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by the header
    elif encoding != "identity":
        raise http.client.HTTPException(f"the answer is {encoding}-encoded, which cannot be decoded here")
    buffer = bytearray(_BUFFER)
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
