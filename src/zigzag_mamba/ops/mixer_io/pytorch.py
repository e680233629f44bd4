"""The ``torch`` backend of the two stages: the definitions forward, and their backward
formulas written out by hand, as the kernels' are. Everything is computed in fp32 (float64 for
float64 inputs) and rounded once at the end."""

from __future__ import annotations

import torch

from zigzag_mamba.ops.mixer_io.inputs import MixerIn, MixerInSaved, MixerOut, MixerOutSaved
from zigzag_mamba.ops.mixer_io.reference import (
    gather,
    mixer_in_reference,
    mixer_out_reference,
    per_sample,
)
from zigzag_mamba.ops.utils import compute_dtype


def _contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The fake rules promise contiguous outputs; elementwise math would follow input strides."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def mixer_in_forward(a: MixerIn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, residual = _contiguous(a.h, a.residual)
    return mixer_in_reference(h, residual, a.norm_weight, a.shift, a.scale, a.order, a.eps)


def mixer_in_backward(
    saved: MixerInSaved, g_residual: torch.Tensor, g_h_norm: torch.Tensor, g_x: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (h, residual, norm_weight, shift, scale) of ``mixer_in``, by hand (None for
    absent inputs).

    With r the summed residual, n = r * rstd, y = n * w and x = y * (1 + scale) + shift:
    dy = dh_norm + unpermute(dx) * (1 + scale), dn = dy * w and, RMSNorm's own backward,
    dr = rstd * (dn - n * mean(dn * n)) + dresidual_out.
    """
    g_residual, g_h_norm, g_x = _contiguous(g_residual, g_h_norm, g_x)
    r, compute = saved.residual_out, saved.residual_out.dtype
    shift, scale = saved.shift, saved.scale
    rstd = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + saved.eps)
    n = r * rstd
    w = saved.norm_weight.to(compute)
    inverse = saved.inverse
    g_x = g_x.to(compute) if inverse is None else gather(g_x.to(compute), inverse)
    g_shift = None if shift is None else g_x.sum(1).to(shift.dtype)
    g_scale = None if scale is None else (g_x * n * w).sum(1).to(scale.dtype)
    if scale is not None:
        g_x = g_x * (1 + per_sample(scale, compute))
    g_y = g_h_norm.to(compute) + g_x
    g_weight = (g_y * n).sum((0, 1)).to(saved.norm_weight.dtype)
    g_n = g_y * w
    g_r = rstd * (g_n - n * (g_n * n).mean(-1, keepdim=True)) + g_residual
    # Outputs may not alias each other, hence the copy when h is float32 like the residual.
    g_h = g_r.to(g_h_norm.dtype, copy=True)
    return g_h, g_r if saved.has_residual else None, g_weight, g_shift, g_scale


def mixer_out_forward(a: MixerOut) -> torch.Tensor:
    h_norm, y = _contiguous(a.h_norm, a.y)
    return mixer_out_reference(h_norm, a.gate, y, a.inverse)


def mixer_out_backward(
    saved: MixerOutSaved, g_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients (y, gate) of ``mixer_out``: dy = permute(gate * dout), dgate = sum(dout * y)."""
    g_out, y = _contiguous(g_out, saved.y)
    gate, order, inverse = saved.gate, saved.order, saved.inverse
    compute = compute_dtype(g_out)
    g = g_out.to(compute)
    g_gate = None
    if gate is not None:
        y_natural = y.to(compute) if inverse is None else gather(y.to(compute), inverse)
        g_gate = (g * y_natural).sum(1).to(gate.dtype)
        g = g * per_sample(gate, compute)
    # copy: without gate and order, g_y would otherwise be the input g_out itself.
    g_y = g.to(y.dtype, copy=True) if order is None else gather(g, order).to(y.dtype)
    return g_y, g_gate
