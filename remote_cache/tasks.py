"""Task groups: which error a failed group reports, and running one coroutine over many items.

anyio raises an ``ExceptionGroup`` holding the first failure and the cancellations it caused in
its sibling tasks (and, in restore, the echo of a failed download in the extraction task). A user
wants the one error that started it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import anyio

__all__ = ["first_error", "for_each"]

_T = TypeVar("_T")


def first_error(
    group: BaseExceptionGroup[BaseException], *, ignore: tuple[type[BaseException], ...] = ()
) -> BaseException:
    """The error to report from a task group: the first real one, not a cancellation or an echo."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for exc in leaves:
        if not isinstance(exc, (cancelled, *ignore)):
            return exc
    return leaves[0] if leaves else group


async def for_each(items: Iterable[_T], func: Callable[[_T], Awaitable[object]], *, jobs: int) -> None:
    """``await func(item)`` for every item, ``jobs`` at a time; the first failure is raised as itself."""
    limiter = anyio.Semaphore(max(1, jobs))

    async def one(item: _T) -> None:
        async with limiter:
            await func(item)

    try:
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
