"""Real object store servers on 127.0.0.1 for the tests: moto (S3), s3rver (S3), Azurite (Azure Blob).

* moto (``moto_server``, PyPI ``moto[server]``) is the faithful S3: conditional writes (answered
  412), multipart uploads, listings. :func:`start_moto` checks the 412 before handing it out.
* s3rver (npm ``s3rver``) is a sloppy S3: it ignores ``If-None-Match``.
* Azurite (npm ``azurite``, its ``azurite-blob`` server) is Microsoft's Azure Blob emulator.

Each server records nothing of ours; put the fault proxy (``tests.registry_server.FaultProxy``,
plain HTTP/1.1) in front of one to see or break its traffic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.registry_server import free_port

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "ObjectServer",
    "azurite_available",
    "moto_available",
    "new_bucket",
    "object_env",
    "s3_client",
    "s3rver_available",
    "start_azurite",
    "start_moto",
    "start_s3rver",
]

#: Azurite's well-known development account and key (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
#: Any key pair will do for moto; s3rver refuses every access key but S3RVER (it checks no signature).
TEST_KEY_ID = "AKIAREMOTECACHETEST"
TEST_SECRET = "remote-cache-test-secret-do-not-log"
S3RVER_KEY = "S3RVER"


@dataclass
class ObjectServer:
    """A running object store server: its endpoint URL and kind; ``stop()`` ends it."""

    kind: str
    endpoint: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path | None = None

    @property
    def host(self) -> str:
        return self.endpoint.removeprefix("http://").split("/", 1)[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def moto_available() -> bool:
    return Path(_venv_bin("moto_server")).exists()


def s3rver_available() -> bool:
    return shutil.which("s3rver") is not None


def azurite_available() -> bool:
    return shutil.which("azurite-blob") is not None


def _venv_bin(name: str) -> str:
    import sys

    return str(Path(sys.executable).with_name(name))


def _wait_listening(url: str, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (with an error, unauthenticated): listening
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"{what} did not start listening on {url}:\n{log.read_text()[-2000:]}")


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def start_moto(workdir: Path) -> ObjectServer:
    """moto_server on a free port, checked to answer a conditional create of an existing key with 412."""
    port = free_port()
    log = workdir / "moto.log"
    binary = _venv_bin("moto_server")  # the pinned one of the project's venv, not another on PATH
    process = _spawn([binary, "-H", "127.0.0.1", "-p", str(port)], log)
    server = ObjectServer("moto", f"http://127.0.0.1:{port}", process, log)
    _wait_listening(server.endpoint + "/", process, log, "moto_server")
    bucket = new_bucket(server)
    client = s3_client(server)
    client.put_object(Bucket=bucket, Key="probe", Body=b"x")
    try:
        client.put_object(Bucket=bucket, Key="probe", Body=b"x", IfNoneMatch="*")
        status = 200
    except client.exceptions.ClientError as exc:
        status = int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    if status != 412:
        server.stop()
        raise RuntimeError(
            f"moto answered {status} to a conditional create of an existing key (412 expected)"
        )
    return server


def start_s3rver(workdir: Path) -> ObjectServer:
    """s3rver (which ignores conditional writes) on a free port, its data in ``workdir``."""
    port = free_port()
    log = workdir / "s3rver.log"
    data = workdir / "s3rver-data"
    data.mkdir()
    env = dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider")  # s3rver's crypto on Node 20
    process = _spawn(["s3rver", "-d", str(data), "-p", str(port), "-a", "127.0.0.1", "--silent"], log, env)
    server = ObjectServer("s3rver", f"http://127.0.0.1:{port}", process, log)
    _wait_listening(server.endpoint + "/", process, log, "s3rver")
    return server


def start_azurite(workdir: Path) -> ObjectServer:
    """Azurite's blob service on a free port; ``endpoint`` includes the development account."""
    port = free_port()
    log = workdir / "azurite.log"
    data = workdir / "azurite-data"
    data.mkdir()
    argv = ["azurite-blob", "--blobHost", "127.0.0.1", "--blobPort", str(port), "-l", str(data)]
    process = _spawn([*argv, "--skipApiVersionCheck", "--loose"], log)
    server = ObjectServer("azurite", f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", process, log)
    _wait_listening(f"http://127.0.0.1:{port}/", process, log, "azurite")
    return server


def new_bucket(server: ObjectServer) -> str:
    """A fresh bucket (or Azure container) on ``server``."""
    name = f"rc-{uuid.uuid4().hex[:12]}"
    if server.kind == "azurite":
        from azure.storage.blob import BlobServiceClient

        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={server.endpoint};"
        )
        BlobServiceClient.from_connection_string(connection).create_container(name)
        return name
    s3_client(server).create_bucket(Bucket=name)
    return name


def s3_client(server: ObjectServer) -> Any:
    """A boto3 S3 client for ``server`` (fixtures only: the code under test uses obstore)."""
    import boto3

    env = object_env(server)
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def object_env(server: ObjectServer) -> dict[str, str]:
    """The environment that points AWS (or Azure) tools, and remote-cache, at ``server``."""
    if server.kind == "azurite":
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
            "AZURE_STORAGE_ENDPOINT": server.endpoint,
        }
    key_id, secret = (S3RVER_KEY, S3RVER_KEY) if server.kind == "s3rver" else (TEST_KEY_ID, TEST_SECRET)
    return {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
    }
