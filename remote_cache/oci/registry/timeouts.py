"""How long a registry exchange may wait, per phase of a request."""

from __future__ import annotations

from msgspec import Struct

__all__ = ["DEFAULT_TIMEOUTS", "Timeouts"]


class Timeouts(Struct, frozen=True):
    """Seconds allowed per phase of a request; ``read`` bounds each wait for more bytes."""

    connect: float = 10.0
    read: float = 60.0
    #: Each wait for the other end to take more of a request body.
    write: float = 60.0

    @classmethod
    def of(cls, value: float | Timeouts | None) -> Timeouts:
        """``None`` -> defaults; a number -> that many seconds for every phase."""
        if value is None:
            return DEFAULT_TIMEOUTS
        if isinstance(value, Timeouts):
            return value
        return cls(connect=float(value), read=float(value), write=float(value))


DEFAULT_TIMEOUTS = Timeouts()
