"""The ``causal_conv1d`` backend: the causal-conv1d package's CUDA kernel, when it imports.

Importing this module imports the package; the registry's probe does that lazily, so a missing
or CPU-only install only makes this backend unavailable. The kernel takes 2 to 4 taps. Its
autograd function is the package's only stable entry point, so the backward re-runs the
forward under autograd (one extra forward) rather than call its private kernels.
"""

from __future__ import annotations

import torch
from causal_conv1d import causal_conv1d_fn

__all__ = ["backward", "forward"]

MIN_TAPS, MAX_TAPS = 2, 4


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    return causal_conv1d_fn(x, weight, bias, activation="silu" if silu else None)


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        out = forward(*leaves, silu)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, dout))
    dx, dweight, dbias = (None if t is None else next(grads) for t in leaves)
    return dx, dweight, dbias
