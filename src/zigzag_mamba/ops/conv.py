"""Causal depthwise conv1d: ``out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - K + 1 + k]``.

On CUDA the causal-conv1d package's kernel runs when it imports (probed lazily, once) and
supports the kernel width (2 to 4 taps), except inside ``torch.compile``; everywhere else
``F.conv1d`` with K - 1 zeros of left padding and one group per channel. Both are differentiable
by autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")


@functools.cache
def _causal_conv1d_fn():
    """causal-conv1d's kernel, or None where the package is absent or fails to import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # absent, or built without CUDA: the F.conv1d path is exact anyway
        return None
    return causal_conv1d_fn


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The definition, as a grouped ``F.conv1d`` over the left-padded sequence."""
    out = F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return out if activation is None else F.silu(out)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution of x (B, D, L) with weight (D, K) and bias (D,).

    ``activation`` is None or "silu" (alias "swish"). Returns (B, D, L) in x's dtype.

    Example::

        >>> x, w = torch.randn(2, 8, 32), torch.randn(8, 4)
        >>> causal_conv1d(x, w, activation="silu").shape
        torch.Size([2, 8, 32])
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.shape[0] != x.shape[1] or weight.dim() != 2:
        shapes = f"{tuple(x.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected x (B, D, L) and weight (D, K), got {shapes}")
    # Under torch.compile the F.conv1d path runs: the package's kernel is opaque to the
    # compiler (it would break the graph), and the probe's import cannot be traced.
    compiling = torch.compiler.is_compiling()
    use_kernel = x.is_cuda and not compiling and 2 <= weight.shape[1] <= 4
    kernel = _causal_conv1d_fn() if use_kernel else None
    if kernel is not None:
        return kernel(x, weight, bias, activation)
    return causal_conv1d_reference(x, weight, bias, activation)
