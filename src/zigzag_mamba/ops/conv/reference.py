"""The definition of the causal depthwise conv1d, and its ``torch`` backend: ``F.conv1d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """The torch backend's forward: the definition, with the padding done by ``F.conv1d`` (K - 1
    zeros on both sides; the last K - 1 outputs are dropped), so x is not copied."""
    channels, taps = weight.shape
    length = x.shape[2]
    if length == 0:
        return x.new_empty(x.shape)
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=taps - 1, groups=channels)[..., :length]
    return F.silu(out) if silu else out


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) by the kernels autograd runs for the definition, in x's dtype: SiLU's
    backward on the recomputed pre-activation, then the convolution's.

    The causal convolution is the first L outputs of the convolution padded with K - 1 zeros on
    both sides, so its gradient is that convolution's, with a gradient of zero for the last K - 1
    outputs. The pre-activation's gradient is written straight into that padded buffer.
    """
    channels, taps = weight.shape
    length = x.shape[2]
    if length == 0:
        dbias = None if bias is None else torch.zeros_like(bias)
        return torch.zeros_like(x), torch.zeros_like(weight), dbias
    w = weight.unsqueeze(1)
    g = x.new_zeros((x.shape[0], channels, length + taps - 1))
    if silu:
        pre = F.conv1d(x, w, bias, padding=taps - 1, groups=channels)[..., :length]
        torch.ops.aten.silu_backward.grad_input(dout, pre, grad_input=g[..., :length])
        del pre
    else:
        g[..., :length] = dout
    bias_sizes = None if bias is None else [channels]
    mask = [True, True, bias is not None]
    dx, dweight, dbias = torch.ops.aten.convolution_backward(
        g, x, w, bias_sizes, [1], [taps - 1], [1], False, [0], channels, mask
    )
    return dx, dweight.squeeze(1), dbias
