"""RegistryStore against a real docker-registry, anonymous, with basic auth and with bearer tokens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_cache.errors import (
    CacheMiss,
    ImageFormatError,
    IntegrityError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    StoreError,
    UnsupportedOperation,
)
from remote_cache.oci import (
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    sha256_digest,
)
from remote_cache.oci.credentials import Credentials
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.registry import RegistryStore, Timeouts
from remote_cache.oci.registry.auth import Authenticator
from remote_cache.oci.store import Store
from tests.oci.blob_reading import read_all
from tests.registry_server import Fault, FaultProxy, RegistryServer, free_port, start_registry, tcp_relay
from tests.stores import DEEP_JSON

ALL_MODES = ["registry", "auth_registry", "token_registry"]


@pytest.fixture(params=ALL_MODES)
def server(request: pytest.FixtureRequest) -> RegistryServer:
    """Each test using this runs against all three auth modes."""
    value: RegistryServer = request.getfixturevalue(request.param)
    return value


def make_store(server: RegistryServer, repo: str, *, host: str | None = None, **kw: object) -> RegistryStore:
    creds = Credentials(server.username, server.password) if server.username and server.password else None
    return RegistryStore(host or server.host, repo, credentials=creds, **kw)  # type: ignore[arg-type]


def blob(data: bytes, media_type: str = OCI_LAYER_TAR) -> Descriptor:
    return Descriptor(media_type, sha256_digest(data), len(data))


async def push_image(store: RegistryStore, tag: str | None, payload: bytes) -> tuple[Descriptor, bytes]:
    """Push a minimal OCI image (config + one layer) and return its manifest descriptor and body."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    cdesc, ldesc = blob(config, OCI_CONFIG), blob(payload)
    await store.put_blob(cdesc, config)
    await store.put_blob(ldesc, payload)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cdesc.to_json(),
            "layers": [ldesc.to_json()],
        }
    ).encode()
    desc = await store.put_manifest(manifest, OCI_MANIFEST, tag=tag)
    return desc, manifest


def test_registry_store_satisfies_store_protocol(registry: RegistryServer) -> None:
    assert isinstance(RegistryStore(registry.host, "x/y"), Store)


async def test_ping(server: RegistryServer) -> None:
    async with make_store(server, "any/repo") as store:
        await store.ping()


@pytest.mark.usefixtures("via")
async def test_blob_push_skip_and_read_back(server: RegistryServer, repo_name: str) -> None:
    data = os.urandom(100_000)
    desc = blob(data)
    async with make_store(server, repo_name) as store:
        assert not await store.has_blob(desc.digest)
        assert await store.put_blob(desc, data) is True
        assert await store.has_blob(desc.digest)
        assert await store.put_blob(desc, data) is False  # already there: skipped
        assert await read_all(store, desc) == data


@pytest.mark.usefixtures("via")
async def test_small_file_goes_in_one_put(
    registry: RegistryServer, repo_name: str, tmp_path: Path, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(registry)
    data = os.urandom(5000)
    path = tmp_path / "small"
    path.write_bytes(data)
    async with RegistryStore(proxy.host, repo_name, chunk_size=64 * 1024) as store:
        assert await store.put_blob(blob(data), path)
        assert await read_all(store, blob(data)) == data
    assert proxy.count("PATCH") == 0
    assert proxy.count("PUT", "/blobs/uploads/") == 1


@pytest.mark.usefixtures("via")
async def test_large_file_uploads_in_chunks(
    server: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    fault_proxy_factory: Callable[..., FaultProxy],
) -> None:
    proxy = fault_proxy_factory(server)
    data = os.urandom(3 * 64 * 1024 + 123)
    path = tmp_path / "layer"
    path.write_bytes(data)
    async with make_store(server, repo_name, host=proxy.host, chunk_size=64 * 1024) as store:
        assert await store.put_blob(blob(data), path) is True
        assert await read_all(store, blob(data)) == data
    assert proxy.count("PATCH") == 4  # 3 full chunks and the 123-byte tail


async def test_wrong_size_bytes_are_refused_before_upload(registry: RegistryServer, repo_name: str) -> None:
    data = b"hello"
    async with make_store(registry, repo_name) as store:
        with pytest.raises(IntegrityError):
            await store.put_blob(Descriptor(OCI_LAYER_TAR, sha256_digest(data), 99), data)


async def test_wrong_digest_is_rejected_by_registry(registry: RegistryServer, repo_name: str) -> None:
    data = b"hello"
    lie = Descriptor(OCI_LAYER_TAR, sha256_digest(b"other"), len(data))
    async with make_store(registry, repo_name) as store:
        with pytest.raises(IntegrityError, match="does not match"):
            await store.put_blob(lie, data)
        assert not await store.has_blob(lie.digest)


@pytest.mark.usefixtures("via")
async def test_parallel_uploads_share_one_client(server: RegistryServer, repo_name: str) -> None:
    blobs = [os.urandom(20_000 + i) for i in range(12)]
    before = server.tokens_issued
    async with make_store(server, repo_name) as store:
        results = await asyncio.gather(*(store.put_blob(blob(b), b) for b in blobs))
        assert results == [True] * len(blobs)
        back = await asyncio.gather(*(read_all(store, blob(b)) for b in blobs))
    if server.auth == "token":  # concurrent 401s share one token fetch per scope
        assert 1 <= server.tokens_issued - before <= 2
    assert back == blobs


@pytest.mark.usefixtures("via")
@pytest.mark.parametrize("same_size", [True, False])
async def test_corrupt_blob_raises_integrity_error(
    registry: RegistryServer, repo_name: str, same_size: bool
) -> None:
    data = os.urandom(50_000)
    desc = blob(data)
    async with make_store(registry, repo_name) as store:
        await store.put_blob(desc, data)
        garbage = os.urandom(len(data) if same_size else len(data) + 100)
        registry.blob_data_path(desc.digest).write_bytes(garbage)
        with pytest.raises(IntegrityError):
            await read_all(store, desc)


async def test_manifest_put_resolve_get(server: RegistryServer, repo_name: str) -> None:
    async with make_store(server, repo_name) as store:
        desc, body = await push_image(store, "npm-linux", b"layer bytes")
        assert desc == Descriptor(OCI_MANIFEST, sha256_digest(body), len(body))
        resolved = await store.resolve("npm-linux")
        assert resolved == desc
        assert resolved.media_type == OCI_MANIFEST
        by_tag = await store.get_manifest("npm-linux")
        by_digest = await store.get_manifest(desc.digest)
        assert by_tag == (desc, body)
        assert by_digest == (desc, body)
        assert await store.resolve(desc.digest) == desc
        # Re-tagging the same body under another tag keeps the digest.
        desc2 = await store.put_manifest(body, OCI_MANIFEST, tag="second")
        assert desc2.digest == desc.digest
        assert sorted(await store.tags()) == ["npm-linux", "second"]


async def test_manifest_by_digest_only(registry: RegistryServer, repo_name: str) -> None:
    async with make_store(registry, repo_name) as store:
        desc, body = await push_image(store, None, b"untagged")
        assert await store.get_manifest(desc.digest) == (desc, body)
        assert await store.tags() == []


async def test_a_manifest_named_by_digest_is_written_with_an_at_sign_in_errors(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    """A refused push of a manifest by digest names it as ``REPO@sha256:...`` (it read
    ``REPO:sha256:...``, a tag that cannot exist), as resolving one already did."""
    proxy = fault_proxy_factory(registry)
    async with RegistryStore(proxy.host, repo_name) as store:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
        proxy.fail(1, status=403, method="PUT", path_contains="/manifests/")
        with pytest.raises(StoreError) as info:
            await store.put_manifest(body, OCI_MANIFEST)
    assert f"{repo_name}@{sha256_digest(body)}" in str(info.value), info.value


async def test_unknown_tag_is_a_cache_miss(server: RegistryServer, repo_name: str) -> None:
    async with make_store(server, repo_name) as store:
        with pytest.raises(CacheMiss) as info:
            await store.resolve("nothing-here")
        assert info.value.key == "nothing-here"
        await push_image(store, "present", b"x")
        with pytest.raises(CacheMiss):
            await store.resolve("still-nothing")
        with pytest.raises(CacheMiss):
            await store.get_manifest("still-nothing")
        with pytest.raises(CacheMiss):
            await store.get_manifest(sha256_digest(b"no such manifest"))


async def test_tags_paginate(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.paginate_tags = True  # docker-registry 2.8 does not paginate tags itself
    names = [f"t{i}" for i in range(5)]
    async with make_store(registry, repo_name, host=proxy.host) as store:
        _desc, body = await push_image(store, None, b"tags")
        for name in names:
            await store.put_manifest(body, OCI_MANIFEST, tag=name)
        proxy.clear()
        assert sorted(await store.tags(page_size=2)) == names
        assert proxy.count("GET", "/tags/list") == 3
        assert sorted(await store.tags()) == names


@pytest.mark.parametrize("link", ["itself", "ever new"])
async def test_tag_pages_that_never_end_are_refused_at_once(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Callable[..., FaultProxy],
    link: str,
) -> None:
    """A tag list whose ``Link`` names a page already read, or new pages that bring no new tag:
    the listing fails at the first repeat, where it made ~1,000 requests a second until its
    100,000-page bound, keeping every page's tags (gigabytes)."""
    proxy = fault_proxy_factory(registry)
    body = json.dumps({"name": repo_name, "tags": ["main-1", "main-2"]}).encode()
    next_page = f"/v2/{repo_name}/tags/list?n=2&last=main-2"
    async with make_store(registry, repo_name, host=proxy.host) as store:
        if link == "itself":
            proxy.add(Fault("status", status=200, body=body, path_contains="/tags/list", times=10**6,
                            headers={"Link": f'<{next_page}>; rel="next"'}))  # fmt: skip
        else:
            for i in range(10**4):
                proxy.add(Fault("status", status=200, body=body, path_contains="/tags/list",
                                headers={"Link": f'<{next_page}&page={i}>; rel="next"'}))  # fmt: skip
        with pytest.raises(RegistryError, match="tag pages"):
            await store.tags()
        assert proxy.count("GET", "/tags/list") <= 3


@pytest.mark.parametrize("what", ["tag list", "manifest"])
async def test_oversized_documents_are_refused(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], what: str
) -> None:
    """No answer is read past MAX_DOCUMENT_BYTES: a registry (or a proxy) cannot make us buffer
    an endless tag list or manifest."""
    proxy = fault_proxy_factory(registry)
    filler = "x" * 60
    huge = json.dumps({"name": repo_name, "tags": [f"{filler}{i}" for i in range(80_000)]}).encode()
    assert len(huge) > MAX_DOCUMENT_BYTES
    async with make_store(registry, repo_name, host=proxy.host) as store:
        if what == "tag list":
            proxy.answer(200, huge, path_contains="/tags/list")
            with pytest.raises(ImageFormatError, match=f"larger than {MAX_DOCUMENT_BYTES} bytes"):
                await store.tags()
        else:
            proxy.answer(200, huge, path_contains="/manifests/")
            with pytest.raises(ImageFormatError, match=f"larger than {MAX_DOCUMENT_BYTES} bytes"):
                await store.get_manifest("big")


@pytest.mark.parametrize("what", ["tag list", "manifest", "error answer"])
async def test_json_nested_too_deeply_is_read_as_unreadable_json(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy], what: str
) -> None:
    """An answer of JSON nested too deeply to parse is taken as one that is not JSON: a tag list
    that cannot be read, a manifest whose media type is the one served, an error without the
    spec's codes. (json raised RecursionError, which came out "unexpected".)"""
    from remote_cache.cache.image import load_image

    proxy = fault_proxy_factory(registry)
    async with make_store(registry, repo_name, host=proxy.host) as store:
        if what == "tag list":
            proxy.answer(200, DEEP_JSON, path_contains="/tags/list")
            with pytest.raises(RegistryError, match="unreadable tag list"):
                await store.tags()
        elif what == "manifest":
            proxy.answer(200, DEEP_JSON, path_contains="/manifests/deep")
            with pytest.raises(ImageFormatError, match="not valid JSON"):
                await load_image(store, "deep")
        else:
            proxy.answer(400, DEEP_JSON, path_contains="/manifests/deep")
            with pytest.raises(RegistryError, match="400"):
                await store.get_manifest("deep")


async def test_tags_of_new_repository_is_empty(server: RegistryServer, repo_name: str) -> None:
    async with make_store(server, repo_name) as store:
        assert await store.tags() == []


async def test_delete_by_tag_and_digest(server: RegistryServer, repo_name: str) -> None:
    async with make_store(server, repo_name) as store:
        await push_image(store, "a", b"first")
        desc_b, _ = await push_image(store, "b", b"second")
        await store.delete("a")
        with pytest.raises(CacheMiss):
            await store.resolve("a")
        await store.delete(desc_b.digest)
        with pytest.raises(CacheMiss):
            await store.resolve("b")
        with pytest.raises(CacheMiss):
            await store.delete("never-existed")


async def test_delete_disabled_is_unsupported(tmp_path: Path, repo_name: str) -> None:
    server = start_registry(tmp_path / "nodelete", delete_enabled=False)
    try:
        async with make_store(server, repo_name) as store:
            await push_image(store, "keep", b"data")
            with pytest.raises(UnsupportedOperation, match="does not allow deleting"):
                await store.delete("keep")
            assert (await store.resolve("keep")).media_type == OCI_MANIFEST
    finally:
        server.stop()


@pytest.mark.usefixtures("via")
async def test_cross_repository_mount(
    server: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(server)
    data = os.urandom(30_000)
    async with make_store(server, repo_name + "-src", host=proxy.host) as src:
        await src.put_blob(blob(data), data)
    proxy.clear()
    async with make_store(server, repo_name + "-dst", host=proxy.host) as dst:
        assert await dst.put_blob(blob(data), data, mount_from=repo_name + "-src") is True
        assert await read_all(dst, blob(data)) == data
    assert proxy.count("POST", "mount=", status=201) == 1
    assert proxy.count("PUT") == 0  # mounted, not uploaded


@pytest.mark.parametrize("mode", ["auth_registry", "token_registry"])
async def test_wrong_password_is_an_auth_error_without_the_secret(
    request: pytest.FixtureRequest, mode: str, repo_name: str
) -> None:
    server: RegistryServer = request.getfixturevalue(mode)
    secret = "Wr0ng-Secret-Value"
    store = RegistryStore(server.host, repo_name, credentials=Credentials(server.username or "", secret))
    async with store:
        with pytest.raises(RegistryAuthError) as info:
            await store.resolve("x")
    message = str(info.value)
    assert secret not in message
    assert server.username is not None and server.username in message
    assert "refused the credentials" in message
    assert secret not in repr(store.transport.auth.credentials)


@pytest.mark.parametrize("mode", ["auth_registry", "token_registry"])
async def test_missing_credentials_is_an_auth_error(
    request: pytest.FixtureRequest, mode: str, repo_name: str
) -> None:
    server: RegistryServer = request.getfixturevalue(mode)
    async with RegistryStore(server.host, repo_name) as store:
        with pytest.raises(RegistryAuthError, match="requires credentials"):
            await store.ping()
        with pytest.raises(RegistryAuthError, match="docker login"):
            await store.put_blob(blob(b"x"), b"x")


async def test_basic_auth_is_sent_up_front_after_first_challenge(
    auth_registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(auth_registry)
    async with make_store(auth_registry, repo_name, host=proxy.host) as store:
        await push_image(store, "t", b"basic")
        await store.resolve("t")
    # Only the very first (anonymous) request is challenged; later ones carry Basic up front.
    assert proxy.count(status=401) == 1
    assert proxy.count() >= 6  # two blob uploads (POST + PUT each), a manifest, a resolve


async def test_bearer_tokens_are_fetched_once_and_reused(
    token_registry: RegistryServer, repo_name: str
) -> None:
    before = token_registry.tokens_issued
    async with make_store(token_registry, repo_name) as store:
        desc, _ = await push_image(store, "tok", os.urandom(1000))
        for _ in range(5):
            assert await store.resolve("tok") == desc
            await store.get_manifest("tok")
        assert await store.tags() == ["tok"]
    issued = token_registry.tokens_issued - before
    assert 1 <= issued <= 2  # a pull,push token for the push; pulls reuse it


async def test_refused_token_is_refreshed(token_registry: RegistryServer, repo_name: str) -> None:
    async with make_store(token_registry, repo_name) as store:
        await push_image(store, "tok", b"refresh")
        # Make every cached token look fresh to us but be refused by the registry (as if revoked).
        for token in store.transport.auth._tokens.values():
            token.value = "not-a-valid-token"
        before = token_registry.tokens_issued
        await store.resolve("tok")
        assert token_registry.tokens_issued == before + 1


async def test_unreachable_port_fails_fast() -> None:
    port = free_port()
    start = time.monotonic()
    async with RegistryStore(f"127.0.0.1:{port}", "a/b", timeout=5) as store:
        with pytest.raises(RegistryUnreachable, match=f"127.0.0.1:{port}"):
            await store.ping()
    assert time.monotonic() - start < 2


async def test_https_default_for_remote_hosts_and_tls_error_message(registry: RegistryServer) -> None:
    # The registry serves plain HTTP; asking for TLS must fail clearly, not hang or fall back.
    async with RegistryStore(registry.host, "a/b", plain_http=False, retries=0, timeout=5) as store:
        assert store.transport.base_url.startswith("https://")
        with pytest.raises(RegistryUnreachable, match=registry.host):
            await store.ping()
    assert RegistryStore("ghcr.io", "a/b").transport.base_url == "https://ghcr.io"
    assert RegistryStore("localhost:5000", "a/b").transport.base_url == "http://localhost:5000"


async def test_from_reference(registry: RegistryServer, repo_name: str) -> None:
    ref = parse_reference(f"{registry.host}/{repo_name}:some-key")
    async with RegistryStore.from_reference(ref) as store:
        assert store.location == f"{registry.host}/{repo_name}"
        await push_image(store, "some-key", b"ref")
        assert (await store.resolve("some-key")).media_type == OCI_MANIFEST


@pytest.mark.usefixtures("via")
async def test_redirect_to_another_origin_drops_credentials(
    auth_registry: RegistryServer,
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Callable[..., FaultProxy],
) -> None:
    """A blob GET redirected to storage elsewhere must not carry our Authorization there."""
    data = os.urandom(40_000)
    desc = blob(data)
    async with make_store(registry, repo_name) as anonymous:
        await anonymous.put_blob(desc, data)
    storage = fault_proxy_factory(registry)  # stands in for object storage on another origin
    front = fault_proxy_factory(auth_registry)
    front.redirect(f"{storage.url}/v2/{repo_name}/blobs/{desc.digest}", method="GET", path_contains="/blobs/")
    async with make_store(auth_registry, repo_name, host=front.host) as store:
        await store.put_blob(desc, data)  # authenticates (Basic) against the front origin
        assert await read_all(store, desc) == data
    assert front.count("GET", "/blobs/", status=307) == 1
    assert front.requests[-1].headers.get("authorization", "").startswith("Basic ")
    assert storage.count("GET", "/blobs/") == 1
    assert "authorization" not in storage.requests[0].headers


async def test_resolve_without_digest_header_falls_back_to_get(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(registry)
    async with make_store(registry, repo_name, host=proxy.host) as store:
        desc, _ = await push_image(store, "t", b"no digest header")
        proxy.strip_response_headers = {"docker-content-digest"}
        proxy.clear()
        assert await store.resolve("t") == desc
    assert proxy.count("HEAD", "/manifests/t") == 1
    assert proxy.count("GET", "/manifests/t") == 1


@pytest.mark.usefixtures("via")
async def test_upload_checks_presence_with_one_mount_request(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    # A new blob: the self-mount POST opens the upload (202), then one PUT; no HEAD.
    # A blob already there: one POST answered 201, nothing uploaded.
    proxy = fault_proxy_factory(registry)
    data = os.urandom(10_000)
    async with make_store(registry, repo_name, host=proxy.host) as store:
        assert await store.put_blob(blob(data), data) is True
        counts = (proxy.count("POST", "mount=", status=202), proxy.count("PUT"), proxy.count("HEAD"))
        assert counts == (1, 1, 0)
        proxy.clear()
        assert await store.put_blob(blob(data), data) is False
        counts = (proxy.count("POST", "mount=", status=201), proxy.count("PUT"), proxy.count("HEAD"))
        assert counts == (1, 0, 0)
        assert await read_all(store, blob(data)) == data


@pytest.mark.usefixtures("via")
async def test_registry_refusing_mounts_gets_head_and_plain_uploads(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.fail(100, status=404, method="POST", path_contains="mount=")
    first, second = os.urandom(10_000), os.urandom(10_000)
    async with make_store(registry, repo_name, host=proxy.host) as store:
        assert await store.put_blob(blob(first), first) is True
        assert await store.put_blob(blob(first), first) is False
        assert await store.put_blob(blob(second), second) is True
        assert await read_all(store, blob(first)) == first
        assert await read_all(store, blob(second)) == second
    assert proxy.count("POST", "mount=") == 1  # refused once, then never tried again
    assert proxy.count("PUT") == 2


async def test_tls_verifies_certificates_and_honours_ssl_cert_file(
    tls_registry: RegistryServer, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with RegistryStore(tls_registry.host, repo_name, plain_http=False, retries=0, timeout=5) as store:
        with pytest.raises(RegistryUnreachable, match=r"CERTIFICATE_VERIFY_FAILED"):
            await store.ping()
    assert tls_registry.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
    async with RegistryStore(tls_registry.host, repo_name, plain_http=False) as store:
        desc, _ = await push_image(store, "tls", b"over tls")
        assert await store.resolve("tls") == desc


async def test_a_slow_upload_over_tls_is_not_a_stall(
    tls_registry: RegistryServer, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write timeout bounds each wait for the registry to take more, under TLS too (an
    ``SSLSocket.send`` writes its whole buffer under one deadline: the body goes in slices)."""
    assert tls_registry.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
    data = os.urandom(24 << 20)
    timeouts = Timeouts(connect=1, read=10, write=1)
    with tcp_relay(tls_registry.host, rate=4_000_000) as relay:
        store = RegistryStore(relay.host, repo_name, plain_http=False, retries=0, timeout=timeouts)
        async with store:
            started = time.monotonic()
            assert await store.put_blob(blob(data), data) is True
            assert time.monotonic() - started > 2.0  # it was slow


@pytest.mark.usefixtures("via")
async def test_a_tls_connection_cut_mid_body_is_not_reused_for_the_resume(
    tls_registry: RegistryServer, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept-alive connection reset in the middle of a blob (under TLS, as every real registry
    is) is dropped, not put back in the pool: the ``Range`` resume goes on a new one. (The dead
    connection was pooled: the resume failed with SSLEOFError, reported as a failed TLS handshake.)"""
    assert tls_registry.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
    data = os.urandom(8 << 20)
    async with RegistryStore(tls_registry.host, repo_name, plain_http=False) as store:
        await store.put_blob(blob(data), data)
    with tcp_relay(tls_registry.host, cut_answer_after=2 << 20) as relay:
        async with RegistryStore(relay.host, repo_name, plain_http=False, retries=2) as store:
            assert await read_all(store, blob(data)) == data
    assert relay.cuts == 1


async def test_a_big_request_body_on_a_stale_tls_connection_goes_on_a_new_one(
    tls_registry: RegistryServer, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept-alive TLS connection the far end closed while idle (load balancers do) fails a
    big body's write with SSLEOFError: a stale connection, tried again on a new one (a save
    failed, final)."""
    assert tls_registry.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
    with tcp_relay(tls_registry.host, close_idle_after=0.5) as relay:
        async with RegistryStore(relay.host, repo_name, plain_http=False, retries=0) as store:
            await store.put_blob(blob(b"warm"), b"warm")  # leaves a kept-alive connection
            await asyncio.sleep(1.0)
            data = os.urandom(1 << 20)
            assert await store.put_blob(blob(data), data) is True


@pytest.mark.usefixtures("via")
@pytest.mark.parametrize("trusted", [False, True])
async def test_plain_http_registry_redirecting_to_tls_storage_verifies_it(
    registry: RegistryServer,
    tls_registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Callable[..., FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool,
) -> None:
    # A plain-HTTP client sets up its HTTPS side only when a redirect needs it; it must verify.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    data = os.urandom(20_000)
    desc = blob(data)
    assert tls_registry.ca is not None
    cert = str(tls_registry.ca.cert)
    with monkeypatch.context() as m:
        m.setenv("SSL_CERT_FILE", cert)
        async with RegistryStore(tls_registry.host, repo_name, plain_http=False) as storage:
            await storage.put_blob(desc, data)
    front = fault_proxy_factory(registry)
    front.redirect(f"https://{tls_registry.host}/v2/{repo_name}/blobs/{desc.digest}", method="GET")
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", cert)
    async with RegistryStore(front.host, repo_name, retries=0, timeout=5) as store:
        assert store.transport.base_url.startswith("http://")
        if trusted:
            assert await read_all(store, desc) == data
        else:
            with pytest.raises(RegistryUnreachable, match=r"CERTIFICATE_VERIFY_FAILED"):
                await read_all(store, desc)


@pytest.mark.usefixtures("via")
async def test_blob_compressed_in_transit_by_a_proxy_still_verifies(repo_name: str) -> None:
    # Some proxies gzip any response, whatever the client asked for. We ask for the stored
    # bytes ("identity"), and decode what comes compressed anyway before checking the digest.
    import gzip
    import http.server
    import threading

    data = os.urandom(30_000) + bytes(30_000)
    desc = blob(data)
    asked: list[str] = []

    class GzipEverything(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.headers.get("Accept-Encoding", ""))
            body = gzip.compress(data)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GzipEverything)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        async with RegistryStore(f"127.0.0.1:{server.server_address[1]}", repo_name) as store:
            assert await read_all(store, desc) == data
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["identity"]


async def test_pull_only_credentials_still_learn_a_blob_is_there(
    auth_registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Callable[..., FaultProxy],
) -> None:
    # The self-mount is a POST, which needs push rights; refused, a HEAD answers instead.
    data = os.urandom(10_000)
    desc = blob(data)
    proxy = fault_proxy_factory(auth_registry)
    async with make_store(auth_registry, repo_name, host=proxy.host) as store:
        assert await store.put_blob(desc, data) is True
        proxy.fail(100, status=403, method="POST")  # as a registry denying this identity pushes
        assert await store.put_blob(desc, data) is False
        other = os.urandom(10_000)
        with pytest.raises(RegistryAuthError):
            await store.put_blob(blob(other), other)
    assert proxy.count("HEAD", "/blobs/") == 2


async def test_credentials_never_go_to_another_origin_named_by_the_registry(
    auth_registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: Callable[..., FaultProxy],
) -> None:
    """An absolute tag-page ``Link`` or upload ``Location`` on another host gets no Authorization
    (as a redirect does not): the registry's credentials are for the registry. That host's 401
    is told as its own, not as the user's credentials refused (they were never sent there)."""
    front, elsewhere = fault_proxy_factory(auth_registry), fault_proxy_factory(auth_registry)
    front.paginate_tags, front.link_origin = True, elsewhere.url
    theirs = f"{elsewhere.url} (where registry {front.host} sent the request) answered 401"
    async with make_store(auth_registry, repo_name, host=front.host, retries=0) as store:
        _desc, body = await push_image(store, None, b"origins")
        for name in ("a", "b", "c"):
            await store.put_manifest(body, OCI_MANIFEST, tag=name)
        with pytest.raises(RegistryError, match=re.escape(theirs)) as info:  # it asks for credentials we keep
            await store.tags(page_size=2)
        assert not isinstance(info.value, RegistryAuthError) and "go to the registry only" in str(info.value)
        front.location_origin = elsewhere.url
        with pytest.raises(RegistryError, match=re.escape(theirs)):
            data = os.urandom(1000)
            await store.put_blob(blob(data), data)
    assert front.requests and all(r.headers.get("authorization") for r in front.requests[-2:])
    assert elsewhere.requests and not [r for r in elsewhere.requests if "authorization" in r.headers]


def test_a_token_answer_nested_too_deeply_is_no_usable_token() -> None:
    """Like a tag list, manifest or error body (commit 2780ba7), a token realm's answer nested too
    deeply to parse is one that is not JSON: "sent no usable token", not RecursionError."""
    auth = Authenticator("registry.example", None, plain_http=False, send=None, timeouts=Timeouts())  # type: ignore[arg-type]
    with pytest.raises(RegistryAuthError, match="no usable token"):
        auth._parse_token(DEEP_JSON[:1_000_000])


@pytest.mark.parametrize("expires_in", [b"1e999", b"Infinity", b"1" * 400])
def test_a_token_answer_with_an_unbounded_lifetime_is_no_usable_token(expires_in: bytes) -> None:
    """Like JSON nested too deeply (ef9219c), an ``expires_in`` no int or float holds is a token
    answer the realm got wrong: "sent no usable token" (or a token with a bounded lifetime), not
    "unexpected OverflowError". ``1e999`` and ``Infinity`` overflow int() inside _parse_token;
    a 400-digit int overflows float when the lifetime is added to the clock. (fails: defect)"""
    import time

    auth = Authenticator("registry.example", None, plain_http=False, send=None, timeouts=Timeouts())  # type: ignore[arg-type]
    try:
        _value, expires_in_s = auth._parse_token(b'{"token":"t","expires_in":' + expires_in + b"}")
    except RegistryAuthError as exc:
        assert "no usable token" in str(exc)
        return
    time.monotonic() + max(expires_in_s - 30, 1.0)  # what Authenticator does with it
