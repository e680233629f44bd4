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


def check_dtype(x: torch.Tensor, weight: torch.Tensor, owner: str) -> None:
    """Tokens in the dtype of the module's weights, unless autocast casts them: a TypeError that
    names both dtypes and the two ways to make them meet (PyTorch's own error says only
    ``expected m1 and m2 to have the same dtype``)."""
    if x.dtype == weight.dtype or not x.is_floating_point():
        return
    if torch.is_autocast_enabled(x.device.type):
        return
    kind = str(weight.dtype).removeprefix("torch.")
    raise TypeError(
        f"{owner} got {str(x.dtype).removeprefix('torch.')} inputs, but its weights are {kind}: "
        f"cast the inputs (x.to(torch.{kind})), cast the module (.to(torch."
        f"{str(x.dtype).removeprefix('torch.')})), or run it under torch.autocast"
    )
