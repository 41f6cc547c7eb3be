"""The cache image format: what we build, and the foreign shapes we must read."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache.image import (
    ANNOTATION_FILES,
    ANNOTATION_GENERATIONS,
    ANNOTATION_KEY,
    ANNOTATION_SIZE,
    ANNOTATION_TOOL,
    DEFAULT_PLATFORMS,
    build_image,
    generation_bounds,
    load_image,
    parse_index,
    parse_manifest,
)
from remote_cache.errors import ImageFormatError
from remote_cache.oci import (
    ANNOTATION_CREATED,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    sha256_digest,
)
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.media import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST
from remote_cache.oci.media import MAX_DOCUMENT_BYTES as MAX_MANIFEST_BYTES
from remote_cache.units import parse_time
from remote_cache.version import TOOL

LAYER_A = Descriptor(OCI_LAYER_ZSTD, sha256_digest(b"a"), 1)
LAYER_B = Descriptor(OCI_LAYER_ZSTD, sha256_digest(b"b"), 1)
DIFF_IDS = [sha256_digest(b"ta"), sha256_digest(b"tb")]
WHEN = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)


def _built() -> tuple[Any, list[Any], list[Any]]:
    img = build_image([LAYER_A, LAYER_B], DIFF_IDS, key="npm linux", size=1234, files=7, created=WHEN)
    index = json.loads(img.index.body)
    manifests = [json.loads(m.body) for m in img.manifests]
    configs = [json.loads(c.body) for c in img.configs]
    assert img.index.descriptor.digest == sha256_digest(img.index.body)
    for blob in (*img.manifests, *img.configs):
        assert blob.descriptor.digest == sha256_digest(blob.body)
        assert blob.descriptor.size == len(blob.body)
    return index, manifests, configs


def test_build_index_has_one_manifest_per_platform_sharing_layers() -> None:
    index, manifests, configs = _built()
    assert index["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    assert len(manifests) == len(DEFAULT_PLATFORMS) == 2
    assert manifests[0]["layers"] == manifests[1]["layers"]
    assert [layer["digest"] for layer in manifests[0]["layers"]] == [LAYER_A.digest, LAYER_B.digest]
    assert all(m["mediaType"] == OCI_MANIFEST for m in manifests)
    assert [c["architecture"] for c in configs] == ["amd64", "arm64"]
    for config in configs:
        assert config["os"] == "linux"
        assert config["rootfs"] == {"type": "layers", "diff_ids": DIFF_IDS}
        assert config["config"] == {}
        assert config["created"] == "2026-01-31T12:00:00Z"
        assert len(config["history"]) == 2


def test_build_annotations_on_index_and_manifests() -> None:
    index, manifests, _ = _built()
    expected = {
        ANNOTATION_CREATED: "2026-01-31T12:00:00Z",
        ANNOTATION_KEY: "npm linux",
        ANNOTATION_SIZE: "1234",
        ANNOTATION_FILES: "7",
        ANNOTATION_TOOL: TOOL,
    }
    assert index["annotations"] == expected
    for manifest in manifests:
        assert manifest["annotations"] == expected


def test_generation_bounds_are_written_and_read_back() -> None:
    img = build_image([LAYER_A], DIFF_IDS[:1], key="k", size=1, files=1, generations=(-5, 10, 1795790365))
    for doc in (img.index, *img.manifests):
        annotations = json.loads(doc.body)["annotations"]
        assert annotations[ANNOTATION_GENERATIONS] == "-5,10,1795790365"
        assert generation_bounds(annotations) == (-5, 10, 1795790365)
    plain = build_image([LAYER_A], DIFF_IDS[:1], key="k", size=1, files=1)
    assert ANNOTATION_GENERATIONS not in json.loads(plain.index.body)["annotations"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1,,2",
        "1, 2",
        "3,2",
        "2,2",
        "0x10",
        "1.5",
        "\uff11\uff12",  # digits int() takes, that no save writes
        "9" * 40,
        ",".join(str(n) for n in range(65)),
        "1," * 2000 + "2",
    ],
)
def test_generation_bounds_not_as_a_save_writes_them_are_ignored(text: str) -> None:
    assert generation_bounds({ANNOTATION_GENERATIONS: text}) == ()


def test_build_custom_platforms_and_manifest_config_match() -> None:
    img = build_image(
        [LAYER_A], DIFF_IDS[:1], key="k", size=1, files=1, platforms=[Platform.parse("linux/arm/v7")]
    )
    (manifest,) = img.manifests
    (config,) = img.configs
    assert manifest.descriptor.platform == Platform("linux", "arm", "v7")
    assert json.loads(config.body)["variant"] == "v7"
    assert json.loads(manifest.body)["config"]["digest"] == config.descriptor.digest
    with pytest.raises(ValueError):
        build_image([LAYER_A], DIFF_IDS, key="k", size=1, files=1)


def test_parse_our_manifest_and_index() -> None:
    img = build_image([LAYER_A, LAYER_B], DIFF_IDS, key="k", size=1, files=1)
    manifests, annotations = parse_index(img.index.body)
    assert [m.digest for m in manifests] == [m.descriptor.digest for m in img.manifests]
    assert annotations[ANNOTATION_KEY] == "k"
    parsed = parse_manifest(img.manifests[0].body)
    assert parsed.layers == (LAYER_A, LAYER_B)
    assert parsed.config.media_type == OCI_CONFIG


def test_parse_docker_v2_manifest() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": sha256_digest(b"c"), "size": 1},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": sha256_digest(b"l"), "size": 1}],
        }
    ).encode()
    parsed = parse_manifest(body, DOCKER_MANIFEST)
    assert parsed.layers[0].media_type == DOCKER_LAYER_GZIP


def test_parse_manifest_without_media_type_field() -> None:
    # OCI allows omitting mediaType in the body (older umoci does).
    body = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(b"c"), "size": 1},
            "layers": [LAYER_A.to_json()],
        }
    ).encode()
    assert parse_manifest(body, "").layers == (LAYER_A,)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
            "expected an image manifest",
        ),
        (json.dumps({"schemaVersion": 1, "mediaType": OCI_MANIFEST, "layers": []}).encode(), "schemaVersion"),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(b"c"), "size": 1},
                    "layers": [
                        {
                            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar",
                            "digest": sha256_digest(b"x"),
                            "size": 1,
                        }
                    ],
                }
            ).encode(),
            "cannot hold",
        ),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": "md5:abc", "size": 1},
                    "layers": [],
                }
            ).encode(),
            "digest",
        ),
    ],
)
def test_parse_manifest_rejects(body: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        parse_manifest(body)


def test_parse_rejects_oversized_documents() -> None:
    body = b'{"pad": "' + b"x" * MAX_MANIFEST_BYTES + b'"}'
    with pytest.raises(ImageFormatError, match="more than"):
        parse_manifest(body)
    with pytest.raises(ImageFormatError, match="more than"):
        parse_index(body)


def test_parse_time_variants() -> None:
    assert parse_time("2026-01-31T12:00:00Z") == WHEN
    assert parse_time("2026-01-31T12:00:00.123456789Z") == WHEN.replace(microsecond=123456)
    assert parse_time("2026-01-31T13:00:00+01:00") == WHEN
    assert parse_time("yesterday") is None
    assert parse_time(None) is None


async def _put(
    store: LayoutStore, obj: dict[str, object], media_type: str, tag: str | None = None
) -> Descriptor:
    return await store.put_manifest(json.dumps(obj).encode(), media_type, tag=tag)


def _manifest(layer: Descriptor, media_type: str = OCI_MANIFEST) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(b"{}"), "size": 2},
        "layers": [layer.to_json()],
    }


async def test_load_image_picks_amd64_from_a_foreign_index(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    arm = await _put(store, _manifest(LAYER_B), OCI_MANIFEST)
    amd = await _put(store, _manifest(LAYER_A), OCI_MANIFEST)
    attestation = await _put(store, _manifest(LAYER_B), OCI_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**arm.to_json(), "platform": {"os": "linux", "architecture": "arm64"}},
            {**attestation.to_json(), "platform": {"os": "unknown", "architecture": "unknown"}},
            {**amd.to_json(), "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    top = await _put(store, index, OCI_INDEX, tag="foreign")
    image = await load_image(store, "foreign")
    assert image.digest == top.digest
    assert image.manifest.digest == amd.digest
    assert image.layers == (LAYER_A,)
    assert image.key is None and image.size is None and image.created is None


async def test_load_image_first_entry_without_amd64_and_docker_list(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    docker = await _put(
        store, _manifest(Descriptor(DOCKER_LAYER_GZIP, LAYER_B.digest, 1), DOCKER_MANIFEST), DOCKER_MANIFEST
    )
    listing = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [{**docker.to_json(), "platform": {"os": "linux", "architecture": "s390x"}}],
    }
    await _put(store, listing, DOCKER_MANIFEST_LIST, tag="list")
    image = await load_image(store, "list")
    assert image.manifest.digest == docker.digest
    assert image.layers[0].media_type == DOCKER_LAYER_GZIP


async def test_load_image_single_manifest_and_empty_index(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    single = await _put(store, _manifest(LAYER_A), OCI_MANIFEST, tag="single")
    image = await load_image(store, "single")
    assert image.digest == image.manifest.digest == single.digest
    await _put(store, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, OCI_INDEX, tag="empty")
    with pytest.raises(ImageFormatError, match="no image manifest"):
        await load_image(store, "empty")


async def test_load_image_reads_our_annotations(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    img = build_image([LAYER_A], DIFF_IDS[:1], key="a key", size=99, files=3, created=WHEN)
    for manifest in img.manifests:
        await store.put_manifest(manifest.body, OCI_MANIFEST)
    await store.put_manifest(img.index.body, OCI_INDEX, tag="t")
    image = await load_image(store, "t")
    assert (image.key, image.size, image.files, image.created) == ("a key", 99, 3, WHEN)
    assert image.manifest.digest == img.manifests[0].descriptor.digest
    assert image.compressed_size == 1
