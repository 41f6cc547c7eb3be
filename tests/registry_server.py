"""Real registries for the tests: ``docker-registry`` processes, a token issuer, a fault proxy.

Everything here listens on 127.0.0.1 only, except a registry started under this machine's own
name (:func:`machine_name`), which listens on the address that name resolves to. Three servers
are offered:

* :func:`start_registry` runs ``/usr/bin/docker-registry`` (the distribution server behind
  ``registry:2``) with filesystem storage in a temporary directory, deletes enabled, and one of
  three auth modes: anonymous, htpasswd (basic) or token (bearer, via :class:`TokenIssuer`);
  with ``tls``, it serves HTTPS with a certificate of a fresh :class:`CertificateAuthority`, and
  can require client certificates.
* :class:`TokenIssuer` is a tiny in-process token server (a thread) that checks basic credentials
  and grants whatever scope is asked, signing RS256 JWTs with a self-signed certificate made by the
  ``openssl`` CLI (no extra Python dependency). It counts the tokens it issued.
* :class:`FaultProxy` is an HTTP-aware TCP proxy (its own thread and event loop) in front of a real
  registry that injects the faults a healthy server never produces: N error statuses, a 429 with
  ``Retry-After``, a connection cut mid-body, a stall.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import queue
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "REGISTRY_BINARY",
    "CertificateAuthority",
    "Fault",
    "FaultProxy",
    "RegistryServer",
    "TokenIssuer",
    "fault_proxy",
    "free_port",
    "machine_name",
    "registry_available",
    "start_registry",
    "tcp_relay",
]

REGISTRY_BINARY = "/usr/bin/docker-registry"
AuthMode = Literal["none", "htpasswd", "token"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine_name() -> tuple[str, str] | None:
    """A name of this machine that remote-cache does not take for loopback, so it speaks HTTPS to
    it by default, and the IPv4 address it resolves to; None when it has no such name."""
    from remote_cache.oci.reference import is_loopback

    for name in dict.fromkeys((socket.gethostname(), socket.getfqdn())):
        if not name or is_loopback(name):
            continue
        try:
            return name, str(socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0])
        except OSError:
            continue
    return None


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class CertificateAuthority:
    """A CA made by the ``openssl`` CLI for one test run, and the certificates it issues."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=remote-cache test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(self.key), "-out", str(self.cert),
        )  # fmt: skip

    @property
    def cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def key(self) -> Path:
        return self.directory / "ca.key"

    def issue(self, name: str, *, sans: list[str], client: bool = False) -> tuple[Path, Path]:
        """A certificate (and its key) for ``name``: a server's for ``sans`` (``DNS:x``, ``IP:y``),
        or a client's; returns the two file paths."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            + (f"subjectAltName={','.join(sans)}\n" if sans else "")
        )
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        )
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
        )  # fmt: skip
        return cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------------------------
# Token issuer


class TokenIssuer:
    """A bearer-token realm for docker-registry's ``auth: token`` mode, served from a thread.

    ``GET /token?service=S&scope=repository:NAME:pull,push`` with basic credentials returns
    ``{"token": JWT, "access_token": JWT, "expires_in": N}``. Wrong credentials get 401.
    """

    def __init__(self, workdir: Path, *, username: str, password: str, expires_in: int = 300) -> None:
        self.username = username
        self.password = password
        self.expires_in = expires_in
        self.issuer = "remote-cache-test-issuer"
        self.service = "remote-cache-test-registry"
        self.tokens_issued = 0
        self.refused = 0
        self.scopes: list[str] = []
        self._lock = threading.Lock()
        workdir.mkdir(parents=True, exist_ok=True)
        self.key_path = workdir / "token.key"
        self.cert_path = workdir / "token.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=remote-cache-test-token",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert_path), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode("ascii")
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer._handle(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        ).encode("ascii")
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input,
            check=True,
            capture_output=True,
        ).stdout
        return signing_input.decode("ascii") + "." + _b64url(sig)

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(req.path).query)
        auth = req.headers.get("Authorization", "")
        user = ""
        ok = False
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                pw = ""
            ok = user == self.username and pw == self.password
        if not ok:
            with self._lock:
                self.refused += 1
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            req.send_response(401)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        access = []
        scopes = query.get("scope", [])
        for scope in scopes:
            for item in scope.split(" "):
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind and name:
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": query.get("service", [self.service])[0],
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = self._sign(claims)
        with self._lock:
            self.tokens_issued += 1
            self.scopes.extend(scopes)
        body = json.dumps({"token": token, "access_token": token, "expires_in": self.expires_in}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------------------------
# docker-registry


@dataclass
class RegistryServer:
    """A running docker-registry: where it is, who may use it, where it keeps its files."""

    host: str
    url: str
    auth: AuthMode
    storage_root: Path
    username: str | None = None
    password: str | None = None
    token_issuer: TokenIssuer | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    #: For a TLS registry: the CA that signed its certificate (and any client certificate).
    ca: CertificateAuthority | None = None

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def tokens_issued(self) -> int:
        """How many bearer tokens the issuer handed out (0 for non-token registries)."""
        return self.token_issuer.tokens_issued if self.token_issuer else 0

    def blob_data_path(self, digest: str) -> Path:
        """The file in which the registry keeps a blob's bytes (to corrupt it in tests)."""
        algo, _, hexd = digest.partition(":")
        return self.storage_root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.token_issuer is not None:
            self.token_issuer.close()


def _wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = 15.0,
    client_cert: tuple[Path, Path] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        try:
            # Readiness only: the tests check certificates themselves.
            insecure = ssl._create_unverified_context() if url.startswith("https:") else None
            if insecure is not None and client_cert is not None:
                insecure.load_cert_chain(*client_cert)
            with urllib.request.urlopen(url + "/v2/", timeout=1, context=insecure):
                return
        except urllib.error.HTTPError:
            return  # 401 from an auth registry: it is serving
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer on {url} within {timeout}s")


def start_registry(
    workdir: Path,
    *,
    auth: AuthMode = "none",
    username: str = "cache-user",
    password: str = "s3cret-Pa55word",
    delete_enabled: bool = True,
    tls: bool = False,
    name: tuple[str, str] | None = None,
    client_certificates: bool = False,
) -> RegistryServer:
    """Start a docker-registry on 127.0.0.1 with storage under ``workdir``; wait until it serves.

    ``tls``: serve HTTPS with a certificate issued by a fresh CA (``server.ca``, trusted by nobody
    until a test says so) for 127.0.0.1 and, with ``name`` (``(host name, its address)``, see
    :func:`machine_name`), for that name: the registry then listens on that address and its
    ``host`` is ``NAME:PORT``. ``client_certificates``: require a client certificate the CA issued
    (``server.ca.directory / "client.crt"`` and ``client.key``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tls_yaml = ""
    ca: CertificateAuthority | None = None
    client: tuple[Path, Path] | None = None
    host_name, address = name or ("127.0.0.1", "127.0.0.1")
    if tls:
        ca = CertificateAuthority(workdir / "ca")
        sans = ["IP:127.0.0.1"] + ([f"DNS:{host_name}", f"IP:{address}"] if name else [])
        cert, key = ca.issue("server", sans=sans)
        tls_yaml = f"  tls:\n    certificate: {cert}\n    key: {key}\n"
        if client_certificates:
            client = ca.issue("client", sans=[], client=True)
            tls_yaml += f"    clientcas:\n      - {ca.cert}\n"
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    issuer: TokenIssuer | None = None
    auth_yaml = ""
    if auth == "htpasswd":
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", username, password], check=True, capture_output=True
        ).stdout
        (workdir / "htpasswd").write_bytes(htpasswd)
        auth_yaml = f"auth:\n  htpasswd:\n    realm: basic-realm\n    path: {workdir / 'htpasswd'}\n"
    elif auth == "token":
        issuer = TokenIssuer(workdir / "token", username=username, password=password)
        auth_yaml = (
            "auth:\n  token:\n"
            f"    realm: {issuer.realm}\n"
            f"    service: {issuer.service}\n"
            f"    issuer: {issuer.issuer}\n"
            f"    rootcertbundle: {issuer.cert_path}\n"
        )
    last_error: Exception | None = None
    for _attempt in range(5):
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            f"  delete:\n    enabled: {'true' if delete_enabled else 'false'}\n"
            "  cache:\n    blobdescriptor: inmemory\n"
            "http:\n"
            f"  addr: {address}:{port}\n"
            f"  secret: {uuid.uuid4().hex}\n" + tls_yaml + auth_yaml
        )
        log_path = workdir / "registry.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"{'https' if tls else 'http'}://{address}:{port}"
        try:
            _wait_ready(url, proc, log_path, client_cert=client)
        except RuntimeError as exc:  # most likely the port was taken meanwhile: try another
            last_error = exc
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            continue
        return RegistryServer(
            host=f"{host_name}:{port}",
            url=f"{'https' if tls else 'http'}://{host_name}:{port}",
            auth=auth,
            storage_root=storage,
            username=username if auth != "none" else None,
            password=password if auth != "none" else None,
            token_issuer=issuer,
            process=proc,
            log_path=log_path,
            ca=ca,
        )
    if issuer is not None:
        issuer.close()
    raise RuntimeError(f"could not start docker-registry: {last_error}")


def registry_available() -> bool:
    """True when the docker-registry binary is installed."""
    return os.access(REGISTRY_BINARY, os.X_OK) and shutil.which("openssl") is not None


# --------------------------------------------------------------------------------------------
# Fault-injecting proxy


FaultKind = Literal["status", "cut", "stall", "redirect", "slow-upload"]


@dataclass
class Fault:
    """One fault to inject on a matching request.

    * ``status``: answer ``status`` (with ``headers``, and ``body`` or a spec error body) instead of
      forwarding the request.
    * ``cut``: forward, pass the response head and ``after_bytes`` body bytes, then close
      (``None``: close before the head, so the request took effect but its answer is lost).
    * ``stall``: forward, pass the head and ``after_bytes`` body bytes (``None``: nothing at all,
      not even the head), then hold the connection open without sending more.

    * ``redirect``: answer ``307`` with ``Location: location`` (e.g. another origin).
    * ``slow-upload``: read the request's body at ``rate`` bytes a second (a slow uplink), then
      forward it.

    ``method``/``path_contains`` restrict which requests match; ``times`` how many it hits.
    """

    kind: FaultKind
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    after_bytes: int | None = 0
    method: str | None = None
    path_contains: str | None = None
    times: int = 1
    location: str = ""
    body: bytes | None = None
    rate: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class ProxiedRequest:
    """What the proxy saw: a request and what it did with it."""

    method: str
    path: str
    outcome: str  # "forwarded", "status 503", "cut", "stall"
    status: int = 0  # the status sent to the client (0 when none was)
    headers: dict[str, str] = field(default_factory=dict)  # request headers, lower-case names


#: How long the proxy waits on the real server for a connection or bytes before giving up on a
#: request (the client then sees its connection closed): no test waits this long on purpose.
_UPSTREAM_TIMEOUT = 120


class _Connection:
    """One of the proxy's connections (a client's, or its own to the real server): a blocking
    socket read and written from worker threads, never registered with the proxy's event loop.
    Twice the suite hung for a whole read timeout with the server's complete answer unread in the
    proxy's socket while its loop slept, the socket absent from the loop's epoll set (``ss`` and
    ``/proc/PID/fdinfo``). A selector keeps its key when a registered descriptor is closed behind
    its back, and a new socket given that number is then never watched: ``add_reader`` finds the
    key, and the epoll selector's ``modify`` with unchanged events only swaps the callback
    (``selectors._PollLikeSelector.modify``; cpython#88968 is one such hang). Who closed a
    descriptor here is not known; a blocking read waits on the socket itself."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._out: list[bytes] = []

    @classmethod
    async def open(cls, address: tuple[str, int]) -> _Connection:
        return cls(await asyncio.to_thread(socket.create_connection, address, _UPSTREAM_TIMEOUT))

    async def _more(self) -> None:
        data = await asyncio.to_thread(self._sock.recv, 65536)
        if not data:
            raise asyncio.IncompleteReadError(self._buf, None)
        self._buf += data

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes; b"" at the end."""
        if not self._buf:
            return await asyncio.to_thread(self._sock.recv, limit)
        data, self._buf = self._buf[:limit], self._buf[limit:]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._more()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    async def readuntil(self, separator: bytes) -> bytes:
        while separator not in self._buf:
            await self._more()
        return await self.readexactly(self._buf.index(separator) + len(separator))

    async def read_all(self) -> bytes:
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        self._out.append(bytes(data))

    async def drain(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            await asyncio.to_thread(self._sock.sendall, data)

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.drain()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a read still waiting in a thread
        self._sock.close()


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` ("127.0.0.1:PORT").

    Every request gets its own upstream connection (``Connection: close`` both ways), which
    keeps the proxy simple and lets a fault affect exactly one request.
    """

    def __init__(self, upstream: str) -> None:
        up_host, _, up_port = upstream.rpartition(":")
        self._upstream = (up_host, int(up_port))
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        #: docker-registry 2.8 ignores ``n``/``last`` on tags/list (tag pagination came with
        #: distribution 3.0); when set, the proxy pages the real, complete list per the spec.
        self.paginate_tags = False
        #: With ``paginate_tags``: the next page's ``Link`` names this origin ("http://host:port")
        #: instead of being relative, as a registry behind a CDN may answer.
        self.link_origin = ""
        #: Rewrites an answer's ``Location`` to this origin (an upload session served elsewhere).
        self.location_origin = ""
        #: Response headers (lower-case names) removed from forwarded answers, to imitate
        #: registries that omit optional headers such as Docker-Content-Digest.
        self.strip_response_headers: set[str] = set()
        self.requests: list[ProxiedRequest] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self._listener.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fault proxy did not start")
        threading.Thread(target=self._accept, daemon=True).start()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    # public API -----------------------------------------------------------------------------

    def add(self, fault: Fault) -> FaultProxy:
        """Queue a fault; faults are consulted in the order they were added."""
        with self._lock:
            self._faults.append(fault)
        return self

    def fail(self, n: int, status: int = 503, **kw: Any) -> FaultProxy:
        """The next ``n`` matching requests get ``status`` instead of a real answer."""
        return self.add(Fault("status", status=status, times=n, **kw))

    def answer(self, status: int, body: bytes, **kw: Any) -> FaultProxy:
        """The next matching request gets ``status`` with ``body``, whatever the registry would say."""
        return self.add(Fault("status", status=status, body=body, **kw))

    def rate_limit(self, retry_after: str = "1", **kw: Any) -> FaultProxy:
        """The next matching request gets ``429 Too Many Requests`` with ``Retry-After``."""
        return self.add(Fault("status", status=429, headers={"Retry-After": retry_after}, **kw))

    def cut(self, after_bytes: int | None = 0, **kw: Any) -> FaultProxy:
        """The next matching response is cut after its head and ``after_bytes`` body bytes."""
        return self.add(Fault("cut", after_bytes=after_bytes, **kw))

    def slow_upload(self, rate: int, **kw: Any) -> FaultProxy:
        """Matching requests' bodies are read at ``rate`` bytes a second."""
        return self.add(Fault("slow-upload", rate=rate, **kw))

    def redirect(self, location: str, **kw: Any) -> FaultProxy:
        """The next matching request is answered ``307 Temporary Redirect`` to ``location``."""
        return self.add(Fault("redirect", status=307, location=location, **kw))

    def stall(self, after_bytes: int | None = None, **kw: Any) -> FaultProxy:
        """The next matching request never completes (see :class:`Fault`)."""
        return self.add(Fault("stall", after_bytes=after_bytes, **kw))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def count(
        self, method: str | None = None, path_contains: str | None = None, *, status: int | None = None
    ) -> int:
        """How many requests matching the filters reached the proxy (and got ``status``)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method)
                and (path_contains is None or path_contains in r.path)
                and (status is None or r.status == status)
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    # internals ------------------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main(started))
        self._loop.close()

    async def _main(self, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        # Every read and write waits in a thread (see _Connection): enough for all in flight,
        # idle connections a client keeps included.
        self._loop.set_default_executor(ThreadPoolExecutor(256, thread_name_prefix="fault-proxy"))
        started.set()
        await self._stop.wait()
        # Cancel hanging handlers (stalls, connections a client kept idle) and let them close
        # their sockets here, rather than leave them to a garbage collection in another thread.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _accept(self) -> None:
        """Hand each connection to the loop, until the listener is closed."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            try:
                asyncio.run_coroutine_threadsafe(self._serve(_Connection(sock)), self._loop)
            except RuntimeError:  # the loop has stopped
                sock.close()
                return

    def _take_fault(self, method: str, path: str, *, slow: bool = False) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.kind == "slow-upload") == slow and fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _log(
        self, method: str, path: str, outcome: str, status: int = 0, headers: dict[str, str] | None = None
    ) -> None:
        with self._lock:
            self.requests.append(ProxiedRequest(method, path, outcome, status, headers or {}))

    @staticmethod
    async def _read_slowly(client: _Connection, length: int, rate: int) -> bytes:
        parts: list[bytes] = []
        left = length
        while left:
            part = await client.readexactly(min(left, 16384))
            parts.append(part)
            left -= len(part)
            await asyncio.sleep(len(part) / rate)
        return b"".join(parts)

    async def _serve(self, client: _Connection) -> None:
        try:
            await self._serve_one(client)
            await client.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # (a client or the server went away, or the server sent nothing for too long)
        finally:
            client.close()

    async def _serve_one(self, client: _Connection) -> None:
        head = await client.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = [line for line in lines[1:] if line]
        length = 0
        chunked = False
        out_headers: list[str] = []
        for line in headers:
            name, _, value = line.partition(":")
            lname = name.strip().lower()
            if lname == "content-length":
                length = int(value.strip())
            elif lname == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            if lname in ("connection", "keep-alive", "proxy-connection"):
                continue
            out_headers.append(line)
        out_headers.append("Connection: close")
        slow = self._take_fault(method, path, slow=True)
        if slow is not None and not chunked:
            body = await self._read_slowly(client, length, slow.rate)
        else:
            body = await (self._read_chunked(client) if chunked else client.readexactly(length))
        if chunked:
            out_headers = [h for h in out_headers if not h.lower().startswith("transfer-encoding")]
            out_headers.append(f"Content-Length: {len(body)}")

        seen = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in headers)
        }
        fault = self._take_fault(method, path)
        if fault is not None and fault.kind == "redirect":
            self._log(method, path, "redirect", 307, seen)
            client.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {fault.location}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            await client.drain()
            return
        if fault is not None and fault.kind == "status":
            self._log(method, path, f"status {fault.status}", fault.status, seen)
            payload = fault.body
            if payload is None:
                payload = json.dumps(
                    {"errors": [{"code": "UNAVAILABLE", "message": "injected fault", "detail": None}]}
                ).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in fault.headers.items())
            client.write(
                (
                    f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n"
                ).encode("latin-1")
                + payload
            )
            await client.drain()
            return
        if fault is not None and fault.kind == "stall" and fault.after_bytes is None:
            self._log(method, path, "stall", 0, seen)
            await asyncio.Event().wait()  # until the proxy shuts down
            return

        if self.paginate_tags and method == "GET" and "/tags/list?" in path and "n=" in path:
            await self._paginated_tags(path, out_headers, client, seen)
            return

        upstream = await _Connection.open(self._upstream)
        try:
            await upstream.send(
                (f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(out_headers) + "\r\n\r\n").encode("latin-1")
                + body
            )
            resp_head = await upstream.readuntil(b"\r\n\r\n")
            status = int(resp_head.split(b" ", 2)[1])
            # Log before the client can see the answer: tests read the log from another thread.
            self._log(method, path, "forwarded" if fault is None else fault.kind, status, seen)
            if fault is not None and fault.kind == "cut" and fault.after_bytes is None:
                return  # the upstream did the work, the client never hears about it
            if self.strip_response_headers:
                resp_head = b"\r\n".join(
                    line
                    for line in resp_head.split(b"\r\n")
                    if line.split(b":", 1)[0].strip().lower().decode("latin-1")
                    not in self.strip_response_headers
                )
            if self.location_origin:
                resp_head = re.sub(
                    rb"(?im)^(location:[ \t]*)(?:https?://[^/\r\n]+)?(/[^\r\n]*)",
                    lambda m: m.group(1) + self.location_origin.encode() + m.group(2),
                    resp_head,
                )
            client.write(resp_head)
            if fault is None:
                while chunk := await upstream.read():
                    client.write(chunk)
                    await client.drain()
                return
            limit = fault.after_bytes or 0
            sent = 0
            while sent < limit:
                chunk = await upstream.read(min(65536, limit - sent))
                if not chunk:
                    break
                client.write(chunk)
                sent += len(chunk)
            await client.drain()
            if fault.kind == "stall":
                await asyncio.Event().wait()
            # "cut": fall through and close both sides with the body incomplete.
        finally:
            upstream.close()

    async def _paginated_tags(
        self, path: str, headers: list[str], client: _Connection, seen: dict[str, str]
    ) -> None:
        from urllib.parse import parse_qs, urlencode, urlsplit

        parts = urlsplit(path)
        query = parse_qs(parts.query)
        n = int(query["n"][0])
        last = query.get("last", [""])[0]
        upstream = await _Connection.open(self._upstream)
        try:
            await upstream.send(
                (f"GET {parts.path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
            )
            raw = await upstream.read_all()
        finally:
            upstream.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        self._log("GET", path, "paginated", status, seen)
        if status != 200:
            client.write(raw)
            await client.drain()
            return
        listing = json.loads(body)
        tags = sorted(listing.get("tags") or [])
        rest = [t for t in tags if t > last] if last else tags
        page = rest[:n]
        link = ""
        if len(rest) > n:
            query = urlencode({"n": n, "last": page[-1]})
            link = f'Link: <{self.link_origin}{parts.path}?{query}>; rel="next"\r\n'
        payload = json.dumps({"name": listing.get("name"), "tags": page}).encode()
        client.write(
            (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n{link}Connection: close\r\n\r\n"
            ).encode("latin-1")
            + payload
        )
        await client.drain()

    @staticmethod
    async def _read_chunked(client: _Connection) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = await client.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await client.readuntil(b"\r\n")  # trailer end (no trailers expected)
                return b"".join(parts)
            parts.append(await client.readexactly(size))
            await client.readexactly(2)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream``, closed on exit."""
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()


def _reset(client: socket.socket, server: socket.socket) -> None:
    """End a relayed connection: the client sees the end of the stream, then a reset (shutting
    both down first wakes the pump reading the other way)."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for end in (client, server):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()


def _delayed(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy ``src`` to ``dst``, each chunk sent ``delay`` seconds after it arrived (queued, not
    slept on: latency without a bandwidth limit)."""
    pending: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def send() -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    threading.Thread(target=send, daemon=True).start()
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            pending.put((time.monotonic() + delay, data))
    pending.put((0.0, b""))


@dataclass
class TcpRelay:
    """What :func:`tcp_relay` yields: where to connect, and how many connections it cut."""

    host: str
    cuts: int = 0


@contextlib.contextmanager
def tcp_relay(
    upstream: str,
    *,
    rate: int | None = None,
    cut_answer_after: int | None = None,
    close_idle_after: float | None = None,
    delay: float | None = None,
) -> Iterator[TcpRelay]:
    """A TCP relay to ``upstream`` (``host:port``), which sees nothing of TLS inside: ``rate`` passes
    what the client sends at that many bytes a second (a slow uplink); ``cut_answer_after`` resets
    the first connection whose answers pass that many bytes (a connection cut mid-body, kept-alive
    ones included); ``close_idle_after`` closes a connection the client sent nothing on for that
    many seconds (as load balancers drop idle kept-alive connections); ``delay`` (alone) delivers
    every byte that many seconds later, each way (a remote server's latency)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    host, port = upstream.rsplit(":", 1)
    relay = TcpRelay(f"127.0.0.1:{listener.getsockname()[1]}")
    lock = threading.Lock()

    def pump(src: socket.socket, dst: socket.socket, upload: bool) -> None:
        moved = 0
        if upload and close_idle_after is not None:
            src.settimeout(close_idle_after)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                try:
                    data = src.recv(16384)
                except TimeoutError:
                    _reset(src, dst)  # idle too long: dropped as abruptly as a balancer does
                    return
                if not data:
                    break
                moved += len(data)
                if not upload and cut_answer_after is not None and moved > cut_answer_after:
                    with lock:
                        cut = relay.cuts == 0
                        relay.cuts += cut
                    if cut:
                        _reset(dst, src)  # the client gets what came so far, then the cut
                        return
                dst.sendall(data)
                if upload and rate is not None:
                    time.sleep(len(data) / rate)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                client, _ = listener.accept()
                server = socket.create_connection((host, int(port)))
                if delay is not None:
                    for a, b in ((client, server), (server, client)):
                        threading.Thread(target=_delayed, args=(a, b, delay), daemon=True).start()
                    continue
                threading.Thread(target=pump, args=(client, server, True), daemon=True).start()
                threading.Thread(target=pump, args=(server, client, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield relay
    finally:
        stop.set()
        listener.close()
