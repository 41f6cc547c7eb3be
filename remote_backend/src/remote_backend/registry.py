"""The registry backend: each cache key is a tag, each entry a plain OCI image of the volume."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import dagger
from dagger import Doc, dag

from remote_cache import __version__
from remote_cache.credentials import Credentials
from remote_cache.errors import CacheMiss, RemoteCacheError
from remote_cache.keys import tag_for_key
from remote_cache.mod import _sdk
from remote_cache.oci import ANNOTATION_CREATED, ANNOTATION_KEY, ANNOTATION_TOOL
from remote_cache.reference import parse_reference
from remote_cache.registry import RegistryStore

__all__ = ["DEFAULT_PLATFORMS", "Registry"]

#: Platforms every entry is published for: the content is the same, but an engine pulls the
#: variant of its own platform, so each platform an engine may run on needs one.
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64")
_TOOL = f"remote-cache/{__version__} (dagger)"


@_sdk.object_type
class Registry:
    """An OCI registry repository storing remote-cache entries: key -> tag, entry -> image."""

    address: str = _sdk.field()
    repo: str = _sdk.field()
    username: str = _sdk.field(default="")
    platforms: list[str] = _sdk.field()
    password: dagger.Secret | None = None
    compression: dagger.ImageLayerCompression = dagger.ImageLayerCompression.Zstd
    media_types: dagger.ImageMediaTypes = dagger.ImageMediaTypes.OCIMediaTypes
    plain_http: bool = False

    @_sdk.function(cache="session")
    async def import_(
        self, key: Annotated[str, Doc("Cache key of the entry to restore")]
    ) -> dagger.Directory:
        """The entry stored under ``key``, pinned by the digest resolved now (once per session).

        A missing tag fails with a message containing ``remote-cache: cache miss:``; auth and
        network problems fail with the registry client's message.
        """
        tag = tag_for_key(key)
        digest = await self._resolve(tag)
        image = f"{self.address}/{self.repo}@{digest}"
        return self._authed(dag.container()).from_(image).rootfs()

    @_sdk.function(cache="never")
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the entry under")],
        dir: Annotated[dagger.Directory, Doc("The volume's contents")],  # API name, shadows a builtin
    ) -> None:
        """Publish ``dir`` as ``ADDRESS/REPO:TAG``, one variant per platform, as credentials allow."""
        tag = tag_for_key(key)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        variants = [
            self._authed(dag.container(platform=dagger.Platform(platform)))
            .with_rootfs(dir)
            .with_annotation(ANNOTATION_KEY, key)
            .with_annotation(ANNOTATION_CREATED, created)
            .with_annotation(ANNOTATION_TOOL, _TOOL)
            for platform in self.platforms
        ]
        await variants[0].publish(
            f"{self.address}/{self.repo}:{tag}",
            platform_variants=variants[1:],
            forced_compression=self.compression,
            media_types=self.media_types,
        )

    async def _resolve(self, tag: str) -> str:
        """The digest under ``tag``, asked of the registry directly (a miss raises CacheMiss)."""
        credentials = None
        if self.password is not None:
            credentials = Credentials(self.username, await self.password.plaintext())
        ref = parse_reference(f"{self.address}/{self.repo}")
        store = RegistryStore.from_reference(
            ref, credentials=credentials, plain_http=True if self.plain_http else None
        )
        try:
            descriptor = await store.resolve(tag)
        except CacheMiss:
            raise  # its message starts with MISS_MARKER: the miss signal across modules
        except RemoteCacheError as exc:
            raise RemoteCacheError(f"remote-cache: cannot read {store.location}:{tag}: {exc}") from exc
        finally:
            await store.aclose()
        return descriptor.digest

    def _authed(self, ctr: dagger.Container) -> dagger.Container:
        if self.password is None:
            return ctr
        return ctr.with_registry_auth(f"{self.address}/{self.repo}", self.username, self.password)
