"""The definition of the selective scan: a plain loop over time, differentiated by autograd.

Slow and obviously correct: every backend is tested against it. As the backend ``"reference"``
(what runs when that backend is forced inside ``torch.compile``, where :func:`selective_scan`
cannot step around its custom op), :func:`forward` runs the loop and keeps the state entering
every chunk, and :func:`backward` differentiates the loop with autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs, expand_groups
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
    x = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y, state, _ = _loop(x, chunk=None)
    return (y, state) if return_last_state else y


def _loop(
    x: ScanInputs, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(out in u's dtype, last state, the states entering every ``chunk`` steps)."""
    u, delta, A, B, C, D, z, delta_bias = x.tensors
    out_dtype = u.dtype
    compute = compute_dtype(u)
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = expand_groups(B.to(compute), channels)
    C = expand_groups(C.to(compute), channels)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if x.delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys, checkpoints = [], []
    for t in range(u.shape[2]):
        if chunk is not None and t % chunk == 0:
            checkpoints.append(state)
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((state * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype), state, checkpoints


def forward(x: ScanInputs, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, last state, checkpoints (B, D, ceil(L / chunk), N)), as every backend returns."""
    y, state, checkpoints = _loop(x, chunk)
    return y.contiguous(), state, torch.stack(checkpoints, dim=2)


def backward(
    x: ScanInputs,
    checkpoints: torch.Tensor,
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    chunk: int,
) -> ScanGrads:
    """The gradients of the loop, by ``torch.func.vjp`` (the checkpoints are not needed).

    A custom op's implementation runs below autograd, where ``torch.autograd.grad`` would see
    no graph; functorch's transform differentiates there.
    """
    present = [t for t in x.tensors if t is not None]

    def loop(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        given = iter(tensors)
        inputs = [None if t is None else next(given) for t in x.tensors]
        y, state, _ = _loop(ScanInputs(*inputs, x.delta_softplus), chunk=None)
        return y, state

    (y, state), vjp = torch.func.vjp(loop, *present)
    grads = iter(vjp((dout.to(y.dtype), torch.zeros_like(state) if dlast is None else dlast)))
    return ScanGrads(*(None if t is None else next(grads) for t in x.tensors))
