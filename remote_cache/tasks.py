"""Task groups: which error a failed group reports.

anyio raises an ``ExceptionGroup`` holding the first failure and the cancellations it caused in
its sibling tasks (and, in restore, the echo of a failed download in the extraction task). A user
wants the one error that started it.
"""

from __future__ import annotations

import anyio

__all__ = ["first_error"]


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
