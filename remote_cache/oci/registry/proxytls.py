"""HTTPS through an ``https://`` proxy: TLS to the proxy itself, as curl and httpx speak it.

The registry's TLS session runs inside a CONNECT tunnel inside the proxy's TLS session (a
plain-HTTP registry needs no tunnel: see ``ThreadClient._through``). ``SSLContext.wrap_socket``
cannot put TLS over a TLS socket (it wants a real one; the standard library offers only the
``SSLObject``/``MemoryBIO`` pieces to build that from), so the inner session is urllib3's
``SSLTransport``, that layer, as urllib3's own HTTPS proxies use it. Imported only when such a
proxy is in the environment.
"""

from __future__ import annotations

import socket
import ssl

from urllib3.util.ssltransport import SSLTransport

from .threaded import TunnelConnection

__all__ = ["ProxyTunnelConnection"]


class ProxyTunnelConnection(TunnelConnection):
    """HTTPS to the registry through a CONNECT tunnel inside TLS to the proxy.

    Constructed for the proxy (host, port and ``proxy_context``) with ``set_tunnel`` naming the
    registry; ``context`` checks the registry. ``tunnelled`` as in :class:`TunnelConnection`:
    before it is set, the proxy failed (its TLS, its answer to CONNECT); after, the registry.
    """

    def __init__(
        self, host: str, port: int, *, timeout: float, context: ssl.SSLContext, proxy_context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._proxy_context = proxy_context

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._proxy_context.wrap_socket(self.sock, server_hostname=self.host)
        self._tunnel()  # http.client's CONNECT, over self.sock (sets ``tunnelled``)
        self.sock = _TLSInTLS(self.sock, self._context, server_hostname=self._tunnel_host)  # type: ignore[attr-defined]


class _TLSInTLS(SSLTransport):
    """The registry's TLS session over the proxy's; shutting it down shuts the proxy's socket
    down, which is what wakes a read blocked in another thread (see ``Stopper``)."""

    def shutdown(self, how: int) -> None:
        self.socket.shutdown(how)
