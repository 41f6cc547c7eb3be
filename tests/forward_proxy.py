"""A small forward HTTP proxy on 127.0.0.1 for the tests: what ``HTTP_PROXY`` points a client at.

It takes absolute-form requests (``GET http://host:port/path``) for plain-HTTP targets, forwards
them on a fresh connection and streams the answer back, and opens CONNECT tunnels for HTTPS
targets (or answers them with ``connect_status``, e.g. 407); it logs each request's method and URL.
Given a certificate it speaks TLS itself (an ``https://`` proxy URL), tunnels included.
"""

from __future__ import annotations

import http.client
import http.server
import select
import socket
import ssl
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ForwardProxy", "proxy_env"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailers"}


def proxy_env(name: str, url: str) -> dict[str, str]:
    """``name`` (e.g. ``HTTPS_PROXY``) set to ``url`` in both cases, as tools read either. The CLI
    tests' environment has no other proxy variable (:func:`tests.cli.output.clean_env`)."""
    return {name.upper(): url, name.lower(): url}


class ForwardProxy:
    """Runs in a thread; ``url`` is what HTTP_PROXY takes; ``seen`` lists ``(method, url)``
    (``("CONNECT", "host:port")`` for a tunnel); ``connect_status`` refuses tunnels with it,
    ``drop_tunnels`` closes them once open; ``tls``, a certificate and its key, makes it an
    ``https://`` proxy."""

    def __init__(self, port: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        self.connect_status: int | None = None
        #: Open tunnels, then reset them when the client's first bytes arrive (nothing goes through).
        self.drop_tunnels = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                proxy.seen.append((self.command, self.path))
                target = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=60)
                try:
                    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
                    upstream.request(self.command, path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in _HOP_BY_HOP | {"transfer-encoding", "content-length"}:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

            def do_CONNECT(self) -> None:
                proxy.seen.append(("CONNECT", self.path))
                self.close_connection = True
                if proxy.connect_status is not None:
                    self.send_response(proxy.connect_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                host, _, port = self.path.rpartition(":")
                with socket.create_connection((host, int(port)), timeout=60) as upstream:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    if not proxy.drop_tunnels:
                        _pipe(self.connection, upstream)
                        return
                    self.connection.recv(1 << 16)  # the client's first bytes (a TLS ClientHello)
                    # Close with a reset, as a far end that gives up does (here, before the server
                    # would shut the socket down with a FIN).
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

        class Server(http.server.ThreadingHTTPServer):
            def verify_request(self, request: object, client_address: object) -> bool:
                proxy.connections += 1
                return True

        #: Connections accepted (with ``tls``: those whose handshake succeeded).
        self.connections = 0
        self._server = Server(("127.0.0.1", port), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            # The handshake runs in accept(); one that fails (an untrusted certificate) is dropped.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    ends = {a: b, b: a}
    while True:
        ready, _, _ = select.select(list(ends), [], [], 60)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(1 << 16)
            if not data:
                return
            # A TLS socket may hold decrypted bytes that select() cannot see: take them too.
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(sock.pending())
            ends[sock].sendall(data)
