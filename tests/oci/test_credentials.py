"""Credential resolution: arguments, environment, docker config.json, real credential helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from remote_cache.errors import RegistryAuthError
from remote_cache.oci.credentials import Credentials, docker_config_path, resolve_credentials
from remote_cache.oci.registry import RegistryStore
from tests.registry_server import RegistryServer

HOST = "registry.example.com:5000"


def write_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def install_helper(bindir: Path, name: str, secrets: dict[str, tuple[str, str]]) -> Path:
    """A real docker-credential-<name> executable: reads the host on stdin, logs its argv."""
    bindir.mkdir(parents=True, exist_ok=True)
    log = bindir / f"{name}.log"
    script = bindir / f"docker-credential-{name}"
    table = {host: {"ServerURL": host, "Username": u, "Secret": p} for host, (u, p) in secrets.items()}
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"table = {json.dumps(table)!r}\n"
        "host = sys.stdin.read().strip()\n"
        f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv, 'host': host}}) + '\\n')\n"
        "entry = json.loads(table).get(host)\n"
        "if sys.argv[1:] != ['get']:\n"
        "    sys.exit(2)\n"
        "if entry is None:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "print(json.dumps(entry))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log


def env_with_path(bindir: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def test_explicit_arguments_win(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"auths": {HOST: {"auth": auth("cfg", "cfgpw")}}})
    env = {"REMOTE_CACHE_USERNAME": "env", "REMOTE_CACHE_PASSWORD": "envpw"}
    got = resolve_credentials(HOST, username="arg", password="argpw", environ=env, docker_config_path=config)
    assert got == Credentials("arg", "argpw")


def test_environment_before_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"auths": {HOST: {"auth": auth("cfg", "cfgpw")}}})
    env = {"REMOTE_CACHE_USERNAME": "env", "REMOTE_CACHE_PASSWORD": "envpw"}
    assert resolve_credentials(HOST, environ=env, docker_config_path=config) == Credentials("env", "envpw")


def test_half_given_credentials_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError, match="--password"):
        resolve_credentials(HOST, username="only-user", environ={}, docker_config_path=tmp_path / "none")
    with pytest.raises(RegistryAuthError, match="REMOTE_CACHE_USERNAME"):
        resolve_credentials(HOST, environ={"REMOTE_CACHE_PASSWORD": "pw"}, docker_config_path=tmp_path / "x")


def test_config_auths_base64(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"auths": {f"https://{HOST}": {"auth": auth("cfg", "pa:ss")}, "other.io": {"auth": "!!"}}}
    )
    assert resolve_credentials(HOST, environ={}, docker_config_path=config) == Credentials("cfg", "pa:ss")
    assert resolve_credentials("unknown.io", environ={}, docker_config_path=config) is None
    with pytest.raises(RegistryAuthError, match=r"docker login other\.io"):
        resolve_credentials("other.io", environ={}, docker_config_path=config)


def test_config_found_through_docker_config_env(tmp_path: Path) -> None:
    write_config(tmp_path / "dc", {"auths": {HOST: {"auth": auth("u", "p")}}})
    env = {"DOCKER_CONFIG": str(tmp_path / "dc")}
    assert docker_config_path(env) == tmp_path / "dc" / "config.json"
    assert resolve_credentials(HOST, environ=env) == Credentials("u", "p")
    write_config(tmp_path / "home" / ".docker", {"auths": {HOST: {"auth": auth("h", "hp")}}})
    assert resolve_credentials(HOST, environ={"HOME": str(tmp_path / "home")}) == Credentials("h", "hp")


def test_missing_config_means_anonymous(tmp_path: Path) -> None:
    assert resolve_credentials(HOST, environ={}, docker_config_path=tmp_path / "absent.json") is None


def test_docker_hub_aliases(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": auth("hub", "hubpw")}}}
    )
    for host in ["registry-1.docker.io", "docker.io", "index.docker.io"]:
        assert resolve_credentials(host, environ={}, docker_config_path=config) == Credentials("hub", "hubpw")


def test_identity_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"auths": {HOST: {"auth": auth("u", ""), "identitytoken": "refresh-me"}}})
    got = resolve_credentials(HOST, environ={}, docker_config_path=config)
    assert got is not None and got.identity_token == "refresh-me"
    assert "refresh-me" not in repr(got)


def test_cred_helper_for_host(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    log = install_helper(bindir, "fake", {HOST: ("helper-user", "helper-secret")})
    config = write_config(
        tmp_path, {"credHelpers": {HOST: "fake"}, "auths": {HOST: {"auth": auth("a", "b")}}}
    )
    got = resolve_credentials(HOST, environ=env_with_path(bindir), docker_config_path=config)
    assert got == Credentials("helper-user", "helper-secret")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["host"] == HOST
    assert calls[0]["argv"][1:] == ["get"]  # the host comes on stdin; no secret in argv


def test_creds_store_and_not_found(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    install_helper(bindir, "store", {HOST: ("store-user", "store-secret")})
    config = write_config(tmp_path, {"credsStore": "store"})
    env = env_with_path(bindir)
    assert resolve_credentials(HOST, environ=env, docker_config_path=config) == Credentials(
        "store-user", "store-secret"
    )
    assert resolve_credentials("elsewhere.io", environ=env, docker_config_path=config) is None


def test_missing_helper_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"credHelpers": {HOST: "nonexistent-xyz"}})
    with pytest.raises(RegistryAuthError, match="docker-credential-nonexistent-xyz is not on PATH"):
        resolve_credentials(HOST, environ={"PATH": str(tmp_path)}, docker_config_path=config)


def test_repr_hides_password() -> None:
    creds = Credentials("user", "hunter2-secret")
    assert "hunter2-secret" not in repr(creds)
    assert "user" in repr(creds)


async def test_helper_credentials_open_the_auth_registry(
    auth_registry: RegistryServer, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    assert auth_registry.username and auth_registry.password
    install_helper(bindir, "e2e", {auth_registry.host: (auth_registry.username, auth_registry.password)})
    config = write_config(tmp_path, {"credHelpers": {auth_registry.host: "e2e"}})
    creds = resolve_credentials(auth_registry.host, environ=env_with_path(bindir), docker_config_path=config)
    async with RegistryStore(auth_registry.host, "any/repo", credentials=creds) as store:
        await store.ping()
