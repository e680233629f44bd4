"""The SSM branch's inputs as one named tuple, so that no argument list is written out twice;
only the custom-op boundary in :mod:`zigzag_mamba.ops.ssm_branch` spells them out flat."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class BranchInputs(NamedTuple):
    """``ssm_branch``'s tensor inputs: xz (B, L, 2E) the in_proj output; conv_weight (E, K) and
    conv_bias (E,) or None; x_proj_weight (R + 2N, E); dt_proj_weight (E, R); A (E, N); D and
    delta_bias (E,) or None."""

    xz: Tensor
    conv_weight: Tensor
    conv_bias: Tensor | None
    x_proj_weight: Tensor
    dt_proj_weight: Tensor
    A: Tensor
    D: Tensor | None
    delta_bias: Tensor | None
