"""Storage backends for remote-cache volumes: an OCI registry repository, one image per key.

``dag.remote_cache(dag.remote_backend().registry("ghcr.io", "me/cache", username="me",
password=token))`` stores each volume as a plain OCI image (its root is the volume's contents)
tagged with the cache key, readable by skopeo, crane, oras and the ``remote-cache`` CLI. The
backends run the ``remote-cache`` core in their own container: every byte they store goes
through the same code as the CLI's.
"""

from __future__ import annotations

from typing import Annotated

import dagger
from dagger import Doc

from remote_cache.cache.image import DEFAULT_PLATFORMS
from remote_cache.dagger import sdk
from remote_cache.errors import RemoteCacheError
from remote_cache.oci.descriptor import Platform
from remote_cache.oci.reference import parse_reference

from .registry import COMPRESSIONS, Registry

__all__ = ["Registry", "RemoteBackend"]


@sdk.object_type
class RemoteBackend:
    """Backends for the remote-cache module."""

    @sdk.function
    def registry(
        self,
        address: Annotated[str, Doc("Registry host[:port], e.g. ghcr.io, localhost:5000, ttl.sh")],
        repo: Annotated[str, Doc("Repository on that registry, e.g. my-org/ci-cache")],
        username: Annotated[str, Doc("Username for the registry (pull and push)")] = "",
        password: Annotated[dagger.Secret | None, Doc("Password or token, e.g. env://REGISTRY_TOKEN")] = None,
        compression: Annotated[
            dagger.ImageLayerCompression, Doc("Layer compression of saved entries: Zstd or Gzip")
        ] = dagger.ImageLayerCompression.Zstd,
        media_types: Annotated[
            dagger.ImageMediaTypes, Doc("Media types of saved entries: OCIMediaTypes (the only kind written)")
        ] = dagger.ImageMediaTypes.OCIMediaTypes,
        platforms: Annotated[
            list[str] | None,
            Doc(
                "Platforms each entry is tagged for, so engines of any of them can pull it "
                "(default: linux/amd64 and linux/arm64)"
            ),
        ] = None,
        plain_http: Annotated[
            bool, Doc("Talk plain HTTP to a non-loopback registry (the engine needs it configured too)")
        ] = False,
        immutable: Annotated[
            bool, Doc("Never overwrite an existing entry: export keeps the first one saved under a key")
        ] = False,
    ) -> Registry:
        """An OCI registry repository as a remote-cache backend. Does no I/O."""
        ref = parse_reference(f"{address}/{repo}")  # validates both, with a clear message
        if ref.key is not None or ref.digest is not None:
            raise ValueError(f"repo {repo!r} must not carry a tag or digest: the cache key is the tag")
        if compression not in COMPRESSIONS:
            raise RemoteCacheError(
                f"remote-cache: compression {compression.value} is not supported: entries are saved with "
                "Zstd (the default) or Gzip"
            )
        if media_types != dagger.ImageMediaTypes.OCIMediaTypes:
            raise RemoteCacheError(
                f"remote-cache: media types {media_types.value} are not supported: entries are OCI images "
                "(an OCI index), which every current registry accepts"
            )
        for platform in platforms or []:
            try:
                Platform.parse(platform)
            except ValueError as exc:
                raise RemoteCacheError(f"remote-cache: platforms: {exc}") from exc
        return Registry(
            address=address,
            repo=repo,
            username=username,
            password=password,
            compression=compression,
            media_types=media_types,
            platforms=list(platforms) if platforms else [str(p) for p in DEFAULT_PLATFORMS],
            plain_http=plain_http,
            immutable=immutable,
        )
