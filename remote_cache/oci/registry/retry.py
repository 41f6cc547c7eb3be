"""Retries: one rule for what is worth trying again, one backoff, used by every registry operation.

The rule (:func:`is_temporary`): a timeout or a dropped connection
(:class:`~remote_cache.errors.RegistryUnreachable` with ``temporary``), a 408/429/5xx answer, and
an upload session the registry lost (``BLOB_UPLOAD_UNKNOWN``). Refused connections, DNS and TLS
failures, auth errors and other answers are final. The backoff is exponential with jitter, or
the ``Retry-After`` the registry sent (capped). The transport retries each request
(:meth:`RetryPolicy.call`, under the auth handshake); a blob download resumes where it stopped
and an upload starts over, each with the same rule and budget (:meth:`RetryPolicy.pause`).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from msgspec import Struct

from ...errors import RegistryError, StoreError, StoreUnreachable

__all__ = ["RETRY_STATUS", "RetryPolicy", "is_temporary"]

#: Answers worth asking again: request timeout, too many requests, server errors.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


def is_temporary(exc: BaseException) -> bool:
    """True when trying again may succeed (see the module docstring)."""
    if isinstance(exc, StoreUnreachable):
        return exc.temporary
    if isinstance(exc, RegistryError):
        return exc.status in RETRY_STATUS or exc.code == "BLOB_UPLOAD_UNKNOWN"
    return False


class RetryPolicy(Struct, frozen=True):
    """How often and how patiently to try again: ``retries`` more attempts after the first."""

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): ``Retry-After`` or backoff with jitter."""
        if retry_after:
            seconds: float | None = None
            try:
                seconds = float(retry_after)
            except ValueError:
                try:
                    seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
                except (TypeError, ValueError):
                    seconds = None
            if seconds is not None:
                return min(max(seconds, 0.0), self.max_retry_after)
        base = min(self.max_backoff, self.backoff * (2.0**attempt))
        return base * (0.5 + random.random() / 2)  # jitter: 50-100 % of the backoff

    async def pause(self, attempt: int, exc: StoreError) -> None:
        """Sleep before retry ``attempt`` after ``exc``; re-raise ``exc`` if final or out of budget."""
        if attempt >= self.retries or not is_temporary(exc):
            raise exc
        retry_after = exc.retry_after if isinstance(exc, RegistryError) else None
        await anyio.sleep(self.delay(attempt, retry_after))

    async def call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """``await operation()``, tried again on temporary failures within the budget."""
        attempt = 0
        while True:
            try:
                return await operation()
            except StoreError as exc:
                await self.pause(attempt, exc)
                attempt += 1
