"""The definition of the selective scan: a plain loop over time, differentiated by autograd.

Slow and obviously correct: every backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.selective_scan.inputs import expand_groups
from zigzag_mamba.ops.utils import compute_dtype


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of :mod:`zigzag_mamba.ops.selective_scan`, one step at a time.

    Same arguments, layouts and results as :func:`~zigzag_mamba.ops.selective_scan`.
    """
    out_dtype = u.dtype
    compute = compute_dtype(u)
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = expand_groups(B.to(compute), channels)
    C = expand_groups(C.to(compute), channels)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((state * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y
