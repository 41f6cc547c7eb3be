"""Walk-through of remote-cache: a message written into a remote-cached volume survives a new engine.

dagger call -m ./example --repo <unique-name> check-cache    # CACHE MISS
dagger call -m ./example --repo <unique-name> prime-cache    # saves "Hello, world"
dagger -m core function call engine local-cache prune      # forget every volume (a fresh engine)
dagger call -m ./example --repo <unique-name> check-cache    # Hello, world
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import dagger
from dagger import Doc, dag

IMAGE = "alpine:3.22.2@sha256:4b7ce07002c69e8f3d704a9c5d6fd3053be500b7f1c69fc0d80990c2ad8dd412"
MOUNT = "/cache"
_F = TypeVar("_F", bound=Callable[..., Any])


def uncached(fn: _F) -> _F:
    """``@dagger.function(cache="never")``: run on every call, since volume contents are no input.

    (A plain alias: dagger-io 0.21.8's type hints for ``function`` leave out ``cache``.)
    """
    decorate: Callable[..., Callable[[_F], _F]] = dagger.function
    return decorate(cache="never")(fn)


@dagger.object_type
class Example:
    """Check and prime a remote-cached volume holding one message."""

    repo: Annotated[str, Doc("Repository for the cache entries, e.g. my-name/remote-cache-demo")]
    registry: Annotated[str, Doc("Registry host; ttl.sh needs no account")] = "ttl.sh"
    cache_key: Annotated[str, Doc("Cache key; on ttl.sh the tag is also the entry's lifetime")] = "1h"
    username: Annotated[str, Doc("Registry username")] = ""
    password: Annotated[dagger.Secret | None, Doc("Registry password or token")] = None
    plain_http: Annotated[bool, Doc("The registry speaks plain HTTP (and the engine allows it)")] = False

    @uncached
    async def check_cache(self) -> str:
        """The message in the cached volume, or CACHE MISS."""
        ctr = (
            dag.container()
            .from_(IMAGE)
            .with_(self._volume().mount)
            .with_env_variable("NONCE", secrets.token_hex(8))  # run every time: volumes are not inputs
            .with_exec(["sh", "-c", f"cat {MOUNT}/message 2>/dev/null || echo 'CACHE MISS'"])
        )
        return (await ctr.stdout()).strip()

    @uncached
    async def prime_cache(self, msg: Annotated[str, Doc("Message to keep")] = "Hello, world") -> str:
        """Write ``msg`` into the cached volume and save it to the registry."""
        ctr = (
            dag.container()
            .from_(IMAGE)
            .with_(self._volume().mount)
            .with_env_variable("NONCE", secrets.token_hex(8))
            .with_exec(["sh", "-c", f'printf "%s\\n" "$1" > {MOUNT}/message', "sh", msg])
        )
        await ctr.with_(self._cache().export).sync()
        return f"saved {msg!r} under key {self.cache_key!r} in {self.registry}/{self.repo}"

    def _cache(self) -> Any:
        # `dag.remote_backend()` and `dag.remote_cache()` are generated inside the engine from
        # this module's dependencies; the dagger-io package used for type checking lacks them.
        api = cast(Any, dag)
        backend = api.remote_backend().registry(
            self.registry,
            self.repo,
            username=self.username,
            password=self.password,
            plain_http=self.plain_http,
        )
        return api.remote_cache(backend)

    def _volume(self) -> Any:
        # One local volume per registry/repo/key: the default volume is named after the key
        # alone, and a warm engine keeps a volume's content, so a new --repo would otherwise
        # show an earlier run's message instead of CACHE MISS.
        scope = hashlib.sha256(f"{self.registry}/{self.repo}:{self.cache_key}".encode()).hexdigest()
        volume = dag.cache_volume(f"remote-cache-example-{scope[:16]}")
        return self._cache().cache_volume(MOUNT, self.cache_key, volume=volume)
