"""The arguments of the two stages, and what their backwards keep, as named tuples.

Backends take these tuples, so no argument list is typed out twice; the custom ops in
:mod:`zigzag_mamba.ops.mixer_io` spell them out flat, as ``torch.library`` requires.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class MixerIn(NamedTuple):
    """``mixer_in``'s arguments: h (B, L, D); residual (B, L, D) in the compute dtype, or None;
    norm_weight (D,); shift, scale (B, D) or None; order, inverse (L,) or None; eps."""

    h: Tensor
    residual: Tensor | None
    norm_weight: Tensor
    shift: Tensor | None
    scale: Tensor | None
    order: Tensor | None
    inverse: Tensor | None
    eps: float


class MixerInSaved(NamedTuple):
    """What ``mixer_in``'s backward needs: the new residual (an output) and the inputs it reads."""

    residual_out: Tensor
    norm_weight: Tensor
    shift: Tensor | None
    scale: Tensor | None
    order: Tensor | None
    inverse: Tensor | None
    has_residual: bool
    eps: float


class MixerOut(NamedTuple):
    """``mixer_out``'s arguments: h_norm (B, L, D); gate (B, D) or None; y (B, L, D) in the
    mixer's order; order, inverse (L,) or None."""

    h_norm: Tensor
    gate: Tensor | None
    y: Tensor
    order: Tensor | None
    inverse: Tensor | None


class MixerOutSaved(NamedTuple):
    """What ``mixer_out``'s backward needs."""

    gate: Tensor | None
    y: Tensor
    order: Tensor | None
    inverse: Tensor | None
