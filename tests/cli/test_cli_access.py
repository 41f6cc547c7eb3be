"""How the console script gets into a registry: credential files (docker's and the containers tools'),
TLS options (skopeo's --tls-verify, --cert-dir and containers-certs.d), run for real against the
test registries (the TLS ones under this machine's own name, so the client does not take them
for loopback and speaks HTTPS to them by default)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.cli.output import Run, json_line, no_traceback, warnings
from tests.credential_files import auths, write
from tests.forward_proxy import ForwardProxy, proxy_env
from tests.registry_server import CertificateAuthority, FaultProxy, RegistryServer
from tests.trees import assert_same_tree, one_file_tree

#: A secret-looking value planted in broken files: it must never be printed.
PLANTED = "pl4nted-S3CRET"


def error_line(proc: object) -> str:
    """The one line a failed command printed (and no traceback)."""
    stderr = proc.stderr  # type: ignore[attr-defined]
    [line] = stderr.splitlines()
    assert line.startswith("remote-cache: error: "), line
    return str(line)


# -------------------------------------------------------------------------------------------
# credential files


@pytest.mark.parametrize(
    "ref",
    [
        "user:PASS-s3cr3t@ghcr.io",  # parsed as Docker Hub's library/user, key 'PASS-s3cr3t@ghcr.io'
        "user:PASS-s3cr3t@localhost:5000",
        "user:PASS-s3cr3t@10.0.0.1",
        "s3://minio:PASS-s3cr3t@cache/ci:k",
        "user:PASS-s3cr3t@x@ghcr.io",  # (a password holding an '@': its rest was the key)
    ],
)
def test_credentials_written_into_a_reference_reach_no_output_and_no_store(
    cli: Run, ref: str, tmp_path: Path
) -> None:
    """Every command refuses a reference that holds ``user:password@`` (exit 2), and no line quotes
    the password: it was printed by ``ls`` ("REPO '...' names an entry"), in every summary line as
    the key, and sent to the store inside the tag's name."""
    src = one_file_tree(tmp_path / "src")
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    for args in (
        ("save", str(src), ref),
        ("restore", ref, str(tmp_path / "out")),
        ("--json", "inspect", ref),
        ("rm", ref),
        ("ls", ref),
        ("prune", ref, "--keep", "1"),
    ):
        proc = cli(*args, env=env)
        assert "PASS-s3cr3t" not in proc.stdout + proc.stderr, (args, proc.stdout + proc.stderr)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "user:password@" in error_line(proc) or "names an entry" in proc.stderr, proc.stderr
        no_traceback(proc)
    assert not (tmp_path / "out").exists()


#: Where the ``cli`` fixture's environment makes each file be found (relative to tmp_path).
PLACES = {
    "docker config.json": "docker-config/config.json",
    "XDG_RUNTIME_DIR auth.json": "run/containers/auth.json",
    "~/.config auth.json": "home/.config/containers/auth.json",
    "REGISTRY_AUTH_FILE": "elsewhere/auth.json",
}


@pytest.mark.parametrize("given", ["environment", "auth file"])
@pytest.mark.parametrize("echo", ["error body", "token realm"])
def test_credentials_a_registry_echoes_are_never_shown(
    cli: Run,
    registry: RegistryServer,
    fault_proxy_factory: Callable[[RegistryServer], FaultProxy],
    tmp_path: Path,
    given: str,
    echo: str,
) -> None:
    """A registry, or a proxy before it, may echo the request: the password (raw, URL-encoded, or
    as the Basic header) reached stderr and --json when it came from the environment or an auth
    file — only --username's was cut, and only raw (a probe found it)."""
    user, password = "bot", "p/a+s=s%w&o?r d-\u00fcn\u00ef"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    forms = [password, quote(password), quote(password, safe=""), quote_plus(password), basic]
    proxy = fault_proxy_factory(registry)
    if echo == "error body":
        message = " | ".join(forms)
        body = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
        proxy.answer(403, body, times=1000)
    else:
        realm = f'Bearer realm="gopher://tokens.example/{quote(password, safe="")}",service="x"'
        proxy.answer(401, b"", headers={"WWW-Authenticate": realm}, times=1000)
    env: dict[str, str] = {}
    if given == "environment":
        env = {"REMOTE_CACHE_USERNAME": user, "REMOTE_CACHE_PASSWORD": password}
    else:
        write(tmp_path / PLACES["docker config.json"], auths(proxy.host, user, password))
    for args in (
        ("restore", f"{proxy.host}/team/cache:k", "out"),
        ("restore", "--json", f"{proxy.host}/team/cache:k", "out"),
    ):
        proc = cli(*args, env=env)
        assert proc.returncode == 4, proc.stderr
        shown = proc.stderr + proc.stdout
        shown += json.dumps(json.loads(proc.stdout)) if proc.stdout.strip() else ""  # \u-escaped forms too
        for form in forms:
            assert form not in shown and form not in json.loads(json.dumps(shown)), (form, shown)
        if "--json" in args:
            assert not any(form in json.loads(proc.stdout)["error"] for form in forms), proc.stdout


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
    src = one_file_tree(tmp_path / "src")

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
    src = one_file_tree(tmp_path / "src")
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


# -------------------------------------------------------------------------------------------
# TLS


def cert_dir(directory: Path, ca: CertificateAuthority, *, client: bool = False) -> Path:
    """A containers-certs.d(5) directory: the CA as ``*.crt``, a client pair as ``*.cert`` + ``*.key``."""
    directory.mkdir(parents=True)
    shutil.copy(ca.cert, directory / "test-ca.crt")
    if client:
        shutil.copy(ca.directory / "client.crt", directory / "client.cert")
        shutil.copy(ca.directory / "client.key", directory / "client.key")
    return directory


def test_a_registry_with_a_private_ca_takes_cert_dir_or_tls_verify_false(
    cli: Run, private_ca_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    server = private_ca_registry
    assert server.ca is not None
    src = one_file_tree(tmp_path / "src")
    repo = f"{server.host}/{repo_name}"
    certs = cert_dir(tmp_path / "certs", server.ca)

    untrusted = cli("save", str(src), f"{repo}:k")
    assert untrusted.returncode == 1, untrusted.stderr
    line = error_line(untrusted)
    assert "certificate" in line and "--cert-dir" in line and "--tls-verify=false" in line, line

    trusted = cli("save", str(src), f"{repo}:k", "--cert-dir", str(certs))
    assert trusted.returncode == 0, trusted.stderr
    restored = cli("--cert-dir", str(certs), "restore", f"{repo}:k", str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out")

    # skopeo's spelling, after or before the command; and its bare form takes no value.
    insecure = cli("save", str(src), f"{repo}:k2", "--tls-verify=false")
    assert insecure.returncode == 0, insecure.stderr
    listing = cli("--tls-verify=false", "ls", repo, "--json")
    assert listing.returncode == 0, listing.stderr
    assert sorted(e["key"] for e in json_line(listing)["entries"]) == ["k", "k2"]
    bare = cli("inspect", "--tls-verify", "--cert-dir", str(certs), f"{repo}:k")
    assert bare.returncode == 0, bare.stderr
    for verify in ("--tls-verify", "--tls-verify=true", "--tls-verify=TRUE"):
        assert cli("inspect", f"{repo}:k", verify).returncode == 1, verify


def test_a_per_host_certs_d_directory_is_used_without_options(
    cli: Run, private_ca_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    assert private_ca_registry.ca is not None
    repo = f"{private_ca_registry.host}/{repo_name}"
    assert cli("ls", repo).returncode == 1
    cert_dir(tmp_path / "home/.config/containers/certs.d" / private_ca_registry.host, private_ca_registry.ca)
    proc = cli("ls", repo)
    assert proc.returncode == 0, proc.stderr


def test_client_certificates_come_from_the_cert_dir(
    cli: Run, client_cert_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    ca = client_cert_registry.ca
    assert ca is not None
    ref = f"{client_cert_registry.host}/{repo_name}:k"
    src = one_file_tree(tmp_path / "src")
    without = cli("save", str(src), ref, "--cert-dir", str(cert_dir(tmp_path / "ca-only", ca)))
    assert without.returncode == 1, without.stderr
    line = error_line(without)
    assert client_cert_registry.host in line and "client certificate" in line and ".cert" in line, line
    with_client = cert_dir(tmp_path / "with-client", ca, client=True)
    proc = cli("save", str(src), ref, "--cert-dir", str(with_client))
    assert proc.returncode == 0, proc.stderr
    proc = cli("inspect", ref, "--cert-dir", str(with_client), "--tls-verify=false")
    assert proc.returncode == 0, proc.stderr


def test_tls_verify_false_falls_back_to_plain_http_as_skopeo_does(
    cli: Run, named_registry: RegistryServer, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = one_file_tree(tmp_path / "src")
    ref = f"{named_registry.host}/{repo_name}:k"
    over_tls = cli("save", str(src), ref)
    assert over_tls.returncode == 1, over_tls.stderr
    assert "--plain-http" in error_line(over_tls)
    insecure = cli("save", str(src), ref, "--tls-verify=false")
    assert insecure.returncode == 0, insecure.stderr
    # The habit of skopeo users with a loopback registry:
    loopback = cli("save", str(src), f"{registry.host}/{repo_name}:k", "--tls-verify=false")
    assert loopback.returncode == 0, loopback.stderr


def test_tls_options_are_checked(cli: Run, tmp_path: Path) -> None:
    half_pair = write(tmp_path / "half" / "client.cert", "").parent
    not_pem = write(tmp_path / "not-pem" / "ca.crt", "not a certificate").parent
    for args, message in [
        (("ls", "oci:layout", "--tls-verify=false"), "--tls-verify is for registries, not oci:layout"),
        (("ls", "s3://bucket/p", "--cert-dir", "."), "--cert-dir is for registries, not s3://bucket/p"),
        (
            ("ls", "oci:layout", "--authfile", "a.json", "--cert-dir", "."),
            "--authfile and --cert-dir are for",
        ),
        (("ls", "localhost:5000/r", "--tls-verify=maybe"), "--tls-verify takes true or false"),
        (("ls", "localhost:5000/r", "--cert-dir", "absent"), "does not exist"),
        (("ls", "localhost:5000/r", "--cert-dir", str(half_pair)), "client.key"),
        (("ls", "localhost:5000/r", "--cert-dir", str(not_pem)), "ca.crt"),
    ]:
        proc = cli(*args, "--fail-open")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        no_traceback(proc)
    assert not (tmp_path / "layout").exists()


def test_an_https_registry_through_a_proxy_tunnel_and_a_proxy_that_refuses_it(
    cli: Run,
    private_ca_registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    forward_proxy_factory: Callable[..., ForwardProxy],
) -> None:
    """HTTPS_PROXY: every request to an HTTPS registry goes through a CONNECT tunnel (TLS to the
    registry inside it, checked against --cert-dir). A proxy that refuses the tunnel (407) is named
    in the error, with the variables to check, and is not asked again."""
    assert private_ca_registry.ca is not None
    certs = cert_dir(tmp_path / "certs", private_ca_registry.ca)
    src = one_file_tree(tmp_path / "src")
    ref = f"{private_ca_registry.host}/{repo_name}:k"
    proxy = forward_proxy_factory()
    env = proxy_env("HTTPS_PROXY", proxy.url)
    assert cli("save", str(src), ref, "--cert-dir", str(certs), "-q", env=env).returncode == 0
    restored = cli("restore", ref, str(tmp_path / "out"), "--cert-dir", str(certs), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out")
    assert proxy.seen and all(seen == ("CONNECT", private_ca_registry.host) for seen in proxy.seen)

    proxy.seen.clear()
    proxy.connect_status = 407
    refused = cli("restore", ref, str(tmp_path / "out2"), "--cert-dir", str(certs), env=env)
    assert refused.returncode == 1, refused.stderr
    line = error_line(refused)
    assert f"through the proxy {proxy.url}: it refused a tunnel to {private_ca_registry.host} (407" in line
    assert "NO_PROXY" in line, line
    assert len(proxy.seen) == 1  # refused for good: no retry
    no_traceback(refused)

    # The tunnel opens, then the far end resets it during the TLS handshake: not the proxy's doing.
    proxy.connect_status, proxy.drop_tunnels = None, True
    dropped = cli("restore", ref, str(tmp_path / "out3"), "--cert-dir", str(certs), env=env)
    assert dropped.returncode == 1, dropped.stderr
    assert "proxy" not in error_line(dropped), dropped.stderr


def test_registries_through_an_https_proxy(
    cli: Run,
    private_ca_registry: RegistryServer,
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    forward_proxy_factory: Callable[..., ForwardProxy],
) -> None:
    """An ``https://`` proxy URL means TLS to the proxy itself (its certificate checked against
    the default trust, here SSL_CERT_FILE), as httpx and curl take it: an HTTPS registry through a
    CONNECT tunnel inside it (the registry's TLS inside the proxy's, checked against --cert-dir),
    a plain-HTTP one with absolute-form requests. (It was spoken to in plain HTTP.) A proxy whose
    certificate is not trusted is named, with the fix."""
    assert private_ca_registry.ca is not None
    proxy_ca = CertificateAuthority(tmp_path / "proxy-ca")
    proxy = forward_proxy_factory(tls=proxy_ca.issue("proxy", sans=["IP:127.0.0.1"]))
    assert proxy.url.startswith("https://")
    certs = cert_dir(tmp_path / "certs", private_ca_registry.ca)
    src = one_file_tree(tmp_path / "src")
    env = {
        **proxy_env("HTTPS_PROXY", proxy.url),
        **proxy_env("HTTP_PROXY", proxy.url),
        "SSL_CERT_FILE": str(proxy_ca.cert),
    }
    tls_ref = f"{private_ca_registry.host}/{repo_name}:k"
    saved = cli("save", str(src), tls_ref, "--cert-dir", str(certs), "-q", env=env)
    assert saved.returncode == 0, saved.stderr
    restored = cli("restore", tls_ref, str(tmp_path / "out"), "--cert-dir", str(certs), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out")
    assert proxy.seen and all(seen == ("CONNECT", private_ca_registry.host) for seen in proxy.seen)

    proxy.seen.clear()
    plain_ref = f"{registry.host}/{repo_name}:k"
    assert cli("save", str(src), plain_ref, "-q", env=env).returncode == 0
    restored = cli("restore", plain_ref, str(tmp_path / "out2"), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out2")
    assert proxy.seen and all(url.startswith(f"http://{registry.host}/v2/") for _method, url in proxy.seen)

    untrusted = {**env, "SSL_CERT_FILE": str(private_ca_registry.ca.cert)}
    proc = cli("restore", tls_ref, str(tmp_path / "out3"), "--cert-dir", str(certs), env=untrusted)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert f"through the proxy {proxy.url}: its certificate is not trusted" in line, line
    assert "SSL_CERT_FILE" in line, line
    no_traceback(proc)


def test_an_https_proxy_that_cannot_be_used_is_named_with_the_fix(
    cli: Run,
    private_ca_registry: RegistryServer,
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    forward_proxy_factory: Callable[..., ForwardProxy],
) -> None:
    """What goes wrong with an ``https://`` proxy is said as the proxy's, once, with what to fix:
    a plain-HTTP proxy written as https:// (common: ``HTTPS_PROXY=https://squid:3128``), a
    certificate issued for another name, and (any proxy) no answer before the tunnel is up — which
    blamed the registry ("is it up?"). An ``SSL_CERT_FILE`` that cannot be loaded is named, with
    or without a proxy (it was "connection to registry … failed (FileNotFoundError …)")."""
    assert private_ca_registry.ca is not None
    certs = cert_dir(tmp_path / "certs", private_ca_registry.ca)
    tls_ref = f"{private_ca_registry.host}/{repo_name}:k"
    plain = forward_proxy_factory()
    proc = cli("restore", tls_ref, str(tmp_path / "o1"), "--cert-dir", str(certs),
               env=proxy_env("HTTPS_PROXY", plain.url.replace("http://", "https://")))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "seems to speak plain HTTP: write http:// in the proxy URL" in error_line(proc), proc.stderr
    assert plain.connections == 1  # final: not asked again

    proxy_ca = CertificateAuthority(tmp_path / "proxy-ca")
    other_name = forward_proxy_factory(tls=proxy_ca.issue("proxy", sans=["DNS:proxy.example"]))
    env = {**proxy_env("HTTPS_PROXY", other_name.url), "SSL_CERT_FILE": str(proxy_ca.cert)}
    proc = cli("restore", tls_ref, str(tmp_path / "o2"), "--cert-dir", str(certs), env=env)
    assert proc.returncode == 1, proc.stderr
    assert "its certificate is not for the name or address in the proxy URL" in error_line(proc)

    absent = tmp_path / "absent.pem"  # the proxy's trust, or (no proxy) an HTTPS registry's
    plain_ref = f"{registry.host}/{repo_name}:k"
    for env, ref in [
        ({**proxy_env("HTTP_PROXY", other_name.url), "SSL_CERT_FILE": str(absent)}, plain_ref),
        ({"SSL_CERT_FILE": str(absent)}, tls_ref),
    ]:
        proc = cli("restore", ref, str(tmp_path / "o3"), env=env)
        assert proc.returncode == 2, proc.stderr
        assert f"SSL_CERT_FILE={absent}: no CA certificates could be loaded" in error_line(proc), proc.stderr

    with socket.socket() as silent:  # takes connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = proxy_env("HTTPS_PROXY", url)
        proc = cli("restore", tls_ref, str(tmp_path / "o4"), "--cert-dir", str(certs), "--timeout=1", env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"through the proxy {url}: no answer within 1s" in error_line(proc), proc.stderr
    no_traceback(proc)


def test_a_proxy_url_that_is_not_valid_or_a_proxy_that_is_not_http_is_named(
    cli: Run, private_ca_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """A proxy password with an unencoded '#' makes the URL invalid: said so, the password not
    repeated (it leaked as "Port could not be cast to integer value as 's3cret'"). A proxy that
    answers CONNECT with something that is not HTTP (a SOCKS proxy, say) is named too, in one
    line (the raw answer broke the error over two). A SOCKS proxy is refused by name."""
    ref = f"{private_ca_registry.host}/{repo_name}:k"
    bad = "http://user:s3cret#x@127.0.0.1:3128"
    env = proxy_env("HTTPS_PROXY", bad)
    proc = cli("restore", ref, str(tmp_path / "out"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert "is not valid: percent-encode" in error_line(proc) and "s3cret" not in proc.stderr, proc.stderr
    no_traceback(proc)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        garbage = f"http://127.0.0.1:{server.getsockname()[1]}"

        def answer_garbage() -> None:
            with contextlib.suppress(OSError):
                while True:
                    peer, _ = server.accept()
                    with peer:
                        peer.recv(4096)
                        peer.sendall(b"\x05\xff\x00\r\n\r\n")

        threading.Thread(target=answer_garbage, daemon=True).start()
        env = proxy_env("HTTPS_PROXY", garbage)
        proc = cli("restore", ref, str(tmp_path / "out2"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"through the proxy {garbage} (" in error_line(proc) and "speaks HTTP" in proc.stderr, proc.stderr

    # A SOCKS proxy is not spoken to as if it were an HTTP one: said so before any connection.
    env = proxy_env("ALL_PROXY", "socks5://127.0.0.1:9")
    proc = cli("restore", ref, str(tmp_path / "out3"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert "through the proxy socks5://127.0.0.1:9: socks5:// proxies are not supported" in error_line(proc)
    no_traceback(proc)
