"""Remote cache volumes: save Dagger cache volumes to an OCI registry, restore them anywhere.

The package is two things. Its engine-independent core (keys, registry client, image format,
save/restore, the ``remote-cache`` CLI) imports no ``dagger``. The Dagger module's main object,
``RemoteCache``, lives in ``remote_cache.mod`` and is imported only when asked for, so the
core stays usable (and importable) without the Dagger SDK.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    MISS_MARKER,
    CacheMiss,
    ImageFormatError,
    IntegrityError,
    InvalidKey,
    InvalidReference,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    RemoteCacheError,
    StoreError,
    UnsafeArchive,
    UnsupportedOperation,
)
from .keys import is_valid_tag, tag_for_key, validate_key

__version__ = "0.1.0"

__all__ = [
    "MISS_MARKER",
    "CacheMiss",
    "ImageFormatError",
    "IntegrityError",
    "InvalidKey",
    "InvalidReference",
    "RegistryAuthError",
    "RegistryError",
    "RegistryUnreachable",
    "RemoteCacheError",
    "StoreError",
    "UnsafeArchive",
    "UnsupportedOperation",
    "__version__",
    "is_valid_tag",
    "tag_for_key",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    # The Dagger runtime finds the main object as `remote_cache:RemoteCache` (project name +
    # module name). Importing it lazily keeps `import remote_cache` free of the Dagger SDK.
    if name == "RemoteCache":
        from .mod import RemoteCache

        return RemoteCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
