"""The Dagger glue of the remote-cache module: restore cache volumes from a backend, save them back.

Replace ``ctr.with_mounted_cache(path, dag.cache_volume(name))`` with
``ctr.with_(dag.remote_cache(backend).cache_volume(path, key).mount)``: the volume is seeded from the
backend's copy under ``key`` (else, with ``restore_keys``, the newest entry under a fallback
prefix) when the engine's own volume is empty. After your pipeline ran,
``ctr.with_(dag.remote_cache(backend).export)`` saves every remote-cached volume mounted on it
(only the ones that changed) under its key. ``read_only``, ``max_size``, ``timeout`` and
``strict`` on ``remote_cache(...)`` control saving and failures. Backends implement
``resolve(key, restore_keys) -> str``, ``import(key) -> Directory`` and ``export(key, dir)``; the
``remote-backend`` module provides an OCI registry backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Backend", "RemoteCache", "RemoteCacheVolume"]

if TYPE_CHECKING:
    from .backend import Backend
    from .main import RemoteCache
    from .volume import RemoteCacheVolume


def __getattr__(name: str) -> Any:
    # Lazy, so `remote_cache.dagger.sdk` can be imported (by remote-backend) without registering
    # this module's object types in another module's runtime.
    if name in __all__:
        from . import backend, main, volume

        return {"Backend": backend.Backend, "RemoteCache": main.RemoteCache}.get(
            name, volume.RemoteCacheVolume
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
