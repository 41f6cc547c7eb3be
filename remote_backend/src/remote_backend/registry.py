"""The registry backend: each cache key is a tag, each entry a plain OCI image of the volume.

Entries are written by the core in this function's container (the layered image the CLI
writes: only new layers go up) and read by the engine's own pull (``from`` by digest).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Annotated

import dagger
from dagger import Doc, dag

from remote_cache.cache.save import save
from remote_cache.dagger import sdk
from remote_cache.dagger.report import report
from remote_cache.errors import CacheMiss, RemoteCacheError
from remote_cache.keys import tag_for_key
from remote_cache.oci.credentials import Credentials
from remote_cache.oci.descriptor import Platform
from remote_cache.oci.reference import Reference, parse_reference
from remote_cache.oci.registry import RegistryStore

from .housekeeping import duration, listed, pruned, removed, resolved
from .local import exported

__all__ = ["COMPRESSIONS", "Registry"]

#: Layer compressions an entry can be saved with: the core's zstd (default) and gzip.
COMPRESSIONS = {dagger.ImageLayerCompression.Zstd: "zstd", dagger.ImageLayerCompression.Gzip: "gzip"}


@sdk.object_type
class Registry:
    """An OCI registry repository storing remote-cache entries: key -> tag, entry -> image.

    Besides the Backend functions (resolve, import, export) it has housekeeping: ``entries``,
    ``remove`` and ``prune``. With ``immutable`` an existing tag is never overwritten: the first
    entry saved under a key stays (pair it with branch-scoped keys and read-only forks, see
    the remote-cache module).
    """

    address: str = sdk.field()
    repo: str = sdk.field()
    username: str = sdk.field(default="")
    platforms: list[str] = sdk.field()
    password: dagger.Secret | None = None
    compression: dagger.ImageLayerCompression = dagger.ImageLayerCompression.Zstd
    media_types: dagger.ImageMediaTypes = dagger.ImageMediaTypes.OCIMediaTypes
    plain_http: bool = False
    immutable: bool = False

    @sdk.function(cache="session")
    async def resolve(
        self,
        key: Annotated[str, Doc("Cache key wanted")],
        restore_keys: Annotated[
            list[str], Doc("Key prefixes to fall back to, in order; the newest match of each wins")
        ],
    ) -> str:
        """The key of the entry to restore: ``key`` itself, a restore key's newest match, or "" (miss).

        Asked of the registry directly, once per session (like actions/cache: exact key first,
        then each prefix in order).
        """
        async with aclosing(await self._store()) as store:
            return await resolved(store, key, restore_keys)

    @sdk.function(cache="session")
    async def import_(
        self, key: Annotated[str, Doc("Cache key of the entry to restore")]
    ) -> dagger.Directory:
        """The entry stored under ``key``, pulled by the engine by the digest resolved now.

        A missing entry (also one deleted between this resolve and the engine's) fails with a
        message containing ``remote-cache: cache miss:``; auth and network problems fail with
        the registry client's message.
        """
        digest = await self._resolve(tag_for_key(key))
        pulled = self._authed(dag.container()).from_(f"{self._reference().location}@{digest}")
        try:
            # `from` with a digest resolves the image when the field is evaluated
            # (core/schema/container.go, `from`): do it here, where a vanished entry is a miss.
            await pulled.id()
        except dagger.QueryError as exc:
            await self._resolve(digest)  # CacheMiss (a miss) when the entry is gone
            raise RemoteCacheError(f"remote-cache: the engine could not pull {key!r}: {exc}") from exc
        return pulled.rootfs()

    @sdk.function(cache="never")
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the entry under")],
        dir: Annotated[dagger.Directory, Doc("The volume's contents")],  # API name, shadows a builtin
    ) -> None:
        """Save ``dir`` under ``key`` as the CLI does: layers the registry already has are not
        uploaded again, and the tag moves last.

        ``dir`` is copied into this function's container and saved there by the core. When the
        registry is ``immutable`` and the tag exists, nothing is copied or saved (logged).
        """
        tag = tag_for_key(key)
        if self.immutable and await self._exists(tag):
            where = f"{self._reference().location}:{tag}"
            report(f"export key={key!r}: {where} exists and the cache is immutable, kept it")
            return
        store = await self._store()
        try:
            async with exported(dir) as tree:
                result = await save(
                    store, key, tree, compression=self._compression(), platforms=self._platforms(),
                    immutable=self.immutable,
                )  # fmt: skip
        except RemoteCacheError as exc:
            raise RemoteCacheError(f"remote-cache: cannot save {key!r} in {store.location}: {exc}") from exc
        finally:
            await store.aclose()
        report(f"export key={key!r}: {result.summary()}")

    @sdk.function(cache="never")
    async def entries(
        self,
        prefix: Annotated[str, Doc("Only keys (or tags) starting with this")] = "",
        json_: Annotated[bool, Doc("JSON lines instead of a table")] = False,
    ) -> str:
        """The entries in the repository, newest first: key, created, size, files, tag."""
        async with aclosing(await self._store()) as store:
            return await listed(store, prefix, json_)

    @sdk.function(cache="never")
    async def remove(
        self,
        key: Annotated[str, Doc("Cache key of the entry to delete")],
        with_copies: Annotated[
            bool, Doc("Also remove the other tags naming the same manifest (copies made with skopeo copy)")
        ] = False,
    ) -> str:
        """Delete the entry under ``key`` (the registry must allow deletes).

        A registry deletes a manifest with every tag naming it, so an entry another tag copies is
        refused unless ``with_copies``, which removes them together.
        """
        async with aclosing(await self._store()) as store:
            return await removed(store, key, None, with_copies=with_copies)

    @sdk.function(cache="never")
    async def prune(
        self,
        older_than: Annotated[str, Doc("Only entries older than this, e.g. 7d, 12h, 2w")] = "",
        keep: Annotated[int, Doc("Keep this many newest entries (per the prefix); 0: no such rule")] = 0,
        prefix: Annotated[str, Doc("Only keys starting with this, e.g. npm-feature-")] = "",
        dry_run: Annotated[bool, Doc("List what would be deleted, delete nothing")] = False,
    ) -> str:
        """Delete old entries: those outside the ``keep`` newest AND older than ``older_than``.

        At least one of older_than, keep or prefix is needed. Entries with no creation time are
        never removed by age. The registry must allow deletes (ttl.sh expires tags by name instead).
        """
        age = duration("older_than", older_than)
        async with aclosing(await self._store()) as store:
            return await pruned(store, older_than=age, keep=keep, prefix=prefix, dry_run=dry_run, grace=None)

    def _reference(self) -> Reference:
        return parse_reference(f"{self.address}/{self.repo}")

    def _compression(self) -> str:
        """The core's name for ``compression`` (checked by ``registry()``)."""
        return COMPRESSIONS[self.compression]

    def _platforms(self) -> list[Platform]:
        return [Platform.parse(p) for p in self.platforms]

    async def _store(self) -> RegistryStore:
        """A core registry client for this repository, with the credentials given."""
        credentials = None
        if self.password is not None:
            credentials = Credentials(self.username, await self.password.plaintext())
        return RegistryStore.from_reference(
            self._reference(), credentials=credentials, plain_http=True if self.plain_http else None
        )

    async def _exists(self, tag: str) -> bool:
        try:
            await self._resolve(tag)
        except CacheMiss:
            return False
        return True

    async def _resolve(self, reference: str) -> str:
        """The digest under a tag (or a digest's own), asked of the registry (a miss raises CacheMiss)."""
        store = await self._store()
        try:
            descriptor = await store.resolve(reference)
        except CacheMiss:
            raise  # its message starts with MISS_MARKER: the miss signal across modules
        except RemoteCacheError as exc:
            raise RemoteCacheError(f"remote-cache: cannot read {store.location}:{reference}: {exc}") from exc
        finally:
            await store.aclose()
        return descriptor.digest

    def _authed(self, ctr: dagger.Container) -> dagger.Container:
        """``ctr`` with the credentials for the engine's own pulls.

        The engine keys registry credentials by host alone (``auth/registry.go``,
        ``parseAuthAddress``: ``registry:5000/acme/x`` would become ``docker.io``): pass the host.
        """
        if self.password is None:
            return ctr
        return ctr.with_registry_auth(self._reference().host, self.username, self.password)
