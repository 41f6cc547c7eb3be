"""Credential resolution: arguments, environment, credential files (docker's config.json, the containers
tools' auth.json), real credential helpers."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from remote_cache.errors import InvalidConfigFile, RegistryAuthError
from remote_cache.oci.credentials import Credentials, auth_files, docker_config_path, resolve_credentials
from remote_cache.oci.registry import RegistryStore
from tests.credential_files import auth, auths, write
from tests.registry_server import RegistryServer

HOST = "registry.example.com:5000"


def write_config(directory: Path, config: dict[str, object]) -> Path:
    return write(directory / "config.json", config)


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


def isolated(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment whose every credential file lives under ``tmp_path`` (none exists yet)."""
    return {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"), **extra}


def test_explicit_arguments_win(tmp_path: Path) -> None:
    config = write_config(tmp_path, auths(HOST, "cfg", "cfgpw"))
    env = {"REMOTE_CACHE_USERNAME": "env", "REMOTE_CACHE_PASSWORD": "envpw"}
    got = resolve_credentials(HOST, username="arg", password="argpw", environ=env, auth_file=config)
    assert got == Credentials("arg", "argpw")


def test_environment_before_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, auths(HOST, "cfg", "cfgpw"))
    env = {"REMOTE_CACHE_USERNAME": "env", "REMOTE_CACHE_PASSWORD": "envpw"}
    assert resolve_credentials(HOST, environ=env, auth_file=config) == Credentials("env", "envpw")


def test_half_given_credentials_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError, match="--password"):
        resolve_credentials(HOST, username="only-user", environ=isolated(tmp_path))
    with pytest.raises(RegistryAuthError, match="REMOTE_CACHE_USERNAME"):
        resolve_credentials(HOST, environ=isolated(tmp_path, REMOTE_CACHE_PASSWORD="pw"))


def test_config_auths_base64(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"auths": {f"https://{HOST}": {"auth": auth("cfg", "pa:ss")}, "other.io": {"auth": "!!"}}}
    )
    assert resolve_credentials(HOST, environ={}, auth_file=config) == Credentials("cfg", "pa:ss")
    assert resolve_credentials("unknown.io", environ={}, auth_file=config) is None
    with pytest.raises(
        InvalidConfigFile, match=r"'auth' entry for other\.io is not base64.*log in to other\.io"
    ):
        resolve_credentials("other.io", environ={}, auth_file=config)


@pytest.mark.parametrize(
    "entry",
    [{"auth": 12345}, {"auth": ["x"]}, "user:pw", {"username": "u", "password": 7}, {"identitytoken": 1}],
)
def test_an_auth_entry_of_the_wrong_type_is_a_malformed_file(tmp_path: Path, entry: object) -> None:
    """A registry's entry that is not an object, or whose auth, username, password or identity
    token is not a string, is malformed (exit 2 when named, a warning when found by searching).
    It was skipped without a word, and the command went on anonymously."""
    config = write_config(tmp_path, {"auths": {HOST: entry}})
    with pytest.raises(InvalidConfigFile, match=HOST):
        resolve_credentials(HOST, environ={}, auth_file=config)


def test_config_found_through_docker_config_env(tmp_path: Path) -> None:
    write_config(tmp_path / "dc", auths(HOST, "u", "p"))
    env = {"DOCKER_CONFIG": str(tmp_path / "dc")}
    assert docker_config_path(env) == tmp_path / "dc" / "config.json"
    assert resolve_credentials(HOST, environ=isolated(tmp_path, **env)) == Credentials("u", "p")
    write_config(tmp_path / "home" / ".docker", auths(HOST, "h", "hp"))
    assert resolve_credentials(HOST, environ=isolated(tmp_path)) == Credentials("h", "hp")


def test_missing_config_means_anonymous(tmp_path: Path) -> None:
    assert resolve_credentials(HOST, environ=isolated(tmp_path, DOCKER_CONFIG=str(tmp_path / "none"))) is None


def test_auth_files_in_the_containers_tools_order(tmp_path: Path) -> None:
    home, run = tmp_path / "home", tmp_path / "run"
    assert auth_files(isolated(tmp_path)) == [
        run / "containers" / "auth.json",
        home / ".config" / "containers" / "auth.json",
        home / ".docker" / "config.json",
    ]
    env = isolated(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg"), DOCKER_CONFIG=str(tmp_path / "dc"))
    assert auth_files(env)[1:] == [
        tmp_path / "xdg" / "containers" / "auth.json",
        tmp_path / "dc" / "config.json",
    ]
    # Without XDG_RUNTIME_DIR, the primary file is where podman keeps it then.
    assert auth_files({"HOME": str(home)})[0] == Path(f"/run/containers/{os.getuid()}/auth.json")
    # REGISTRY_AUTH_FILE is the one file read, as it is skopeo's and podman's default --authfile.
    assert auth_files(isolated(tmp_path, REGISTRY_AUTH_FILE=str(tmp_path / "a.json"))) == [
        tmp_path / "a.json"
    ]


def test_the_first_file_with_an_entry_for_the_host_wins(tmp_path: Path) -> None:
    env = isolated(tmp_path)
    primary, config_home, docker = auth_files(env)
    write_config(docker.parent, auths(HOST, "docker", "d"))
    assert resolve_credentials(HOST, environ=env) == Credentials("docker", "d")
    write(config_home, auths("other.io", "o", "o"))
    assert resolve_credentials(HOST, environ=env) == Credentials("docker", "d")
    write(primary, auths(HOST, "podman", "p"))
    assert resolve_credentials(HOST, environ=env) == Credentials("podman", "p")


def test_a_malformed_file_found_by_searching_is_warned_about_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = isolated(tmp_path)
    primary, _, docker = auth_files(env)
    write(primary, json.dumps(auths(HOST, "leak", "s3cret"))[:-1])  # a brace short
    write_config(docker.parent, auths(HOST, "docker", "d"))
    with caplog.at_level(logging.WARNING, logger="remote_cache"):
        for _ in range(3):
            assert resolve_credentials(HOST, environ=env) == Credentials("docker", "d")
    [record] = caplog.records
    assert str(primary) in record.getMessage() and "not valid JSON" in record.getMessage()
    assert auth("leak", "s3cret") not in caplog.text


def test_an_explicit_file_is_checked_even_when_other_credentials_win(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    for kwargs in ({"username": "u", "password": "p"}, {}):
        with pytest.raises(InvalidConfigFile, match=r"--authfile .*broken\.json: it holds no JSON object"):
            resolve_credentials(HOST, environ=isolated(tmp_path), auth_file=broken, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigFile, match="does not exist"):
        resolve_credentials(HOST, environ={}, auth_file=tmp_path / "absent.json")


def test_docker_hub_aliases(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": auth("hub", "hubpw")}}}
    )
    for host in ["registry-1.docker.io", "docker.io", "index.docker.io"]:
        assert resolve_credentials(host, environ={}, auth_file=config) == Credentials("hub", "hubpw")


def test_identity_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"auths": {HOST: {"auth": auth("u", ""), "identitytoken": "refresh-me"}}})
    got = resolve_credentials(HOST, environ={}, auth_file=config)
    assert got is not None and got.identity_token == "refresh-me"
    assert "refresh-me" not in repr(got)


def test_cred_helper_for_host(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    log = install_helper(bindir, "fake", {HOST: ("helper-user", "helper-secret")})
    config = write_config(
        tmp_path, {"credHelpers": {HOST: "fake"}, "auths": {HOST: {"auth": auth("a", "b")}}}
    )
    got = resolve_credentials(HOST, environ=env_with_path(bindir), auth_file=config)
    assert got == Credentials("helper-user", "helper-secret")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["host"] == HOST
    assert calls[0]["argv"][1:] == ["get"]  # the host comes on stdin; no secret in argv


def test_creds_store_and_not_found(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    install_helper(bindir, "store", {HOST: ("store-user", "store-secret")})
    config = write_config(tmp_path, {"credsStore": "store"})
    env = env_with_path(bindir)
    assert resolve_credentials(HOST, environ=env, auth_file=config) == Credentials(
        "store-user", "store-secret"
    )
    assert resolve_credentials("elsewhere.io", environ=env, auth_file=config) is None


def test_missing_helper_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"credHelpers": {HOST: "nonexistent-xyz"}})
    with pytest.raises(RegistryAuthError, match="docker-credential-nonexistent-xyz is not on PATH"):
        resolve_credentials(HOST, environ={"PATH": str(tmp_path)}, auth_file=config)


def test_a_helper_that_cannot_be_run_is_a_credentials_error(tmp_path: Path) -> None:
    """On PATH without its execute bit: an auth error naming it (exit 4), as a missing one is (a
    PermissionError came out raw, exit 1)."""
    bindir = tmp_path / "bin"
    install_helper(bindir, "noexec", {HOST: ("u", "p")})
    (bindir / "docker-credential-noexec").chmod(0o644)
    config = write_config(tmp_path, {"credHelpers": {HOST: "noexec"}})
    with pytest.raises(RegistryAuthError, match="docker-credential-noexec cannot be run"):
        resolve_credentials(HOST, environ=env_with_path(bindir), auth_file=config)
    helper = bindir / "docker-credential-noexec"
    helper.write_text("#!/nonexistent/python\n")  # on PATH, its interpreter missing (ENOENT too)
    helper.chmod(0o755)
    with pytest.raises(RegistryAuthError, match="docker-credential-noexec cannot be run"):
        resolve_credentials(HOST, environ=env_with_path(bindir), auth_file=config)


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
    creds = resolve_credentials(auth_registry.host, environ=env_with_path(bindir), auth_file=config)
    async with RegistryStore(auth_registry.host, "any/repo", credentials=creds) as store:
        await store.ping()
