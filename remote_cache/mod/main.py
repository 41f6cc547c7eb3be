"""The module's main object: makes remote-cached volumes and saves them back."""

from __future__ import annotations

import time
from typing import Annotated

import dagger
from dagger import Doc, dag

from .. import scripts
from ..errors import RemoteCacheError
from ..keys import tag_for_key, validate_key
from . import _sdk
from ._toolbox import report, run_script, toolbox
from .backend import Backend
from .volume import RemoteCacheVolume

__all__ = ["RemoteCache"]


@_sdk.object_type
class RemoteCache:
    """Cache volumes that survive ephemeral engines: restored from and saved to a backend."""

    backend: Annotated[Backend, Doc("Where entries are stored, e.g. dag.remote_backend().registry(...)")]
    strict: Annotated[
        bool,
        Doc("Fail when the backend fails (default: warn and carry on; a miss is never a failure)"),
    ] = False

    @_sdk.function
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
    ) -> RemoteCacheVolume:
        """A remote-cached volume; mount it with ``ctr.with_(vol.mount)``. Does no I/O."""
        validate_key(key)
        if not path.startswith("/"):
            raise RemoteCacheError(f"remote-cache: path {path!r} must be absolute, e.g. /root/.npm")
        return RemoteCacheVolume(
            path=path,
            key=key,
            volume=volume if volume is not None else dag.cache_volume(f"remote-cache-{tag_for_key(key)}"),
            backend=self.backend,
            sharing=sharing,
            owner=owner,
            strict=self.strict,
        )

    # NB: `ctr` must stay the only argument, so Go callers can write `.With(cache.Export)`.
    @_sdk.function(cache="never")
    async def export(self, ctr: dagger.Container) -> dagger.Container:
        """Save every remote-cached volume mounted on ``ctr`` that changed since it was restored.

        Runs ``ctr``'s pipeline first (its commands are what fill the volumes). Returns ``ctr``
        unchanged: no labels, no env vars, nothing that could leak into an image you publish.
        """
        await ctr.sync()
        for target in await ctr.mounts():
            if target.startswith(scripts.BOOKKEEPING_ROOT + "/"):
                await self._export_volume(ctr, target)
        return ctr

    async def _export_volume(self, ctr: dagger.Container, bookkeeping: str) -> None:
        started = time.monotonic()
        key = path = "?"
        try:
            text = await ctr.file(f"{bookkeeping}/{scripts.VOLUME_FILE}").contents()
            key, path = scripts.parse_volume_record(text)
            state = scripts.state_file(key, path)
            copied = run_script(toolbox(ctr), scripts.COPY_OUT, path, scripts.OUT_DIR, state)
            changed, listing = scripts.parse_status(await copied.stdout())
            if changed:
                await self.backend.export(key, copied.directory(scripts.OUT_DIR))
                await run_script(toolbox(ctr), scripts.RECORD, listing, state).sync()
                outcome = "saved"
            else:
                outcome = "unchanged, not uploaded"
        except (dagger.DaggerError, ValueError) as exc:
            what = f"could not export key {key!r} from {path}"
            if self.strict:
                raise RemoteCacheError(f"remote-cache: {what}: {exc}") from exc
            text = str(exc).strip()
            report(f"warning: {what}, skipped: {text.splitlines()[0] if text else type(exc).__name__}")
            outcome = "error"
        report(f"export key={key!r} path={path}: {outcome} in {time.monotonic() - started:.1f}s")
