"""Certificate directories: where they are looked for, what makes one unusable, and what then."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from remote_cache.errors import InvalidConfigFile
from remote_cache.oci.certs import TlsOptions, default_context, find_cert_dir, per_host_cert_dirs
from tests.registry_server import CertificateAuthority


def test_per_host_directories_in_containers_image_order(tmp_path: Path) -> None:
    assert per_host_cert_dirs("registry.example:5000", {"HOME": str(tmp_path)}) == [
        tmp_path / ".config/containers/certs.d/registry.example:5000",
        Path("/etc/containers/certs.d/registry.example:5000"),
        Path("/etc/docker/certs.d/registry.example:5000"),
    ]


def test_cert_dir_replaces_the_per_host_directories(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    ca.issue("client", sans=[], client=True)
    home_dir = tmp_path / "home/.config/containers/certs.d/h:1"
    home_dir.mkdir(parents=True)
    (home_dir / "ca.crt").write_bytes(ca.cert.read_bytes())
    env = {"HOME": str(tmp_path / "home")}
    found = find_cert_dir("h:1", TlsOptions(), env)
    assert found is not None and found.path == home_dir and found.cas == (home_dir / "ca.crt",)

    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "team.cert").write_bytes((ca.directory / "client.crt").read_bytes())
    (explicit / "team.key").write_bytes((ca.directory / "client.key").read_bytes())
    found = find_cert_dir("h:1", TlsOptions(cert_dir=explicit), env)
    assert (
        found is not None
        and found.cas == ()
        and found.clients == ((explicit / "team.cert", explicit / "team.key"),)
    )
    found.load_into(ssl.create_default_context())


def test_a_broken_per_host_directory_is_warned_about_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / ".config/containers/certs.d/h:2"
    broken.mkdir(parents=True)
    (broken / "client.key").write_text("-----BEGIN PRIVATE KEY-----\nnot shown\n")
    with caplog.at_level(logging.WARNING, logger="remote_cache"):
        for _ in range(2):
            assert find_cert_dir("h:2", TlsOptions(), {"HOME": str(tmp_path)}) is None
    [record] = caplog.records
    assert str(broken) in record.getMessage() and "client.key has no client certificate client.cert" in (
        record.getMessage()
    )
    assert "not shown" not in caplog.text
    with pytest.raises(
        InvalidConfigFile, match=r"--cert-dir .*h:2: key client\.key has no client certificate"
    ):
        find_cert_dir("h:2", TlsOptions(cert_dir=broken))


@pytest.mark.parametrize("env", ["none", "SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_the_default_trust_is_what_httpx_trusts(
    env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry client (http.client, threaded.py) trusts default_context(); it replaced httpx,
    # so a user's CA set-up must mean the same as it did: the same CAs as httpx's default.
    import httpx

    ca = CertificateAuthority(tmp_path / "ca")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if env == "SSL_CERT_FILE":
        monkeypatch.setenv(env, str(ca.cert))
    elif env == "SSL_CERT_DIR":
        monkeypatch.setenv(env, str(tmp_path))
    ours, theirs = default_context(), httpx.create_ssl_context()
    assert ours.get_ca_certs() == theirs.get_ca_certs()
    assert ours.cert_store_stats() == theirs.cert_store_stats()
    assert (ours.verify_mode, ours.check_hostname) == (theirs.verify_mode, theirs.check_hostname)
    if env == "SSL_CERT_FILE":
        assert [c["subject"] for c in ours.get_ca_certs()] == [c["subject"] for c in theirs.get_ca_certs()]
        assert len(ours.get_ca_certs()) == 1
    unverified, httpx_unverified = default_context(False), httpx.create_ssl_context(verify=False)
    assert (unverified.verify_mode, unverified.check_hostname) == (ssl.CERT_NONE, False)
    assert (httpx_unverified.verify_mode, httpx_unverified.check_hostname) == (ssl.CERT_NONE, False)
