"""The definition of the mixer's SSM branch: the public ops composed, differentiated by autograd
(which keeps every intermediate for the backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.selective_scan import selective_scan


def ssm_branch_reference(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    reverse: bool = False,
) -> torch.Tensor:
    """conv + SiLU -> x_proj -> dt_proj -> selective scan gated by z; see ``ssm_branch``."""
    if reverse:
        weights = (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias)
        return ssm_branch_reference(xz.flip(1), *weights).flip(-1)
    rank, n_state = dt_proj_weight.shape[1], A.shape[1]
    x, z = split_xz(xz)
    u = causal_conv1d(x, conv_weight, conv_bias, activation="silu")
    # Token-major projections, read by the scan as channel-major views (no copies).
    dt, B, C = F.linear(u.transpose(1, 2), x_proj_weight).split([rank, n_state, n_state], dim=-1)
    delta = F.linear(dt, dt_proj_weight)
    return selective_scan(
        u,
        delta.transpose(1, 2),
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=True,
    )


def split_xz(xz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, E, L) views x and z of the in_proj output xz (B, L, 2E).

    Split along the channels of the transposed view, so that autograd's backward of the split is
    one cat of two (B, E, L) gradients, in (B, 2E, L) order, which the in_proj's backward reads
    as a transposed operand (no copies).
    """
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    return x, z
