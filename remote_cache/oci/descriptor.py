"""Descriptors and platforms: what an OCI blob or manifest is, by media type, digest and size."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from msgspec import Struct, field

from ..errors import ImageFormatError
from ..records import ignoring
from .digest import check_digest, sha256_digest

__all__ = [
    "Descriptor",
    "JSONTooDeep",
    "Platform",
    "media_type_of",
    "own_media_type",
    "parse_json",
    "reached_through",
    "referenced_by",
    "referenced_digests",
    "references",
]


class JSONTooDeep(ValueError):
    """JSON nested too deeply to parse: unlike bytes that are not JSON, it may hold anything."""


def parse_json(body: bytes | str) -> Any:
    """The JSON value of a document or answer a store holds or sends (the stores and the cache
    image parse theirs here). ValueError when it is not JSON, :class:`JSONTooDeep` when it nests
    too deeply to parse (``json`` raises RecursionError there, which ``except ValueError`` misses)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise JSONTooDeep("its arrays and objects nest too deeply to parse") from None


class Platform(Struct, frozen=True):
    """An image platform (``linux/amd64``, ``linux/arm64/v8``)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``OS/ARCH[/VARIANT]``; ValueError with an example otherwise."""
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


class Descriptor(Struct, frozen=True):
    """An OCI content descriptor: what a blob or manifest is, by digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    # A blob is what its digest, size and media type say; annotations and platform describe it.
    __eq__, __hash__ = ignoring("annotations", "platform")

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
        except KeyError as exc:
            raise ImageFormatError(f"malformed descriptor {obj!r}: it has no {exc.args[0]!r}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ImageFormatError(f"malformed descriptor {obj!r}: {exc}") from exc


def reached_through(top: bytes, known: Mapping[str, bytes]) -> set[str]:
    """The digests document ``top`` refers to, and those its referred documents in ``known`` (bodies
    by digest: the ones a save wrote) refer to in turn; ``top``'s own digest included."""
    reached = {sha256_digest(top)}
    pending = [top]
    while pending:
        for digest in referenced_by(pending.pop()):
            if digest not in reached:
                reached.add(digest)
                if digest in known:
                    pending.append(known[digest])
    return reached


def references(document: Any) -> list[dict[str, Any]]:
    """The descriptors (with a digest) a manifest, index or other OCI JSON document refers to:
    ``manifests``, ``layers``, ``blobs``, ``config``, ``subject``. Anything that is not such a
    document refers to nothing."""
    if not isinstance(document, dict):
        return []
    found: list[Any] = []
    for name in ("manifests", "layers", "blobs"):
        value = document.get(name)
        if isinstance(value, list):
            found.extend(value)
    for name in ("config", "subject"):
        if isinstance(document.get(name), dict):
            found.append(document[name])
    return [c for c in found if isinstance(c, dict) and isinstance(c.get("digest"), str)]


def own_media_type(body: bytes) -> str | None:
    """The ``mediaType`` a document's bytes state for themselves, when they are a JSON object
    stating a string there (the stores read it to label what they serve)."""
    try:
        value = parse_json(body).get("mediaType")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def media_type_of(descriptor: dict[str, Any]) -> str | None:
    """A descriptor's ``mediaType`` when it is a string (a foreign or damaged document may hold
    anything there, or nothing)."""
    media_type = descriptor.get("mediaType")
    return media_type if isinstance(media_type, str) else None


def referenced_digests(document: Any) -> list[str]:
    """Digests a document refers to (see :func:`references`): what a garbage collector must keep
    when it keeps the document."""
    return [c["digest"] for c in references(document)]


def referenced_by(body: bytes) -> list[str]:
    """:func:`referenced_digests` of a document's bytes; none when they are not JSON.
    ImageFormatError when they nest too deeply to parse: what they refer to cannot be told."""
    try:
        return referenced_digests(parse_json(body))
    except JSONTooDeep as exc:
        raise ImageFormatError(f"the document {sha256_digest(body)} cannot be read: {exc}") from exc
    except ValueError:
        return []
