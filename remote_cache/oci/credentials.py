"""Who am I at a registry: explicit credentials, environment, or docker's ``config.json``.

Resolution order (first hit wins):

1. ``username``/``password`` passed explicitly (CLI ``--username`` + ``--password-stdin``);
2. ``REMOTE_CACHE_USERNAME`` / ``REMOTE_CACHE_PASSWORD`` in the environment;
3. docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``):
   ``credHelpers[host]``, then ``auths[host].auth`` (base64 ``user:password``) or
   ``identitytoken``, then ``credsStore`` — helpers run as ``docker-credential-<name> get``
   with the host on stdin, so no secret ever appears in argv.

Docker Hub is known under several names; ``https://index.docker.io/v1/`` is what ``docker
login`` writes, and it is tried for ``docker.io``/``registry-1.docker.io`` too.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RegistryAuthError

__all__ = [
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "PASS_CREDENTIALS",
    "Credentials",
    "docker_config_path",
    "resolve_credentials",
]

#: How to give credentials, for error messages (the CLI and the Dagger module differ).
PASS_CREDENTIALS = (
    "a username and password (CLI: --username with --password-stdin; "
    "Dagger: registry(username=..., password=...))"
)

ENV_USERNAME = "REMOTE_CACHE_USERNAME"
ENV_PASSWORD = "REMOTE_CACHE_PASSWORD"
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


@dataclass(frozen=True)
class Credentials:
    """A username and secret for one registry. The secret never appears in ``repr``.

    When ``identity_token`` is set (``docker login`` with an OAuth identity), it is sent as an
    OAuth2 refresh token to the token realm instead of basic credentials.
    """

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)


def docker_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where docker keeps ``config.json``: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    env = os.environ if environ is None else environ
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".docker" / "config.json"


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
    except FileNotFoundError as exc:
        raise RegistryAuthError(
            f"docker config names credential helper {name!r} but {program} is not on PATH: "
            f"install it, or pass {PASS_CREDENTIALS}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise RegistryAuthError(
            f"credential helper {program} did not answer within {_HELPER_TIMEOUT}s"
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


def _from_auths(entry: Any, config_path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    username = entry.get("username")
    password = entry.get("password")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RegistryAuthError(
                f"the 'auth' entry for {key} in {config_path} is not base64 'user:password'; "
                f"run `docker login {key}` again"
            ) from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise RegistryAuthError(
                f"the 'auth' entry for {key} in {config_path} has no ':'; run `docker login {key}` again"
            )
    if isinstance(token, str) and token:
        return Credentials(username=str(username or ""), password="", identity_token=token)
    if isinstance(username, str) and isinstance(password, str) and (username or password):
        return Credentials(username=username, password=password)
    return None


def _from_docker_config(host: str, path: Path, environ: Mapping[str, str]) -> Credentials | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryAuthError(f"cannot read docker config {path}: {exc}; fix or remove it") from exc
    if not isinstance(config, dict):
        return None
    aliases = _host_aliases(host)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for alias in aliases:
            helper = helpers.get(alias)
            if isinstance(helper, str) and helper:
                return _run_helper(helper, alias, environ)
    auths = config.get("auths")
    if isinstance(auths, dict):
        for alias in aliases:
            found = _from_auths(auths.get(alias), path, alias)
            if found is not None:
                return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        for alias in aliases[:2]:
            found = _run_helper(store, alias, environ)
            if found is not None:
                return found
    return None


def resolve_credentials(
    host: str,
    *,
    username: str | None = None,
    password: str | None = None,
    environ: Mapping[str, str] | None = None,
    docker_config_path: Path | None = None,
) -> Credentials | None:
    """Credentials for ``host`` (``HOST[:PORT]``) from args, environment or docker config; else None.

    A username without a password (or the reverse) is an error: it is almost always a typo.
    """
    env = os.environ if environ is None else environ
    if username is not None or password is not None:
        return _pair(username, password, "--username", "--password")
    env_user, env_pass = env.get(ENV_USERNAME), env.get(ENV_PASSWORD)
    if env_user is not None or env_pass is not None:
        return _pair(env_user, env_pass, ENV_USERNAME, ENV_PASSWORD)
    path = docker_config_path if docker_config_path is not None else _default_config_path(env)
    return _from_docker_config(host, path, env)


def _default_config_path(env: Mapping[str, str]) -> Path:
    return docker_config_path(env)


def _pair(username: str | None, password: str | None, user_name: str, pass_name: str) -> Credentials:
    if not username:
        raise RegistryAuthError(f"{pass_name} was given without {user_name}: set both or neither")
    if password is None:
        raise RegistryAuthError(f"{user_name} was given without {pass_name}: set both or neither")
    return Credentials(username=username, password=password)
