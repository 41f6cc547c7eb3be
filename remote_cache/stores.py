"""Open the :class:`~remote_cache.store.Store` a reference names, registry or layout alike.

The CLI and the Dagger backend call :func:`open_store` and never care which kind they got.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

# Each kind of store is imported only when asked for: the registry client pulls in httpx, which
# a layout-only run (and the CLI's start-up) need not pay for.
if TYPE_CHECKING:
    from .reference import Reference
    from .store import Store

__all__ = ["open_store"]


def open_store(
    reference: Reference,
    *,
    username: str | None = None,
    password: str | None = None,
    plain_http: bool | None = None,
    timeout: float | None = None,
) -> Store:
    """A store for ``HOST/REPO`` (credentials resolved as in docker) or ``oci:DIR`` (created on write).

    ``plain_http`` None means plain HTTP for loopback registries only; ``timeout`` is seconds.
    The reference's key is ignored here. Close the store with ``await store.aclose()``.
    """
    if reference.transport == "layout":
        from .layout import LayoutStore

        assert reference.path is not None
        return LayoutStore(Path(reference.path).expanduser())
    from .credentials import resolve_credentials
    from .registry import RegistryStore

    credentials = resolve_credentials(reference.host, username=username, password=password)
    return RegistryStore.from_reference(
        reference, credentials=credentials, plain_http=plain_http, timeout=timeout
    )
