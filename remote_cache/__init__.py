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

# Not `typing.TYPE_CHECKING`: importing typing (~20 ms) would stretch the window below; mypy
# takes any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
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
    from .version import VERSION as __version__

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


def __dir__() -> list[str]:
    # dir() and help() list the re-exports, which are not module globals until first asked for.
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    # Each re-export is imported when first asked for: `remote-cache` imports this package before
    # its entry point can catch a Ctrl-C, and loading these (hashlib's OpenSSL among them) took
    # ~40 ms of that window. The Dagger runtime finds the main object as `remote_cache:RemoteCache`
    # (project name + module name); importing it lazily keeps `import remote_cache` free of the SDK.
    if name == "RemoteCache":
        from .dagger import RemoteCache

        return RemoteCache
    if name == "__version__":
        from .version import VERSION

        return VERSION
    if name in __all__:
        from . import errors, keys

        return getattr(keys if name in keys.__all__ else errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
