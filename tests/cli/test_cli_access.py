"""How the console script gets into a registry: credential files (docker's and the containers tools'),
run for real against the test registries."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.cli.output import Run, no_traceback
from tests.registry_server import RegistryServer

#: A secret-looking value planted in broken files: it must never be printed.
PLANTED = "pl4nted-S3CRET"


def auths(host: str, username: str, password: str) -> dict[str, object]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"auths": {host: {"auth": token}}}


def write(path: Path, content: str | dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("remote-cache: warning: ")]


# -------------------------------------------------------------------------------------------
# credential files


#: Where the ``cli`` fixture's environment makes each file be found (relative to tmp_path).
PLACES = {
    "docker config.json": "docker-config/config.json",
    "XDG_RUNTIME_DIR auth.json": "run/containers/auth.json",
    "~/.config auth.json": "home/.config/containers/auth.json",
    "REGISTRY_AUTH_FILE": "elsewhere/auth.json",
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("defect", ["not JSON", "bad auth entry"])
def test_a_malformed_auth_file_is_one_warning_and_an_anonymous_registry_still_works(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path, place: str, defect: str
) -> None:
    path = tmp_path / PLACES[place]
    if defect == "not JSON":
        write(path, json.dumps({"auths": {registry.host: {"auth": PLANTED}}})[:-1])  # a brace short
    else:
        write(path, {"auths": {registry.host: {"auth": PLANTED + "!"}}})  # not base64
    env = {"REGISTRY_AUTH_FILE": str(path)} if place == "REGISTRY_AUTH_FILE" else {}
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")

    for args in (
        ("save", str(src), f"{registry.host}/{repo_name}:k"),
        ("ls", f"{registry.host}/{repo_name}"),
    ):
        proc = cli(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        [warning] = warnings(proc.stderr)
        assert str(path) in warning, warning
        assert ("not valid JSON" if defect == "not JSON" else "base64") in warning, warning
        assert PLANTED not in proc.stderr + proc.stdout
        no_traceback(proc)


def test_credential_files_are_searched_in_the_containers_tools_order(
    cli: Run, auth_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    host, user, password = auth_registry.host, auth_registry.username, auth_registry.password
    assert user is not None and password is not None
    right, wrong, elsewhere = (
        auths(host, user, password),
        auths(host, user, "wr0ng"),
        auths("other.io", "u", "p"),
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    ref = f"{auth_registry.host}/{repo_name}:k"
    saved = cli("save", str(src), ref, env={"REMOTE_CACHE_USERNAME": user, "REMOTE_CACHE_PASSWORD": password})
    assert saved.returncode == 0, saved.stderr
    runtime, config_home = (
        tmp_path / PLACES["XDG_RUNTIME_DIR auth.json"],
        tmp_path / PLACES["~/.config auth.json"],
    )

    def inspect(*options: str, **env: str) -> int:
        proc = cli("inspect", ref, "--json", *options, env=env)
        assert password not in proc.stderr + proc.stdout and "wr0ng" not in proc.stderr
        assert proc.returncode in (0, 4), proc.stderr
        return proc.returncode

    assert inspect() == 4  # no file has credentials yet
    write(tmp_path / PLACES["docker config.json"], right)
    assert inspect() == 0
    write(config_home, wrong)  # read before docker's config.json: the first file with an entry wins
    assert inspect() == 4
    write(runtime, right)  # read before ~/.config
    assert inspect() == 0
    write(runtime, elsewhere)  # no entry for this registry: the search goes on, to ~/.config
    assert inspect() == 4
    xdg_config = tmp_path / "xdg-config"
    write(xdg_config / "containers" / "auth.json", right)  # $XDG_CONFIG_HOME replaces ~/.config
    assert inspect(XDG_CONFIG_HOME=str(xdg_config)) == 0

    # REGISTRY_AUTH_FILE, then --authfile: the one file read (as skopeo and podman read them).
    write(config_home, right)
    only_elsewhere = write(tmp_path / "elsewhere.json", elsewhere)
    assert inspect() == 0
    assert inspect(REGISTRY_AUTH_FILE=str(only_elsewhere)) == 4
    assert inspect(REGISTRY_AUTH_FILE=str(write(tmp_path / "right.json", right))) == 0
    assert inspect("--authfile", str(only_elsewhere)) == 4
    authfile = write(tmp_path / "authfile.json", right)
    write(config_home, wrong)
    write(tmp_path / PLACES["docker config.json"], wrong)
    assert inspect("--authfile", str(authfile), REGISTRY_AUTH_FILE=str(only_elsewhere)) == 0
    # A common option: before the command too.
    before = cli("--authfile", str(authfile), "inspect", ref, "--json")
    assert before.returncode == 0, before.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        (json.dumps({"auths": {"h": {"auth": PLANTED}}})[:-1], "not valid JSON"),
        (json.dumps([PLANTED]), "no JSON object"),
        (json.dumps({"auths": [PLANTED]}), "'auths' is not a JSON object"),
        ("BAD ENTRY", "base64"),
    ],
)
def test_a_missing_or_malformed_authfile_is_a_usage_error(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "auth.json"
    if content == "BAD ENTRY":
        write(path, {"auths": {registry.host: {"auth": PLANTED + "!"}}})
    elif content is not None:
        write(path, content)
    proc = cli("ls", f"{registry.host}/{repo_name}", "--authfile", str(path), "--fail-open")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("remote-cache: error: ") and str(path) in line and "--authfile" in line, line
    assert problem in line, line
    assert PLANTED not in proc.stderr + proc.stdout
    no_traceback(proc)
