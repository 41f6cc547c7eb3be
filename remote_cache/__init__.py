"""Remote cache volumes: save Dagger cache volumes to an OCI registry, restore them anywhere.

The package, by layer (``tests/test_boundaries.py`` holds the directions):

* the engine-independent core, importing no ``dagger``:
  :mod:`.cpus`, :mod:`.errors`, :mod:`.keys`, :mod:`.records`, :mod:`.units`, :mod:`.tasks`,
  :mod:`.version` (shared by all),
  :mod:`.oci` (the OCI vocabulary, references, credentials, the layout and registry stores),
  :mod:`.archive` (a directory tree as deterministic layer tars, and back; no OCI),
  :mod:`.cache` (the cache image, save, restore, entries, this machine's evidence);
* :mod:`.cli`, the ``remote-cache`` command over the core;
* :mod:`.dagger`, the glue of the Dagger module, whose main object ``RemoteCache`` is imported
  only when asked for, so the core stays usable (and importable) without the Dagger SDK.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    MISS_MARKER,
    BrokenEntry,
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
from .version import VERSION

__version__ = VERSION

__all__ = [
    "MISS_MARKER",
    "BrokenEntry",
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
        from .dagger import RemoteCache

        return RemoteCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
