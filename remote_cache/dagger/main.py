"""The module's main object: makes remote-cached volumes and saves them back."""

from __future__ import annotations

import time
from typing import Annotated

import dagger
from dagger import Doc, dag

from ..errors import RemoteCacheError
from ..keys import tag_for_key, validate_key, validate_restore_keys
from ..units import format_bytes, parse_size
from . import scripts, sdk
from .backend import Backend
from .report import deadline, fail_open, report
from .toolbox import run_script, toolbox
from .volume import RemoteCacheVolume

__all__ = ["RemoteCache"]


@sdk.object_type
class RemoteCache:
    """Cache volumes that survive ephemeral engines: restored from and saved to a backend.

    Scoping caches to branches (trust): put the branch in the key and fall back to the default
    branch's entries, and let untrusted runs (forks, pull requests from outside) only read::

        cache = dag.remote_cache(backend, read_only=is_fork)
        ctr.with_(cache.cache_volume("/root/.npm", f"npm-{branch}-{lock_hash}",
                                     restore_keys=[f"npm-{branch}-", "npm-main-"]).mount)

    A branch then never overwrites another branch's entries, a new branch starts from main's
    newest entry, and a fork can use the cache without being able to poison it. With a registry
    backend, ``immutable=True`` also keeps the first entry written under each key.
    """

    backend: Annotated[Backend, Doc("Where entries are stored, e.g. dag.remote_backend().registry(...)")]
    strict: Annotated[
        bool,
        Doc("Fail when the backend fails (default: warn and carry on; a miss is never a failure)"),
    ] = False
    read_only: Annotated[
        bool,
        Doc("Restore but never save: export only logs (for untrusted runs such as forks)"),
    ] = False
    max_size: Annotated[
        str,
        Doc("Do not save a volume bigger than this on disk, e.g. 2GB or 500M (default: no limit)"),
    ] = ""
    timeout: Annotated[
        int,
        Doc(
            "Seconds each import (resolve and pull) and each export may take before it is "
            "abandoned (0: no limit)"
        ),
    ] = 600

    @sdk.function
    def cache_volume(
        self,
        path: Annotated[str, Doc("Absolute path to mount the volume at, e.g. /root/.npm")],
        key: Annotated[str, Doc("Cache key; put whatever invalidates the cache in it, e.g. a lockfile hash")],
        volume: Annotated[
            dagger.CacheVolume | None,
            Doc("Your own cache volume (default: one named after the key, in this module's namespace)"),
        ] = None,
        sharing: Annotated[dagger.CacheSharingMode | None, Doc("Sharing mode of the mount")] = None,
        owner: Annotated[str, Doc("user:group owning the volume when it is created")] = "",
        restore_keys: Annotated[
            list[str] | None,
            Doc(
                "Key prefixes to restore from when KEY has no entry, in order (the newest entry "
                "starting with each wins), e.g. npm-main- ; the volume is still saved under KEY"
            ),
        ] = None,
    ) -> RemoteCacheVolume:
        """A remote-cached volume; mount it with ``ctr.with_(vol.mount)``. Does no I/O.

        Restore keys work as in GitHub's actions/cache: with key ``npm-feature-abc123`` and
        restore keys ``["npm-feature-", "npm-main-"]`` a new lockfile still starts from the
        newest npm cache of the branch, else of main.
        """
        validate_key(key)
        if not path.startswith("/"):
            raise RemoteCacheError(f"remote-cache: path {path!r} must be absolute, e.g. /root/.npm")
        fallbacks = validate_restore_keys(restore_keys or [])
        self._max_kib()  # a bad max_size fails here, before any work
        return RemoteCacheVolume(
            path=path,
            key=key,
            volume=volume if volume is not None else dag.cache_volume(f"remote-cache-{tag_for_key(key)}"),
            restore_keys=fallbacks,
            backend=self.backend,
            sharing=sharing,
            owner=owner,
            strict=self.strict,
            timeout=self.timeout,
        )

    # NB: `ctr` must stay the only argument, so Go callers can write `.With(cache.Export)`.
    @sdk.function(cache="never")
    async def export(self, ctr: dagger.Container) -> dagger.Container:
        """Save every remote-cached volume mounted on ``ctr`` that changed since it was restored.

        Runs ``ctr``'s pipeline first (its commands are what fill the volumes). Returns ``ctr``
        unchanged: no labels, no env vars, nothing that could leak into an image you publish.
        Prints one line per volume: saved, unchanged, skipped (read-only, over max_size) or error.
        """
        max_kib = self._max_kib()
        await ctr.sync()
        for target in await ctr.mounts():
            if target.startswith(scripts.BOOKKEEPING_ROOT + "/"):
                await self._export_volume(ctr, target, max_kib)
        return ctr

    def _max_kib(self) -> int:
        """``max_size`` in KiB (what ``du -sk`` prints); 0 for no limit."""
        if not self.max_size:
            return 0
        try:
            size = parse_size(self.max_size)
        except ValueError as exc:
            raise RemoteCacheError(f"remote-cache: max_size: {exc}") from exc
        if size <= 0:
            raise RemoteCacheError(f"remote-cache: max_size {self.max_size!r} must be above zero")
        return max(1, size // 1024)

    async def _export_volume(self, ctr: dagger.Container, bookkeeping: str, max_kib: int) -> None:
        started = time.monotonic()
        key = path = "?"
        try:
            text = await ctr.file(f"{bookkeeping}/{scripts.VOLUME_FILE}").contents()
            key, path = scripts.parse_volume_record(text)
            if self.read_only:
                report(f"export key={key!r} path={path}: skipped: read-only")
                return
            state = scripts.state_file(key, path)
            # The copy goes into a mounted empty directory, so what the backend gets is a mount's
            # whole content, never a sub-path of the helper's root filesystem (publish would ship
            # that whole snapshot: core/container.go, getVariantRefs). See docs/engine.md.
            helper = toolbox(ctr).with_mounted_directory(scripts.OUT_DIR, dag.directory())
            copied = run_script(helper, scripts.COPY_OUT, path, scripts.OUT_DIR, state, str(max_kib))
            status = scripts.parse_status(await copied.stdout())
            if status.state == "too-big":
                size = format_bytes((status.kib or 0) * 1024)
                what = f"volume for key {key!r} at {path} is {size} on disk, over max_size {self.max_size}"
                if self.strict:
                    raise RemoteCacheError(f"remote-cache: {what}; raise max_size or cache less")
                outcome = f"skipped: {size} is over max_size {self.max_size}"
            elif status.changed:
                with deadline(self.timeout):
                    await self.backend.export(key, copied.directory(scripts.OUT_DIR))
                await run_script(toolbox(ctr), scripts.RECORD, status.listing, state).sync()
                outcome = "saved"
            else:
                outcome = "unchanged, not uploaded"
        except (dagger.DaggerError, ValueError, TimeoutError) as exc:
            what = f"could not export key {key!r} from {path}"
            if isinstance(exc, TimeoutError):
                what = f"export of key {key!r} from {path} timed out after {self.timeout}s"
            fail_open(what, exc, strict=self.strict, then="skipped")
            outcome = "error"
        report(f"export key={key!r} path={path}: {outcome} in {time.monotonic() - started:.1f}s")
