"""Test helper: open a store from a reference and always close it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from remote_cache.reference import Reference
from remote_cache.store import Store
from remote_cache.stores import open_store


@asynccontextmanager
async def opened(ref: Reference) -> AsyncIterator[Store]:
    store = open_store(ref)
    try:
        yield store
    finally:
        await store.aclose()
