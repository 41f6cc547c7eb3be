"""obstore's calls, made with its blocking API in worker threads.

obstore's ``*_async`` functions hand each result back from a tokio thread through
pyo3-async-runtimes (``call_soon_threadsafe``). When such a hand-back races interpreter shutdown,
the tokio thread needs the GIL, CPython ends it with ``pthread_exit`` inside Rust frames, and
the process aborts (SIGABRT, exit 134): seen in about 5% of short runs against moto, under gdb
in ``pyo3_async_runtimes::generic::set_result`` → ``take_gil`` (pyo3-async-runtimes issue #40).
The blocking API finishes on the calling thread (GIL released meanwhile), so nothing calls into
Python once the work is done: 0 aborts in 150 runs of the same script.

A blocking call cannot be interrupted, and holds its thread until the request ends (the stall
timeout; ten times that for an upload, see :mod:`.client`). So a cancelled caller (a signal,
``--deadline``) does not wait for it: the thread is abandoned and finishes on its own, or dies
with the process, which the CLI leaves with ``os._exit`` (no interpreter shutdown to race). A sink
is never called once its caller has gone (:class:`_Gate`): the file it writes may be closed.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import obstore

from ..store import guarded

if TYPE_CHECKING:
    from obstore.store import ObjectStore as ObstoreClient

__all__ = ["Calls"]

_T = TypeVar("_T")


async def _blocking(func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)


class _Abandoned(Exception):
    """Raised in an abandoned worker thread at its next chunk: nobody takes it any more."""


class _Gate:
    """A sink that a worker thread calls until :meth:`close`, which waits for a call in progress."""

    def __init__(self, sink: Callable[[memoryview], None]) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._open = True

    def __call__(self, chunk: memoryview) -> None:
        with self._lock:
            if not self._open:
                raise _Abandoned()
            self._sink(chunk)

    def close(self, *, blocking: bool = True) -> bool:
        """No call after this one; False (without ``blocking``) while a call is in progress."""
        if not self._lock.acquire(blocking=blocking):
            return False
        self._open = False
        self._lock.release()
        return True


class Calls:
    """The obstore operations the object store uses, awaitable, none on obstore's async path.

    Blob uploads go through ``uploads``, a client whose read timeout is longer (see
    :mod:`.client`): the HTTP client's read timeout also runs while a request body is sent.
    """

    def __init__(self, client: ObstoreClient, uploads: ObstoreClient) -> None:
        self._client = client
        self._uploads = uploads

    async def head(self, key: str) -> dict[str, Any]:
        return dict(await _blocking(obstore.head, self._client, key))

    async def get(self, key: str) -> bytes:
        return await _blocking(lambda: bytes(obstore.get(self._client, key).bytes()))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await _blocking(lambda: bytes(obstore.get_range(self._client, key, start=start, end=end)))

    async def put(self, key: str, data: Any, **options: Any) -> None:
        await _blocking(obstore.put, self._client, key, data, **options)

    async def upload(self, key: str, data: Any, **options: Any) -> None:
        await _blocking(obstore.put, self._uploads, key, data, **options)

    async def delete(self, keys: str | Sequence[str]) -> None:
        await _blocking(obstore.delete, self._client, keys)

    async def list(self, prefix: str) -> list[dict[str, Any]]:
        return [dict(m) for m in await _blocking(lambda: obstore.list(self._client, prefix).collect())]

    async def list_one(self, prefix: str) -> None:
        """The first page of a listing (at most one key), for its errors."""
        await _blocking(lambda: next(iter(obstore.list(self._client, prefix, chunk_size=1)), None))

    async def stream_into(self, key: str, sink: Callable[[memoryview], None], chunk: int = 1 << 20) -> None:
        """The object's bytes into ``sink``, all in one worker thread."""

        own = _Gate(guarded(sink))

        def run() -> None:
            for piece in obstore.get(self._client, key).stream(min_chunk_size=chunk):
                own(memoryview(piece))

        try:
            await _blocking(run)
        finally:
            # A chunk being written ends first (the caller may close the sink's file next), waited
            # for in a thread so that the event loop, and a second signal, are not held meanwhile.
            if not own.close(blocking=False):
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(own.close)

    async def stream(self, key: str, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object's bytes, about ``chunk`` at a time."""
        result = await _blocking(obstore.get, self._client, key)
        pieces = iter(result.stream(min_chunk_size=chunk))
        while (piece := await _blocking(next, pieces, None)) is not None:
            yield bytes(piece)
