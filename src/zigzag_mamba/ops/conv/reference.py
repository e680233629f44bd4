"""The definition of the causal depthwise conv1d, and its ``torch`` backend: ``F.conv1d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.utils import compute_dtype


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """A grouped ``F.conv1d`` over the sequence padded with K - 1 zeros on the left."""
    length = x.shape[2]
    # An empty sequence gets one more zero on the right (conv1d needs K inputs); its one output
    # is then cut off, which keeps the empty result attached to the graph.
    padded = F.pad(x, (weight.shape[1] - 1, int(length == 0)))
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[1])[..., :length]
    return out if activation is None else F.silu(out)


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """The torch backend's forward: the definition itself, in x's dtype."""
    return causal_conv1d_reference(x, weight, bias, "silu" if silu else None)


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) in their inputs' dtypes, computed in fp32 (float64 stays float64).

    With ``g`` the pre-activation's gradient: dx is the convolution of ``g`` with the reversed
    taps, padded on the right; ``dweight[:, k]`` sums ``g`` times x shifted by ``K - 1 - k``.
    """
    dtype = compute_dtype(x)
    channels, taps = weight.shape
    length = x.shape[2]
    if length == 0:
        dbias = None if bias is None else torch.zeros_like(bias)
        return torch.zeros_like(x), torch.zeros_like(weight), dbias
    x_pad = F.pad(x.to(dtype), (taps - 1, 0))
    w = weight.to(dtype)
    g = dout.to(dtype)
    if silu:  # recompute the pre-activation: silu'(p) = s (1 + p (1 - s)), s = sigmoid(p)
        pre = F.conv1d(x_pad, w.unsqueeze(1), None if bias is None else bias.to(dtype),
                       groups=channels)  # fmt: skip
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
        del pre, sig
    dx = F.conv1d(F.pad(g, (0, taps - 1)), w.flip(-1).unsqueeze(1), groups=channels)
    dweight = torch.stack([(g * x_pad[..., k : k + length]).sum((0, 2)) for k in range(taps)], 1)
    dbias = None if bias is None else g.sum((0, 2)).to(bias.dtype)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias
