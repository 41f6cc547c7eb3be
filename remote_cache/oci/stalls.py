"""The stall rule every remote store follows: no bytes and no answer for the stall timeout is a
stall, and the retries after stalls share one budget.

Each request waits at most the stall timeout for its next bytes (a long healthy transfer is never
cut). A store that stalls is given one more stall period to make progress, whatever its requests
do meanwhile — retries, other requests in parallel, later phases of the same command: once it
has sent nothing for :data:`BUDGET_PERIODS` stall periods in a row, every request fails at once.
So with the default 60 s, a store that accepts connections and never answers fails the step in
about two minutes, where 16 requests each waiting out their own retries took 971 s.
"""

from __future__ import annotations

import time

__all__ = ["BUDGET_PERIODS", "GIVING_UP", "Stalls"]

#: Stall periods without progress after which a store is given up on.
BUDGET_PERIODS = 2.0
#: How every stalled request's final error ends, whichever kind of store stalled.
GIVING_UP = "retries included: giving up (--timeout sets the stall timeout)"


class Stalls:
    """One store's stall budget, shared by all its requests (see the module docstring)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.budget = period * BUDGET_PERIODS
        self._since: float | None = None
        #: Where the latest stall happened, when not at the store itself (a place a registry
        #: sent requests to); None otherwise.
        self.place: str | None = None

    def progressed(self) -> None:
        """Something arrived: the store is not stalled."""
        self._since = None
        self.place = None

    def stalled(self, place: str | None = None) -> bool:
        """Record a request that waited out the stall timeout (at ``place``, when it was not the
        store itself); True while retrying may still help."""
        now = time.monotonic()
        if self._since is None:
            self._since = now - self.period  # the stall began a period ago
        self.place = place  # (where the latest was: what a refusal after it names)
        return now - self._since < self.budget

    def spent(self) -> None:
        """Record a request that waited out the stall timeout through retries taking the whole
        budget (an object store's client retries within it itself): nothing more is tried."""
        now = time.monotonic()
        self._since = now - self.budget if self._since is None else min(self._since, now - self.budget)

    def refusal(self, who: str) -> str | None:
        """Why a request must not even be sent, once the store has been stalled past the budget
        (the message starts with ``who``, e.g. ``registry ghcr.io``); None until then."""
        if self._since is None:
            return None
        stalled_for = time.monotonic() - self._since
        if stalled_for < self.budget:
            return None
        return f"{who} has sent nothing for {stalled_for:.0f}s, {GIVING_UP}"

    def gave_up(self, error: str) -> str:
        """``error`` (a request that waited out the stall timeout) as the final word on a store
        that has now sent nothing for the whole budget."""
        return f"{error}; it has sent nothing for {self.budget:g}s, {GIVING_UP}"
