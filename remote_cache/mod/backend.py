"""The Backend interface: where volume contents are stored under a key."""

from __future__ import annotations

from typing import Annotated, Protocol

import dagger
from dagger import Doc

from . import _sdk

__all__ = ["Backend"]


@_sdk.interface
class Backend(Protocol):
    """Storage for volume contents under a key. Any object with these two functions fits.

    A missing key must fail ``import`` with an error whose message contains
    ``remote-cache: cache miss:`` (errors cross modules as text); any other failure is a real error.
    """

    @_sdk.function
    def import_(self, key: Annotated[str, Doc("Cache key of the entry to restore")]) -> dagger.Directory:
        """The contents stored under ``key``."""
        ...

    @_sdk.function
    async def export(
        self,
        key: Annotated[str, Doc("Cache key to store the contents under")],
        dir: Annotated[dagger.Directory, Doc("The contents to store")],
    ) -> None:
        """Store ``dir`` under ``key``, replacing what was there."""
        ...
