"""The httpx side of the registry transport: requests that carry a body (uploads, manifest
``PUT``s, upload sessions' ``POST``/``PATCH``) and ``DELETE``s, over one pooled ``httpx.AsyncClient``.

Imported only when such a request is first made: a restore, or a save that finds its entry
unchanged, never loads httpx (requests without a body go through :mod:`.threaded`). Each request
is read whole into a :class:`~.threaded.WireAnswer`, so the transport handles both kinds of
answer the same way. Redirects are not followed here (only GET and HEAD are, in
:mod:`.threaded`); httpx's exceptions leave through :func:`.errors.translated` in the transport.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import httpx

from ...version import TOOL
from .threaded import WireAnswer
from .timeouts import Timeouts

__all__ = ["HttpxSender"]

_BODY_PIECE = 128 << 10  # request bodies bigger than this go out in slices this big


class _LazyTLS(httpx.AsyncBaseTransport):
    """The HTTPS transport of a client for a plain-HTTP registry, built on first use.

    Loading a CA bundle costs ~45 ms, a cost every command against a plain-HTTP registry would
    pay for a redirect to HTTPS storage that rarely comes. This builds the transport (with the
    registry's TLS context) at the first HTTPS request, on the event loop (no await in between,
    so no race).
    """

    def __init__(self, limits: httpx.Limits, tls: Callable[[], ssl.SSLContext]) -> None:
        self._limits = limits
        self._tls = tls
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = httpx.AsyncHTTPTransport(limits=self._limits, verify=self._tls())
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


def _no_trust() -> ssl.SSLContext:
    # For the plain-HTTP transport, which never sees an https:// URL (those go to _LazyTLS):
    # a verifying context that trusts nothing, so it would fail closed if it ever did.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


async def _pieces(content: bytes) -> AsyncIterator[memoryview]:
    """``content`` in slices that a socket mostly takes whole.

    Handed one big buffer, asyncio sends what the socket takes, then copies the rest into its
    write buffer and shifts that buffer after every later send: copies under the GIL that
    measured ~1/5 of the main thread's time during a save's uploads.
    """
    view = memoryview(content)
    for start in range(0, len(view), _BODY_PIECE):
        yield view[start : start + _BODY_PIECE]


class HttpxSender:
    """Requests with bodies to one registry host (and its upload locations)."""

    def __init__(
        self, *, plain_http: bool, tls: Callable[[], ssl.SSLContext], timeouts: Timeouts, max_connections: int
    ) -> None:
        """``tls`` gives the registry's TLS context (the same the thread client uses)."""
        self._timeout = httpx.Timeout(
            connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
        )
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        tls_setup: dict[str, Any]
        if plain_http:
            tls_setup = {"verify": _no_trust(), "mounts": {"https://": _LazyTLS(limits, tls)}}
        else:
            tls_setup = {"verify": tls()}
        self._client = httpx.AsyncClient(
            timeout=self._timeout,
            limits=limits,
            follow_redirects=False,
            headers={"User-Agent": TOOL},
            **tls_setup,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        params: Mapping[str, str] | None,
        content: bytes | None,
        limit: int,
    ) -> WireAnswer:
        """Send once and read the answer's body whole, up to ``limit + 1`` bytes (httpx's errors
        propagate)."""
        send_headers = dict(headers)
        body: bytes | AsyncIterator[bytes] | None = content
        if content is not None and len(content) > _BODY_PIECE:
            body = cast(AsyncIterator[bytes], _pieces(content))  # memoryviews do as bytes
            send_headers["Content-Length"] = str(len(content))
        request = self._client.build_request(
            method, url, headers=send_headers, params=params, content=body, timeout=self._timeout
        )
        response = await self._client.send(request, stream=True)
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    break
        finally:
            await response.aclose()
        return WireAnswer(
            response.status_code,
            response.reason_phrase,
            response.headers,
            b"".join(chunks)[: limit + 1],
            str(response.url),
        )
