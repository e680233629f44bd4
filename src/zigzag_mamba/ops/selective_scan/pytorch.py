"""The ``torch`` backend of the selective scan: chunked PyTorch with a hand-written backward.

It runs on every device, and takes over from the kernels for dtypes they do not take. Inside,
every sequence-long tensor is laid out time-major, (L, b, G, P) and (L, b, G, N), so that one
step of one chunk is one contiguous block. The forward scans ``chunk`` steps at a time,
vectorised over batch, channels and state except for one fused multiply-add per step on such a
block, and keeps the state entering each chunk (checkpoints (B, D, ceil(L / chunk), N)); the
backward recomputes one chunk at a time from its checkpoint and runs the adjoint recurrence in
reverse, so memory stays O(B * D * L) plus one chunk's (chunk, B, D, N). The backward's symbols
(adj, carry, q, adj_b) are those derived in :mod:`zigzag_mamba.ops.selective_scan`.

Channels are viewed as (G, P): group g holds channels g * P .. (g + 1) * P - 1, which all read
B[:, g] and C[:, g].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.utils import compute_dtype


def _time_major(x: torch.Tensor, n_group: int) -> torch.Tensor:
    """(b, D, L) -> contiguous (L, b, G, P)."""
    return x.permute(2, 0, 1).reshape(x.shape[2], x.shape[0], n_group, -1).contiguous()


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """(L, b, G, P) -> (b, D, L), the inverse of :func:`_time_major` (a view)."""
    return x.flatten(2).permute(1, 2, 0)


def _time_major_bc(bc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, N, L) or (b, G, N, L) -> contiguous (L, b, G, N)."""
    grouped = bc if bc.dim() == 4 else bc.unsqueeze(1)
    return grouped.to(dtype).permute(3, 0, 1, 2).contiguous()


def _dt(delta, delta_bias, softplus, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dt and, under softplus, d dt / d delta (= sigmoid of the softplus argument)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if not softplus:
        return dt, None
    return F.softplus(dt), torch.sigmoid(dt)


class _Chunk(NamedTuple):
    decay: torch.Tensor  # exp(dt * A), (T, b, G, P, N)
    states: torch.Tensor  # state after each step, (T, b, G, P, N)
    dt: torch.Tensor  # (T, b, G, P)
    u: torch.Tensor  # (T, b, G, P)
    dtu: torch.Tensor  # dt * u, (T, b, G, P)
    B: torch.Tensor  # (T, b, G, N)
    C: torch.Tensor  # (T, b, G, N)


def _scan_chunk(dt, u, A, Bt, Ct, start, stop, state) -> _Chunk:
    """States of steps start..stop from ``state``, vectorised except for one fused op per step."""
    dt_c, u_c, B_c, C_c = dt[start:stop], u[start:stop], Bt[start:stop], Ct[start:stop]
    dtu = dt_c * u_c
    decay = torch.exp(dt_c.unsqueeze(-1) * A)
    states = dtu.unsqueeze(-1) * B_c.unsqueeze(-2)
    previous = state
    for i in range(stop - start):
        previous = states[i].addcmul_(decay[i], previous)
    return _Chunk(decay, states, dt_c, u_c, dtu, B_c, C_c)


def _readout(chunk: _Chunk) -> torch.Tensor:
    """C . state at each step: (T, b, G, P)."""
    return torch.matmul(chunk.states, chunk.C.unsqueeze(-1)).squeeze(-1)


def _prepare(x: ScanInputs, dtype: torch.dtype):
    """Time-major dt, u, B, C, A as (G, P, N), and d dt / d delta (channel-major, or None)."""
    Bt, Ct = _time_major_bc(x.B, dtype), _time_major_bc(x.C, dtype)
    n_group = Bt.shape[2]
    dt, dt_grad = _dt(x.delta, x.delta_bias, x.delta_softplus, dtype)
    Ag = x.A.to(dtype).reshape(n_group, -1, x.A.shape[1])
    return _time_major(dt, n_group), _time_major(x.u.to(dtype), n_group), Ag, Bt, Ct, dt_grad


def forward(x: ScanInputs, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out in u's dtype, last state, checkpoints), both in the compute dtype."""
    dtype = compute_dtype(x.u)
    dt, ut, Ag, Bt, Ct, _ = _prepare(x, dtype)
    length = x.u.shape[2]
    state = ut.new_zeros(*ut.shape[1:], x.A.shape[1])
    ys, ckpts = [], []
    for start in range(0, length, chunk):
        ckpts.append(state)
        steps = _scan_chunk(dt, ut, Ag, Bt, Ct, start, min(start + chunk, length), state)
        state = steps.states[-1]
        ys.append(_readout(steps))
    y = _skip_and_gate(_channel_major(_cat(ys, ut)), x.u, x.D, x.z, dtype)[0]
    ckpt = torch.stack(ckpts, 3).flatten(1, 2) if ckpts else state.new_empty(_no_chunks(x))
    return y.to(x.u.dtype).contiguous(), state.flatten(1, 2).clone(), ckpt


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The time-major chunks joined; an empty sequence has none."""
    return torch.cat(parts) if parts else like.new_zeros(like.shape)


def _no_chunks(x: ScanInputs) -> tuple[int, ...]:
    return (x.u.shape[0], x.u.shape[1], 0, x.A.shape[1])


def _skip_and_gate(y, u, D, z, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y + D u) * silu(z), and the gate's derivative factor y * silu'(z) (None without z)."""
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is None:
        return y, None
    zc = z.to(dtype)
    sig = torch.sigmoid(zc)
    return y * zc * sig, y * sig * (1 + zc * (1 - sig))


def backward(
    x: ScanInputs, checkpoints: Tensor, dout: Tensor, dlast: Tensor | None, chunk: int
) -> ScanGrads:
    """The gradients, in the compute dtype (B and C's in their own layouts)."""
    u, dtype = x.u, checkpoints.dtype
    dt, ut, Ag, Bt, Ct, dt_grad = _prepare(x, dtype)
    n_group, length = Bt.shape[2], u.shape[2]
    dy = dout.to(dtype) if x.z is None else dout.to(dtype) * F.silu(x.z.to(dtype))
    dyt = _time_major(dy, n_group)
    ckpt_g = checkpoints.reshape(checkpoints.shape[0], n_group, -1, *checkpoints.shape[2:])
    carry = ut.new_zeros(*ut.shape[1:], x.A.shape[1])  # (b, G, P, N): adj passed back a chunk
    if dlast is not None:
        carry = dlast.to(dtype).reshape(carry.shape)
    dA = torch.zeros_like(Ag)
    parts: dict[str, list[torch.Tensor]] = {"du": [], "ddt": [], "y": [], "dB": [], "dC": []}
    for start in reversed(range(0, length, chunk)):
        stop = min(start + chunk, length)
        state = ckpt_g[:, :, :, start // chunk]
        steps = _scan_chunk(dt, ut, Ag, Bt, Ct, start, stop, state)
        carry = _chunk_backward(steps, state, dyt[start:stop], Ag, carry, dA, parts)
    du, ddt, y = (_channel_major(_cat(parts[k][::-1], ut)) for k in ("du", "ddt", "y"))
    dB, dC = (_cat(parts[k][::-1], Bt).permute(1, 2, 3, 0) for k in ("dB", "dC"))
    dgate = _skip_and_gate(y, u, x.D, x.z, dtype)[1]
    if x.D is not None:
        du = du + dy * x.D.to(dtype)[:, None]
    ddelta = ddt if dt_grad is None else ddt * dt_grad
    return ScanGrads(
        du,
        ddelta,
        dA.flatten(0, 1),
        dB.reshape(x.B.shape),
        dC.reshape(x.C.shape),
        None if x.D is None else (dy * u.to(dtype)).sum((0, 2)),
        None if x.z is None else dout.to(dtype) * dgate,
        None if x.delta_bias is None else ddelta.sum((0, 2)),
    )


def _chunk_backward(steps: _Chunk, state, dy, A, carry, dA, parts) -> torch.Tensor:
    """Gradients of one chunk; returns the carry into the previous chunk (a_start * adj_start)."""
    # adj[i] = dy C at step i, plus the carry from step i + 1 (from the next chunk at the end).
    adj = dy.unsqueeze(-1) * steps.C.unsqueeze(-2)
    adj[-1] += carry
    for i in range(adj.shape[0] - 2, -1, -1):
        adj[i].addcmul_(steps.decay[i + 1], adj[i + 1])
    x_prev = torch.cat([state.unsqueeze(0), steps.states[:-1]])
    parts["y"].append(_readout(steps))
    parts["dC"].append(torch.matmul(dy.unsqueeze(-2), steps.states).squeeze(-2))  # sum_d dy x
    parts["dB"].append(torch.matmul(steps.dtu.unsqueeze(-2), adj).squeeze(-2))  # sum_d adj dt u
    adj_b = torch.matmul(adj, steps.B.unsqueeze(-1)).squeeze(-1)
    carry = steps.decay[0] * adj[0]
    q = adj.mul_(steps.decay).mul_(x_prev)  # adj * a * x_prev, in adj's memory
    dA += (q * steps.dt.unsqueeze(-1)).sum((0, 1))
    parts["ddt"].append((q * A).sum(-1) + steps.u * adj_b)
    parts["du"].append(steps.dt * adj_b)
    return carry
