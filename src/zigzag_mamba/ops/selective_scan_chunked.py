"""The portable selective scan: a chunked PyTorch implementation with a hand-written backward.

It runs on every device. The forward scans :data:`CHUNK` steps at a time, vectorised over batch,
channels and state except for one fused multiply-add per step, and keeps the state entering each
chunk (checkpoints (B, D, ceil(L / CHUNK), N)); the backward recomputes one chunk at a time from
its checkpoint and runs the adjoint recurrence in reverse, so memory stays O(B * D * L) plus one
chunk's (B, D, CHUNK, N).

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


def _grouped(x: torch.Tensor, n_group: int) -> torch.Tensor:
    """(b, D, ...) -> (b, G, P, ...)."""
    return x.view(x.shape[0], n_group, x.shape[1] // n_group, *x.shape[2:])


def _state_last(bc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, N, L) or (b, G, N, L) -> (b, G, L, N), so that a chunk of steps is one slice."""
    grouped = bc if bc.dim() == 4 else bc.unsqueeze(1)
    return grouped.to(dtype).transpose(-1, -2)


def _dt(delta, delta_bias, softplus, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dt and, under softplus, d dt / d delta (= sigmoid of the softplus argument)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if not softplus:
        return dt, None
    return F.softplus(dt), torch.sigmoid(dt)


class _Chunk(NamedTuple):
    decay: torch.Tensor  # exp(dt * A), (b, G, P, T, N)
    states: torch.Tensor  # state after each step, (b, G, P, T, N)
    dt: torch.Tensor  # (b, G, P, T)
    u: torch.Tensor  # (b, G, P, T)
    dtu: torch.Tensor  # dt * u, (b, G, P, T)
    B: torch.Tensor  # (b, G, T, N)
    C: torch.Tensor  # (b, G, T, N)


def _scan_chunk(dt, u, A, Bt, Ct, start, stop, state) -> _Chunk:
    """States of steps start..stop from ``state``, vectorised except for one fused op per step."""
    dt_c, u_c = dt[..., start:stop], u[..., start:stop]
    B_c, C_c = Bt[:, :, start:stop], Ct[:, :, start:stop]
    dtu = dt_c * u_c
    decay = torch.exp(dt_c.unsqueeze(-1) * A.unsqueeze(-2))
    states = dtu.unsqueeze(-1) * B_c.unsqueeze(2)
    previous = state
    for i in range(stop - start):
        previous = states[..., i, :].addcmul_(decay[..., i, :], previous)
    return _Chunk(decay, states, dt_c, u_c, dtu, B_c, C_c)


def _readout(chunk: _Chunk) -> torch.Tensor:
    return torch.einsum("bgptn,bgtn->bgpt", chunk.states, chunk.C)


def chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype = compute_dtype(u)
    Bt, Ct = _state_last(B, dtype), _state_last(C, dtype)
    n_group = Bt.shape[1]
    dt = _grouped(_dt(delta, delta_bias, delta_softplus, dtype)[0], n_group)
    ug, Ag = _grouped(u.to(dtype), n_group), _grouped(A.to(dtype)[None], n_group)[0]
    state = ug.new_zeros(*ug.shape[:3], A.shape[1])
    ys, ckpts = [], []
    for start in range(0, u.shape[2], CHUNK):
        ckpts.append(state)
        chunk = _scan_chunk(dt, ug, Ag, Bt, Ct, start, min(start + CHUNK, u.shape[2]), state)
        state = chunk.states[..., -1, :]
        ys.append(_readout(chunk))
    y = _skip_and_gate(torch.cat(ys, -1).flatten(1, 2), u, D, z, dtype)[0]
    ckpt = torch.stack(ckpts, 3).flatten(1, 2)
    return y.to(u.dtype), state.flatten(1, 2).clone(), ckpt


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
    Bt, Ct = _state_last(B, dtype), _state_last(C, dtype)
    n_group, length = Bt.shape[1], u.shape[2]
    dt_flat, dt_grad = _dt(delta, delta_bias, delta_softplus, dtype)
    dt = _grouped(dt_flat, n_group)
    ug, Ag = _grouped(u.to(dtype), n_group), _grouped(A.to(dtype)[None], n_group)[0]
    dy = dout.to(dtype) if z is None else dout.to(dtype) * F.silu(z.to(dtype))
    dyg, ckpt_g = _grouped(dy, n_group), _grouped(ckpt, n_group)
    adjoint = _grouped(dlast.to(dtype), n_group)  # d loss / d state, carried backwards
    dA = torch.zeros_like(Ag)
    parts: dict[str, list[torch.Tensor]] = {"du": [], "ddt": [], "y": [], "dB": [], "dC": []}
    for start in reversed(range(0, length, CHUNK)):
        stop = min(start + CHUNK, length)
        state = ckpt_g[..., start // CHUNK, :]
        chunk = _scan_chunk(dt, ug, Ag, Bt, Ct, start, stop, state)
        adjoint = _chunk_backward(chunk, state, dyg[..., start:stop], Ag, adjoint, dA, parts)
    du, ddt, y = (torch.cat(parts[k][::-1], -1).flatten(1, 2) for k in ("du", "ddt", "y"))
    dB, dC = (torch.cat(parts[k][::-1], -2) for k in ("dB", "dC"))
    dgate = _skip_and_gate(y, u, D, z, dtype)[1]
    if D is not None:
        du = du + dy * D.to(dtype)[:, None]
    ddelta = ddt if dt_grad is None else ddt * dt_grad
    return (
        du,
        ddelta,
        dA.flatten(0, 1),
        dB.transpose(-1, -2).reshape(B.shape),
        dC.transpose(-1, -2).reshape(C.shape),
        None if D is None else (dy * u.to(dtype)).sum((0, 2)),
        None if z is None else dout.to(dtype) * dgate,
        None if delta_bias is None else ddelta.sum((0, 2)),
    )


def _chunk_backward(chunk: _Chunk, state, dy, A, adjoint, dA, parts) -> torch.Tensor:
    """Gradients of one chunk; returns the adjoint to carry into the previous chunk."""
    # adjoints[i] = d loss / d state after step i: injected dy C, plus the later steps' share.
    adjoints = dy.unsqueeze(-1) * chunk.C.unsqueeze(2)
    adjoints[..., -1, :] += adjoint
    for i in range(adjoints.shape[-2] - 2, -1, -1):
        adjoints[..., i, :].addcmul_(chunk.decay[..., i + 1, :], adjoints[..., i + 1, :])
    before = torch.cat([state.unsqueeze(-2), chunk.states[..., :-1, :]], -2)
    parts["y"].append(_readout(chunk))
    parts["dC"].append(torch.einsum("bgptn,bgpt->bgtn", chunk.states, dy))
    parts["dB"].append(torch.einsum("bgptn,bgpt->bgtn", adjoints, chunk.dtu))
    adj_b = torch.einsum("bgptn,bgtn->bgpt", adjoints, chunk.B)
    carry = chunk.decay[..., 0, :] * adjoints[..., 0, :]
    # d loss / d (dt * A) at each step, reusing the adjoints' memory.
    d_exponent = adjoints.mul_(chunk.decay).mul_(before)
    dA += torch.einsum("bgptn,bgpt->gpn", d_exponent, chunk.dt)
    parts["ddt"].append(torch.einsum("bgptn,gpn->bgpt", d_exponent, A) + chunk.u * adj_b)
    parts["du"].append(chunk.dt * adj_b)
    return carry
