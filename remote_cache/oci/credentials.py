"""Who am I at a registry: explicit credentials, environment, or the credential files docker and
the containers tools (podman, skopeo, buildah) write.

Resolution order (first hit wins):

1. ``username``/``password`` passed explicitly (CLI ``--username`` + ``--password-stdin``);
2. ``REMOTE_CACHE_USERNAME`` / ``REMOTE_CACHE_PASSWORD`` in the environment;
3. credential files, the first with an entry for the host deciding (:func:`auth_files`): the one
   file given explicitly (CLI ``--authfile``), else ``$REGISTRY_AUTH_FILE`` alone, else
   ``${XDG_RUNTIME_DIR}/containers/auth.json``, ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``
   and docker's ``config.json`` -- the order of containers-auth.json(5) as containers/image
   implements it. In each: ``credHelpers[host]``, then ``auths[host].auth`` (base64
   ``user:password``) or ``identitytoken``, then ``credsStore`` -- helpers run as
   ``docker-credential-<name> get`` with the host on stdin, so no secret ever appears in argv.

A file found by searching that cannot be read or parsed is logged once (logger ``remote_cache``)
and skipped, so a broken file never locks anyone out of an anonymous registry; a file named
explicitly that is missing or malformed raises :class:`~remote_cache.errors.InvalidConfigFile`.

Docker Hub is known under several names; ``https://index.docker.io/v1/`` is what ``docker
login`` writes, and it is tried for ``docker.io``/``registry-1.docker.io`` too.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct

from ..errors import InvalidConfigFile, RegistryAuthError, os_reason
from ..home import home
from ..records import hiding

__all__ = [
    "ENV_AUTH_FILE",
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "PASS_CREDENTIALS",
    "Credentials",
    "auth_files",
    "docker_config_path",
    "resolve_credentials",
]

log = logging.getLogger("remote_cache")

#: How to give credentials, for error messages (the CLI and the Dagger module differ).
PASS_CREDENTIALS = (
    "a username and password (CLI: --username with --password-stdin; "
    "Dagger: registry(username=..., password=...))"
)

ENV_USERNAME = "REMOTE_CACHE_USERNAME"
ENV_PASSWORD = "REMOTE_CACHE_PASSWORD"
#: The containers tools' override of where credentials live (the default of skopeo's --authfile).
ENV_AUTH_FILE = "REGISTRY_AUTH_FILE"
_DOCKER_HUB_NAMES = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io",
)
#: Username docker credential helpers return for an identity (refresh) token.
_TOKEN_USERNAME = "<token>"
_HELPER_TIMEOUT = 30.0


class Credentials(Struct, frozen=True):
    """A username and secret for one registry. The secret never appears in ``repr``.

    When ``identity_token`` is set (``docker login`` with an OAuth identity), it is sent as an
    OAuth2 refresh token to the token realm instead of basic credentials.
    """

    username: str
    password: str
    identity_token: str | None = None

    __repr__, __rich_repr__ = hiding("password", "identity_token")


def docker_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where docker keeps ``config.json``: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``
    (None without either: no home directory)."""
    env = os.environ if environ is None else environ
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    user = home(env)
    return None if user is None else user / ".docker" / "config.json"


def auth_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The credential files searched, in order, when none is given explicitly.

    ``$REGISTRY_AUTH_FILE`` alone when set (skopeo and podman take it as ``--authfile``, and since
    containers/image 5.24 read nothing else then); else ``${XDG_RUNTIME_DIR}/containers/auth.json``
    (``/run/containers/$UID/auth.json`` without XDG_RUNTIME_DIR), then
    ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``, then docker's ``config.json``.
    """
    env = os.environ if environ is None else environ
    override = env.get(ENV_AUTH_FILE)
    if override:
        return [Path(override)]
    runtime = env.get("XDG_RUNTIME_DIR")
    primary = Path(runtime) if runtime else Path("/run/containers") / str(os.getuid())
    user = home(env)
    xdg = env.get("XDG_CONFIG_HOME")
    config_home = Path(xdg) if xdg else None if user is None else user / ".config"
    found = [
        primary / ("containers/auth.json" if runtime else "auth.json"),
        None if config_home is None else config_home / "containers" / "auth.json",
        docker_config_path(env),
    ]
    return [path for path in found if path is not None]


def _host_aliases(host: str) -> list[str]:
    """Keys under which docker may have stored credentials for ``host``."""
    bare = host.lower()
    if bare in _DOCKER_HUB_NAMES:
        return list(_DOCKER_HUB_NAMES)
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def _run_helper(name: str, server: str, environ: Mapping[str, str]) -> Credentials | None:
    """Ask ``docker-credential-<name>`` for ``server``; None when it knows nothing about it."""
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            env=dict(environ),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RegistryAuthError(
            f"credential helper {program} did not answer within {_HELPER_TIMEOUT}s"
        ) from exc
    except OSError as exc:
        # Not found, unless it is on PATH (then its interpreter is missing); else not runnable.
        if isinstance(exc, FileNotFoundError) and shutil.which(program, path=environ.get("PATH")) is None:
            raise RegistryAuthError(
                f"a credential file names credential helper {name!r} but {program} is not on PATH: "
                f"install it, or pass {PASS_CREDENTIALS}"
            ) from exc
        raise RegistryAuthError(
            f"credential helper {program} cannot be run ({os_reason(exc)}): fix its installation, "
            f"or pass {PASS_CREDENTIALS}"
        ) from exc
    if proc.returncode != 0:
        # "credentials not found in native keychain" is the helpers' normal "no entry" answer.
        if b"not found" in proc.stdout.lower() or b"not found" in proc.stderr.lower():
            return None
        raise RegistryAuthError(
            f"credential helper {program} failed for {server} (exit {proc.returncode}); "
            f"run `echo {server} | {program} get` to see why, or pass {PASS_CREDENTIALS}"
        )
    try:
        data = json.loads(proc.stdout)
        username = str(data.get("Username", ""))
        secret = str(data.get("Secret", ""))
    except (ValueError, AttributeError) as exc:
        raise RegistryAuthError(f"credential helper {program} returned something that is not JSON") from exc
    if not secret:
        return None
    if username == _TOKEN_USERNAME:
        return Credentials(username="", password="", identity_token=secret)
    return Credentials(username=username, password=secret)


class _Malformed(Exception):
    """What is wrong with a credential file, in words that hold no secret."""


def _from_auths(entry: Any, key: str) -> Credentials | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise _Malformed(f"its entry for {key} is not a JSON object (log in to {key} again)")
    for name in ("auth", "identitytoken", "username", "password"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise _Malformed(f"its {name!r} entry for {key} is not a string (log in to {key} again)")
    token = entry.get("identitytoken")
    username = entry.get("username")
    password = entry.get("password")
    auth = entry.get("auth")
    if auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            # The decoder's message may quote the secret: say what is wrong, not where.
            raise _Malformed(
                f"its 'auth' entry for {key} is not base64 'user:password' (log in to {key} again)"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise _Malformed(f"its 'auth' entry for {key} has no ':' (log in to {key} again)")
    if token:  # (each of the four is a string or None by now)
        return Credentials(username=username or "", password="", identity_token=token)
    if isinstance(username, str) and isinstance(password, str) and (username or password):
        return Credentials(username=username, password=password)
    return None


def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object in a credential file; None when there is no such file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Malformed(f"it cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        config = json.loads(raw)
    except UnicodeDecodeError:
        raise _Malformed("it is not UTF-8 text") from None
    except ValueError as exc:
        # json's message is a position ("Expecting ',' delimiter: line 1 column 58"), never content.
        raise _Malformed(f"it is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _Malformed("it holds no JSON object")
    for section in ("auths", "credHelpers"):
        if section in config and not isinstance(config[section], dict):
            raise _Malformed(f"its {section!r} is not a JSON object")
    return config


def _lookup(host: str, config: dict[str, Any], environ: Mapping[str, str]) -> Credentials | None:
    """Credentials for ``host`` in one parsed credential file (helpers, entries, store)."""
    aliases = _host_aliases(host)
    helpers = config.get("credHelpers") or {}
    for alias in aliases:
        helper = helpers.get(alias)
        if isinstance(helper, str) and helper:
            return _run_helper(helper, alias, environ)
    auths = config.get("auths") or {}
    for alias in aliases:
        found = _from_auths(auths.get(alias), alias)
        if found is not None:
            return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        for alias in aliases[:2]:
            found = _run_helper(store, alias, environ)
            if found is not None:
                return found
    return None


#: (file, problem) pairs already warned about: a long-lived process says it once.
_warned: set[tuple[Path, str]] = set()


def _from_found_file(host: str, path: Path, environ: Mapping[str, str]) -> Credentials | None:
    """Credentials from a file found by searching; one warning and none when it is malformed."""
    try:
        config = _read(path)
        return None if config is None else _lookup(host, config, environ)
    except _Malformed as exc:
        if (path, str(exc)) not in _warned:
            _warned.add((path, str(exc)))
            log.warning("ignoring the credentials in %s: %s; fix or remove it", path, exc)
        return None


def _explicit_file(path: Path) -> dict[str, Any]:
    """The file given with --authfile, parsed; InvalidConfigFile when it is missing or malformed."""
    try:
        config = _read(path)
    except _Malformed as exc:
        raise InvalidConfigFile(f"--authfile {path}: {exc}") from None
    if config is None:
        raise InvalidConfigFile(f"--authfile {path} does not exist; give the path of an auth.json file")
    return config


def resolve_credentials(
    host: str,
    *,
    username: str | None = None,
    password: str | None = None,
    environ: Mapping[str, str] | None = None,
    auth_file: Path | None = None,
) -> Credentials | None:
    """Credentials for ``host`` (``HOST[:PORT]``) from args, environment or credential files; else None.

    ``auth_file`` is the one file to read instead of searching (CLI ``--authfile``); it is checked
    even when explicit or environment credentials win, since naming a broken file is a mistake.
    A username without a password (or the reverse) is an error: it is almost always a typo.
    """
    env = os.environ if environ is None else environ
    explicit = _explicit_file(auth_file) if auth_file is not None else None
    if username is not None or password is not None:
        return _pair(username, password, "--username", "--password")
    env_user, env_pass = env.get(ENV_USERNAME), env.get(ENV_PASSWORD)
    if env_user is not None or env_pass is not None:
        return _pair(env_user, env_pass, ENV_USERNAME, ENV_PASSWORD)
    if explicit is not None:
        try:
            return _lookup(host, explicit, env)
        except _Malformed as exc:
            raise InvalidConfigFile(f"--authfile {auth_file}: {exc}") from None
    for path in auth_files(env):
        found = _from_found_file(host, path, env)
        if found is not None:
            return found
    return None


def _pair(username: str | None, password: str | None, user_name: str, pass_name: str) -> Credentials:
    if not username:
        raise RegistryAuthError(f"{pass_name} was given without {user_name}: set both or neither")
    if password is None:
        raise RegistryAuthError(f"{user_name} was given without {pass_name}: set both or neither")
    return Credentials(username=username, password=password)
