"""The registry backend: each cache key is a tag, each entry a plain OCI image of the volume."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import dagger
from dagger import Doc, dag

from remote_cache.cache import entries as core_entries
from remote_cache.cache.image import ANNOTATION_KEY, ANNOTATION_TOOL
from remote_cache.dagger import sdk
from remote_cache.dagger.report import report
from remote_cache.errors import CacheMiss, RemoteCacheError
from remote_cache.keys import tag_for_key, validate_key
from remote_cache.oci.credentials import Credentials
from remote_cache.oci.media import ANNOTATION_CREATED
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.registry import RegistryStore
from remote_cache.units import format_time, parse_duration
from remote_cache.version import TOOL

__all__ = ["Registry"]

_TOOL = f"{TOOL} (dagger)"


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
        store = await self._store()
        try:
            match = await core_entries.find_entry(store, key, restore_keys)
        except RemoteCacheError as exc:
            raise RemoteCacheError(
                f"remote-cache: cannot look up {key!r} in {store.location}: {exc}"
            ) from exc
        finally:
            await store.aclose()
        return "" if match is None else match.key

    @sdk.function(cache="session")
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

    @sdk.function(cache="never")
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the entry under")],
        dir: Annotated[dagger.Directory, Doc("The volume's contents")],  # API name, shadows a builtin
    ) -> None:
        """Publish ``dir`` as ``ADDRESS/REPO:TAG``, one variant per platform, as credentials allow.

        When the registry is ``immutable`` and the tag exists, nothing is published (logged).
        """
        tag = tag_for_key(key)
        if self.immutable and await self._exists(tag):
            report(
                f"export key={key!r}: {self.address}/{self.repo}:{tag} exists and the cache is "
                "immutable, kept it"
            )
            return
        created = format_time(datetime.now(UTC))
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

    @sdk.function(cache="never")
    async def entries(
        self,
        prefix: Annotated[str, Doc("Only keys (or tags) starting with this")] = "",
        json_: Annotated[bool, Doc("JSON lines instead of a table")] = False,
    ) -> str:
        """The entries in the repository, newest first: key, created, size, files, tag."""
        store = await self._store()
        try:
            found = await core_entries.list_entries(store, prefix=prefix)
        except RemoteCacheError as exc:
            raise RemoteCacheError(f"remote-cache: cannot list {store.location}: {exc}") from exc
        finally:
            await store.aclose()
        if json_:
            return "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in found)
        if not found:
            return f"no entries in {self.address}/{self.repo}" + (
                f" starting with {prefix!r}" if prefix else ""
            )
        return core_entries.format_table(found)

    @sdk.function(cache="never")
    async def remove(self, key: Annotated[str, Doc("Cache key of the entry to delete")]) -> str:
        """Delete the entry under ``key`` (the registry must allow deletes)."""
        validate_key(key)
        store = await self._store()
        try:
            entry = await core_entries.remove(store, key)
        finally:
            await store.aclose()
        return f"removed {entry.key} (tag {entry.tag}, {entry.digest})"

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
        try:
            age = parse_duration(older_than) if older_than else None
        except ValueError as exc:
            raise RemoteCacheError(f"remote-cache: older_than: {exc}") from exc
        store = await self._store()
        try:
            gone = await core_entries.prune(
                store, older_than=age, keep=keep or None, prefix=prefix, dry_run=dry_run
            )
        except ValueError as exc:  # the core refuses a prune with no rule, or a negative keep
            raise RemoteCacheError(f"remote-cache: {exc}") from exc
        finally:
            await store.aclose()
        verb = "would remove" if dry_run else "removed"
        head = f"{verb} {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} from {self.address}/{self.repo}"
        return head if not gone else f"{head}:\n{core_entries.format_table(gone)}"

    async def _store(self) -> RegistryStore:
        """A core registry client for this repository, with the credentials given."""
        credentials = None
        if self.password is not None:
            credentials = Credentials(self.username, await self.password.plaintext())
        ref = parse_reference(f"{self.address}/{self.repo}")
        return RegistryStore.from_reference(
            ref, credentials=credentials, plain_http=True if self.plain_http else None
        )

    async def _exists(self, tag: str) -> bool:
        try:
            await self._resolve(tag)
        except CacheMiss:
            return False
        return True

    async def _resolve(self, tag: str) -> str:
        """The digest under ``tag``, asked of the registry directly (a miss raises CacheMiss)."""
        store = await self._store()
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
