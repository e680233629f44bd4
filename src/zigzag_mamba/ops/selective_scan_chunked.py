"""The portable selective scan: a chunked PyTorch implementation with a hand-written backward.

It runs on every device. Inside, every sequence-long tensor is laid out time-major, (L, b, G, P)
and (L, b, G, N), so that one step of one chunk is one contiguous block. The forward scans
:data:`CHUNK` steps at a time, vectorised over batch, channels and state except for one fused
multiply-add per step on such a block, and keeps the state entering each chunk (checkpoints
(B, D, ceil(L / CHUNK), N)); the backward recomputes one chunk at a time from its checkpoint and
runs the adjoint recurrence in reverse, so memory stays O(B * D * L) plus one chunk's
(CHUNK, B, D, N).

Channels are viewed as (G, P): group g holds channels g * P .. (g + 1) * P - 1, which all read
B[:, g] and C[:, g].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK = 64  # steps between state checkpoints, and the length of one vectorised chunk


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


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


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, dtype):
    """Time-major dt, u, B, C, A as (G, P, N), and d dt / d delta (channel-major, or None)."""
    Bt, Ct = _time_major_bc(B, dtype), _time_major_bc(C, dtype)
    n_group = Bt.shape[2]
    dt, dt_grad = _dt(delta, delta_bias, delta_softplus, dtype)
    Ag = A.to(dtype).reshape(n_group, -1, A.shape[1])
    return _time_major(dt, n_group), _time_major(u.to(dtype), n_group), Ag, Bt, Ct, dt_grad


def chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype = compute_dtype(u)
    dt, ut, Ag, Bt, Ct, _ = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
    state = ut.new_zeros(*ut.shape[1:], A.shape[1])
    ys, ckpts = [], []
    for start in range(0, u.shape[2], CHUNK):
        ckpts.append(state)
        chunk = _scan_chunk(dt, ut, Ag, Bt, Ct, start, min(start + CHUNK, u.shape[2]), state)
        state = chunk.states[-1]
        ys.append(_readout(chunk))
    y = _skip_and_gate(_channel_major(torch.cat(ys)), u, D, z, dtype)[0]
    ckpt = torch.stack(ckpts, 3).flatten(1, 2)
    return y.to(u.dtype).contiguous(), state.flatten(1, 2).clone(), ckpt


def _skip_and_gate(y, u, D, z, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y + D u) * silu(z), and the gate's derivative factor y * silu'(z) (None without z)."""
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is None:
        return y, None
    zc = z.to(dtype)
    sig = torch.sigmoid(zc)
    return y * zc * sig, y * sig * (1 + zc * (1 - sig))


def chunked_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    dtype = ckpt.dtype
    dt, ut, Ag, Bt, Ct, dt_grad = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
    n_group, length = Bt.shape[2], u.shape[2]
    dy = dout.to(dtype) if z is None else dout.to(dtype) * F.silu(z.to(dtype))
    dyt = _time_major(dy, n_group)
    ckpt_g = ckpt.reshape(ckpt.shape[0], n_group, -1, *ckpt.shape[2:])  # (b, G, P, chunks, N)
    adjoint = dlast.to(dtype).reshape(ckpt_g.shape[:3] + ckpt_g.shape[4:])  # d loss / d state
    dA = torch.zeros_like(Ag)
    parts: dict[str, list[torch.Tensor]] = {"du": [], "ddt": [], "y": [], "dB": [], "dC": []}
    for start in reversed(range(0, length, CHUNK)):
        stop = min(start + CHUNK, length)
        state = ckpt_g[:, :, :, start // CHUNK]
        chunk = _scan_chunk(dt, ut, Ag, Bt, Ct, start, stop, state)
        adjoint = _chunk_backward(chunk, state, dyt[start:stop], Ag, adjoint, dA, parts)
    du, ddt, y = (_channel_major(torch.cat(parts[k][::-1])) for k in ("du", "ddt", "y"))
    dB, dC = (torch.cat(parts[k][::-1]).permute(1, 2, 3, 0) for k in ("dB", "dC"))
    dgate = _skip_and_gate(y, u, D, z, dtype)[1]
    if D is not None:
        du = du + dy * D.to(dtype)[:, None]
    ddelta = ddt if dt_grad is None else ddt * dt_grad
    return (
        du,
        ddelta,
        dA.flatten(0, 1),
        dB.reshape(B.shape),
        dC.reshape(C.shape),
        None if D is None else (dy * u.to(dtype)).sum((0, 2)),
        None if z is None else dout.to(dtype) * dgate,
        None if delta_bias is None else ddelta.sum((0, 2)),
    )


def _chunk_backward(chunk: _Chunk, state, dy, A, adjoint, dA, parts) -> torch.Tensor:
    """Gradients of one chunk; returns the adjoint to carry into the previous chunk."""
    # adjoints[i] = d loss / d state after step i: injected dy C, plus the later steps' share.
    adjoints = dy.unsqueeze(-1) * chunk.C.unsqueeze(-2)
    adjoints[-1] += adjoint
    for i in range(adjoints.shape[0] - 2, -1, -1):
        adjoints[i].addcmul_(chunk.decay[i + 1], adjoints[i + 1])
    before = torch.cat([state.unsqueeze(0), chunk.states[:-1]])
    parts["y"].append(_readout(chunk))
    parts["dC"].append(torch.matmul(dy.unsqueeze(-2), chunk.states).squeeze(-2))
    parts["dB"].append(torch.matmul(chunk.dtu.unsqueeze(-2), adjoints).squeeze(-2))
    adj_b = torch.matmul(adjoints, chunk.B.unsqueeze(-1)).squeeze(-1)
    carry = chunk.decay[0] * adjoints[0]
    # d loss / d (dt * A) at each step, reusing the adjoints' memory.
    d_exponent = adjoints.mul_(chunk.decay).mul_(before)
    dA += (d_exponent * chunk.dt.unsqueeze(-1)).sum((0, 1))
    parts["ddt"].append((d_exponent * A).sum(-1) + chunk.u * adj_b)
    parts["du"].append(chunk.dt * adj_b)
    return carry
