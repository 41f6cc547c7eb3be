"""Which certificates a connection to a registry trusts and presents: skopeo's ``--tls-verify`` and
``--cert-dir``, and the per-host directories of containers-certs.d(5) and docker.

A certificate directory holds CA certificates as ``*.crt`` (trusted in addition to the system's)
and client certificates as ``*.cert`` with their keys as ``*.key`` of the same name. Without
``--cert-dir``, the first existing of ``~/.config/containers/certs.d/HOST[:PORT]``,
``/etc/containers/certs.d/HOST[:PORT]`` and ``/etc/docker/certs.d/HOST[:PORT]`` is used, as
containers/image does. A directory given explicitly that is missing or unusable raises
:class:`~remote_cache.errors.InvalidConfigFile`; what is wrong in a per-host one is warned about
once and left out (a ``.cert`` without its ``.key`` leaves out the whole directory).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from msgspec import Struct

from ..errors import InvalidConfigFile, os_reason
from ..home import home

__all__ = ["CertDir", "TlsOptions", "default_context", "find_cert_dir", "per_host_cert_dirs", "tls_context"]

log = logging.getLogger("remote_cache")

_SYSTEM_CERT_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


class TlsOptions(Struct, frozen=True):
    """How to use TLS with a registry.

    ``verify`` False skips certificate verification and, as skopeo's ``--tls-verify=false``,
    falls back to plain HTTP when the registry does not speak TLS. ``cert_dir`` replaces the
    per-host directories.
    """

    verify: bool = True
    cert_dir: Path | None = None


class CertDir(Struct, frozen=True):
    """The certificates of one directory: CA files to trust, (certificate, key) pairs to present."""

    path: Path
    explicit: bool
    cas: tuple[Path, ...]
    clients: tuple[tuple[Path, Path], ...]

    def load_into(self, context: ssl.SSLContext) -> None:
        """Trust the CAs and present the client certificates in ``context`` (a file that will not
        load is refused, or, in a per-host directory, warned about and left out)."""
        for ca in self.cas:
            try:
                context.load_verify_locations(cafile=ca)
            except OSError as exc:  # ssl.SSLError included
                _unusable(self.path, f"{ca.name} is not a PEM CA certificate ({exc})", explicit=self.explicit)
        for cert, key in self.clients:
            try:
                # An empty passphrase: an encrypted key fails here instead of prompting on a terminal.
                context.load_cert_chain(cert, key, password="")
            except OSError as exc:
                problem = f"{cert.name} and {key.name} are not a PEM certificate and unencrypted key ({exc})"
                _unusable(self.path, problem, explicit=self.explicit)


def default_context(verify: bool = True) -> ssl.SSLContext:
    """The trust httpx builds by default (httpx 0.28 ``create_ssl_context``): ``SSL_CERT_FILE``,
    else ``SSL_CERT_DIR``, else certifi's bundle; with ``verify`` False, none. The registry client
    (:mod:`.registry.threaded`) used to be httpx: it keeps trusting exactly what httpx did."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if os.environ.get("SSL_CERT_FILE"):
        return _trusting("SSL_CERT_FILE")
    if os.environ.get("SSL_CERT_DIR"):
        return _trusting("SSL_CERT_DIR")
    import certifi  # here: loading it and its bundle is for TLS connections only

    return ssl.create_default_context(cafile=certifi.where())


def _trusting(variable: str) -> ssl.SSLContext:
    """A context trusting the CAs ``variable`` (``SSL_CERT_FILE`` or ``SSL_CERT_DIR``) names; a file
    that cannot be loaded is said so by name (the ssl module's error names neither). A directory is
    only searched when a certificate is checked: a wrong one shows as an untrusted certificate."""
    where = os.environ[variable]
    try:
        if variable == "SSL_CERT_FILE":
            return ssl.create_default_context(cafile=where)
        return ssl.create_default_context(capath=where)
    except (OSError, ssl.SSLError) as exc:
        reason = os_reason(exc)
        raise InvalidConfigFile(
            f"{variable}={where}: no CA certificates could be loaded from it ({reason}); "
            "point it at a PEM file of CA certificates, or unset it"
        ) from None


def tls_context(host: str, options: TlsOptions) -> ssl.SSLContext | None:
    """The TLS context for ``host``: None for the default trust (:func:`default_context`, built
    when a TLS connection first needs it: loading the CAs costs ~45 ms), else that trust (or
    none, under ``--tls-verify=false``) plus the host's certificate directory."""
    certs = find_cert_dir(host, options)
    if certs is None and options.verify:
        return None
    context = default_context(options.verify)
    if certs is not None:
        certs.load_into(context)
    return context


def per_host_cert_dirs(host: str, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where containers/image looks for ``host``'s certificates, in order (``host`` is ``HOST[:PORT]``)."""
    env = os.environ if environ is None else environ
    user = home(env)
    per_user = () if user is None else (user / ".config/containers/certs.d",)
    return [base / host for base in (*per_user, *_SYSTEM_CERT_DIRS)]


def find_cert_dir(host: str, options: TlsOptions, environ: Mapping[str, str] | None = None) -> CertDir | None:
    """The certificate directory for ``host``: ``options.cert_dir``, else the first per-host one."""
    if options.cert_dir is not None:
        if not options.cert_dir.is_dir():
            raise InvalidConfigFile(
                f"--cert-dir {options.cert_dir} does not exist or is not a directory; give a directory "
                "holding the registry's CA certificate as *.crt"
            )
        return _scan(options.cert_dir, explicit=True)
    for directory in per_host_cert_dirs(host, environ):
        try:
            if directory.is_dir():
                return _scan(directory, explicit=False)
        except PermissionError:
            continue  # as containers/image: a directory we may not read is not ours
    return None


def _scan(directory: Path, *, explicit: bool) -> CertDir | None:
    """The certificate files of ``directory``; a ``*.cert`` needs its ``*.key`` and the reverse."""
    try:
        names = sorted(entry.name for entry in directory.iterdir() if entry.is_file())
    except OSError as exc:
        _unusable(directory, f"it cannot be read ({exc.strerror or exc})", explicit=explicit)
        return None
    cas = tuple(directory / name for name in names if name.endswith(".crt"))
    clients: list[tuple[Path, Path]] = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".cert":
            if f"{stem}.key" not in names:
                problem = f"client certificate {name} has no {stem}.key (CA certificates end in .crt)"
                _unusable(directory, problem, explicit=explicit)
                return None
            clients.append((directory / name, directory / f"{stem}.key"))
        elif ext == ".key" and f"{stem}.cert" not in names:
            _unusable(directory, f"key {name} has no client certificate {stem}.cert", explicit=explicit)
            return None
    return CertDir(directory, explicit, cas, tuple(clients))


#: (directory, problem) pairs already warned about.
_warned: set[tuple[Path, str]] = set()


def _unusable(directory: Path, problem: str, *, explicit: bool) -> None:
    """Refuse an explicit directory; warn once about a per-host one (which is then skipped)."""
    if explicit:
        raise InvalidConfigFile(f"--cert-dir {directory}: {problem}")
    if (directory, problem) not in _warned:
        _warned.add((directory, problem))
        log.warning("ignoring the certificates in %s: %s", directory, problem)
