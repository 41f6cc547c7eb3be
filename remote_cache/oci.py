"""OCI vocabulary: media types, descriptors and digests (no I/O)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ImageFormatError, IntegrityError

__all__ = [
    "ANNOTATION_CREATED",
    "ANNOTATION_FILES",
    "ANNOTATION_KEY",
    "ANNOTATION_SIZE",
    "ANNOTATION_TOOL",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "BlobCheck",
    "Descriptor",
    "Platform",
    "sha256_digest",
    "verify_bytes",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})
#: Accept header for manifest requests: everything we can read.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_KEY = "dev.remote-cache.key"
ANNOTATION_SIZE = "dev.remote-cache.size"
ANNOTATION_FILES = "dev.remote-cache.files"
ANNOTATION_TOOL = "dev.remote-cache.tool"

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise ImageFormatError."""
    if not _DIGEST.fullmatch(digest):
        raise ImageFormatError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return digest


def verify_bytes(data: bytes, digest: str, size: int | None = None) -> None:
    """Raise IntegrityError unless ``data`` has this digest (and size, when given)."""
    if size is not None and len(data) != size:
        raise IntegrityError(f"content of {digest} is {len(data)} bytes, expected {size}")
    actual = sha256_digest(data)
    if actual != digest:
        raise IntegrityError(f"content digest {actual} does not match expected {digest}")


@dataclass(frozen=True)
class Platform:
    """An image platform (``linux/amd64``, ``linux/arm64/v8``)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not OS/ARCH[/VARIANT], e.g. linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob or manifest is, by digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        try:
            plat = obj.get("platform")
            return cls(
                media_type=str(obj["mediaType"]),
                digest=check_digest(str(obj["digest"])),
                size=int(obj["size"]),
                annotations=dict(obj.get("annotations") or {}),
                platform=(
                    Platform(plat["os"], plat["architecture"], plat.get("variant", "")) if plat else None
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageFormatError(f"malformed descriptor {obj!r}: {exc}") from exc


class BlobCheck:
    """Size and digest of a blob, checked while it streams: every store's reads end in :meth:`finish`."""

    def __init__(self, desc: Descriptor, where: str) -> None:
        self._desc = desc
        self._where = where  # e.g. "in oci:/x" or "from ghcr.io/acme/cache"
        self._hasher = hashlib.sha256()
        self.seen = 0

    def update(self, chunk: bytes) -> None:
        """Count and hash ``chunk``; IntegrityError as soon as the blob runs past its size."""
        self.seen += len(chunk)
        if self.seen > self._desc.size:
            raise IntegrityError(
                f"blob {self._desc.digest} {self._where} is larger than its {self._desc.size} bytes"
            )
        self._hasher.update(chunk)

    def finish(self) -> None:
        """IntegrityError unless exactly the blob's size and digest went through :meth:`update`."""
        d = self._desc
        if self.seen != d.size:
            raise IntegrityError(f"blob {d.digest} {self._where} is {self.seen} bytes, expected {d.size}")
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != d.digest:
            raise IntegrityError(f"blob {d.digest} {self._where} has digest {actual}: it is corrupted")
