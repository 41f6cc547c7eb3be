"""Retries and timeouts, exercised through a fault-injecting proxy in front of a real registry."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from remote_cache.errors import CacheMiss, RegistryAuthError, RegistryError, RegistryUnreachable, StoreError
from remote_cache.oci import OCI_LAYER_TAR, Descriptor, sha256_digest
from remote_cache.oci.credentials import Credentials
from remote_cache.oci.registry import RegistryStore, RegistryTransport, Timeouts
from tests.oci import blob_reading
from tests.oci.blob_reading import read_all
from tests.registry_server import Fault, FaultProxy, RegistryServer, free_port

ProxyFactory = Callable[[RegistryServer], FaultProxy]


def blob(data: bytes) -> Descriptor:
    return Descriptor(OCI_LAYER_TAR, sha256_digest(data), len(data))


def store_via(proxy: FaultProxy | None, server: RegistryServer, repo: str, **kw: object) -> RegistryStore:
    """A store of ``repo`` on ``server`` through ``proxy`` (None: straight to the server)."""
    creds = Credentials(server.username, server.password) if server.username and server.password else None
    kw.setdefault("retries", 3)
    host = server.host if proxy is None else proxy.host
    return RegistryStore(host, repo, credentials=creds, **kw)  # type: ignore[arg-type]


async def test_503s_are_retried(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.fail(2, 503, method="HEAD")
    async with store_via(proxy, registry, repo_name) as store:
        with pytest.raises(CacheMiss):
            await store.resolve("latest")
    assert proxy.count("HEAD", status=503) == 2
    assert proxy.count("HEAD", status=404) == 1


async def test_persistent_5xx_gives_up_after_bounded_attempts(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.fail(100, 502)
    async with store_via(proxy, registry, repo_name, retries=2) as store:
        with pytest.raises(RegistryError) as info:
            await store.tags()
    assert info.value.status == 502
    assert proxy.count() == 3  # first try + 2 retries


async def test_4xx_is_not_retried(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.fail(1, 400)
    async with store_via(proxy, registry, repo_name) as store:
        with pytest.raises(RegistryError) as info:
            await store.tags()
    assert info.value.status == 400
    assert proxy.count() == 1


async def test_429_honours_retry_after(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.rate_limit(retry_after="1")
    async with store_via(proxy, registry, repo_name) as store:
        start = time.monotonic()
        assert await store.tags() == []
        elapsed = time.monotonic() - start
    assert elapsed >= 0.9  # backoff alone would be ~0.05 s
    assert proxy.count(status=429) == 1


@pytest.mark.usefixtures("via")
async def test_blob_download_cut_mid_body_resumes(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(300_000)
    proxy = fault_proxy_factory(registry)
    async with store_via(proxy, registry, repo_name) as store:
        await store.put_blob(blob(data), data)
        proxy.cut(after_bytes=100_000, method="GET", path_contains="/blobs/sha256:")
        assert await read_all(store, blob(data)) == data
    assert proxy.count("GET", "/blobs/sha256:") == 2  # cut once, then resumed with Range


@pytest.mark.parametrize("start", ["zero", "past"])
async def test_a_resume_answered_from_another_offset_than_asked(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory, start: str
) -> None:
    """A 206 whose Content-Range starts before the byte asked for (storage that ignores the
    offset but says so) is read from the right byte: the blob comes out whole; one that starts
    after it cannot be used and fails as the connection's fault, naming the range. (Both were
    taken as following on from the offset: "blob ... is larger than its N bytes", a corrupt blob.)"""
    data = os.urandom(300_000)
    first = 0 if start == "zero" else 200_000
    proxy = fault_proxy_factory(registry)
    async with store_via(proxy, registry, repo_name, retries=1) as store:
        await store.put_blob(blob(data), data)
        # The first answer is cut half-way; each resume is answered from byte ``first``.
        proxy.cut(after_bytes=150_000, method="GET", path_contains="/blobs/sha256:")
        content_range = {"Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"}
        proxy.add(
            Fault(
                "status", status=206, body=data[first:], headers=content_range, method="GET",
                path_contains="/blobs/sha256:", times=100,
            )
        )  # fmt: skip
        if start == "zero":
            assert await read_all(store, blob(data)) == data
        else:
            with pytest.raises(RegistryUnreachable, match="Content-Range"):
                await read_all(store, blob(data))
    ranges = [r.headers.get("range") for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path]
    assert ranges[:2] == [None, "bytes=150000-"]


@pytest.mark.usefixtures("via")
async def test_blob_download_cut_every_time_fails_as_unreachable(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(300_000)
    proxy = fault_proxy_factory(registry)
    async with store_via(proxy, registry, repo_name, retries=2) as store:
        await store.put_blob(blob(data), data)
        proxy.add(Fault("cut", after_bytes=10_000, method="GET", times=100))
        with pytest.raises(RegistryUnreachable, match="connection to registry"):
            await read_all(store, blob(data))


@pytest.mark.usefixtures("via")
async def test_upload_retried_after_503_on_commit(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(50_000)
    proxy = fault_proxy_factory(registry)
    proxy.fail(1, 503, method="PUT", path_contains="/blobs/uploads/")
    async with store_via(proxy, registry, repo_name) as store:
        assert await store.put_blob(blob(data), data) is True
        assert await read_all(store, blob(data)) == data
    assert proxy.count("PUT", status=503) == 1
    assert proxy.count("PUT", status=201) == 1


@pytest.mark.usefixtures("via")
async def test_chunked_upload_restarts_after_cut(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "big"
    path.write_bytes(data)
    proxy = fault_proxy_factory(registry)
    proxy.cut(after_bytes=None, method="PATCH")  # the chunk lands, the answer is lost
    async with store_via(proxy, registry, repo_name, chunk_size=64 * 1024) as store:
        assert await store.put_blob(blob(data), path) is True
        assert await read_all(store, blob(data)) == data
    assert proxy.count("POST") == 2  # the broken session was abandoned and a new one started


async def test_stall_ends_with_unreachable_within_timeout(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.stall(times=100)
    async with store_via(
        proxy, registry, repo_name, timeout=Timeouts(connect=1, read=0.5), retries=1
    ) as store:
        start = time.monotonic()
        # The retry's own timeout, or (when the backoff's jitter already used up the two-period
        # stall budget) the stall rule's refusal to send it: either way a stall, said as one.
        with pytest.raises(RegistryUnreachable, match=r"read timeout|has sent nothing for"):
            await store.resolve("latest")
        elapsed = time.monotonic() - start
    assert elapsed < 3.0  # two attempts of 0.5 s plus backoff, not forever


@pytest.mark.usefixtures("via")
async def test_stall_mid_body_ends_with_unreachable(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(200_000)
    proxy = fault_proxy_factory(registry)
    async with store_via(
        proxy, registry, repo_name, timeout=Timeouts(connect=1, read=0.5), retries=0
    ) as store:
        await store.put_blob(blob(data), data)
        proxy.stall(after_bytes=50_000, method="GET")
        start = time.monotonic()
        with pytest.raises(RegistryUnreachable, match=registry.host.split(":")[0]):
            await read_all(store, blob(data))
        assert time.monotonic() - start < 3.0


async def test_single_stall_is_retried(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(registry)
    proxy.stall(method="GET")
    # The budget is two stall periods: the first stall, the retry's pause (up to the policy's
    # 0.5 s backoff) and the retry's answer must fit. Under a 0.5 s timeout they did not always.
    async with store_via(proxy, registry, repo_name, timeout=Timeouts(connect=1, read=1.0)) as store:
        assert await store.tags() == []
    assert proxy.count("GET") == 2


async def test_a_slow_upload_is_not_a_stall(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    # 24 MB taken at 4 MB/s: seconds more than the 1 s timeout, past what the socket buffers
    # hold. The timeout bounds each wait for the registry to take more, not the whole body.
    data = os.urandom(24 << 20)
    proxy = fault_proxy_factory(registry)
    proxy.slow_upload(4_000_000, method="PUT", times=10)
    async with store_via(
        proxy, registry, repo_name, timeout=Timeouts(connect=1, read=10, write=1), retries=0
    ) as store:
        started = time.monotonic()
        assert await store.put_blob(blob(data), data) is True
        assert time.monotonic() - started > 2.0  # it was slow
    assert [r.outcome for r in proxy.requests if r.method == "PUT"] == ["forwarded"]


async def test_an_upload_the_registry_stops_taking_ends_as_a_write_stall(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(24 << 20)
    proxy = fault_proxy_factory(registry)
    proxy.slow_upload(1, method="PUT", times=10)  # takes 16 KiB, then nothing more
    async with store_via(proxy, registry, repo_name, timeout=1.0, retries=0) as store:
        started = time.monotonic()
        with pytest.raises(RegistryUnreachable, match=r"stopped accepting data for 1s \(write timeout\)"):
            await store.put_blob(blob(data), data)
        assert time.monotonic() - started < 5.0


@pytest.mark.usefixtures("via")
async def test_token_flow_survives_faults(
    token_registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    proxy = fault_proxy_factory(token_registry)
    proxy.fail(1, 503)
    data = os.urandom(10_000)
    async with store_via(proxy, token_registry, repo_name) as store:
        assert await store.put_blob(blob(data), data) is True
        assert await read_all(store, blob(data)) == data


def test_retry_after_forms_and_backoff_bounds() -> None:
    transport = RegistryTransport("127.0.0.1:1", backoff=0.5, max_backoff=4, max_retry_after=30)
    assert transport.retry.delay(0, "2") == 2.0
    assert transport.retry.delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert transport.retry.delay(0, "3600") == 30.0  # capped
    for attempt in range(8):
        delay = transport.retry.delay(attempt, "not a date")
        assert min(4, 0.5 * 2**attempt) / 2 <= delay <= min(4, 0.5 * 2**attempt)


# -- found by review: a token the registry stopped accepting, a presigned URL in an error, a
# -- healthy stretch between two stalls, a cancel before the worker thread began


@pytest.mark.usefixtures("via")
async def test_a_token_the_registry_no_longer_accepts_is_renewed_once(
    token_registry: RegistryServer, repo_name: str
) -> None:
    # docker-registry spells the challenge header "Www-Authenticate": it must be found anyway.
    payload = os.urandom(200_000)
    async with store_via(None, token_registry, repo_name) as store:
        desc = blob(payload)
        await store.put_blob(desc, payload)
        _revoke_tokens(store)
        before = token_registry.tokens_issued
        assert await read_all(store, desc) == payload
        assert token_registry.tokens_issued - before == 1


@pytest.mark.parametrize("order", ["bearer first", "basic first"])
async def test_a_challenge_offering_bearer_and_basic_gets_a_token(
    token_registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory, order: str
) -> None:
    """A 401 whose ``WWW-Authenticate`` offers two schemes (RFC 7235 allows several challenges in
    one header, and repeated headers read as one): the bearer challenge is met with its own realm,
    as docker's client prefers it. (Its realm was read from the Basic challenge after it, a token
    asked of "basic-realm"; with Basic first, Basic was sent to a registry wanting tokens.)"""
    issuer = token_registry.token_issuer
    assert issuer is not None
    bearer = f'Bearer realm="{issuer.realm}",service="{issuer.service}"'
    challenges = [bearer, 'Basic realm="basic-realm"']
    header = ", ".join(challenges if order == "bearer first" else challenges[::-1])
    proxy = fault_proxy_factory(token_registry)
    proxy.add(Fault("status", status=401, headers={"WWW-Authenticate": header}, method="HEAD", times=1))
    before = token_registry.tokens_issued
    async with store_via(proxy, token_registry, repo_name) as store:
        with pytest.raises(CacheMiss):
            await store.resolve("absent")  # answered (a miss) once a token was fetched and sent
    assert token_registry.tokens_issued > before


async def test_a_token_realm_that_fails_is_named_not_the_registry(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    """A token realm answering 500: the message names that realm (it said "registry H answered
    500", pointing at the server that had answered fine)."""
    front, realm = fault_proxy_factory(registry), fault_proxy_factory(registry)
    challenge = f'Bearer realm="{realm.url}/token",service="svc"'
    front.add(Fault("status", status=401, headers={"WWW-Authenticate": challenge}, method="HEAD", times=1))
    realm.answer(500, b"token service down", method="GET", path_contains="/token", times=100)
    async with store_via(front, registry, repo_name, retries=0) as store:
        with pytest.raises(RegistryError) as info:
            await store.resolve("absent")
    said = str(info.value)
    assert f"token realm {realm.host} of registry {front.host} answered 500" in said, said


@pytest.mark.usefixtures("via")
async def test_a_redirect_loop_names_no_signature(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    data = os.urandom(1000)
    desc = await _stored(registry, repo_name, data)
    front, storage = fault_proxy_factory(registry), fault_proxy_factory(registry)
    query = "X-Amz-Signature=SECRETsig&X-Amz-Credential=AKIASECRET"
    signed = f"{storage.url}/v2/{repo_name}/blobs/{desc.digest}?{query}"
    for proxy in (front, storage):
        proxy.redirect(signed, method="GET", path_contains="/blobs/", times=100)
    async with store_via(front, registry, repo_name, retries=2) as store:
        with pytest.raises(RegistryError) as info:
            await read_all(store, desc)
    assert "SECRET" not in str(info.value) and "redirected more than 5 times" in str(info.value)
    # An answer, not a network failure: not asked again (1 + 5 redirects, one of them the front's).
    assert front.count("GET", "/blobs/") + storage.count("GET", "/blobs/") == 6


_S3_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><RequestId>R1</RequestId></Error>"
)


@pytest.mark.usefixtures("via")
@pytest.mark.parametrize("storage", ["refused", "untrusted", "expired", "echoed", "echoed-json", "bad-url"])
async def test_a_failure_where_the_registry_redirected_names_that_place(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: ProxyFactory,
    request: pytest.FixtureRequest,
    storage: str,
) -> None:
    """A registry that sends blob downloads to storage elsewhere (S3, a CDN): a failure there
    names that place and the registry that sent the request, with the advice that fits, never
    the signed query. (All were blamed on the registry, which answered fine: "cannot connect
    to registry", its certificate, "requires credentials" for an expired signed URL; and a
    Location http.client refused was quoted whole, signature included.)"""
    data = os.urandom(1000)
    desc = await _stored(registry, repo_name, data)
    front = fault_proxy_factory(registry)
    signed = "X-Amz-Signature=SECRET" + "5f" * 29  # (64 characters, as S3's)
    if storage == "refused":
        place = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    elif storage == "untrusted":
        place = f"https://{request.getfixturevalue('tls_registry').host}"
    elif storage == "expired":
        elsewhere = fault_proxy_factory(registry)
        elsewhere.answer(403, _S3_EXPIRED, method="GET", path_contains="/blobs/")
        place = elsewhere.url
    elif storage.startswith("echoed"):  # what storage says quotes the signed URL it was sent
        elsewhere = fault_proxy_factory(registry)
        quoted = f"Request has expired for /blobs/x?{signed}&X-Amz-Credential=AKIA/x"
        body = (
            json.dumps({"errors": [{"code": "DENIED", "message": quoted}]}).encode()
            if storage == "echoed-json"
            else _S3_EXPIRED.replace(b"Request has expired", quoted.encode())
        )
        elsewhere.answer(403, body, method="GET", path_contains="/blobs/")
        place = elsewhere.url
    else:  # a place that answers, sent a URL with a space
        place = fault_proxy_factory(registry).url
    path = f"/v2/{repo_name}/blobs/{desc.digest}" + (" x" if storage == "bad-url" else "")
    front.redirect(f"{place}{path}?{signed}", method="GET", path_contains="/blobs/")
    async with store_via(front, registry, repo_name, retries=0) as store:
        with pytest.raises(StoreError) as info:
            await read_all(store, desc)
    said = str(info.value)
    assert f"{place} (where registry {front.host} sent the request)" in said, said
    assert "SECRET" not in said and "requires credentials" not in said and "docker login" not in said, said
    assert f"connect to registry {front.host}" not in said and f"of registry {front.host}" not in said, said
    advice = {
        "refused": "this machine must reach",
        "untrusted": "--cert-dir",
        "expired": "AccessDenied: Request has expired; this tool's credentials go to the registry only",
        "echoed": "AccessDenied: Request has expired for /blobs/x?X-Amz-Signature=***&X-Amz-Credential",
        "echoed-json": "DENIED: Request has expired for /blobs/x?X-Amz-Signature=***&X-Amz-Credential",
        "bad-url": "not a valid URL",
    }[storage]
    assert advice in said, said
    assert not isinstance(info.value, RegistryAuthError), said  # no credentials of ours went there


@pytest.mark.parametrize("bad", ["http://127.0.0.1:port", "http://[::1"])
@pytest.mark.parametrize("where", ["redirect", "upload Location"])
async def test_a_url_from_the_registry_that_is_no_url_is_its_error(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory, where: str, bad: str
) -> None:
    """A redirect or an upload ``Location`` that cannot be parsed (a port that is no number, a
    broken IPv6 address): the registry's error, said once (not retried) and without the URL,
    which may hold a signature. (A bare ValueError escaped every translation.)"""
    data = os.urandom(1000)
    front = fault_proxy_factory(registry)
    async with store_via(front, registry, repo_name) as store:
        if where == "redirect":
            desc = await _stored(registry, repo_name, data)
            front.redirect(
                f"{bad}/x?X-Amz-Signature=SECRETsig", method="GET", path_contains="/blobs/", times=5
            )
            with pytest.raises(RegistryError) as info:
                await read_all(store, desc)
        else:
            front.location_origin = bad
            with pytest.raises(RegistryError) as info:
                await store.put_blob(blob(data), data)
    said = str(info.value)
    assert f"registry {front.host} " in said and "not a valid URL" in said and "SECRET" not in said, said
    assert front.count("GET" if where == "redirect" else "POST") == 1


async def test_what_a_storage_error_says_is_shown_on_one_line_with_its_code(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    """Storage answering with a terminal's escape sequences and line breaks in its message: shown
    as printable text on one line, cut short when long; a spec error body keeps its code."""
    data = os.urandom(1000)
    desc = await _stored(registry, repo_name, data)
    front, elsewhere = fault_proxy_factory(registry), fault_proxy_factory(registry)
    hostile = (
        b"<Error><Code>Bad</Code><Message>\x1b]0;pwned\x07 line1\nline2" + b"x" * 400 + b"</Message></Error>"
    )
    spec = b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]}'
    elsewhere.answer(400, hostile, method="GET", path_contains="/blobs/")
    elsewhere.answer(404, spec, method="GET", path_contains="/blobs/")
    front.redirect(
        f"{elsewhere.url}/v2/{repo_name}/blobs/{desc.digest}", method="GET", path_contains="/blobs/", times=2
    )
    async with store_via(front, registry, repo_name, retries=0) as store:
        with pytest.raises(RegistryError) as first:
            await read_all(store, desc)
        with pytest.raises(RegistryError) as second:
            await read_all(store, desc)
    said = str(first.value)
    assert "400 Bad: ]0;pwned line1 line2xxx" in said and said.count("x") < 330 and "..." in said, said
    assert all(c.isprintable() for c in said), said
    assert second.value.code == "BLOB_UNKNOWN" and "404 BLOB_UNKNOWN: blob unknown to registry" in str(
        second.value
    )


async def test_an_upload_location_on_a_host_that_cannot_be_reached_names_that_host(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    """A registry behind a proxy that names its own internal address in upload ``Location``s (a
    wrong ``http.host``): the error names that address and the registry that gave it (it said
    the registry could not be reached, which had just answered the upload's POST)."""
    front = fault_proxy_factory(registry)
    front.location_origin = internal = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    data = os.urandom(1000)
    async with store_via(front, registry, repo_name, retries=0) as store:
        with pytest.raises(RegistryUnreachable) as info:
            await store.put_blob(blob(data), data)
    said = str(info.value)
    assert f"cannot connect to {internal} (where registry {front.host} sent the request)" in said, said


async def test_a_stall_where_the_registry_redirected_is_named_when_later_requests_are_refused(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    """Storage that stalls every download the registry sends it: once the stall budget is spent,
    the registry's next request is refused, naming the storage that stalled (it said the
    registry "has sent nothing", which had answered every request)."""
    data = os.urandom(1000)
    desc = await _stored(registry, repo_name, data)
    front, storage = fault_proxy_factory(registry), fault_proxy_factory(registry)
    storage.stall(after_bytes=0, method="GET", path_contains="/blobs/", times=100)
    front.redirect(
        f"{storage.url}/v2/{repo_name}/blobs/{desc.digest}", method="GET", path_contains="/blobs/", times=100
    )
    async with store_via(front, registry, repo_name, timeout=Timeouts(connect=0.5, read=0.5)) as store:
        with pytest.raises(RegistryUnreachable, match="giving up"):
            await read_all(store, desc)
        with pytest.raises(RegistryUnreachable) as info:
            await store.resolve("latest")
    said = str(info.value)
    assert f"{storage.url} (where registry {front.host} sent requests) has sent nothing" in said, said


async def test_a_refusal_after_stalls_names_where_the_latest_stall_was(
    registry: RegistryServer, repo_name: str, fault_proxy_factory: ProxyFactory
) -> None:
    """Storage stalls once, then the registry itself stalls and spends the budget: the request
    refused after that names the registry, as the error just before it did (it named the storage,
    whose stall had begun the count)."""
    data = os.urandom(1000)
    desc = await _stored(registry, repo_name, data)
    front, storage = fault_proxy_factory(registry), fault_proxy_factory(registry)
    storage.stall(after_bytes=0, method="GET", times=1)
    front.redirect(f"{storage.url}/v2/{repo_name}/blobs/{desc.digest}", method="GET", path_contains="/blobs/")
    front.stall(after_bytes=None, method="HEAD", times=10)  # (no answer at all)
    async with store_via(
        front, registry, repo_name, retries=0, timeout=Timeouts(connect=0.5, read=0.5)
    ) as store:
        with pytest.raises(RegistryUnreachable, match="where registry"):
            await read_all(store, desc)
        with pytest.raises(RegistryUnreachable, match=f"^registry {front.host} stopped sending data"):
            await store.resolve("x")
        with pytest.raises(RegistryUnreachable) as info:
            await store.resolve("y")
    assert str(info.value).startswith(f"registry {front.host} has sent nothing"), info.value


@pytest.mark.usefixtures("via")
async def test_bytes_moving_between_two_stalls_refill_the_budget(
    registry: RegistryServer,
    repo_name: str,
    fault_proxy_factory: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backoff's shortest jitter, pinned: the pause after the second stall (the second retry,
    # 0.5-1 s) comes out of the one stall period the rule gives after a stall, so with the longest
    # jitter the third request is refused whatever came before (a CI run failed so: 1 s + ~1 s);
    # pinned, it has 0.5 s to spare on every run.
    monkeypatch.setattr(random, "random", lambda: 0.0)
    data = os.urandom(4_000_000)
    desc = await _stored(registry, repo_name, data)
    proxy = fault_proxy_factory(registry)
    proxy.stall(after_bytes=100_000, method="GET", path_contains="/blobs/")  # the first GET stalls early
    proxy.stall(after_bytes=3_000_000, method="GET", path_contains="/blobs/")  # the resumed one, late
    timeouts = Timeouts(connect=1, read=1.0)  # a budget of 2 s of silence
    async with store_via(proxy, registry, repo_name, timeout=timeouts) as store:
        got = bytearray()

        def slow_disk(chunk: memoryview) -> None:  # ~3 s of healthy transfer between the stalls
            got.extend(chunk)
            time.sleep(len(chunk) / 1_000_000)

        if blob_reading.VIA == "stream":
            async for chunk in store.read_blob(desc):
                slow_disk(memoryview(chunk))
        else:
            await store.download_blob(desc, slow_disk)
    assert bytes(got) == data


async def test_a_full_disk_under_a_download_is_the_disks_error(
    registry: RegistryServer, repo_name: str
) -> None:
    """The sink's own OSError is not taken for the network's (RegistryUnreachable)."""
    desc = await _stored(registry, repo_name, os.urandom(50_000))

    def full_disk(chunk: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with store_via(None, registry, repo_name) as store:
        with pytest.raises(OSError) as info:
            await store.download_blob(desc, full_disk)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.usefixtures("via")
async def test_a_cancel_before_the_download_thread_began_does_not_hang(
    registry: RegistryServer, repo_name: str
) -> None:
    payload = os.urandom(50_000)
    desc = blob(payload)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    async with store_via(None, registry, repo_name) as store:
        await store.put_blob(desc, payload)
        limiter.total_tokens = 1  # the second download waits for a worker thread
        try:
            for delay in (0, 0.001, 0.002, 0.005, 0.01, 0.02):  # the cancel lands at various points
                with anyio.move_on_after(10) as guard:
                    async with anyio.create_task_group() as tg:
                        for _ in range(2):
                            tg.start_soon(read_all, store, desc)
                        await anyio.sleep(delay)
                        tg.cancel_scope.cancel()
                assert not guard.cancelled_caught, "a cancelled download waited for a thread never run"
        finally:
            limiter.total_tokens = tokens


async def _stored(registry: RegistryServer, repo: str, data: bytes) -> Descriptor:
    """Put ``data`` in ``repo`` as a blob, straight to the registry; its descriptor."""
    desc = blob(data)
    async with store_via(None, registry, repo) as direct:
        await direct.put_blob(desc, data)
    return desc


def _revoke_tokens(store: RegistryStore) -> None:
    """Make every cached bearer token one the registry refuses (revoked, or a skewed clock)."""
    auth = store.transport.auth
    for scope, token in list(auth._tokens.items()):
        auth._tokens[scope] = type(token)("eyJhbGciOiJub25lIn0.e30.revoked", token.expires_at)


async def test_a_cancel_while_connecting_does_not_wait_for_the_connect_timeout() -> None:
    # A host that accepts TCP but never finishes the TLS handshake: the request is still
    # connecting (no socket to shut down yet) when a deadline or a signal cancels it.
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with RegistryStore(host, "team/cache", plain_http=False, timeout=8, retries=0) as store:
            start = time.monotonic()
            with anyio.move_on_after(0.5):
                await store.resolve("latest")
            assert time.monotonic() - start < 2.0  # not the 8 s connect timeout
    finally:
        listener.close()
        for conn in held:
            conn.close()
