"""A remote-cached volume: mounts like a cache volume, seeded from the backend on a cold engine."""

from __future__ import annotations

import time

import dagger
from dagger import dag

from ..errors import MISS_MARKER
from . import scripts, sdk
from .backend import Backend
from .report import deadline, fail_open, report
from .toolbox import mount_cache, run_script, toolbox

__all__ = ["RemoteCacheVolume"]


@sdk.object_type
class RemoteCacheVolume:
    """A cache volume whose contents are restored from a backend under a key."""

    path: str = sdk.field()
    key: str = sdk.field()
    volume: dagger.CacheVolume = sdk.field()
    restore_keys: list[str] = sdk.field(default=list)
    backend: Backend
    sharing: dagger.CacheSharingMode | None = None
    owner: str = ""
    strict: bool = False
    timeout: int = 600

    # NB: `ctr` must stay the only argument, so Go callers can write `.With(vol.Mount)`.
    @sdk.function(cache="session")
    async def mount(self, ctr: dagger.Container) -> dagger.Container:
        """Mount the volume on ``ctr`` at its path, first restoring the backend's copy into it if it is empty.

        The backend resolves the key (exact, else the newest entry matching a restore key) and
        the chosen entry is imported. A missing entry is a miss (start cold); other failures,
        and an import slower than the cache's ``timeout``, print one warning and go on with the
        volume as it is, unless the cache was made with ``strict``.
        """
        started = time.monotonic()
        mounted = mount_cache(ctr, self.path, self.volume, self.sharing, self.owner)
        state = scripts.state_file(self.key, self.path)
        outcome = "miss"
        source: dagger.Directory | None = None
        exact = True
        try:
            with deadline(self.timeout):
                matched = await self.backend.resolve(self.key, list(self.restore_keys))
                if matched:
                    imported = self.backend.import_(matched)
                    await imported.sync()
                    source, exact = imported, matched == self.key
                    outcome = "hit" if exact else f"fallback hit (from {matched!r})"
        except dagger.DaggerError as exc:
            if MISS_MARKER not in str(exc):
                outcome = "error"
                self._fail(f"could not import key {self.key!r}", exc)
        except TimeoutError as exc:
            outcome = "error"
            self._fail(f"import of key {self.key!r} timed out after {self.timeout}s", exc)

        steps = toolbox(mounted)
        if source is not None:
            # After a fallback the exact key has no entry yet: record nothing, so export uploads.
            steps = run_script(
                steps.with_mounted_directory(scripts.SRC_DIR, source, read_only=True),
                scripts.SEED,
                scripts.SRC_DIR,
                self.path,
                state,
                "record" if exact else "forget",
            )
        else:
            # Nothing trustworthy was imported: forget what was recorded, so export uploads.
            steps = run_script(steps, scripts.FORGET, state)
        try:
            await steps.sync()
        except dagger.DaggerError as exc:
            outcome = "error"
            self._fail(f"could not restore key {self.key!r} into {self.path}", exc)

        report(f"import key={self.key!r} path={self.path}: {outcome} in {time.monotonic() - started:.1f}s")
        record = dag.directory().with_new_file(
            scripts.VOLUME_FILE, scripts.volume_record(self.key, self.path)
        )
        return mounted.with_mounted_directory(scripts.bookkeeping_dir(self.path), record, read_only=True)

    def _fail(self, what: str, exc: Exception) -> None:
        """Raise when strict, else warn once and carry on (fail-open)."""
        fail_open(what, exc, strict=self.strict, then="continuing without it")
