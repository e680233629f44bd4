"""Fused selective-scan kernels for the CPU, compiled by numba.

Layouts (one floating dtype, float32 or float64): u, delta, z, out (nb, nd, L), and dout in the
backward, with any strides: each chunk of them is copied into a tile anyway, so the transposed
views a Mamba mixer passes (token-major (nb, L, nd) memory) are read in place instead of being
copied first. The rest is C-contiguous: A (nd, N); Bt, Ct (nb, G, L, N), i.e. B and C transposed
so that the loop over the state dimension is contiguous; Dv, bias (nd,) (zeros when absent); z
has length 0 along L when absent. ``ckpt`` (nb, nd, ceil(L / chunk), N) holds the state entering
each chunk: the forward writes it, the backward recomputes each chunk's states from it, so no
(nb, nd, L, N) tensor ever exists.

Both kernels vectorise across channels: each parallel job owns a block of ``_LANES`` channels
of one batch element (a multiple of the SIMD width), so every inner loop runs over the block's
lanes with unit stride, and the state is an (N, _LANES) array. Per chunk, u, delta, z (and in
the backward dout) are transposed into (chunk, _LANES) tiles, dt, softplus' derivative and the
silu gate are computed for the whole tile, and the recurrence then touches only small local
arrays and one element each of B and C per state. The backward walks chunks in reverse,
recomputes the chunk's states and decays from its checkpoint into an L2-sized scratch, and runs
the adjoint recurrence over it; dB and dC, which sum over the channels of a group, are reduced
over the block's lanes and accumulated into per-job partial buffers (``dB_part[b, g, s]``) so that
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
from numba.np.arrayobj import populate_array

# Reassociation lets LLVM vectorise the sums over the lanes (for dB and dC). The exp polynomial
# is compiled separately without it, so its Cody-Waite range reduction stays exact. Functions
# that divide use error_model="numpy": the ZeroDivisionError branch of Python semantics would keep
# their loops from vectorising, and no divisor here can be zero.
_FAST = {"contract", "reassoc", "nsz"}
_f32 = np.float32
# Channels per parallel job and width of every inner loop: a multiple of the SIMD width and a
# compile-time trip count, so LLVM unrolls the lane loops without remainders. 32 float32 lanes
# (four AVX2 vectors) share each step's loop overhead, scalar loads of B and C, and horizontal
# sums better than 16, and measured a little faster; the chunk scratch still fits in L2.
_LANES = 32
_HALF_LANES = _LANES // 2

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


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
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


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM compile the calling function with the CPU's widest vector registers.

    On AVX-512 CPUs LLVM prefers 256-bit vectors unless a function says otherwise (process-wide,
    numba could only change that for every function it compiles). These two string attributes
    say it for the calling kernel alone (llvmlite's attribute set knows only keyword attributes,
    hence ``set.add``); targets without such registers ignore them. ``noinline`` keeps the body
    in a function that carries them: code inlined into a caller is compiled under the caller's
    attributes. Measured on an AVX-512 Xeon: about 9% off the forward and 6% off the backward.
    """

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _stack_tile(typingctx, rows, dtype):
    """An uninitialised C-contiguous (rows, _LANES) array on the calling function's stack.

    LLVM knows that stack memory aliases no other array, so loops that store into such arrays
    vectorise without runtime overlap checks (too many of those make it give up and run the
    scalar loop). The memory lives until the calling function returns: call this only at the
    top level of a kernel, never in a loop or in a helper that returns the array.
    """
    item = dtype.dtype
    array_type = types.Array(item, 2, "C")

    def codegen(context, builder, signature, args):
        n_rows = context.cast(builder, args[0], signature.args[0], types.intp)
        lanes = context.get_constant(types.intp, _LANES)
        ll_item = context.get_value_type(item)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(ll_item))
        array = context.make_array(array_type)(context, builder)
        populate_array(
            array,
            data=builder.alloca(ll_item, size=builder.mul(n_rows, lanes)),
            shape=[n_rows, lanes],
            strides=[builder.mul(lanes, itemsize), itemsize],
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(rows, dtype), codegen


@njit(cache=True)
def _block_bounds(n_chan, n_group, block):
    """(group, first channel, channel count) of the block-th block of _LANES channels.

    Blocks never straddle a group, so one block reads one row of B and C; a group whose size is
    not a multiple of _LANES ends in a partial block.
    """
    per_group = n_chan // n_group
    per_block = -(-per_group // _LANES)
    g, k = block // per_block, block % per_block
    first = g * per_group + k * _LANES
    return g, first, min(_LANES, (g + 1) * per_group - first)


# The copies below take stack tiles; inlining them (in numba's IR) keeps the tiles' addresses
# from escaping into a call, which would cost LLVM its knowledge that they alias nothing.


@njit(cache=True, inline="always")
def _load_tile(src, b, d0, width, c0, steps, tile):
    """tile[i, w] = src[b, d0 + w, c0 + i]; lanes beyond ``width`` are zeroed."""
    # Contiguous stores, strided loads: the order that compiles to plain scalar copies (the
    # other order is vectorised with gathers, which are slower than scalar code here).
    for i in range(steps):
        for w in range(_LANES):
            tile[i, w] = src[b, d0 + w, c0 + i] if w < width else 0


@njit(cache=True, inline="always")
def _store_tile(tile, b, d0, width, c0, steps, dst):
    # Contiguous stores, strided loads from the (L1-resident) tile: the other order compiles to
    # scatters, which are far slower.
    for w in range(width):
        for i in range(steps):
            dst[b, d0 + w, c0 + i] = tile[i, w]


@njit(cache=True, inline="always")
def _load_lanes(vec, d0, width, lanes):
    """lanes[w] = vec[d0 + w], zero beyond ``width``."""
    for w in range(_LANES):
        lanes[w] = vec[d0 + w] if w < width else 0


@njit(cache=True, inline="always")
def _load_A(A, d0, width, a):
    """a[n, w] = A[d0 + w, n]; padding lanes get A = 0, so their state never moves off zero."""
    for n in range(A.shape[1]):
        for w in range(_LANES):
            a[n, w] = A[d0 + w, n] if w < width else 0


# The transcendental tiles are heap arrays passed to ordinary calls: these loops vectorise on
# their own, and the hot loops only read the tiles.


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _tile_dt(bias, softplus, steps, dts, ddts):
    """In place: dts = softplus(delta + bias) (or delta + bias); ddts = d dt / d delta."""
    for i in range(steps):
        for w in range(_LANES):
            x = dts[i, w] + bias[w]
            if softplus:
                e = _exp(-abs(x))  # softplus and sigmoid from one exp, stable for either sign
                dts[i, w] = max(x, _ZERO) + _log1p_unit(e)
                ddts[i, w] = (_ONE if x >= _ZERO else e) / (_ONE + e)
            else:
                dts[i, w] = x
                ddts[i, w] = _ONE


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _tile_gate(steps, gate, dgate):
    """In place: gate = silu(z); dgate = silu'(z)."""
    for i in range(steps):
        for w in range(_LANES):
            zi = gate[i, w]
            sig = _ONE / (_ONE + _exp(-zi))
            gate[i, w] = zi * sig
            dgate[i, w] = sig * (_ONE + zi * (_ONE - sig))


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _forward_block(b, g, d0, width, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out, last,
                   ckpt):  # fmt: skip
    _wide_vectors()
    length, n_state, dtype = u.shape[2], A.shape[1], u.dtype
    has_z = z.shape[2] == length
    x, a = _stack_tile(n_state, dtype), _stack_tile(n_state, dtype)
    vecs = _stack_tile(2, dtype)
    skip, bias_w = vecs[0], vecs[1]
    us, dtus, ys = _stack_tile(chunk, dtype), _stack_tile(chunk, dtype), _stack_tile(chunk, dtype)
    dts, ddts = np.empty((chunk, _LANES), dtype), np.empty((chunk, _LANES), dtype)
    gate, dgate = np.ones((chunk, _LANES), dtype), np.empty((chunk, _LANES), dtype)
    x[:] = 0
    _load_A(A, d0, width, a)
    _load_lanes(Dv, d0, width, skip)
    _load_lanes(bias, d0, width, bias_w)
    for c0 in range(0, length, chunk):
        steps = min(chunk, length - c0)
        for w in range(width):
            for n in range(n_state):
                ckpt[b, d0 + w, c0 // chunk, n] = x[n, w]
        _load_tile(u, b, d0, width, c0, steps, us)
        _load_tile(delta, b, d0, width, c0, steps, dts)
        _tile_dt(bias_w, softplus, steps, dts, ddts)
        if has_z:
            _load_tile(z, b, d0, width, c0, steps, gate)
            _tile_gate(steps, gate, dgate)
        # Whole-tile loops for the per-step terms keep the recurrence below down to the loop
        # over the state.
        for i in range(steps):
            for w in range(_LANES):
                dtus[i, w] = dts[i, w] * us[i, w]
                ys[i, w] = skip[w] * us[i, w]
        for i in range(steps):
            t = c0 + i
            for n in range(n_state):
                bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                for w in range(_LANES):
                    x[n, w] = _exp(dts[i, w] * a[n, w]) * x[n, w] + dtus[i, w] * bn
                    ys[i, w] += x[n, w] * cn
        for i in range(steps):
            for w in range(_LANES):
                ys[i, w] *= gate[i, w]
        _store_tile(ys, b, d0, width, c0, steps, out)
    for w in range(width):
        for n in range(n_state):
            last[b, d0 + w, n] = x[n, w]


@njit(cache=True, parallel=True)
def selective_scan_forward(u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out, last, ckpt):
    """Fill ``out`` (nb, nd, L), ``last`` (nb, nd, N) and ``ckpt`` (see the module docstring)."""
    n_batch, n_chan, n_group = u.shape[0], u.shape[1], Bt.shape[1]
    n_block = n_group * -(-(n_chan // n_group) // _LANES)
    for job in prange(n_batch * n_block):
        b = job // n_block
        g, d0, width = _block_bounds(n_chan, n_group, job % n_block)
        _forward_block(b, g, d0, width, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, out,
                       last, ckpt)  # fmt: skip


@njit(cache=True, fastmath=_FAST, error_model="numpy")
def _backward_block(
    b, g, s, d0, width, dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, ckpt,
    du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
):  # fmt: skip
    _wide_vectors()
    length, n_state, dtype = u.shape[2], A.shape[1], u.dtype
    has_z = z.shape[2] == length
    a, h = _stack_tile(n_state, dtype), _stack_tile(n_state, dtype)  # h: adjoint of the state
    dA_acc = _stack_tile(n_state, dtype)
    vecs = _stack_tile(4, dtype)
    skip, bias_w, dD_acc, dbias_acc = vecs[0], vecs[1], vecs[2], vecs[3]
    us, ys, gouts = _stack_tile(chunk, dtype), _stack_tile(chunk, dtype), _stack_tile(chunk, dtype)
    dys, dtus = _stack_tile(chunk, dtype), _stack_tile(chunk, dtype)
    sum_hb, sum_q = _stack_tile(chunk, dtype), _stack_tile(chunk, dtype)
    dts, ddts = np.empty((chunk, _LANES), dtype), np.empty((chunk, _LANES), dtype)
    gate, dgate = np.ones((chunk, _LANES), dtype), np.zeros((chunk, _LANES), dtype)
    # States before each step of the chunk (xs[i + 1] after step i) and the step's decays: with
    # N = 16 and chunk = 64 about 270 KB, which stays in L2 while the chunk is reversed. They
    # live on the heap, since their size would overflow small thread stacks for large N.
    xs = np.empty((chunk + 1, n_state, _LANES), dtype)
    decays = np.empty((chunk, n_state, _LANES), dtype)
    # The chunk's dB and dC terms, added to the partial buffers once per chunk.
    dB_chunk, dC_chunk = np.empty((chunk, n_state), dtype), np.empty((chunk, n_state), dtype)
    _load_A(A, d0, width, a)
    _load_lanes(Dv, d0, width, skip)
    _load_lanes(bias, d0, width, bias_w)
    for n in range(n_state):
        for w in range(_LANES):
            h[n, w] = dlast[b, d0 + w, n] if w < width else 0
    dA_acc[:] = 0
    dD_acc[:] = 0
    dbias_acc[:] = 0
    for c0 in range((length - 1) // chunk * chunk, -1, -chunk):
        steps = min(chunk, length - c0)
        _load_tile(u, b, d0, width, c0, steps, us)
        _load_tile(delta, b, d0, width, c0, steps, dts)
        _tile_dt(bias_w, softplus, steps, dts, ddts)
        _load_tile(dout, b, d0, width, c0, steps, gouts)
        if has_z:
            _load_tile(z, b, d0, width, c0, steps, gate)
            _tile_gate(steps, gate, dgate)
        for n in range(n_state):
            for w in range(_LANES):
                xs[0, n, w] = ckpt[b, d0 + w, c0 // chunk, n] if w < width else 0
        for i in range(steps):
            for w in range(_LANES):
                dtus[i, w] = dts[i, w] * us[i, w]
                dys[i, w] = gouts[i, w] * gate[i, w]
                ys[i, w] = skip[w] * us[i, w]
                sum_hb[i, w] = sum_q[i, w] = 0
        # Recompute the chunk's states; dC needs only them, so it is accumulated here too.
        for i in range(steps):
            t = c0 + i
            for n in range(n_state):
                bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                acc_c = _ZERO
                for w in range(_LANES):
                    decay = _exp(dts[i, w] * a[n, w])
                    decays[i, n, w] = decay
                    xn = decay * xs[i, n, w] + dtus[i, w] * bn
                    xs[i + 1, n, w] = xn
                    ys[i, w] += xn * cn
                    acc_c += dys[i, w] * xn
                dC_chunk[i, n] = acc_c
        for i in range(steps - 1, -1, -1):
            t = c0 + i
            for n in range(n_state):
                dB_chunk[i, n] = 0
            # Half the lanes at a time: the per-step sums over the state (sum_hb, sum_q) then
            # fit in registers across the loop over n. Measured 5% off the backward.
            for v in range(0, _LANES, _HALF_LANES):
                for n in range(n_state):
                    bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                    acc_b = _ZERO
                    for w in range(v, v + _HALF_LANES):
                        hn = h[n, w] + dys[i, w] * cn
                        acc_b += hn * dtus[i, w]
                        sum_hb[i, w] += hn * bn
                        decay = decays[i, n, w]
                        q = hn * decay * xs[i, n, w]  # d loss / d (dt * A)
                        dA_acc[n, w] += q * dts[i, w]
                        sum_q[i, w] += q * a[n, w]
                        h[n, w] = hn * decay
                    dB_chunk[i, n] += acc_b
        for i in range(steps):
            for n in range(n_state):
                dB_part[b, g, s, c0 + i, n] += dB_chunk[i, n]
                dC_part[b, g, s, c0 + i, n] += dC_chunk[i, n]
        # us, gouts and ys are no longer needed: they take du, ddelta and dz.
        for i in range(steps):
            for w in range(_LANES):
                ut, dy = us[i, w], dys[i, w]
                dD_acc[w] += dy * ut
                dd = (sum_q[i, w] + ut * sum_hb[i, w]) * ddts[i, w]
                dbias_acc[w] += dd
                ys[i, w] *= gouts[i, w] * dgate[i, w]
                us[i, w] = dy * skip[w] + dts[i, w] * sum_hb[i, w]
                gouts[i, w] = dd
        _store_tile(us, b, d0, width, c0, steps, du)
        _store_tile(gouts, b, d0, width, c0, steps, ddelta)
        if has_z:
            _store_tile(ys, b, d0, width, c0, steps, dz)
    for w in range(width):
        for n in range(n_state):
            dA_part[b, d0 + w, n] = dA_acc[n, w]
        dD_part[b, d0 + w] = dD_acc[w]
        dbias_part[b, d0 + w] = dbias_acc[w]


@njit(cache=True, parallel=True)
def selective_scan_backward(
    dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus, chunk, ckpt,
    du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
):  # fmt: skip
    """Gradients of the forward above given ``dout`` (nb, nd, L) and ``dlast`` (nb, nd, N).

    ``du``, ``ddelta``, ``dz`` are written in full. ``dA_part`` (nb, nd, N), ``dD_part`` and
    ``dbias_part`` (nb, nd) hold per-batch terms (the caller sums over nb). ``dB_part`` and
    ``dC_part`` (nb, G, S, L, N) must be zero on entry: job (b, g, s) adds the terms of the s-th
    of S slices of group g's channel blocks; the caller sums over S.
    """
    n_batch, n_chan = u.shape[0], u.shape[1]
    n_group, n_split = Bt.shape[1], dB_part.shape[2]
    per_block = -(-(n_chan // n_group) // _LANES)
    for job in prange(n_batch * n_group * n_split):
        b, rest = job // (n_group * n_split), job % (n_group * n_split)
        g, s = rest // n_split, rest % n_split
        for k in range(s * per_block // n_split, (s + 1) * per_block // n_split):
            _, d0, width = _block_bounds(n_chan, n_group, g * per_block + k)
            _backward_block(
                b, g, s, d0, width, dout, dlast, u, delta, A, Bt, Ct, Dv, z, bias, softplus,
                chunk, ckpt, du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
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
        u.to(dtype),
        delta.to(dtype),
        A.to(dtype).contiguous(),
        _state_last(B, dtype),
        _state_last(C, dtype),
        zeros if D is None else D.to(dtype).contiguous(),
        u.new_empty((*u.shape[:2], 0), dtype=dtype) if z is None else z.to(dtype),
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
        blocks = -(-(n_chan // n_group) // _LANES)
        splits = min(blocks, max(1, -(-2 * threads // (n_batch * n_group))))
        dB_part, dC_part = (
            torch.zeros(n_batch, n_group, splits, length, n_state, dtype=dtype) for _ in range(2)
        )
        selective_scan_backward(
            dout.to(dtype).numpy(), dlast.to(dtype).contiguous().numpy(), *arrays,
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
