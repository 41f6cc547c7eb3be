"""The console script against buckets: moto (S3) and Azurite (Azure Blob), run for real in
subprocesses with credentials in the environment, as AWS and Azure tools take them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli.output import Run, json_line, no_traceback
from tests.object_servers import ObjectServer, new_bucket, object_env, s3_client
from tests.registry_server import FaultProxy, free_port
from tests.trees import assert_same_tree, small_tree


def _keys(server: ObjectServer, bucket: str, part: str) -> list[str]:
    listed = s3_client(server).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", []) if part in o["Key"]]


def test_every_command_through_a_bucket(cli: Run, moto: ObjectServer, tmp_path: Path) -> None:
    """save, restore, ls, inspect, rm and prune on ``s3://BUCKET/PREFIX:KEY``; the endpoint from
    ``--endpoint`` or from ``AWS_ENDPOINT_URL``; blobs freed by rm once the grace period allows."""
    env = object_env(moto)
    bucket = new_bucket(moto)
    repo = f"s3://{bucket}/team/ci"
    src = small_tree(tmp_path / "src")
    no_endpoint = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}

    saved = cli("save", str(src), f"{repo}:npm/linux", "--endpoint", moto.endpoint, "--json", env=no_endpoint)
    assert saved.returncode == 0, saved.stderr
    assert json_line(saved)["outcome"] == "saved" and json_line(saved)["bytes_uploaded"] > 0
    assert all(k.startswith("team/ci/") for k in _keys(moto, bucket, ""))

    restored = cli("restore", f"{repo}:npm/linux", str(tmp_path / "out"), "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    assert json_line(restored)["outcome"] == "hit"
    assert_same_tree(src, tmp_path / "out")
    again = cli("save", str(src), f"{repo}:npm/linux", "--json", env=env)
    assert json_line(again)["outcome"] == "unchanged"

    assert cli("save", str(tmp_path / "out"), f"{repo}:pip", env=env).returncode == 0
    table = cli("ls", repo, env=env)
    assert sorted(row.split()[0] for row in table.stdout.splitlines()[1:]) == ["npm/linux", "pip"]
    info = json_line(cli("inspect", f"{repo}:pip", "--json", env=env))
    assert info["annotations"]["dev.remote-cache.key"] == "pip"

    kept = cli("rm", f"{repo}:pip", "--json", env=env)  # default grace: just saved, so nothing freed
    assert kept.returncode == 0, kept.stderr
    assert json_line(kept)["blobs_freed"] == 0 and "stay" in kept.stderr
    blobs = len(_keys(moto, bucket, "/blobs/"))
    pruned = cli("prune", repo, "--keep", "0", "--grace", "0s", "--json", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert [e["key"] for e in json_line(pruned)["removed"]] == ["npm/linux"]
    assert json_line(pruned)["blobs_freed"] == blobs and _keys(moto, bucket, "/blobs/") == []
    assert cli("restore", f"{repo}:npm/linux", str(tmp_path / "gone"), env=env).returncode == 3


def test_azure_blob_round_trip(cli: Run, azurite: ObjectServer, tmp_path: Path) -> None:
    env = object_env(azurite)
    ref = f"az://{new_bucket(azurite)}/cache:go"
    src = small_tree(tmp_path / "src")
    saved = cli("save", str(src), ref, env=env)
    assert saved.returncode == 0, saved.stderr
    restored = cli("restore", ref, str(tmp_path / "out"), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out")


def test_encryption_and_storage_class_reach_the_server_and_the_secret_never_does(
    cli: Run, moto: ObjectServer, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    """What the server receives (through the proxy): the encryption and storage class headers on
    every blob upload, the key id in the signature, never the secret key."""
    proxy: FaultProxy = fault_proxy_factory(moto)
    env = {**object_env(moto), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    ref = f"s3://{new_bucket(moto)}/enc:k"
    src = small_tree(tmp_path / "src")
    args = ("--sse", "aws:kms", "--sse-kms-key-id", "alias/ci-cache", "--storage-class", "STANDARD_IA")
    saved = cli("save", str(src), ref, *args, env=env)
    assert saved.returncode == 0, saved.stderr
    uploads = [r for r in proxy.requests if r.method == "PUT" and "/blobs/" in r.path]
    assert uploads
    for request in uploads:
        assert request.headers.get("x-amz-server-side-encryption") == "aws:kms"
        assert request.headers.get("x-amz-server-side-encryption-aws-kms-key-id") == "alias/ci-cache"
        assert request.headers.get("x-amz-storage-class") == "STANDARD_IA"
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert all(
        f"Credential={env['AWS_ACCESS_KEY_ID']}/" in r.headers["authorization"] for r in proxy.requests
    )
    assert not any(secret in str(r.headers) or secret in r.path for r in proxy.requests)
    assert secret not in saved.stderr + saved.stdout


def test_bucket_usage_errors_exit_2(cli: Run, moto: ObjectServer, registry: Any, tmp_path: Path) -> None:
    env = object_env(moto)
    src = small_tree(tmp_path / "src")
    ref = f"s3://{new_bucket(moto)}/c:k"
    cases = [
        (("save", str(src), ref, "--username", "someone"), "environment"),
        (("save", str(src), f"{registry.host}/team/c:k", "--region", "eu-west-1"), "object stores"),
        (("save", str(src), f"{registry.host}/team/c:k", "--sse", "AES256"), "object stores"),
        (("save", str(src), ref, "--sse", "des"), "AES256"),
        (("save", str(src), ref, "--sse-kms-key-id", "k1"), "aws:kms"),
        (("save", str(src), ref, "--endpoint", "http://cache.example:9000"), "plain HTTP"),
        (("save", str(src), ref, "--endpoint", "ftp://cache.example"), "http(s)"),
        # No scheme: the parser takes the host (or an IP's first part) for one, and the message
        # said "endpoint ://..." or "minio.example://...".
        (
            ("save", str(src), ref, "--endpoint", "127.0.0.1:9000"),
            "has no scheme: give http://127.0.0.1:9000",
        ),
        (
            ("save", str(src), ref, "--endpoint", "minio.example:9000"),
            "give http://minio.example:9000 or https://",
        ),
        (
            ("save", str(src), ref, "--endpoint", "http:/minio:9000"),
            "write its scheme as http:// or https://",
        ),
        (("restore", "s3://Not_A_Bucket:k", str(tmp_path / "o")), "bucket"),
        (("save", str(src), "gs://some-bucket/c:k", "--sse", "AES256"), "S3 options"),
        (("save", str(src), "az://container/c:k", "--region", "westeurope"), "S3 options"),
        (("save", str(src), ref, "--storage-class", "GLACIER"), "never be restored"),
        (("save", str(src), ref, "--endpoint", "https://user:hunter2@minio.example"), "environment"),
        # Secrets hold "/" (AWS's often do), "?" or "#": the URL parser then takes part of one for
        # the port, and the message quoted it.
        (("save", str(src), ref, "--endpoint", "https://AKIA:wJal/hunter2/x@minio.example"), "environment"),
        (("save", str(src), ref, "--endpoint", "https://AKIA:hunter2?x@minio.example:9000"), "environment"),
        (("save", str(src), ref, "--endpoint", "https://AKIA:hunter2#x@minio.example:9000"), "environment"),
        (("save", str(src), ref, "--endpoint", "http://127.0.0.1:99999"), "not a valid URL"),
        (("save", str(src), ref, "--endpoint", "http://127.0.0.1:notaport"), "not a valid URL"),
        (("save", str(src), ref, "--endpoint", "http://[::1"), "not a valid URL"),
        (("save", str(src), ref, "--endpoint", "http://exa mple:9000"), "not a valid URL"),
        (("save", str(src), ref, "--endpoint", "http://127.0.0.1:9000/a b"), "not a valid URL"),
        (("save", str(src), ref, "--endpoint", "http://[fe80::1%25eth0]:9000"), "not a valid URL"),
        (
            ("save", str(src), ref, "--endpoint", "http://10.1.2.3:9000/?X-Amz-Security-Token=hunter2"),
            "plain HTTP",
        ),
    ]
    for args, why in cases:
        proc = cli(*args, env={**env, "REMOTE_CACHE_PASSWORD": "pw"})
        assert proc.returncode == 2, (args, proc.stderr)
        assert why in proc.stderr, (args, proc.stderr)
        assert "hunter2" not in proc.stderr and "wJal" not in proc.stderr, proc.stderr
        no_traceback(proc)


def test_unreachable_or_stalled_bucket_fails_fast_with_a_clear_message(
    cli: Run, moto: ObjectServer, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    src = small_tree(tmp_path / "src")
    env = object_env(moto)
    ref = f"s3://{new_bucket(moto)}/c:k"
    nobody = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    failed = cli("save", str(src), ref, env=nobody)
    assert failed.returncode == 1, failed.stderr
    assert "could not be reached" in failed.stderr and time.monotonic() - started < 30
    opened = cli("restore", ref, str(tmp_path / "o"), "--fail-open", env=nobody)
    assert opened.returncode == 0 and "warning" in opened.stderr
    no_traceback(failed)

    assert cli("save", str(src), ref, env=env).returncode == 0
    proxy: FaultProxy = fault_proxy_factory(moto)
    proxy.stall(after_bytes=1024, path_contains="/blobs/", times=1000)  # mid-body, every try
    started = time.monotonic()
    stalled = cli(
        "restore",
        ref,
        str(tmp_path / "o2"),
        "--timeout",
        "2",
        env={**env, "AWS_ENDPOINT_URL": f"http://{proxy.host}"},
    )
    assert stalled.returncode == 1, stalled.stderr
    assert "stopped answering" in stalled.stderr and time.monotonic() - started < 30
    # Worded as a registry's stall is (tests/cli/test_cli.py), the fix included.
    assert "retries included: giving up (--timeout sets the stall timeout)" in stalled.stderr, stalled.stderr
    assert not (tmp_path / "o2").exists()
    no_traceback(stalled)


def test_a_bucket_that_never_answers_fails_a_save_and_a_restore_within_the_stall_budget(
    cli: Run, moto: ObjectServer, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    """As a registry's (tests/cli/test_cli.py): about two stall periods, whichever request meets
    the stall. (A save took four: its first request, the lookup of the key's entry, spent two
    inside obstore's own retries, was counted as stalled for one, and the next request got two
    more.)"""
    src = small_tree(tmp_path / "src")
    env = object_env(moto)
    ref = f"s3://{new_bucket(moto)}/c:k"
    assert cli("save", str(src), ref, env=env).returncode == 0
    proxy: FaultProxy = fault_proxy_factory(moto)
    proxy.stall(times=10_000)  # every request hangs, forever
    hanging = {**env, "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    for args in (("save", str(src), ref), ("restore", ref, str(tmp_path / "out"))):
        started = time.monotonic()
        proc = cli(*args, "--timeout", "2", env=hanging)
        elapsed = time.monotonic() - started
        assert proc.returncode == 1, proc.stderr
        assert "retries included: giving up (--timeout sets the stall timeout)" in proc.stderr, proc.stderr
        assert elapsed < 2 * 2 + 4, f"{args[0]}: --timeout 2 took {elapsed:.1f}s to give up"
        no_traceback(proc)


def test_keys_from_the_aws_shared_files_as_aws_tools_read_them(
    cli: Run, moto: ObjectServer, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    """No keys in the environment: ``~/.aws/credentials`` (read through boto3, obstore does not
    read it) supplies them, a named profile with ``AWS_PROFILE``; the server sees that key id."""
    env = object_env(moto)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    secret = env["AWS_SECRET_ACCESS_KEY"]
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = FROMFILEDEFAULT\naws_secret_access_key = {secret}\n"
        f"[ci]\naws_access_key_id = FROMFILEPROFILE\naws_secret_access_key = {secret}\n"
    )
    (home / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n[profile ci]\nregion = eu-west-1\n")
    proxy: FaultProxy = fault_proxy_factory(moto)
    files_only = {"HOME": str(home), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    ref = f"s3://{new_bucket(moto)}/c:k"
    src = small_tree(tmp_path / "src")

    saved = cli("save", str(src), ref, env=files_only)
    assert saved.returncode == 0, saved.stderr
    assert all("Credential=FROMFILEDEFAULT/" in r.headers["authorization"] for r in proxy.requests)
    assert all("/eu-west-1/s3/" in r.headers["authorization"] for r in proxy.requests)
    proxy.clear()
    restored = cli("restore", ref, str(tmp_path / "out"), env={**files_only, "AWS_PROFILE": "ci"})
    assert restored.returncode == 0, restored.stderr
    assert all("Credential=FROMFILEPROFILE/" in r.headers["authorization"] for r in proxy.requests)
    assert_same_tree(src, tmp_path / "out")

    # No credentials anywhere, and no metadata service (one that refuses, here): an auth error.
    no_metadata = f"http://127.0.0.1:{free_port()}"
    nothing = cli(
        "restore", ref, str(tmp_path / "o2"),
        env={"HOME": str(tmp_path), "AWS_ENDPOINT_URL": moto.endpoint, "AWS_METADATA_ENDPOINT": no_metadata},
    )  # fmt: skip
    assert nothing.returncode == 4, nothing.stderr
    assert "no credentials" in nothing.stderr and "AWS_ACCESS_KEY_ID" in nothing.stderr


def test_an_azure_container_without_an_account_name_is_an_auth_error_naming_the_variable(
    cli: Run, azurite: ObjectServer, tmp_path: Path
) -> None:
    """Without AZURE_STORAGE_ACCOUNT_NAME the client cannot be set up: exit 4 naming the variable
    (it was exit 1, "Generic MicrosoftAzure error: Account must be specified")."""
    env = {k: v for k, v in object_env(azurite).items() if k != "AZURE_STORAGE_ACCOUNT_NAME"}
    proc = cli("ls", "az://somecontainer/c", env={**env, "HOME": str(tmp_path)})
    assert proc.returncode == 4, proc.stderr
    assert "AZURE_STORAGE_ACCOUNT_NAME" in proc.stderr and "Generic" not in proc.stderr, proc.stderr
    no_traceback(proc)


@pytest.mark.parametrize("key", ["abc", "not-base64!", "a-b"])
def test_an_azure_account_key_that_is_no_key_is_an_auth_error_quoting_none_of_it(
    cli: Run, azurite: ObjectServer, tmp_path: Path, key: str
) -> None:
    """An account key that is not base64 fails before any request: exit 4 naming the variable.
    It was exit 1, "… answered with an error (… Invalid Access Key: Invalid symbol 45, offset 1)"
    -- no store had answered, and the decoder's words quote the key's characters."""
    env = {**object_env(azurite), "AZURE_STORAGE_ACCOUNT_KEY": key, "HOME": str(tmp_path)}
    proc = cli("ls", "az://somecontainer/c", env=env)
    assert proc.returncode == 4, proc.stderr
    assert "AZURE_STORAGE_ACCOUNT_KEY" in proc.stderr and "answered" not in proc.stderr, proc.stderr
    assert "Invalid symbol" not in proc.stderr and "offset" not in proc.stderr, proc.stderr
    no_traceback(proc)


def test_an_error_body_that_echoes_the_session_token_is_one_line_without_it(
    cli: Run, moto: ObjectServer, tmp_path: Path, fault_proxy_factory: Any
) -> None:
    """AWS answers a bad signature with 403 ``SignatureDoesNotMatch`` whose XML body echoes the
    canonical request, ``x-amz-security-token`` and its value included; Azure's errors span lines.
    The message keeps the code and the message, on one line, and no credential from the
    environment."""
    token = "FQoGZXIvYXdzEXAMPLEsessionTOKEN0123456789"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code>'
        "<Message>The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.</Message><AWSAccessKeyId>ASIAEXAMPLE</AWSAccessKeyId>"
        "<StringToSign>AWS4-HMAC-SHA256\n20261127T000000Z</StringToSign><CanonicalRequest>GET\n/\n\n"
        f"host:example\nx-amz-security-token:{token}\n\nhost;x-amz-security-token\nUNSIGNED"
        "</CanonicalRequest><RequestId>4442587FB7D0A2F9</RequestId></Error>"
    ).encode()
    proxy: FaultProxy = fault_proxy_factory(moto)
    proxy.answer(403, body, times=1000)
    env = {**object_env(moto), "AWS_ENDPOINT_URL": f"http://{proxy.host}", "AWS_SESSION_TOKEN": token}
    bucket = new_bucket(moto)
    for args in (("ls", f"s3://{bucket}/p", "--json"), ("prune", f"s3://{bucket}/p", "--keep", "1")):
        proc = cli(*args, env=env)
        assert proc.returncode == 4, (args, proc.stderr)
        assert token not in proc.stderr + proc.stdout, (args, proc.stderr)
        assert "SignatureDoesNotMatch" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        no_traceback(proc)
    # REMOTE_CACHE_DEBUG=1 adds the traceback, whose chained obstore error holds the whole body:
    # it is shown with the credentials cut out too.
    debug = cli("ls", f"s3://{bucket}/p", env={**env, "REMOTE_CACHE_DEBUG": "1"})
    assert debug.returncode == 4 and "Traceback" in debug.stderr, debug.stderr
    assert token not in debug.stderr and "SignatureDoesNotMatch" in debug.stderr, debug.stderr
    # Credentials from a profile are not in the environment: what the server echoes goes all the same.
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = ASIAEXAMPLE\naws_secret_access_key = sEcReTfRoMfIlE0123456789\n"
        f"aws_session_token = {token}PROFILE\n"
    )
    proxy.clear()
    proxy.answer(403, body.replace(token.encode(), f"{token}PROFILE".encode()), times=1000)
    files = {"HOME": str(home), "AWS_ENDPOINT_URL": f"http://{proxy.host}", "REMOTE_CACHE_DEBUG": "1"}
    from_profile = cli("ls", f"s3://{bucket}/p", env=files)
    assert from_profile.returncode == 4 and "Traceback" in from_profile.stderr, from_profile.stderr
    assert token not in from_profile.stderr, from_profile.stderr
    # ...and so does a profile's secret or token a server says in its own words, in a message or
    # a plain-text body (both were shown: only the environment's credentials were known).
    for status, said in (
        (
            403,
            f"<Error><Code>AccessDenied</Code><Message>token {token}PROFILE is not valid</Message></Error>",
        ),
        (500, f"internal error for key sEcReTfRoMfIlE0123456789 and token {token}PROFILE"),
    ):
        proxy.clear()
        proxy.answer(status, said.encode(), times=1000)
        for args in (("ls", f"s3://{bucket}/p", "--json"), ("ls", f"s3://{bucket}/p")):
            echoed = cli(*args, env={**files, "REMOTE_CACHE_DEBUG": ""})
            assert echoed.returncode in (1, 4), echoed.stderr
            shown = echoed.stderr + echoed.stdout
            assert token not in shown and "sEcReTfRoMfIlE" not in shown, shown
            assert "token ***" in shown, shown  # (what the server said, the rest of it kept)


def test_aws_profile_problems_are_credential_errors_that_show_no_program_output(
    cli: Run, moto: ObjectServer, tmp_path: Path
) -> None:
    """A profile that is not there, a config file that does not parse, a ``credential_process``
    that fails, a secret key without its key id: exit 4, one line saying what to fix, and never
    what a credential program wrote (it may be a secret). They were "unexpected
    ProfileNotFound/ConfigParseError/CredentialRetrievalError: ..." (exit 1, the program's stderr
    quoted) and obstore's "Missing AccessKeyId" (exit 1)."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    config = home / ".aws" / "config"
    base = {"HOME": str(home), "AWS_ENDPOINT_URL": moto.endpoint}
    leak = "token=PROFILESECRET-abcdefgh"
    cases = {
        "missing profile": ("[default]\nregion = eu-west-1\n", {"AWS_PROFILE": "nosuch"}, "'nosuch'"),
        "unparsable file": ("[default\nregion = eu-west-1\n", {}, "config"),
        "failing program": (
            f"[default]\ncredential_process = /bin/sh -c 'echo {leak} >&2; echo {leak}; exit 3'\n",
            {},
            "its custom-process failed",
        ),
        "secret alone": ("", {"AWS_SECRET_ACCESS_KEY": "only-the-secret-0123"}, "AWS_ACCESS_KEY_ID is not"),
        "role out of reach": (  # (its credentials are fetched when the client is made: STS refused)
            "[default]\nregion = eu-west-1\nrole_arn = arn:aws:iam::123456789012:role/ci\n"
            "source_profile = base\n[profile base]\naws_access_key_id = AKIAEXAMPLE\n"
            "aws_secret_access_key = base-secret-0123456\n",
            {"AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{free_port()}"},
            "cannot be used",
        ),
    }
    for name, (text, env, said) in cases.items():
        config.write_text(text)
        for args in (("ls", f"s3://{new_bucket(moto)}/p"), ("--json", "ls", f"s3://{new_bucket(moto)}/p")):
            proc = cli(*args, env={**base, **env})
            shown = proc.stderr + proc.stdout
            assert proc.returncode == 4, (name, shown)
            assert said in shown and "unexpected" not in shown, (name, shown)
            assert "PROFILESECRET" not in shown and "only-the-secret" not in shown, (name, shown)
            assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
            no_traceback(proc)


def test_a_save_into_a_missing_bucket_or_container_says_so(
    cli: Run, moto: ObjectServer, azurite: ObjectServer, tmp_path: Path
) -> None:
    """Whether or not this machine knows the tree (its state then lets the save look for blobs
    first), a bucket or container that does not exist is named as such, on one line."""
    src = small_tree(tmp_path / "src")
    env = object_env(moto)
    assert cli("save", str(src), f"s3://{new_bucket(moto)}/c:k", env=env).returncode == 0  # state known
    for ref, server in (
        ("s3://no-such-bucket-here/c:k", moto),
        ("az://nosuchcontainer/c:k", azurite),
        ("s3://no-such-bucket-here/other:k", moto),
    ):
        proc = cli("save", str(src), ref, env=object_env(server))
        assert proc.returncode == 1, (ref, proc.stderr)
        assert "does not exist" in proc.stderr, (ref, proc.stderr)
        assert ("region" in proc.stderr) == (server is moto), (ref, proc.stderr)  # (Azure has none)
        assert len(proc.stderr.strip().splitlines()) == 1, (ref, proc.stderr)
        assert "unexpected" not in proc.stderr
        no_traceback(proc)


def test_a_broken_entry_is_listed_with_its_error_and_rm_removes_it(
    cli: Run, moto: ObjectServer, tmp_path: Path
) -> None:
    """An entry whose manifests are gone (a sweep raced its save, a hand-made delete) and a tag
    object that is not an index, under keys that are their own tag and keys with a hashed tag:
    ``ls`` shows each under its key with its error, and ``rm KEY`` deletes it (it is the one
    command that can)."""
    env = object_env(moto)
    bucket = new_bucket(moto)
    src = small_tree(tmp_path / "src")
    tags = {}
    for key in ("gone", "garbage", "feature/gone", "feature/garbage", "fine"):
        assert cli("save", str(src), f"s3://{bucket}/c:{key}", env=env).returncode == 0
        tags[key] = json_line(cli("inspect", f"s3://{bucket}/c:{key}", "--json", env=env))["tag"]
    assert tags["feature/gone"] != "feature/gone"  # a hashed tag
    s3 = s3_client(moto)
    for key in ("gone", "feature/gone"):
        top = json.loads(s3.get_object(Bucket=bucket, Key=f"c/tags/{tags[key]}")["Body"].read())
        for manifest in top["manifests"]:
            s3.delete_object(Bucket=bucket, Key=f"c/blobs/sha256/{manifest['digest'].split(':')[1]}")
    for key in ("garbage", "feature/garbage"):
        s3.put_object(Bucket=bucket, Key=f"c/tags/{tags[key]}", Body=b"not an index")
    listed = cli("ls", f"s3://{bucket}/c", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    entries = {e["key"]: e for e in json_line(listed)["entries"]}
    # A garbage document under a hashed tag names no key: it is listed under its tag.
    assert set(entries) == {"gone", "garbage", "feature/gone", tags["feature/garbage"], "fine"}, entries
    assert [k for k, e in entries.items() if not e.get("error")] == ["fine"], entries
    # rm deletes each; its sweep stops (exit 1, naming it) while another tag is not a document:
    # not knowing what that one uses, it must free nothing.
    first = cli("rm", f"s3://{bucket}/c:garbage", env=env)
    assert first.returncode == 1 and "is not a readable image document" in first.stderr, first.stderr
    assert "warning: garbage was removed; freeing the blobs no entry uses failed" in first.stderr
    no_traceback(first)
    for key in ("feature/garbage", "gone", "feature/gone"):
        removed = cli("rm", f"s3://{bucket}/c:{key}", env=env)
        assert removed.returncode == 0, (key, removed.stderr)
        no_traceback(removed)
    assert _keys(moto, bucket, "/tags/") == ["c/tags/fine"]
    assert cli("restore", f"s3://{bucket}/c:fine", str(tmp_path / "o"), env=env).returncode == 0


def _saved_with_its_biggest_layer(
    cli: Run, moto: ObjectServer, tmp_path: Path
) -> tuple[dict[str, str], Path, str, Any, str]:
    """A small tree saved to a new bucket: (env, the tree, its ref, an S3 client, the key of its
    biggest layer object)."""
    env = object_env(moto)
    bucket = new_bucket(moto)
    src = small_tree(tmp_path / "src")
    ref = f"s3://{bucket}/c:k"
    assert cli("save", str(src), ref, env=env).returncode == 0
    s3 = s3_client(moto)
    sizes = {k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in _keys(moto, bucket, "/blobs/")}
    return env, src, ref, s3, max(sizes, key=lambda k: sizes[k])


def test_a_layer_cut_short_in_a_bucket_is_replaced_by_a_full_save(
    cli: Run, moto: ObjectServer, tmp_path: Path
) -> None:
    """A layer object cut short: the restore fails naming ``save --full``, which writes it again
    (it found an object under that key and kept it)."""
    env, src, ref, s3, layer = _saved_with_its_biggest_layer(cli, moto, tmp_path)
    s3.put_object(Bucket=ref.split("/")[2], Key=layer, Body=b"cut")
    failed = cli("restore", ref, str(tmp_path / "out"), env=env)
    assert failed.returncode == 1 and "save --full" in failed.stderr, failed.stderr
    assert cli("save", str(src), ref, "--full", env=env).returncode == 0
    assert cli("restore", ref, str(tmp_path / "out"), env=env).returncode == 0
    assert_same_tree(src, tmp_path / "out")


def test_a_layer_changed_in_place_in_a_bucket_names_what_mends_it(
    cli: Run, moto: ObjectServer, tmp_path: Path
) -> None:
    """A layer object rewritten with other bytes of the same size: a save cannot tell it from the
    right one without reading it back, so the error says to delete that object (it named a
    `save --full` that would find the object there and keep it)."""
    env, src, ref, s3, layer = _saved_with_its_biggest_layer(cli, moto, tmp_path)
    bucket = ref.split("/")[2]
    body = bytearray(s3.get_object(Bucket=bucket, Key=layer)["Body"].read())
    body[-20] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=layer, Body=bytes(body))
    failed = cli("restore", ref, str(tmp_path / "out"), env=env)
    assert failed.returncode == 1 and f"delete {layer.split('/', 1)[1]}" in failed.stderr, failed.stderr
    s3.delete_object(Bucket=bucket, Key=layer)  # as told
    assert cli("save", str(src), ref, "--full", env=env).returncode == 0
    assert cli("restore", ref, str(tmp_path / "out"), env=env).returncode == 0
    assert_same_tree(src, tmp_path / "out")


@pytest.mark.parametrize("status", [401, 403])
def test_a_bucket_that_refuses_every_request_bare_is_an_auth_error_for_every_command(
    cli: Run, moto: ObjectServer, fault_proxy_factory: Any, tmp_path: Path, status: int
) -> None:
    """An S3-compatible server (or a gateway before it) answering 401 or 403 with no error body:
    exit 4 naming the credentials, for every command. A listing (ls, prune) said "answered with an
    error (... 401 Unauthorized)", exit 1, where the others said exit 4."""
    proxy: FaultProxy = fault_proxy_factory(moto)
    proxy.answer(status, b"", times=1000)
    env = {**object_env(moto), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    ref = f"s3://{new_bucket(moto)}/c"
    src = small_tree(tmp_path / "src")
    for args in (
        ("ls", ref),
        ("prune", ref, "--keep", "1"),
        ("restore", f"{ref}:k", str(tmp_path / "out")),
        ("inspect", f"{ref}:k"),
        ("rm", f"{ref}:k"),
        ("save", str(src), f"{ref}:k"),
    ):
        proc = cli(*args, "--timeout", "5", env=env)
        assert proc.returncode == 4, (args, proc.stderr)
        assert "refused the credentials" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr, proc.stderr
        no_traceback(proc)
