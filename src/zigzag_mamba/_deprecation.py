"""Old argument names that keep working, with a DeprecationWarning (docs/design.md, "Names")."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def rename_keys(
    values: Mapping[str, Any], renames: Mapping[str, str], owner: str, *, stacklevel: int = 3
) -> dict[str, Any]:
    """``values`` with each old key of ``renames`` moved to its new name, warning once per key."""
    out = dict(values)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(f"{owner} got both {old!r} (its old name) and {new!r}")
        warnings.warn(
            f"{owner}: {old!r} is now called {new!r}", DeprecationWarning, stacklevel=stacklevel
        )
        out[new] = out.pop(old)
    return out


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword argument (``old="new"``) under its new name, with a warning."""

    def decorate(fn: F) -> F:
        owner = fn.__qualname__.removesuffix(".__init__") + "()"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **rename_keys(kwargs, renames, owner, stacklevel=3))

        return wrapper  # type: ignore[return-value]

    return decorate


def deprecated_alias(new: Callable[..., Any], old_name: str) -> Callable[..., Any]:
    """A function named ``old_name`` that warns, then calls ``new`` with the same arguments."""
    new_name = new.__name__

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old_name} is now called {new_name}", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated name of :func:`{new_name}`."
    return alias
