"""The Backend interface: where volume contents are stored under a key."""

from __future__ import annotations

from typing import Annotated, Protocol

import dagger
from dagger import Doc

from . import sdk

__all__ = ["Backend"]


@sdk.interface
class Backend(Protocol):
    """Storage for volume contents under a key. Any object with these three functions fits.

    The contract:

    * ``resolve(key, restore_keys)`` picks the entry to restore: ``key`` itself when it exists,
      else, for each restore key in order, the newest entry whose key starts with it; ``""`` on
      a miss. It returns the chosen entry's key (the caller treats anything but ``key`` as a
      fallback). Make it ``cache="session"`` so every session asks the storage again.
    * ``import(key)`` returns the contents under an existing key. A missing key must fail with
      an error whose message contains ``remote-cache: cache miss:`` (errors cross modules as
      text; the entry may vanish between resolve and import); any other failure is a real error.
    * ``export(key, dir)`` stores ``dir`` under ``key``, replacing what was there (a backend may
      decline, e.g. an immutable one keeping the first entry; it should say so on stderr).
    """

    @sdk.function
    async def resolve(
        self,
        key: Annotated[str, Doc("Cache key wanted")],
        restore_keys: Annotated[
            list[str], Doc("Key prefixes to fall back to, in order; the newest match of each wins")
        ],
    ) -> str:
        """The key of the entry to restore: ``key``, a fallback's key, or "" for a miss."""
        ...

    @sdk.function
    def import_(self, key: Annotated[str, Doc("Cache key of the entry to restore")]) -> dagger.Directory:
        """The contents stored under ``key``."""
        ...

    @sdk.function
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the contents under")],
        dir: Annotated[dagger.Directory, Doc("The contents to store")],
    ) -> None:
        """Store ``dir`` under ``key``, replacing what was there."""
        ...
