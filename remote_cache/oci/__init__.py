"""The OCI side of the core: content vocabulary, references, credentials and the stores.

* :mod:`.media`, :mod:`.digest`, :mod:`.descriptor` -- media types, digests, descriptors (no I/O);
* :mod:`.reference` -- ``HOST/REPO:KEY`` and ``oci:DIR:KEY`` parsed once; :mod:`.credentials`;
* :mod:`.store` -- the :class:`~.store.Store` protocol every store implements, and ``open_store``;
* :mod:`.layout` -- an OCI image layout directory; :mod:`.registry` -- a registry repository.

Nothing here knows about caches; each kind of store is imported only when one is opened.
"""

from __future__ import annotations

from .descriptor import Descriptor, Platform
from .digest import BlobCheck, check_digest, is_digest, sha256_digest, verify_bytes
from .media import (
    ANNOTATION_CREATED,
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)

__all__ = [
    "ANNOTATION_CREATED",
    "ANNOTATION_REF_NAME",
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_TYPES",
    "MAX_DOCUMENT_BYTES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "BlobCheck",
    "Descriptor",
    "Platform",
    "check_digest",
    "is_digest",
    "sha256_digest",
    "verify_bytes",
]
