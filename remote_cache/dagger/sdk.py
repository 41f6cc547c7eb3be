"""The SDK's decorators, typed for mypy; at runtime they are dagger-io's own objects.

dagger-io 0.21.8's decorators do not type-check under mypy: their type variables come from
``typing_extensions`` with ``infer_variance`` (mypy reads every decorated function as returning
an unsolved ``R?``), ``dataclass_transform`` sits on a bound method mypy does not follow (object
constructors take no arguments), and the ``function`` overloads leave out ``cache``. These
declarations state what the decorators really do, so the code using them is checked for real.

Importing this module registers nothing: ``remote-backend`` uses it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["field", "function", "interface", "object_type"]

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform, overload

    _F = TypeVar("_F", bound=Callable[..., Any])
    _T = TypeVar("_T", bound=type)

    def field(
        *,
        default: Any = ...,
        name: str | None = None,
        init: bool = True,
        deprecated: str | None = None,
    ) -> Any: ...

    @overload
    def function(func: _F, /) -> _F: ...
    @overload
    def function(
        *,
        name: str | None = None,
        doc: str | None = None,
        cache: str | None = None,
        deprecated: str | None = None,
    ) -> Callable[[_F], _F]: ...
    def function(*args: Any, **kwargs: Any) -> Any: ...

    @dataclass_transform(kw_only_default=True, field_specifiers=(field,))
    def object_type(cls: _T, /) -> _T: ...

    def interface(cls: _T, /) -> _T: ...

else:
    from dagger import field, function, interface, object_type
