"""The definitions of the two stages around the mixer, in plain PyTorch, differentiated by
autograd. They compute in fp32 (float64 for float64 inputs) and round once at the end."""

from __future__ import annotations

import torch

from zigzag_mamba.ops.permute.pytorch import gather_tokens as gather
from zigzag_mamba.ops.utils import compute_dtype


def per_sample(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, D) -> (B, 1, D), broadcasting one row per sample over the tokens."""
    return v.to(dtype)[:, None]


def mixer_in_reference(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    order: torch.Tensor | None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition of :func:`~zigzag_mamba.ops.mixer_in` (differentiable by autograd)."""
    compute = compute_dtype(h)
    r = h.to(compute, copy=True) if residual is None else residual + h.to(compute)
    y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(compute)
    # copy: with no shift/scale/order, x would otherwise be the same tensor as h_norm.
    h_norm = y.to(h.dtype, copy=True)
    if scale is not None:
        y = y * (1 + per_sample(scale, compute))
    if shift is not None:
        y = y + per_sample(shift, compute)
    x = y.to(h.dtype)
    return r, h_norm, x if order is None else gather(x, order)


def mixer_out_reference(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor,
    inverse: torch.Tensor | None,
) -> torch.Tensor:
    """The definition of :func:`~zigzag_mamba.ops.mixer_out` (differentiable by autograd)."""
    compute = compute_dtype(h_norm)
    y = y.to(compute) if inverse is None else gather(y.to(compute), inverse)
    if gate is not None:
        y = y * per_sample(gate, compute)
    return (h_norm.to(compute) + y).to(h_norm.dtype)
