"""Store references: a registry repository, an OCI layout, a bucket; parsed once (no I/O).

Grammar (skopeo-style, names as in the OCI distribution spec
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests)::

    reference  := ["docker://"] [host "/"] repository [":" key] ["@" digest]
                | "oci:" dir [":" key]
                | ("s3" | "gs" | "az") "://" bucket ["/" prefix] [":" key]
    host       := domain-component ("." domain-component)* [":" port] | "[" ipv6 "]" [":" port]
    repository := path-component ("/" path-component)*
    path-component := [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*
    digest     := sha256:[a-f0-9]{64}

The first component is a host when it contains a ``.`` or ``:`` or is ``localhost`` (as docker
does); otherwise the reference means Docker Hub, whose API host is ``registry-1.docker.io`` and
whose single-component repositories live under ``library/``. That normalisation happens here only.

``KEY`` is the raw cache key (made a tag later by :func:`remote_cache.keys.tag_for_key`): it is
everything after the first ``:`` that follows the last ``/``, so a key may contain ``:`` (and
``@`` when no ``algorithm:`` follows it) but not ``/``. For ``oci:`` the directory ends at the
first ``:`` (as in skopeo).

Object stores: ``bucket`` is an S3/GCS bucket or an Azure container (3 to 63 of ``a-z 0-9 . -``,
starting and ending with a letter or digit); ``prefix`` is ``/``-separated components of
``A-Z a-z 0-9 . _ -`` (no ``.``/``..``) under which the cache's objects live. Neither holds a
``:``, so the key is everything after the first ``:`` and may contain ``/`` (as for ``oci:``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from msgspec import Struct
from msgspec.structs import replace

from ..errors import InvalidReference
from ..keys import validate_key
from .digest import is_digest

__all__ = [
    "DOCKER_HUB_API_HOST",
    "DOCKER_HUB_HOSTS",
    "OBJECT_CREDENTIALS",
    "OBJECT_SCHEMES",
    "Reference",
    "is_loopback",
    "masked",
    "parse_reference",
]

DOCKER_HUB_API_HOST = "registry-1.docker.io"
#: Names users write for Docker Hub; all talk to :data:`DOCKER_HUB_API_HOST`.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", DOCKER_HUB_API_HOST})

_EXAMPLE = (
    "e.g. 'localhost:5000/team/cache:npm-linux', 'ghcr.io/org/cache:go', 's3://bucket/ci-cache:npm' "
    "or 'oci:./layout:npm'"
)

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
#: Object store schemes: S3 (and S3-compatible stores), Google Cloud Storage, Azure Blob Storage.
OBJECT_SCHEMES = ("s3", "gs", "az")
#: Where each object store's credentials go, for the messages that send users there.
OBJECT_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile, or the role)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or the SAS, or the identity)",
    "gs": "GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS",
}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")


class Reference(Struct, frozen=True):
    """Where a cache lives, plus an optional key.

    ``transport`` is ``"registry"`` (``host`` and ``repository`` set), ``"layout"`` (``path``
    set) or ``"object"`` (``scheme``, ``bucket`` and maybe ``prefix`` set). ``key`` is the raw
    cache key, ``digest`` a pinned manifest digest; either may be None.
    """

    transport: Literal["registry", "layout", "object"]
    host: str = ""
    repository: str = ""
    key: str | None = None
    digest: str | None = None
    path: str | None = None
    scheme: str = ""
    bucket: str = ""
    prefix: str = ""

    @property
    def is_docker_hub(self) -> bool:
        """True for Docker Hub references (whatever alias was written)."""
        return self.transport == "registry" and self.host == DOCKER_HUB_API_HOST

    @property
    def location(self) -> str:
        """The repository, layout or bucket without key/digest, e.g. ``localhost:5000/team/cache``."""
        if self.transport == "layout":
            return f"oci:{self.path}"
        if self.transport == "object":
            return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        host = "docker.io" if self.is_docker_hub else self.host
        return f"{host}/{self.repository}"

    def with_key(self, key: str | None) -> Reference:
        """The same repository/layout with another key (and no pinned digest)."""
        if key is not None:
            validate_key(key)
        return replace(self, key=key, digest=None)

    def __str__(self) -> str:
        text = self.location
        if self.key is not None:
            text += f":{self.key}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    """True when ``host`` (optionally with ``:port``) names this machine: localhost, 127/8, ::1."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _invalid(text: str, why: str) -> InvalidReference:
    return InvalidReference(f"invalid reference {masked(text)!r}: {why}; {_EXAMPLE}")


def masked(text: str) -> str:
    """A reference as messages quote it: what may be the password of a ``user:password@`` at its
    start is ``***``, up to the last '@' (a password may hold one) that starts no digest
    (``s3://bucket:***@main`` when it was a key's words)."""
    return _USERINFO.sub(r"\1***@", text)


#: A URL scheme; a character of a host (or a name) before its ``:``; one of a user name, which may
#: hold an '@' (an email login).
_SCHEME = r"[a-z0-9+.-]+"
_NAME = r"[^/@:\s]"
_USER_NAME = r"[^/:\s]"
#: What may be ``user:password@`` at a reference's start (never the scheme's ``s3://``): never
#: quoted. Broader than _USER on purpose (an empty user, spaces before): masking costs nothing.
_USERINFO = re.compile(rf"^(\s*(?:{_SCHEME}://)?{_USER_NAME}*:)(?!//).*@(?!sha256:)", re.I | re.S)


def parse_reference(text: str) -> Reference:
    """Parse ``HOST[:PORT]/REPO[:KEY][@sha256:...]`` or ``oci:DIR[:KEY]`` into a :class:`Reference`."""
    raw = text.strip()
    if not raw:
        raise _invalid(text, "it is empty")
    if raw.startswith("oci:"):
        return _parse_layout(text, raw[len("oci:") :])
    _refuse_credentials(raw)
    scheme, sep, rest = raw.partition("://")
    if sep and scheme in OBJECT_SCHEMES:
        return _parse_object(text, scheme, rest)
    if raw.startswith("docker://"):
        raw = raw[len("docker://") :]
    elif "://" in raw:
        raise _invalid(
            text, "only 'docker://', 'oci:', 's3://', 'gs://' and 'az://' are supported (or no prefix)"
        )

    digest: str | None = None
    at = raw.rfind("@")
    # '@' starts a digest only when an algorithm follows; otherwise it belongs to the key.
    if at != -1 and re.match(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:", raw[at + 1 :]):
        candidate = raw[at + 1 :]
        if not is_digest(candidate):
            raise _invalid(text, f"{candidate!r} after '@' is not a sha256 digest (sha256:<64 hex digits>)")
        digest = candidate
        raw = raw[:at]

    key: str | None = None
    slash = raw.rfind("/")
    colon = raw.find(":", slash + 1)
    if colon != -1:
        key = raw[colon + 1 :]
        raw = raw[:colon]
        if not key:
            raise _invalid(text, "the key after ':' is empty")
        validate_key(key)

    first, sep, rest = raw.partition("/")
    if sep and _looks_like_host(first):
        host, repository = first.lower(), rest
        if not _HOST.fullmatch(host):
            raise _invalid(text, f"{first!r} is not a valid host[:port]")
        port = host.rpartition("]")[2].partition(":")[2] if host.startswith("[") else host.partition(":")[2]
        if port and not 0 < int(port) < 65536:
            raise _invalid(text, f"port {port} of {first!r} is out of range (1-65535)")
    elif not sep and _looks_like_host(first) and ("." in first or first == "localhost"):
        shown = text.strip()
        raise _invalid(
            text,
            f"{shown!r} names a registry but no repository: add one, e.g. '{shown}/team/cache:KEY' "
            "(a Docker Hub image is 'name:tag', e.g. 'redis:7')",
        )
    else:
        host, repository = DOCKER_HUB_API_HOST, raw
    if ":" in repository:
        raise _invalid(
            text, "the key contains '/', which a registry reference cannot hold: pass the key with --key KEY"
        )
    if host in DOCKER_HUB_HOSTS:
        host = DOCKER_HUB_API_HOST
        if repository and "/" not in repository:
            repository = f"library/{repository}"
    if not repository:
        raise _invalid(text, "the repository name is missing")
    if not _REPOSITORY.fullmatch(repository):
        hint = " (repository names must be lowercase)" if repository != repository.lower() else ""
        raise _invalid(
            text,
            f"repository {repository!r} is not valid: path components are "
            f"[a-z0-9]+ separated by '.', '_', '__' or '-'{hint}",
        )
    if len(host) + 1 + len(repository) > 255:
        raise _invalid(text, "host and repository together exceed 255 characters")
    return Reference("registry", host=host, repository=repository, key=key, digest=digest)


#: ``[SCHEME://]USER:``, where credentials would begin; ``PASSWORD@HOST`` follows, the host then
#: ``/`` or the end. The password may hold ``/``, ``:`` and ``@`` (a user name no ``/`` or ``:``;
#: ``NAME:KEY@…`` of a key with an '@' ends before any '/').
_USER = re.compile(rf"^(?:({_SCHEME})://)?{_USER_NAME}+:(?!//)", re.I)
_HOST_AFTER_AT = re.compile(r"(?!sha256:)([^/@\s]+)(/|$)", re.I)
#: ``HOST:PORT/…``: a registry's reference, whose key may hold an '@' (``…/cache:py@1.2-rc``).
_HOST_PORT_FIRST = re.compile(rf"^(?:{_SCHEME}://)?{_NAME}+:\d{{1,5}}/", re.I)
#: A password's look, where a bucket's name after the '@' leaves the words unclear: a secret key's
#: alphabet (base64, hex) at length, or its ``+``, ``/`` and ``=``.
_SECRET_LOOKING = re.compile(r"[A-Za-z0-9+/=]{16,}|.*[+/=].*")


def _refuse_credentials(raw: str) -> None:
    """Refuse ``[SCHEME://]USER:PASSWORD@HOST/...`` without quoting it: CI logs keep errors, and the
    key would be sent to the store in a tag's name.

    Without a ``/`` after the host, ``s3://BUCKET:KEY`` and a Docker Hub ``NAME:KEY`` may hold an
    '@' in the key (``python@3.11``, ``deps@main``): only a registry host after the '@' (by
    docker's rule, not a version) makes it credentials, or for a bucket (whose name cannot be
    told from a key's words) a word before the '@' that looks like a secret key."""
    user = _USER.match(raw)
    if user is None or _HOST_PORT_FIRST.match(raw):
        return
    scheme = user[1].lower() if user[1] else None
    at = raw.rfind("@")
    while at >= user.end():  # (each '@' from the last: a password may hold some; the host follows the last)
        host = _HOST_AFTER_AT.match(raw, at + 1)
        if host is not None and _credentials_before(host[1], host[2], scheme, raw[user.end() : at]):
            _refuse_before(host[1], host[2], scheme)
        at = raw.rfind("@", 0, at)


def _credentials_before(place: str, slash: str, scheme: str | None, password: str) -> bool:
    """Whether ``USER:PASSWORD@PLACE`` followed by ``slash`` (``/`` or the end) is credentials,
    not ``NAME:KEY`` with an '@' in the key (see :func:`_refuse_credentials`)."""
    if slash:
        return True
    if scheme in OBJECT_SCHEMES:
        return _SECRET_LOOKING.fullmatch(password) is not None
    return scheme is not None or _names_a_host(place)


def _refuse_before(place: str, slash: str, scheme: str | None) -> None:
    fix = (
        f"set {OBJECT_CREDENTIALS[scheme]}"
        if scheme in OBJECT_CREDENTIALS
        else "set REMOTE_CACHE_USERNAME and REMOTE_CACHE_PASSWORD, or pass --username with --password-stdin"
    )
    key_hint = "" if slash else " (a key holding '@' goes in --key KEY)"
    raise InvalidReference(
        f"invalid reference: it holds credentials before {place!r} (user:password@); a reference "
        f"never carries them (it is shown in logs): {fix}{key_hint}"
    )


#: What follows a key's '@' as often as a host would: a version (``3.11``, ``v1.2.3``).
_VERSION = re.compile(r"v?\d+(?:\.\d+){0,2}", re.I)


def _names_a_host(after_at: str) -> bool:
    """Whether what follows ``NAME:WORD@`` (no ``/`` after it) is a registry's host rather than
    the rest of a Docker Hub key: a host by docker's rule that is no version."""
    return _looks_like_host(after_at) and not _VERSION.fullmatch(after_at)


def _looks_like_host(name: str) -> bool:
    """Whether a reference's first component is a host (docker's rule): a ``.`` or ``:``, or
    ``localhost``, or an IPv6 literal."""
    return "." in name or ":" in name or name == "localhost" or name.startswith("[")


def _parse_layout(text: str, rest: str) -> Reference:
    path, sep, key = rest.partition(":")
    if not path:
        raise _invalid(text, "the layout directory after 'oci:' is missing")
    if sep:
        if not key:
            raise _invalid(text, "the key after ':' is empty")
        validate_key(key)
    return Reference("layout", path=path, key=key if sep else None)


def _parse_object(text: str, scheme: str, rest: str) -> Reference:
    colon = rest.find(":")  # bucket and prefix never hold a ':', so the key may hold '/' (as for layouts)
    location, key = (rest[:colon], rest[colon + 1 :]) if colon != -1 else (rest, None)
    bucket, _, prefix = location.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise _invalid(
            text,
            f"{bucket!r} is not a bucket name (3-63 of a-z 0-9 . -, starting and ending with a letter "
            "or digit)",
        )
    if scheme == "az" and ("." in bucket or "--" in bucket):
        raise _invalid(text, f"{bucket!r} is not an Azure container name (a-z 0-9 and single '-', no '.')")
    prefix = prefix.rstrip("/")
    parts = prefix.split("/") if prefix else []
    if not all(_PREFIX_COMPONENT.fullmatch(part) and part not in (".", "..") for part in parts):
        raise _invalid(text, f"prefix {prefix!r} must be '/'-separated components of A-Z a-z 0-9 . _ -")
    if key is not None:
        if not key:
            raise _invalid(text, "the key after ':' is empty")
        validate_key(key)
    return Reference("object", key=key, scheme=scheme, bucket=bucket, prefix=prefix)
