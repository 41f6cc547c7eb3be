"""OCI media types, standard annotations and the size cap on JSON documents (no I/O).

Names as in the image spec (https://github.com/opencontainers/image-spec/blob/main/media-types.md),
plus the Docker v2 equivalents registries still serve.
"""

from __future__ import annotations

__all__ = [
    "ANNOTATION_CREATED",
    "ANNOTATION_REF_NAME",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCUMENT_TYPES",
    "INDEX_TYPES",
    "LAYER_COMPRESSION",
    "LAYER_TYPES",
    "LEAF_TYPES",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "MAX_DOCUMENT_BYTES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "layer_media_type",
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
#: Documents (manifests and indexes), as against the blobs they refer to.
DOCUMENT_TYPES = MANIFEST_TYPES | INDEX_TYPES
#: Layer media type -> the compression of its tar stream.
LAYER_COMPRESSION = {
    OCI_LAYER_TAR: "tar",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
}
LAYER_TYPES = frozenset(LAYER_COMPRESSION)
#: Blobs that refer to nothing, whatever their bytes: a garbage collector need not read them.
LEAF_TYPES = LAYER_TYPES | {OCI_CONFIG, DOCKER_CONFIG}
#: Accept header for manifest requests: everything we can read.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

#: When an image was made (RFC 3339).
ANNOTATION_CREATED = "org.opencontainers.image.created"
#: The name (tag) of an entry of an image layout's ``index.json``.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

#: Largest JSON document (manifest, index, config, tag list page) we read. The distribution spec
#: suggests registries accept manifests of at least 4 MiB; a cache image's are a few KiB.
MAX_DOCUMENT_BYTES = 4 << 20


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for ``zstd``, ``gzip`` or ``tar``; ValueError for anything else."""
    for media_type, kind in LAYER_COMPRESSION.items():
        if kind == compression and media_type.startswith("application/vnd.oci."):
            return media_type
    raise ValueError(f"compression must be 'zstd' or 'gzip', not {compression!r}")
