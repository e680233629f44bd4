"""The ``torch`` backend of ``causal_conv1d``: ``F.conv1d`` and its backward kernels, on every
device, in x's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """The torch backend's forward: the definition on a contiguous, left-padded copy of x.

    ``F.conv1d``'s own ``padding`` argument would save that copy, but its kernel is several
    times slower on the CPU than the unpadded one, and copies x anyway when x is transposed.
    """
    if x.shape[2] == 0:
        return x.new_empty(x.shape)
    out = F.conv1d(_left_padded(x, weight), weight.unsqueeze(1), bias, groups=weight.shape[0])
    return F.silu(out, inplace=True) if silu else out


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) by the kernels autograd runs for the definition, in x's dtype: SiLU's
    backward on the recomputed pre-activation, then the convolution's on the padded copy of x.
    dx is a view that drops the padding's gradient (not contiguous)."""
    channels, taps = weight.shape
    if x.shape[2] == 0:
        dbias = None if bias is None else torch.zeros_like(bias)
        return torch.zeros_like(x), torch.zeros_like(weight), dbias
    w = weight.unsqueeze(1)
    padded = _left_padded(x, weight)
    dpre = dout
    if silu:
        dpre = torch.ops.aten.silu_backward(dout, F.conv1d(padded, w, bias, groups=channels))
    bias_sizes = None if bias is None else [channels]
    mask = [True, True, bias is not None]
    dpadded, dweight, dbias = torch.ops.aten.convolution_backward(
        dpre, padded, w, bias_sizes, [1], [0], [1], False, [0], channels, mask
    )
    return dpadded[..., taps - 1 :], dweight.squeeze(1), dbias


def _left_padded(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, D, L) with K - 1 zeros before the first step: (B, D, L + K - 1), contiguous."""
    return F.pad(x, (weight.shape[1] - 1, 0))
