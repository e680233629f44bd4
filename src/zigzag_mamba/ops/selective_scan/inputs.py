"""The selective scan's inputs and gradients as named tuples, and the one check of their shapes.

Backends take a :class:`ScanInputs` and return a :class:`ScanGrads`, so no argument list is
typed out twice; only the custom-op boundary in :mod:`zigzag_mamba.ops.selective_scan` spells
the inputs out flat, as ``torch.library`` requires.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ScanInputs(NamedTuple):
    """The arguments of ``selective_scan``, in mamba_ssm's order and layouts.

    Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L), or grouped (B, G, N, L) with
    D % G == 0 (channel d reads group d // (D / G)); D, delta_bias (D,).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    z: Tensor | None
    delta_bias: Tensor | None
    delta_softplus: bool

    @property
    def tensors(self) -> tuple[Tensor | None, ...]:
        """The eight tensor inputs, in order (None for absent optional ones)."""
        return tuple(self[:8])

    @property
    def groups(self) -> int:
        """How many groups of channels share one row of B and C (1 when ungrouped)."""
        return self.B.shape[1] if self.B.dim() == 4 else 1


class ScanGrads(NamedTuple):
    """Gradients of the eight tensor inputs; None for absent optional inputs."""

    du: Tensor
    ddelta: Tensor
    dA: Tensor
    dB: Tensor
    dC: Tensor
    dD: Tensor | None
    dz: Tensor | None
    ddelta_bias: Tensor | None


NAMES = ScanInputs._fields[:8]


def check_inputs(x: ScanInputs) -> None:
    """Raise an error naming the argument that does not fit the others.

    A TypeError for an integer or bool tensor (an integer ``u`` would be scanned in integer
    arithmetic and truncated); a ValueError for a tensor on another device than ``u`` (a
    ``meta`` tensor among CPU tensors would run the shape-only kernel and return uninitialised
    memory) or of the wrong shape. Reads only metadata, so it is cheap and traceable.
    """
    _check_dtypes_and_devices(x)
    u, delta, A, B, C, D, z, delta_bias = x.tensors
    if u.dim() != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("u, delta (and z) must share one shape (B, D, L)")
    n_batch, n_chan, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != n_chan:
        raise ValueError(f"A must be real with shape (D, N) = ({n_chan}, N), got {tuple(A.shape)}")
    for name, bc in (("B", B), ("C", C)):
        n_group = bc.shape[1] if bc.dim() == 4 else 1
        expected = (n_batch, *((n_group,) if bc.dim() == 4 else ()), A.shape[1], length)
        if tuple(bc.shape) != expected or n_chan % n_group:
            raise ValueError(
                f"{name} must have shape (B, N, L) or (B, G, N, L) with D % G == 0, "
                f"got {tuple(bc.shape)} for u {tuple(u.shape)} and A {tuple(A.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (n_chan,):
            raise ValueError(f"{name} must have shape ({n_chan},), got {tuple(vec.shape)}")


def _check_dtypes_and_devices(x: ScanInputs) -> None:
    for name, tensor in zip(NAMES, x.tensors, strict=True):
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        # A complex A gets the shape check's message ("A must be real") below.
        if not (tensor.is_floating_point() or (name == "A" and tensor.is_complex())):
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.u.device:
            raise ValueError(
                f"every selective_scan input must be on u's device ({x.u.device}); "
                f"{name} is on {tensor.device}"
            )


def expand_groups(bc: Tensor, channels: int) -> Tensor:
    """(B, N, L) -> (B, 1, N, L); (B, G, N, L) -> (B, D, N, L), channel d in group d // (D/G)."""
    if bc.dim() == 3:
        return bc.unsqueeze(1)
    return bc.repeat_interleave(channels // bc.shape[1], dim=1)


def zeros_like_state(x: ScanInputs, dtype: torch.dtype) -> Tensor:
    """A zero state (B, D, N) for these inputs."""
    return x.u.new_zeros((x.u.shape[0], x.u.shape[1], x.A.shape[1]), dtype=dtype)
