"""Fused selective-scan kernels for the CPU, compiled by numba.

Layouts (all C-contiguous, one floating dtype, float32 or float64):
u, delta, z, out (nb, nd, L); A (nd, N); Bt, Ct (nb, G, L, N), i.e. B and C transposed so that
the loop over the state dimension is contiguous; Dv, bias (nd,) (zeros when absent); z has
length 0 along L when absent. ``ckpt`` (nb, nd, ceil(L / chunk), N) holds the state entering
each chunk: the forward writes it, the backward recomputes each chunk's states from it, so no
(nb, nd, L, N) tensor ever exists.

The forward runs one (batch, channel) sequence per parallel iteration with the N-vector state in
a small array that stays in L1. Everything per time step (bias, softplus, D skip, silu gate) is
fused, and per-chunk precomputation of dt and of the gate keeps the transcendental functions in
vectorisable loops. The backward walks chunks in reverse; dB and dC, which sum over the
channels of a group, are accumulated into per-job partial buffers (``dB_part[b, g, s]``) so that
parallel jobs never write the same element.

float32 uses a polynomial ``exp`` that LLVM can vectorise (there is no vector math library to
call); float64, used for gradient checks, uses ``math``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Reassociation lets LLVM vectorise the sums over the state dimension. The exp polynomial is
# compiled separately without it, so its Cody-Waite range reduction stays exact.
_FAST = {"contract", "reassoc", "nsz"}
_f32 = np.float32

_LOG2E = _f32(1.4426950408889634)
_LN2_HI = _f32(0.693145751953125)  # few mantissa bits, so k * _LN2_HI is exact
_LN2_LO = _f32(1.428606765330187e-06)
_EXP_LO = _f32(-87.33)  # exp(x) is subnormal in float32 below this
_EXP_HI = _f32(88.72)  # and overflows above this
_ZERO, _HALF, _ONE, _TWO = _f32(0.0), _f32(0.5), _f32(1.0), _f32(2.0)
_EXPONENT_BIAS, _MANTISSA_SCALE = _f32(127.0), _f32(2.0**23)
# Taylor coefficients 1/k!; |r| <= ln(2)/2 bounds the degree-6 remainder by 1.3e-7 relative.
_E2, _E3, _E4, _E5, _E6 = (_f32(1.0 / math.factorial(k)) for k in range(2, 7))
# atanh series 1/(2k+1): log1p(e) = 2 atanh(e / (2 + e)) with e / (2 + e) <= 1/3 for e in [0, 1].
_A3, _A5, _A7, _A9, _A11, _A13 = (_f32(1.0 / k) for k in range(3, 15, 2))


@intrinsic
def _int_bits_as_float32(typingctx, bits):
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, fastmath={"contract"})
def _exp32(x):
    # Clamping keeps the exponent arithmetic in range and costs nothing measurable: below the
    # clamp the result is 1.2e-38 instead of a subnormal (absolute error < 1.2e-38); above it,
    # float32 overflows anyway. Written as comparisons so that NaN passes through.
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p = _ONE + r * (_ONE + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * _E6)))))
    return p * _int_bits_as_float32(np.int32((k + _EXPONENT_BIAS) * _MANTISSA_SCALE))


@njit(cache=True, fastmath={"contract"})
def _log1p32_unit(e):
    """log(1 + e) for e in [0, 1]."""
    s = e / (_TWO + e)
    s2 = s * s
    series = _A9 + s2 * (_A11 + s2 * _A13)
    return _TWO * s * (_ONE + s2 * (_A3 + s2 * (_A5 + s2 * (_A7 + s2 * series))))


def _exp(x):
    raise NotImplementedError  # only called from compiled code, resolved by the overload below


def _log1p_unit(e):
    raise NotImplementedError


@overload(_exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


@overload(_log1p_unit)
def _log1p_unit_impl(e):
    if e == types.float32:
        return lambda e: _log1p32_unit(e)
    return lambda e: math.log1p(e)


@njit(cache=True, fastmath=_FAST)
def _chunk_dt(delta, bias, b, d, softplus, c0, c1, dts, ddts):
    """dt = softplus(delta + bias) (or delta + bias) and d dt / d delta for steps c0..c1."""
    for i in range(c1 - c0):
        x = delta[b, d, c0 + i] + bias[d]
        if softplus:
            e = _exp(-abs(x))  # softplus and sigmoid from one exp, stable for either sign
            dts[i] = max(x, _ZERO) + _log1p_unit(e)
            ddts[i] = (_ONE if x >= _ZERO else e) / (_ONE + e)
        else:
            dts[i] = x
            ddts[i] = _ONE


@njit(cache=True, fastmath=_FAST)
def _chunk_gate(z, b, d, c0, c1, gate, dgate):
    """silu(z) and its derivative for steps c0..c1."""
    for i in range(c1 - c0):
        zi = z[b, d, c0 + i]
        sig = _ONE / (_ONE + _exp(-zi))
        gate[i] = zi * sig
        dgate[i] = sig * (_ONE + zi * (_ONE - sig))


@njit(cache=True, fastmath=_FAST)
def _forward_channel(b, d, g, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out, last, ckpt):
    length, n_state = u.shape[2], A.shape[1]
    has_z = z.shape[2] == length
    x = np.zeros(n_state, u.dtype)
    dts, ddts = np.empty(chunk, u.dtype), np.empty(chunk, u.dtype)
    gate, dgate = np.ones(chunk, u.dtype), np.empty(chunk, u.dtype)
    a_row, skip = A[d], Dv[d]
    for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        for n in range(n_state):
            ckpt[b, d, c0 // chunk, n] = x[n]
        _chunk_dt(delta, bias, b, d, softplus, c0, c1, dts, ddts)
        if has_z:
            _chunk_gate(z, b, d, c0, c1, gate, dgate)
        for i in range(c1 - c0):
            t = c0 + i
            dt, ut = dts[i], u[b, d, t]
            dtu = dt * ut
            y = skip * ut
            for n in range(n_state):
                x[n] = _exp(dt * a_row[n]) * x[n] + dtu * Bt[b, g, t, n]
                y += x[n] * Ct[b, g, t, n]
            out[b, d, t] = y * gate[i]
    for n in range(n_state):
        last[b, d, n] = x[n]


@njit(cache=True, parallel=True)
def selective_scan_forward(u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out, last, ckpt):
    """Fill ``out`` (nb, nd, L), ``last`` (nb, nd, N) and ``ckpt`` (see the module docstring)."""
    n_batch, n_chan = u.shape[0], u.shape[1]
    per_group = n_chan // Bt.shape[1]
    for job in prange(n_batch * n_chan):
        b, d = job // n_chan, job % n_chan
        _forward_channel(
            b, d, d // per_group, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out, last, ckpt
        )


@njit(cache=True, fastmath=_FAST)
def _recompute_chunk(b, d, g, c0, c1, u, A, Bt, Ct, Dv, dts, ckpt, chunk, xs, decays, ys):
    """States xs[i] before step c0 + i (xs[i + 1] after it), decays, and pre-gate outputs."""
    n_state = A.shape[1]
    for n in range(n_state):
        xs[0, n] = ckpt[b, d, c0 // chunk, n]
    a_row = A[d]
    for i in range(c1 - c0):
        t = c0 + i
        dt, ut = dts[i], u[b, d, t]
        dtu = dt * ut
        y = Dv[d] * ut
        for n in range(n_state):
            a = _exp(dt * a_row[n])
            decays[i, n] = a
            xs[i + 1, n] = a * xs[i, n] + dtu * Bt[b, g, t, n]
            y += xs[i + 1, n] * Ct[b, g, t, n]
        ys[i] = y


@njit(cache=True, fastmath=_FAST)
def _backward_channel(
    b, d, g, s, dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, ckpt,
    du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
):  # fmt: skip
    length, n_state = u.shape[2], A.shape[1]
    has_z = z.shape[2] == length
    dts, ddts = np.empty(chunk, u.dtype), np.empty(chunk, u.dtype)
    gate, dgate = np.ones(chunk, u.dtype), np.zeros(chunk, u.dtype)
    ys = np.empty(chunk, u.dtype)
    xs, decays = np.empty((chunk + 1, n_state), u.dtype), np.empty((chunk, n_state), u.dtype)
    h = np.empty(n_state, u.dtype)  # adjoint of the state, carried backwards through time
    for n in range(n_state):
        h[n] = dlast[b, d, n]
    dA_acc = np.zeros(n_state, u.dtype)
    dD_acc = dbias_acc = _ZERO  # float32 zero; numba widens it for float64 inputs
    a_row, skip = A[d], Dv[d]
    for c0 in range((length - 1) // chunk * chunk, -1, -chunk):
        c1 = min(c0 + chunk, length)
        _chunk_dt(delta, bias, b, d, softplus, c0, c1, dts, ddts)
        if has_z:
            _chunk_gate(z, b, d, c0, c1, gate, dgate)
        _recompute_chunk(b, d, g, c0, c1, u, A, Bt, Ct, Dv, dts, ckpt, chunk, xs, decays, ys)
        for i in range(c1 - c0 - 1, -1, -1):
            t = c0 + i
            g_out = dout[b, d, t]
            if has_z:
                dz[b, d, t] = g_out * ys[i] * dgate[i]
            dy = g_out * gate[i]
            dt, ut = dts[i], u[b, d, t]
            dtu = dt * ut
            sum_hb = sum_hdecay = _ZERO
            for n in range(n_state):
                hn = h[n] + dy * Ct[b, g, t, n]
                dC_part[b, g, s, t, n] += dy * xs[i + 1, n]
                dB_part[b, g, s, t, n] += hn * dtu
                sum_hb += hn * Bt[b, g, t, n]
                w = hn * decays[i, n] * xs[i, n]
                dA_acc[n] += w * dt
                sum_hdecay += w * a_row[n]
                h[n] = hn * decays[i, n]
            dD_acc += dy * ut
            du[b, d, t] = dy * skip + dt * sum_hb
            dd = (sum_hdecay + ut * sum_hb) * ddts[i]
            ddelta[b, d, t] = dd
            dbias_acc += dd
    dA_part[b, d, :] = dA_acc
    dD_part[b, d] = dD_acc
    dbias_part[b, d] = dbias_acc


@njit(cache=True, parallel=True)
def selective_scan_backward(
    dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, ckpt,
    du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
):  # fmt: skip
    """Gradients of the forward above given ``dout`` (nb, nd, L) and ``dlast`` (nb, nd, N).

    ``du``, ``ddelta``, ``dz`` are written in full. ``dA_part`` (nb, nd, N), ``dD_part`` and
    ``dbias_part`` (nb, nd) hold per-batch terms (the caller sums over nb). ``dB_part`` and
    ``dC_part`` (nb, G, S, L, N) must be zero on entry: job (b, g, s) adds the terms of the s-th
    of S slices of group g's channels; the caller sums over S.
    """
    n_batch, n_chan = u.shape[0], u.shape[1]
    n_group, n_split = Bt.shape[1], dB_part.shape[2]
    per_group = n_chan // n_group
    for job in prange(n_batch * n_group * n_split):
        b, rest = job // (n_group * n_split), job % (n_group * n_split)
        g, s = rest // n_split, rest % n_split
        first = g * per_group
        for d in range(first + s * per_group // n_split, first + (s + 1) * per_group // n_split):
            _backward_channel(
                b, d, g, s, dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk,
                ckpt, du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
            )  # fmt: skip


@contextlib.contextmanager
def _torch_thread_count() -> Iterator[int]:
    """Run numba with torch's thread count, and give torch its count back afterwards.

    numba's OpenMP layer shares the OpenMP runtime with torch and resets its thread count when
    numba sets its own, so a user's ``torch.set_num_threads`` would otherwise be lost.
    """
    count = torch.get_num_threads()
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield count
    finally:
        torch.set_num_threads(count)


def _state_last(bc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, N, L) or (b, G, N, L) -> contiguous (b, G, L, N): one transpose outside the hot loop."""
    grouped = bc if bc.dim() == 4 else bc.unsqueeze(1)
    return grouped.to(dtype).transpose(-1, -2).contiguous()


def _arrays(u, delta, A, B, C, D, z, delta_bias, dtype) -> list[np.ndarray]:
    n_chan = u.shape[1]
    zeros = torch.zeros(n_chan, dtype=dtype)
    tensors = [
        u.to(dtype).contiguous(),
        delta.to(dtype).contiguous(),
        A.to(dtype).contiguous(),
        _state_last(B, dtype),
        _state_last(C, dtype),
        zeros if D is None else D.to(dtype).contiguous(),
        u.new_empty((*u.shape[:2], 0), dtype=dtype) if z is None else z.to(dtype).contiguous(),
        zeros if delta_bias is None else delta_bias.to(dtype).contiguous(),
    ]
    return [t.numpy() for t in tensors]


def forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused forward on CPU tensors: (out in u's dtype, last state, chunk checkpoints)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    n_batch, n_chan, length = u.shape
    n_state = A.shape[1]
    arrays = _arrays(u, delta, A, B, C, D, z, delta_bias, dtype)
    out = torch.empty(n_batch, n_chan, length, dtype=dtype)
    last = torch.empty(n_batch, n_chan, n_state, dtype=dtype)
    ckpt = torch.empty(n_batch, n_chan, -(-length // chunk), n_state, dtype=dtype)
    with _torch_thread_count():
        selective_scan_forward(
            *arrays, delta_softplus, chunk, out.numpy(), last.numpy(), ckpt.numpy()
        )
    return out.to(u.dtype), last, ckpt


def backward(
    dout: torch.Tensor,
    dlast: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    ckpt: torch.Tensor,
    delta_softplus: bool,
    chunk: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype.

    dB and dC come back in B's and C's layout; dD, dz, ddelta_bias are None when absent.
    """
    dtype = ckpt.dtype
    arrays = _arrays(u, delta, A, B, C, D, z, delta_bias, dtype)
    n_batch, n_chan, length = u.shape
    n_state, n_group = A.shape[1], arrays[3].shape[1]
    du, ddelta = torch.empty_like(u, dtype=dtype), torch.empty_like(u, dtype=dtype)
    dz = torch.empty(arrays[6].shape, dtype=dtype)
    dA_part = torch.empty(n_batch, n_chan, n_state, dtype=dtype)
    dD_part, dbias_part = (torch.empty(n_batch, n_chan, dtype=dtype) for _ in range(2))
    with _torch_thread_count() as threads:
        # Enough independent slices of each group to keep every thread busy; each slice owns
        # a partial dB/dC buffer, summed below.
        splits = min(n_chan // n_group, max(1, -(-2 * threads // (n_batch * n_group))))
        dB_part, dC_part = (
            torch.zeros(n_batch, n_group, splits, length, n_state, dtype=dtype) for _ in range(2)
        )
        selective_scan_backward(
            dout.to(dtype).contiguous().numpy(), dlast.to(dtype).contiguous().numpy(), *arrays,
            delta_softplus, chunk, ckpt.contiguous().numpy(), du.numpy(), ddelta.numpy(),
            dz.numpy(), dA_part.numpy(), dD_part.numpy(), dbias_part.numpy(), dB_part.numpy(),
            dC_part.numpy(),
        )  # fmt: skip
    dB, dC = (part.sum(2).transpose(-1, -2).reshape(B.shape) for part in (dB_part, dC_part))
    return (
        du,
        ddelta,
        dA_part.sum(0),
        dB,
        dC,
        None if D is None else dD_part.sum(0),
        None if z is None else dz,
        None if delta_bias is None else dbias_part.sum(0),
    )
