"""Record classes: msgspec ``Struct`` subclasses, and what dataclasses did per field that they do not.

Every command pays for its record classes before it does anything: Python 3.11 compiles each
dataclass's generated methods when its module is imported (~1.2 ms a frozen class on a 2-vCPU VM,
~45 ms for the 38 a save imports; the save after a restore took 1/0.915 as long with them), where
a ``Struct`` class is built in C in microseconds (README "Speed"). A ``Struct`` has no per-field
``repr`` or ``compare``: the records that hide a field (a secret, a bulky member) or leave one out
of their identity take their ``__repr__`` and ``__rich_repr__`` (:func:`hiding`), ``__eq__`` and
``__hash__`` (:func:`ignoring`) from these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from msgspec import Struct

__all__ = ["compared", "hiding", "ignoring"]


def hiding(*hidden: str) -> tuple[Callable[[Any], str], Callable[[Any], list[tuple[str, Any]]]]:
    """``__repr__`` and ``__rich_repr__`` for a record that shows every field but ``hidden``, as
    dataclasses' ``field(repr=False)`` did: a Struct's own ``__rich_repr__`` lists every field, and
    rich's pretty printer and its tracebacks' locals read it before ``__repr__``."""

    def __rich_repr__(record: Any) -> list[tuple[str, Any]]:
        return [(name, getattr(record, name)) for name in record.__struct_fields__ if name not in hidden]

    def __repr__(record: Any) -> str:
        values = ", ".join(f"{name}={value!r}" for name, value in __rich_repr__(record))
        return f"{type(record).__name__}({values})"

    return __repr__, __rich_repr__


def ignoring(*ignored: str) -> tuple[Callable[[Any, object], bool], Callable[[Any], int]]:
    """``__eq__`` and ``__hash__`` for a record identified by every field but ``ignored``, as
    dataclasses' ``field(compare=False)`` did (a record of another class: ``NotImplemented``)."""

    def __eq__(record: Any, other: object) -> Any:
        if type(other) is not type(record):
            return NotImplemented
        return compared(record, ignored) == compared(other, ignored)  # type: ignore[arg-type]

    def __hash__(record: Any) -> int:
        return hash(compared(record, ignored))

    return __eq__, __hash__


def compared(record: Struct, ignored: Collection[str]) -> tuple[Any, ...]:
    """The values that identify ``record``: every field but the ``ignored`` ones, in order."""
    return tuple(getattr(record, n) for n in record.__struct_fields__ if n not in ignored)
