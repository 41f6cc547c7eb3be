"""Record classes: msgspec ``Struct`` subclasses, and what dataclasses did per field that they do not.

Every command pays for its record classes before it does anything: Python 3.11 compiles each
dataclass's generated methods when its module is imported (~1.2 ms a frozen class on a 2-CPU CI
machine, ~45 ms for the 38 one save imports, a sixth of the save after a restore), where a
``Struct`` class is built in C in microseconds (README "Speed"). A ``Struct`` has no per-field
``repr`` or ``compare``: the records that hide a field (a secret, a bulky member) or leave one out
of their identity define ``__repr__``, ``__eq__`` and ``__hash__`` with these helpers.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from msgspec import Struct

__all__ = ["compared", "shown"]


def shown(record: Struct, hidden: Collection[str]) -> str:
    """``Name(field=value, ...)`` as a dataclass shows it, without the ``hidden`` fields."""
    values = ", ".join(f"{n}={getattr(record, n)!r}" for n in record.__struct_fields__ if n not in hidden)
    return f"{type(record).__name__}({values})"


def compared(record: Struct, ignored: Collection[str]) -> tuple[Any, ...]:
    """The values that identify ``record``: every field but the ``ignored`` ones, in order."""
    return tuple(getattr(record, n) for n in record.__struct_fields__ if n not in ignored)
