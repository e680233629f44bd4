"""Argument checks shared by the modules' constructors, with messages that name the argument."""

from __future__ import annotations

import numbers

import torch


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_positive(name: str, value: object) -> float:
    """``value`` if it is a real number > 0, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def dtype_mismatch(x: torch.Tensor, weight: torch.Tensor, owner: str) -> TypeError:
    """The error for inputs of another dtype than a module's weights, naming both dtypes and the
    ways to make them meet (PyTorch's own says only ``expected m1 and m2 to have the same
    dtype``). Raised from the failing call, so that hooks that cast weights (autocast,
    diffusers' layerwise casting) are never in the way."""
    given, kind = (str(t.dtype).removeprefix("torch.") for t in (x, weight))
    return TypeError(
        f"{owner} got {given} inputs, but its weights are {kind}: cast the inputs "
        f"(x.to(torch.{kind})), cast the module (.to(torch.{given})), or run it under "
        "torch.autocast"
    )
