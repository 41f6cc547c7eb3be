"""The cache image format: build it for saving, read it (and other tools' images) for restoring.

A saved cache is an OCI image index with one image manifest per platform, all sharing the same
layers, so a Dagger engine of any platform can ``from_`` it. Its root filesystem is the saved
directory. Reading is lenient: our index, a single OCI or Docker v2 manifest, or an index or
manifest list written by Dagger ``publish``, skopeo or umoci are all accepted (the rootfs is
platform-independent for us, so any platform's manifest will do; ``linux/amd64`` is preferred).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from msgspec import Struct, field

from ..errors import BrokenEntry, CacheMiss, ImageFormatError
from ..oci.descriptor import Descriptor, Platform, parse_json
from ..oci.digest import sha256_digest
from ..oci.media import (
    ANNOTATION_CREATED,
    DOCUMENT_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from ..oci.store import Store
from ..units import format_time, parse_time
from ..version import TOOL

__all__ = [
    "ANNOTATION_FILES",
    "ANNOTATION_GENERATIONS",
    "ANNOTATION_KEY",
    "ANNOTATION_LISTING",
    "ANNOTATION_SIZE",
    "ANNOTATION_TOOL",
    "DEFAULT_PLATFORMS",
    "Blob",
    "BuiltImage",
    "CacheImage",
    "ParsedManifest",
    "bounds_text",
    "build_image",
    "checked_bounds",
    "document_annotations",
    "generation_bounds",
    "load_image",
    "parse_index",
    "parse_manifest",
    "read_diff_ids",
    "read_document",
]

#: Platforms a saved cache is published for: an engine on either can ``from_`` it.
DEFAULT_PLATFORMS: tuple[Platform, ...] = (Platform("linux", "amd64"), Platform("linux", "arm64"))
#: The cache key the entry was saved under (its tag may be a hashed form of it, see remote_cache.keys).
ANNOTATION_KEY = "dev.remote-cache.key"
#: Uncompressed bytes and regular files of the saved tree.
ANNOTATION_SIZE = "dev.remote-cache.size"
ANNOTATION_FILES = "dev.remote-cache.files"
#: The tool and version that wrote the entry.
ANNOTATION_TOOL = "dev.remote-cache.tool"
#: Layer descriptor annotation: SHA-256 of the layer's listing (paths and tar-header fields, no
#: contents), so a later save can reuse the layer without reading its files.
ANNOTATION_LISTING = "dev.remote-cache.listing"
#: The generation bounds the layers were cut at (mtimes in seconds, comma-separated, increasing;
#: see remote_cache.archive.plan, rule 7): the next save of the key cuts at them too.
ANNOTATION_GENERATIONS = "dev.remote-cache.generations"
#: More bounds than a save ever writes: an annotation holding more is not ours, and is ignored.
_MAX_BOUNDS = 64
#: ASCII decimal integers (seconds, before 1970 too), comma-separated: what :func:`bounds_text` writes.
_BOUNDS = re.compile(r"-?[0-9]{1,18}(?:,-?[0-9]{1,18})*", re.ASCII)


class Blob(Struct, frozen=True):
    """A small JSON document (config, manifest, index) with its descriptor."""

    descriptor: Descriptor
    body: bytes


class BuiltImage(Struct, frozen=True):
    """Everything a save pushes besides the layers: configs, manifests, then the index (tagged)."""

    configs: tuple[Blob, ...]
    manifests: tuple[Blob, ...]
    index: Blob


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode("utf-8")


def build_image(
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    *,
    key: str,
    size: int,
    files: int,
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS,
    created: datetime | None = None,
    generations: Sequence[int] = (),
) -> BuiltImage:
    """Build the configs, per-platform manifests and index of a cache image over ``layers``
    (``generations``: the bounds they were cut at, written when there are any)."""
    if len(layers) != len(diff_ids):
        raise ValueError("one diff_id per layer is required")
    if not platforms:
        raise ValueError("at least one platform is required")
    stamp = format_time(created or datetime.now(UTC))
    annotations = {
        ANNOTATION_CREATED: stamp,
        ANNOTATION_KEY: key,
        ANNOTATION_SIZE: str(size),
        ANNOTATION_FILES: str(files),
        ANNOTATION_TOOL: TOOL,
    }
    if generations:
        annotations[ANNOTATION_GENERATIONS] = bounds_text(generations)
    history: list[dict[str, Any]] = [
        {"created": stamp, "created_by": f"{TOOL} save", "comment": f"layer {i + 1} of {len(layers)}"}
        for i in range(len(layers))
    ] or [{"created": stamp, "created_by": f"{TOOL} save", "empty_layer": True}]
    configs: list[Blob] = []
    manifests: list[Blob] = []
    for plat in platforms:
        config: dict[str, Any] = {
            "created": stamp,
            "architecture": plat.architecture,
            "os": plat.os,
        }
        if plat.variant:
            config["variant"] = plat.variant
        config.update(
            {
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
                "history": history,
            }
        )
        config_body = _canonical(config)
        config_desc = Descriptor(OCI_CONFIG, sha256_digest(config_body), len(config_body))
        configs.append(Blob(config_desc, config_body))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.to_json() for layer in layers],
            "annotations": annotations,
        }
        manifest_body = _canonical(manifest)
        manifests.append(
            Blob(
                Descriptor(OCI_MANIFEST, sha256_digest(manifest_body), len(manifest_body), platform=plat),
                manifest_body,
            )
        )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [m.descriptor.to_json() for m in manifests],
        "annotations": annotations,
    }
    index_body = _canonical(index)
    index_desc = Descriptor(OCI_INDEX, sha256_digest(index_body), len(index_body), annotations=annotations)
    return BuiltImage(tuple(configs), tuple(manifests), Blob(index_desc, index_body))


def _load_json(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ImageFormatError(
            f"the {what} is {len(body)} bytes, more than the {MAX_DOCUMENT_BYTES} we accept; "
            "this is not a cache image"
        )
    try:
        obj = parse_json(body)
    except ValueError as exc:
        raise ImageFormatError(f"the {what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ImageFormatError(f"the {what} is not a JSON object")
    return obj


def _media_type(obj: dict[str, Any], declared: str) -> str:
    """The document's media type: its own field, else the one it was served with, else a guess."""
    own = obj.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if declared in DOCUMENT_TYPES:
        return declared
    # OCI allows omitting mediaType; older umoci does.
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj:
        return OCI_MANIFEST
    return declared


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    raw = obj.get("annotations") or {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items()}


def parse_index(body: bytes, media_type: str = OCI_INDEX) -> tuple[list[Descriptor], dict[str, str]]:
    """The manifest descriptors and annotations of an OCI index or Docker manifest list."""
    obj = _load_json(body, "image index")
    kind = _media_type(obj, media_type)
    if kind not in INDEX_TYPES:
        raise ImageFormatError(f"expected an image index, got media type {kind!r}")
    raw = obj.get("manifests")
    if not isinstance(raw, list):
        raise ImageFormatError("the image index has no 'manifests' list")
    return [Descriptor.from_json(m) for m in raw], _annotations(obj)


class ParsedManifest(Struct, frozen=True):
    """An image manifest reduced to what a restore needs."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


def parse_manifest(body: bytes, media_type: str = OCI_MANIFEST) -> ParsedManifest:
    """Parse an OCI or Docker v2 image manifest; reject layer types we cannot unpack."""
    obj = _load_json(body, "image manifest")
    kind = _media_type(obj, media_type)
    if kind not in MANIFEST_TYPES:
        raise ImageFormatError(f"expected an image manifest, got media type {kind!r}")
    if obj.get("schemaVersion") != 2:
        raise ImageFormatError(f"unsupported manifest schemaVersion {obj.get('schemaVersion')!r}")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageFormatError("the image manifest has no 'layers' list")
    layers = tuple(Descriptor.from_json(layer) for layer in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ImageFormatError(
                f"layer {layer.digest} has media type {layer.media_type!r}, which a cache image "
                f"cannot hold (expected one of: {', '.join(sorted(LAYER_TYPES))})"
            )
    config = Descriptor.from_json(obj.get("config"))
    return ParsedManifest(config, layers, _annotations(obj))


def _pick(manifests: Sequence[Descriptor]) -> Descriptor:
    """linux/amd64 when present, else the first image manifest (attestations are skipped)."""
    candidates = [
        m
        for m in manifests
        if m.media_type in MANIFEST_TYPES
        and not (m.platform is not None and m.platform.os == "unknown")  # buildkit attestations
    ]
    if not candidates:
        raise ImageFormatError("the image index holds no image manifest")
    for m in candidates:
        if m.platform is not None and (m.platform.os, m.platform.architecture) == ("linux", "amd64"):
            return m
    return candidates[0]


class CacheImage(Struct, frozen=True):
    """A cache entry as read from a store: the top-level digest, the chosen manifest, its layers."""

    descriptor: Descriptor
    manifest: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    #: The chosen manifest's config (its ``rootfs.diff_ids`` pair up with ``layers``).
    config: Descriptor | None = None
    #: The platforms of the index's manifests, in order (none when the top is a manifest).
    platforms: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def key(self) -> str | None:
        return self.annotations.get(ANNOTATION_KEY)

    @property
    def created(self) -> datetime | None:
        return parse_time(self.annotations.get(ANNOTATION_CREATED))

    @property
    def size(self) -> int | None:
        return _int(self.annotations.get(ANNOTATION_SIZE))

    @property
    def files(self) -> int | None:
        return _int(self.annotations.get(ANNOTATION_FILES))

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def bounds_text(bounds: Sequence[int]) -> str:
    """Generation bounds as :data:`ANNOTATION_GENERATIONS` holds them."""
    return ",".join(str(bound) for bound in bounds)


def generation_bounds(annotations: dict[str, str]) -> tuple[int, ...]:
    """The generation bounds an entry's annotations carry; none when absent or not as a save
    writes them (integers, strictly increasing, at most a few dozen): a store's documents are
    not trusted to be ours."""
    text = annotations.get(ANNOTATION_GENERATIONS)
    if not text or len(text) > 20 * _MAX_BOUNDS or not _BOUNDS.fullmatch(text):
        return ()
    return checked_bounds([int(part) for part in text.split(",")])


def checked_bounds(values: Sequence[object]) -> tuple[int, ...]:
    """``values`` as generation bounds when they are what a save writes (integers of at most 18
    digits, strictly increasing, at most a few dozen), else none."""
    bounds = tuple(v for v in values if type(v) is int and abs(v) < 10**18)
    if len(bounds) != len(values) or len(bounds) > _MAX_BOUNDS:
        return ()
    return () if any(b <= a for a, b in itertools.pairwise(bounds)) else bounds


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


async def read_document(store: Store, reference: str, what: str = "manifest") -> tuple[Descriptor, bytes]:
    """A manifest or index by tag or digest, no bigger than a cache image's documents are."""
    desc, body = await store.get_manifest(reference)
    if len(body) > MAX_DOCUMENT_BYTES or desc.size > MAX_DOCUMENT_BYTES:
        raise ImageFormatError(
            f"the {what} {reference} is larger than {MAX_DOCUMENT_BYTES} bytes; this is not a cache image"
        )
    return desc, body


def _kind(desc: Descriptor, body: bytes) -> str:
    try:
        obj = parse_json(body)
    except ValueError as exc:
        raise ImageFormatError(f"the manifest {desc.digest} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ImageFormatError(f"the manifest {desc.digest} is not a JSON object")
    return _media_type(obj, desc.media_type)


def document_annotations(desc: Descriptor, body: bytes) -> dict[str, str]:
    """The annotations of a top document: an index's own, or a manifest's ({} for anything else)."""
    kind = _kind(desc, body)
    if kind in INDEX_TYPES:
        return parse_index(body, kind)[1]
    if kind in MANIFEST_TYPES:
        return parse_manifest(body, kind).annotations
    return {}


async def load_image(
    store: Store, reference: str, read: tuple[Descriptor, bytes] | None = None
) -> CacheImage:
    """Read the image at ``reference`` (tag or digest), descending from an index to one manifest;
    ``read``: its top document, already read (:func:`read_document`).

    Annotations come from the top level (our index carries them), falling back to the manifest's.
    CacheMiss when ``reference`` is absent; BrokenEntry when an index names a manifest that is not.
    """
    top, body = read if read is not None else await read_document(store, reference, "manifest")
    kind = _kind(top, body)
    if kind in INDEX_TYPES:
        manifests, annotations = parse_index(body, kind)
        chosen = _pick(manifests)
        if chosen.size > MAX_DOCUMENT_BYTES:
            raise ImageFormatError(f"the manifest {chosen.digest} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            mdesc, mbody = await read_document(store, chosen.digest, "manifest")
        except CacheMiss as exc:  # the index is there, its manifest not: not an absent key
            raise BrokenEntry(reference, store.location, f"manifest {chosen.digest}") from exc
        parsed = parse_manifest(mbody, _kind(mdesc, mbody))
        manifest = Descriptor(chosen.media_type, mdesc.digest, mdesc.size, platform=chosen.platform)
        merged = {**parsed.annotations, **annotations}
        top = Descriptor(kind, top.digest, top.size)
        platforms = tuple(str(m.platform) for m in manifests)
    elif kind in MANIFEST_TYPES:
        parsed = parse_manifest(body, kind)
        manifest = Descriptor(kind, top.digest, top.size)
        merged = parsed.annotations
        top = manifest
        platforms = ()
    else:
        raise ImageFormatError(
            f"{reference} in {store.location} has media type {kind!r}, not an image index or manifest"
        )
    return CacheImage(
        descriptor=top,
        manifest=manifest,
        layers=parsed.layers,
        annotations=merged,
        config=parsed.config,
        platforms=platforms,
    )


async def read_diff_ids(store: Store, image: CacheImage) -> list[str]:
    """The config's ``rootfs.diff_ids`` (one per layer); ImageFormatError when absent or mismatched."""
    if image.config is None or image.config.size > MAX_DOCUMENT_BYTES:
        raise ImageFormatError(f"the image {image.digest} has no readable config")
    body = b"".join([chunk async for chunk in store.read_blob(image.config)])
    obj = _load_json(body, "image config")
    rootfs = obj.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
        raise ImageFormatError(f"the config of {image.digest} does not list one diff_id per layer")
    return [str(d) for d in diff_ids]
