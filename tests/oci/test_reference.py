"""Reference parsing: registry and layout forms, Docker Hub normalisation, errors."""

from __future__ import annotations

import pytest

from remote_cache.errors import InvalidKey, InvalidReference
from remote_cache.oci.reference import Reference, is_loopback, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "host", "repository", "key", "digest"),
    [
        ("localhost:5000/team/cache:npm-linux", "localhost:5000", "team/cache", "npm-linux", None),
        ("localhost/cache", "localhost", "cache", None, None),
        ("127.0.0.1:5000/a/b/c:2h", "127.0.0.1:5000", "a/b/c", "2h", None),
        ("ghcr.io/org/cache:go", "ghcr.io", "org/cache", "go", None),
        ("GHCR.io/org/cache:go", "ghcr.io", "org/cache", "go", None),
        ("docker://ghcr.io/org/cache:go", "ghcr.io", "org/cache", "go", None),
        ("ttl.sh/x-y_z.w__v--u:1h", "ttl.sh", "x-y_z.w__v--u", "1h", None),
        ("[::1]:5000/cache:k", "[::1]:5000", "cache", "k", None),
        # Keys are raw cache keys: anything without '/', ':' allowed (split at the first ':').
        ("ghcr.io/org/cache:npm:linux@x", "ghcr.io", "org/cache", "npm:linux@x", None),
        ("ghcr.io/org/cache:Key With Spaces", "ghcr.io", "org/cache", "Key With Spaces", None),
        (f"ghcr.io/org/cache@{DIGEST}", "ghcr.io", "org/cache", None, DIGEST),
        (f"ghcr.io/org/cache:k@{DIGEST}", "ghcr.io", "org/cache", "k", DIGEST),
        # Docker Hub
        ("alpine", "registry-1.docker.io", "library/alpine", None, None),
        ("alpine:3", "registry-1.docker.io", "library/alpine", "3", None),
        ("user/cache:npm", "registry-1.docker.io", "user/cache", "npm", None),
        ("docker.io/alpine", "registry-1.docker.io", "library/alpine", None, None),
        ("index.docker.io/user/cache:k", "registry-1.docker.io", "user/cache", "k", None),
    ],
)
def test_parse_registry_references(
    text: str, host: str, repository: str, key: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref == Reference("registry", host=host, repository=repository, key=key, digest=digest)


def test_str_round_trips_and_shows_docker_hub_by_its_name() -> None:
    for text in ["localhost:5000/team/cache:npm", f"ghcr.io/o/c:k@{DIGEST}", "oci:/tmp/layout:k", "oci:rel"]:
        assert str(parse_reference(text)) == text
        assert parse_reference(str(parse_reference(text))) == parse_reference(text)
    assert str(parse_reference("alpine:3")) == "docker.io/library/alpine:3"
    assert parse_reference("alpine").is_docker_hub
    assert parse_reference("alpine").location == "docker.io/library/alpine"


@pytest.mark.parametrize(
    ("text", "path", "key"),
    [
        ("oci:/tmp/layout:npm", "/tmp/layout", "npm"),
        ("oci:./layout", "./layout", None),
        ("oci:layout:a:b", "layout", "a:b"),
        ("oci:dir/with/slash:key/with/slash", "dir/with/slash", "key/with/slash"),
    ],
)
def test_parse_layout_references(text: str, path: str, key: str | None) -> None:
    assert parse_reference(text) == Reference("layout", path=path, key=key)


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "prefix", "key"),
    [
        ("s3://ci-caches/team/npm:linux-x64", "s3", "ci-caches", "team/npm", "linux-x64"),
        ("s3://ci-caches:npm", "s3", "ci-caches", "", "npm"),
        ("s3://ci-caches/team/", "s3", "ci-caches", "team", None),
        ("gs://b.example/p:k/with/slash", "gs", "b.example", "p", "k/with/slash"),
        ("az://container/p", "az", "container", "p", None),
    ],
)
def test_parse_object_references(text: str, scheme: str, bucket: str, prefix: str, key: str | None) -> None:
    ref = parse_reference(text)
    assert ref == Reference("object", key=key, scheme=scheme, bucket=bucket, prefix=prefix)
    assert ref.location == f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")


def test_docker_hub_name_tag_stays_valid() -> None:
    ref = parse_reference("redis:7")
    assert (ref.host, ref.repository, ref.key) == ("registry-1.docker.io", "library/redis", "7")


def test_with_key_replaces_key_and_drops_digest() -> None:
    ref = parse_reference(f"ghcr.io/o/c:old@{DIGEST}")
    assert ref.with_key("new") == Reference("registry", host="ghcr.io", repository="o/c", key="new")
    assert ref.with_key(None).key is None
    with pytest.raises(InvalidKey):
        ref.with_key("")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("ghcr.io/Org/Cache:k", "lowercase"),
        ("ghcr.io/org//cache", "not valid"),
        ("ghcr.io/org/cache-:k", "not valid"),
        ("ghcr.io/:k", "missing"),
        ("ghcr.io/org/cache:", "empty"),
        ("ghcr.io/org/cache@sha256:short", "digest"),
        ("https://ghcr.io/org/cache", "supported"),
        ("s3://", "bucket"),
        ("s3://Bad_Bucket:k", "bucket"),
        ("s3://ab:k", "bucket"),
        ("s3://bucket/a/../b:k", "prefix"),
        ("s3://bucket/a b:k", "prefix"),
        ("s3://bucket:", "empty"),
        # Azure container names: no dots, no "--" (S3's rule let them through to a bare 400).
        ("az://my.container:k", "container"),
        ("az://my--container:k", "container"),
        ("oci:", "missing"),
        ("oci:dir:", "empty"),
        ("bad_host.io:x/repo", "host"),
        ("127.0.0.1:99999/team/cache:k", "out of range"),
        ("127.0.0.1:5001", "no repository"),
        ("localhost:5000", "no repository"),
        ("registry.example.com", "no repository"),
        ("localhost:5000/team/cache:../x", "--key"),
    ],
)
def test_invalid_references_explain_and_show_an_example(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why) as info:
        parse_reference(text)
    assert "e.g. 'localhost:5000/team/cache:npm-linux'" in str(info.value)


def test_key_with_control_characters_is_rejected() -> None:
    with pytest.raises(InvalidKey):
        parse_reference("ghcr.io/o/c:bad\x01key")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3:80", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("registry.localhost:5000", True),
        ("ghcr.io", False),
        ("10.0.0.1:5000", False),
        ("[fe80::1]:5000", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("cache-user:PASS-s3cr3t@127.0.0.1:5000/team/cache:k", "REMOTE_CACHE_PASSWORD"),
        ("https://user:PASS-s3cr3t@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),
        ("docker://user:PASS-s3cr3t@ghcr.io/org/cache", "REMOTE_CACHE_PASSWORD"),
        ("s3://AKIAEXAMPLE:PASS-s3cr3t@bucket/ci:k", "AWS_SECRET_ACCESS_KEY"),
        ("s3://AKIA:PASS-s3cr3t@bucket:k", "not a bucket name"),  # (no '/': '@' may be a key's)
        ("user:PASS-s3cr3t@Not_A_Host/x", "REMOTE_CACHE_PASSWORD"),
        ("user:PASS-s3cr3t/with+slash@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),  # (AWS-like)
        ("s3://AKIAEXAMPLE:PASS-s3cr3t/x@bucket/ci:k", "AWS_SECRET_ACCESS_KEY"),
        ("gs://user:PASS-s3cr3t@bucket/ci:k", "GOOGLE_APPLICATION_CREDENTIALS"),  # each store's own
        ("az://account:PASS-s3cr3t@container/ci:k", "AZURE_STORAGE_ACCOUNT_KEY"),
        # No '/' after the host: the part after '@' is a host by docker's rule (a '.' or ':', or
        # localhost), so no key of a Docker Hub 'name:key' (it parsed as one and went to Docker Hub)
        ("user:PASS-s3cr3t@ghcr.io", "REMOTE_CACHE_PASSWORD"),
        ("user:PASS-s3cr3t@localhost", "REMOTE_CACHE_PASSWORD"),
        ("docker://user:PASS-s3cr3t@registry.example.com", "REMOTE_CACHE_PASSWORD"),
        ("https://user:PASS-s3cr3t@ghcr.io", "REMOTE_CACHE_PASSWORD"),
        # A bucket's reference with no '/': a word before the '@' that looks like a secret key
        ("az://account:AbC+dEf/gh0123456789==@container", "AZURE_STORAGE_ACCOUNT_KEY"),
        ("s3://minio:PASSs3cr3tPASSs3cr3t@cache", "AWS_SECRET_ACCESS_KEY"),
        ("user:PASS-s3cr3t@10.0.0.1", "REMOTE_CACHE_PASSWORD"),  # (4 numbers: an address)
    ],
)
def test_credentials_in_a_reference_are_refused_and_never_quoted(text: str, fix: str) -> None:
    """``user:password@host`` in a reference: refused with where credentials go, without quoting
    the password (it was quoted whole: "'...' after '@' is not a sha256 digest")."""
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert "PASS-s3cr3t" not in str(info.value) and fix in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("user:p@ss-s3cr3t@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),
        ("user:p@ss-s3cr3t@ghcr.io", "REMOTE_CACHE_PASSWORD"),
        ("user:p@ss/s3cr3t@localhost:5000/team/cache:k", "REMOTE_CACHE_PASSWORD"),
        ("user:p@ss-s3cr3t@ghcr.io/org/cache:k@sha256:" + "a" * 64, "REMOTE_CACHE_PASSWORD"),
        ("s3://AKIAEXAMPLE:p@ss-s3cr3t@bucket/ci:k", "AWS_SECRET_ACCESS_KEY"),
        ("user:pa ss-s3cr3t@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),
        ("user:p@s3cr3t/pw@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),  # (not quoted as the host)
        ("me@corp.example:p@ss-s3cr3t@ghcr.io/org/cache:k", "REMOTE_CACHE_PASSWORD"),  # (an email login)
        ("me@corp.example:s3cr3t@ghcr.io", "REMOTE_CACHE_PASSWORD"),
    ],
)
def test_a_password_holding_an_at_sign_or_a_space_is_refused_and_never_quoted(text: str, fix: str) -> None:
    """A password with an '@' (or a space) in a reference: refused like any other, no part of it
    quoted (the first '@' ended the password: 'ss-s3cr3t' was quoted, and not refused as one)."""
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    message = str(info.value)
    assert "s3cr3t" not in message and "p@ss" not in message and fix in message, message


def test_an_at_sign_that_is_no_credential_still_parses() -> None:
    digest = "sha256:" + "a" * 64
    assert parse_reference(f"redis@{digest}").digest == digest  # Docker Hub by digest
    assert parse_reference("s3://bucket:key@x").key == "key@x"
    assert parse_reference("ghcr.io/org/cache:key@x").key == "key@x"
    assert parse_reference("myimage:key@x").key == "key@x"  # Docker Hub's library/myimage
    # Versions and branches after an '@' are a key's (a bucket may be named '3.11' or 'main':
    # without a '/' an object store's reference never reads as credentials)
    for text, key in [
        ("s3://ci-cache:python@3.11", "python@3.11"),
        ("s3://bucket:deps@main", "deps@main"),
        ("gs://bucket:node@18.20.0", "node@18.20.0"),
        ("lib:py@3.11", "py@3.11"),
        ("name:k@v1.2.3", "k@v1.2.3"),
        ("localhost:5000/team/cache:py@1.2.3-rc", "py@1.2.3-rc"),  # (HOST:PORT/…: no user)
        ("127.0.0.1:5000/c:deps@main.x", "deps@main.x"),
        ("s3://ci-cache:deps-0123@main", "deps-0123@main"),
        ("s3://ci-cache/prefix:deps@main.x", "deps@main.x"),  # (the scheme is no user name)
    ]:
        assert parse_reference(text).key == key, text
