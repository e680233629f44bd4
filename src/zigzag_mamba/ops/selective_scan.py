"""Mamba-1 selective scan with the semantics and layouts of mamba_ssm's ``selective_scan_fn``.

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L) with D % G == 0;
D, delta_bias (D,); last state (B, D, N). The state recurrence, per channel d and state n::

    dt[t]   = softplus(delta[t] + delta_bias)          (softplus optional)
    x[t]    = exp(dt[t] * A[d, n]) * x[t-1] + dt[t] * B[n, t] * u[t]
    y[t]    = sum_n x[t] * C[n, t] + D[d] * u[t]        then  y * silu(z)   (z optional)

Accumulation is in fp32 (float64 stays float64); the output has u's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(bc: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, L) -> (B, 1, N, L); (B, G, N, L) -> (B, D, N, L) with channel d in group d // (D/G)."""
    if bc.dim() == 3:
        return bc.unsqueeze(1)
    groups = bc.shape[1]
    return bc.repeat_interleave(channels // groups, dim=1)


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
    """A plain sequential loop over L: slow, obviously correct, differentiable by autograd."""
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = _expand_groups(B.to(compute), channels)
    C = _expand_groups(C.to(compute), channels)
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
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y
