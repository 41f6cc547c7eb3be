"""The S3 backend: each cache key is one tag object in a bucket, each entry the same layered
image the CLI writes (blobs by digest under the prefix).

Both directions run the core in this function's container: export copies the directory here
and saves it; import restores here and hands the tree to the engine (``local.imported``).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Annotated

import dagger
from dagger import Doc

from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.dagger import sdk
from remote_cache.dagger.report import report
from remote_cache.errors import CacheMiss, RemoteCacheError
from remote_cache.keys import tag_for_key
from remote_cache.oci.objectstore import ObjectStore, ObjectStoreOptions
from remote_cache.oci.reference import Reference, parse_reference

from .housekeeping import duration, listed, pruned, removed, resolved
from .local import exported, imported, scratch_dir
from .registry import COMPRESSIONS

__all__ = ["S3Bucket", "bucket_options"]


def bucket_options(
    endpoint: str,
    region: str,
    plain_http: bool,
    sse: str,
    sse_kms_key_id: str,
    storage_class: str,
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
) -> ObjectStoreOptions:
    """The core's options for a bucket (``""``: unset; no credentials: the environment's)."""
    return ObjectStoreOptions(
        endpoint=endpoint or None,
        region=region or None,
        plain_http=plain_http,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        session_token=session_token,
        encryption=sse,
        kms_key_id=sse_kms_key_id,
        storage_class=storage_class,
    )


@sdk.object_type
class S3Bucket:
    """A prefix in an S3 (or S3-compatible) bucket storing remote-cache entries.

    Besides the Backend functions (resolve, import, export) it has housekeeping: ``entries``,
    ``remove`` and ``prune``, which also free the blobs no entry uses any more (those a save
    relied on within ``grace`` stay). With ``immutable`` an existing key is never overwritten
    (a conditional create; on servers that ignore it, a check first: see the README).
    """

    bucket: str = sdk.field()
    prefix: str = sdk.field(default="")
    region: str = sdk.field(default="")
    endpoint: str = sdk.field(default="")
    access_key_id: dagger.Secret | None = None
    secret_access_key: dagger.Secret | None = None
    session_token: dagger.Secret | None = None
    compression: dagger.ImageLayerCompression = dagger.ImageLayerCompression.Zstd
    immutable: bool = False
    plain_http: bool = False
    sse: str = ""
    sse_kms_key_id: str = ""
    storage_class: str = ""

    @sdk.function(cache="session")
    async def resolve(
        self,
        key: Annotated[str, Doc("Cache key wanted")],
        restore_keys: Annotated[
            list[str], Doc("Key prefixes to fall back to, in order; the newest match of each wins")
        ],
    ) -> str:
        """The key of the entry to restore: ``key`` itself, a restore key's newest match, or "" (miss)."""
        async with aclosing(await self._store()) as store:
            return await resolved(store, key, restore_keys)

    @sdk.function(cache="session")
    async def import_(
        self, key: Annotated[str, Doc("Cache key of the entry to restore")]
    ) -> dagger.Directory:
        """The entry stored under ``key``, restored by the core in this function's container (sizes
        and digests checked) and handed to the engine with its owners.

        A missing entry fails with a message containing ``remote-cache: cache miss:``.
        """
        store = await self._store()
        try:
            async with scratch_dir() as scratch:
                result = await restore(store, key, scratch / "tree", record_state=False)
                directory = await imported(scratch / "tree", scratch / "owners")
        except CacheMiss:
            raise  # its message starts with MISS_MARKER: the miss signal across modules
        except RemoteCacheError as exc:
            raise RemoteCacheError(
                f"remote-cache: cannot restore {key!r} from {store.location}: {exc}"
            ) from exc
        finally:
            await store.aclose()
        report(f"import key={key!r}: {result.summary()}")
        return directory

    @sdk.function(cache="never")
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the entry under")],
        dir: Annotated[dagger.Directory, Doc("The volume's contents")],  # API name, shadows a builtin
    ) -> None:
        """Save ``dir`` under ``key`` as the CLI does: blobs the bucket has are not uploaded again,
        and the tag object is written last. With ``immutable`` and the key taken, nothing is copied."""
        store = await self._store()
        try:
            if self.immutable and await self._exists(store, tag_for_key(key)):
                report(f"export key={key!r}: {store.location} holds it and the cache is immutable, kept it")
                return
            async with exported(dir) as tree:
                result = await save(
                    store, key, tree, compression=COMPRESSIONS[self.compression], immutable=self.immutable
                )
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
        """The entries under the prefix, newest first: key, created, size, files, tag."""
        async with aclosing(await self._store()) as store:
            return await listed(store, prefix, json_)

    @sdk.function(cache="never")
    async def remove(
        self,
        key: Annotated[str, Doc("Cache key of the entry to delete")],
        grace: Annotated[str, Doc("Blobs a save relied on this recently stay, e.g. 1h, 0s")] = "1h",
    ) -> str:
        """Delete the entry under ``key``, then the blobs no entry uses (outside ``grace``)."""
        async with aclosing(await self._store()) as store:
            return await removed(store, key, duration("grace", grace))

    @sdk.function(cache="never")
    async def prune(
        self,
        older_than: Annotated[str, Doc("Only entries older than this, e.g. 7d, 12h, 2w")] = "",
        keep: Annotated[int, Doc("Keep this many newest entries (per the prefix); 0: no such rule")] = 0,
        prefix: Annotated[str, Doc("Only keys starting with this, e.g. npm-feature-")] = "",
        dry_run: Annotated[bool, Doc("List what would be deleted, delete nothing")] = False,
        grace: Annotated[str, Doc("Blobs a save relied on this recently stay, e.g. 1h, 0s")] = "1h",
    ) -> str:
        """Delete old entries (outside the ``keep`` newest AND older than ``older_than``), then the
        blobs no entry uses. At least one of older_than, keep or prefix is needed."""
        age, grace_period = duration("older_than", older_than), duration("grace", grace)
        async with aclosing(await self._store()) as store:
            return await pruned(
                store, older_than=age, keep=keep, prefix=prefix, dry_run=dry_run, grace=grace_period
            )

    def _reference(self) -> Reference:
        return parse_reference(f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else ""))

    async def _store(self) -> ObjectStore:
        """A core client for this bucket, with the credentials given (the environment's otherwise)."""

        async def plain(secret: dagger.Secret | None) -> str | None:
            return await secret.plaintext() if secret is not None else None

        options = bucket_options(
            self.endpoint,
            self.region,
            self.plain_http,
            self.sse,
            self.sse_kms_key_id,
            self.storage_class,
            access_key_id=await plain(self.access_key_id),
            secret_access_key=await plain(self.secret_access_key),
            session_token=await plain(self.session_token),
        )
        return ObjectStore(self._reference(), options)

    @staticmethod
    async def _exists(store: ObjectStore, tag: str) -> bool:
        try:
            await store.resolve(tag)
        except CacheMiss:
            return False
        return True
