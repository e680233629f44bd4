"""Causal depthwise conv1d: ``out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - K + 1 + k]``.

Backends (registry op ``"causal_conv1d"``): the causal-conv1d package's CUDA kernel
(:mod:`.causal_conv1d`) when it imports and supports the kernel width (2 to 4 taps), except
inside ``torch.compile``; everywhere else ``F.conv1d`` with K - 1 zeros of left padding and one
group per channel (:mod:`.reference`). Both are differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zigzag_mamba.ops.backends import PORTABLE, backend_module, register_backend, resolve
from zigzag_mamba.ops.conv.reference import causal_conv1d_reference

__all__ = ["causal_conv1d", "causal_conv1d_reference"]

OP = "causal_conv1d"
_ACTIVATIONS = (None, "silu", "swish")

register_backend(OP, "causal_conv1d", f"{__name__}.causal_conv1d", ("cuda",))
register_backend(OP, "torch", f"{__name__}.reference", ("cpu", "cuda", "mps", "xpu"))


def _kernel(x: torch.Tensor, taps: int) -> Callable[..., torch.Tensor]:
    # Under torch.compile the F.conv1d path runs: the package's kernel is opaque to the compiler
    # (it would break the graph), and the registry's lazy probe cannot be traced.
    if torch.compiler.is_compiling():
        return causal_conv1d_reference
    name = resolve(OP, x.device.type)
    # The package's kernel takes 2 to 4 taps, and is not known to take empty sequences.
    if name != PORTABLE and (not 2 <= taps <= 4 or x.shape[2] == 0):
        name = PORTABLE
    return backend_module(OP, name).causal_conv1d


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
    return _kernel(x, weight.shape[1])(x, weight, bias, activation)
