"""The memory layout of ``causal_conv1d``'s output and of x's gradient: x's own layout."""

from __future__ import annotations

import torch

from zigzag_mamba.ops.utils import new_empty


def channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, D, L) is a transposed (B, L, D) tensor: channel stride 1, as the mixer's
    views of the in_proj output are."""
    return x.stride(1) == 1 and x.stride(2) != 1


def empty_in_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, D, L) tensor in x's layout: channels last (a transposed, contiguous
    (B, L, D) tensor) when :func:`channels_last`, else contiguous. Poisoned inside
    :func:`~zigzag_mamba.ops.utils.poisoned_outputs`."""
    batch, channels, length = x.shape
    dtype = x.dtype if dtype is None else dtype
    if channels_last(x):
        return new_empty((batch, length, channels), dtype, x.device).transpose(1, 2)
    return new_empty((batch, channels, length), dtype, x.device)


def in_layout_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (x's shape) with the strides of :func:`empty_in_layout`: itself if it has them,
    else a copy."""
    like = empty_in_layout(x, t.dtype)
    if t.stride() == like.stride():
        return t
    return like.copy_(t)
