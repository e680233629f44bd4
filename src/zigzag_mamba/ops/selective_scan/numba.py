"""The ``numba`` backend: fused selective-scan kernels for the CPU, compiled by numba.

Layouts (one floating dtype, float32 or float64): u, delta, z, out (nb, nd, L), and dout in the
backward, with any strides: each chunk of them is copied into a tile anyway, so the transposed
views a Mamba mixer passes (token-major (nb, L, nd) memory) are read in place instead of being
copied first. The rest is C-contiguous: A (nd, N); Bt, Ct (nb, G, L, N), i.e. B and C transposed
so that the loop over the state dimension is contiguous; Dv, bias (nd,) (zeros when absent); z
has length 0 along L when absent. ``ckpt`` (nb, nd, ceil(L / chunk), N) holds the state entering
each chunk: the forward writes it, the backward recomputes each chunk's states from it, so no
(nb, nd, L, N) tensor ever exists.

Both kernels vectorise across channels: each parallel job owns a block of ``LANES`` channels
of one batch element (a multiple of the SIMD width), so every inner loop runs over the block's
lanes with unit stride, and the state is an (N, LANES) array. Per chunk, u, delta, z (and in
the backward dout) are transposed into (chunk, LANES) tiles, dt, softplus' derivative and the
silu gate are computed for the whole tile, and the recurrence then touches only small local
arrays and one element each of B and C per state. The backward walks chunks in reverse,
recomputes the chunk's states and decays from its checkpoint into an L2-sized scratch, and runs
the adjoint recurrence over it; dB and dC, which sum over the channels of a group, are reduced
over the block's lanes and accumulated into per-job partial buffers (``dB_part[b, g, s]``) so that
parallel jobs never write the same element. The backward's symbols (adj, carry, q, adj_b)
are those derived in :mod:`zigzag_mamba.ops.selective_scan`; the building blocks (lane tiles,
vectorisable exp) are in :mod:`.numba_math`. docs/kernels.md records what their tuning measured.

Importing this module imports numba and compiles nothing; kernels compile (or load from numba's
on-disk cache) at their first call. The registry imports it lazily, so a broken numba install
only disables this backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.selective_scan.numba_math import (
    FAST,
    HALF_LANES,
    LANES,
    ONE,
    ZERO,
    block_bounds,
    exp,
    load_A,
    load_lanes,
    load_tile,
    log1p_unit,
    stack_tile,
    store_tile,
    wide_vectors,
)
from zigzag_mamba.ops.utils import compute_dtype

# The transcendental tiles are heap arrays passed to ordinary calls: these loops vectorise on
# their own, and the hot loops only read the tiles.


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _tile_dt(bias, softplus, steps, dts, ddts):
    """In place: dts = softplus(delta + bias) (or delta + bias); ddts = d dt / d delta."""
    for i in range(steps):
        for w in range(LANES):
            x = dts[i, w] + bias[w]
            if softplus:
                e = exp(-abs(x))  # softplus and sigmoid from one exp, stable for either sign
                dts[i, w] = max(x, ZERO) + log1p_unit(e)
                ddts[i, w] = (ONE if x >= ZERO else e) / (ONE + e)
            else:
                dts[i, w] = x
                ddts[i, w] = ONE


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _tile_gate(steps, gate, dgate):
    """In place: gate = silu(z); dgate = silu'(z)."""
    for i in range(steps):
        for w in range(LANES):
            zi = gate[i, w]
            sig = ONE / (ONE + exp(-zi))
            gate[i, w] = zi * sig
            dgate[i, w] = sig * (ONE + zi * (ONE - sig))


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _forward_block(b, g, d0, width, inputs, softplus, chunk, out, last, ckpt):
    wide_vectors()
    u, delta, A, Bt, Ct, Dv, z, bias = inputs
    length, n_state, dtype = u.shape[2], A.shape[1], u.dtype
    has_z = z.shape[2] == length
    x, a = stack_tile(n_state, dtype), stack_tile(n_state, dtype)
    vecs = stack_tile(2, dtype)
    skip, bias_w = vecs[0], vecs[1]
    us, dtus, ys = stack_tile(chunk, dtype), stack_tile(chunk, dtype), stack_tile(chunk, dtype)
    dts, ddts = np.empty((chunk, LANES), dtype), np.empty((chunk, LANES), dtype)
    gate, dgate = np.ones((chunk, LANES), dtype), np.empty((chunk, LANES), dtype)
    x[:] = 0
    load_A(A, d0, width, a)
    load_lanes(Dv, d0, width, skip)
    load_lanes(bias, d0, width, bias_w)
    for c0 in range(0, length, chunk):
        steps = min(chunk, length - c0)
        for w in range(width):
            for n in range(n_state):
                ckpt[b, d0 + w, c0 // chunk, n] = x[n, w]
        load_tile(u, b, d0, width, c0, steps, us)
        load_tile(delta, b, d0, width, c0, steps, dts)
        _tile_dt(bias_w, softplus, steps, dts, ddts)
        if has_z:
            load_tile(z, b, d0, width, c0, steps, gate)
            _tile_gate(steps, gate, dgate)
        # Whole-tile loops for the per-step terms keep the recurrence below down to the loop
        # over the state.
        for i in range(steps):
            for w in range(LANES):
                dtus[i, w] = dts[i, w] * us[i, w]
                ys[i, w] = skip[w] * us[i, w]
        for i in range(steps):
            t = c0 + i
            for n in range(n_state):
                bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                for w in range(LANES):
                    x[n, w] = exp(dts[i, w] * a[n, w]) * x[n, w] + dtus[i, w] * bn
                    ys[i, w] += x[n, w] * cn
        for i in range(steps):
            for w in range(LANES):
                ys[i, w] *= gate[i, w]
        store_tile(ys, b, d0, width, c0, steps, out)
    for w in range(width):
        for n in range(n_state):
            last[b, d0 + w, n] = x[n, w]


@njit(cache=True, parallel=True)
def selective_scan_forward(inputs, softplus, chunk, out, last, ckpt):
    """Fill ``out`` (nb, nd, L), ``last`` (nb, nd, N) and ``ckpt`` from ``inputs``, the tuple
    (u, delta, A, Bt, Ct, Dv, z, bias) (see the module docstring)."""
    u, Bt = inputs[0], inputs[3]
    n_batch, n_chan, n_group = u.shape[0], u.shape[1], Bt.shape[1]
    n_block = n_group * -(-(n_chan // n_group) // LANES)
    for job in prange(n_batch * n_block):
        b = job // n_block
        g, d0, width = block_bounds(n_chan, n_group, job % n_block)
        _forward_block(b, g, d0, width, inputs, softplus, chunk, out, last, ckpt)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _backward_block(b, g, s, d0, width, dout, dlast, inputs, softplus, chunk, ckpt, grads):
    wide_vectors()
    u, delta, A, Bt, Ct, Dv, z, bias = inputs
    du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part = grads
    length, n_state, dtype = u.shape[2], A.shape[1], u.dtype
    has_z = z.shape[2] == length
    # carry[n, w]: a_{t+1} * adj_{t+1}, what the later steps pass back to step t.
    a, carry = stack_tile(n_state, dtype), stack_tile(n_state, dtype)
    dA_acc = stack_tile(n_state, dtype)
    vecs = stack_tile(4, dtype)
    skip, bias_w, dD_acc, dbias_acc = vecs[0], vecs[1], vecs[2], vecs[3]
    us, ys, gouts = stack_tile(chunk, dtype), stack_tile(chunk, dtype), stack_tile(chunk, dtype)
    dys, dtus = stack_tile(chunk, dtype), stack_tile(chunk, dtype)
    adj_b, sum_qa = stack_tile(chunk, dtype), stack_tile(chunk, dtype)  # per step: sum_n adj B, q A
    dts, ddts = np.empty((chunk, LANES), dtype), np.empty((chunk, LANES), dtype)
    gate, dgate = np.ones((chunk, LANES), dtype), np.zeros((chunk, LANES), dtype)
    # States before each step of the chunk (xs[i + 1] after step i) and the step's decays: with
    # N = 16 and chunk = 64 about 270 KB, which stays in L2 while the chunk is reversed. They
    # live on the heap, since their size would overflow small thread stacks for large N.
    xs = np.empty((chunk + 1, n_state, LANES), dtype)
    decays = np.empty((chunk, n_state, LANES), dtype)
    # The chunk's dB and dC terms, added to the partial buffers once per chunk.
    dB_chunk, dC_chunk = np.empty((chunk, n_state), dtype), np.empty((chunk, n_state), dtype)
    load_A(A, d0, width, a)
    load_lanes(Dv, d0, width, skip)
    load_lanes(bias, d0, width, bias_w)
    for n in range(n_state):
        for w in range(LANES):
            carry[n, w] = dlast[b, d0 + w, n] if w < width else 0
    dA_acc[:] = 0
    dD_acc[:] = 0
    dbias_acc[:] = 0
    for c0 in range((length - 1) // chunk * chunk, -1, -chunk):
        steps = min(chunk, length - c0)
        load_tile(u, b, d0, width, c0, steps, us)
        load_tile(delta, b, d0, width, c0, steps, dts)
        _tile_dt(bias_w, softplus, steps, dts, ddts)
        load_tile(dout, b, d0, width, c0, steps, gouts)
        if has_z:
            load_tile(z, b, d0, width, c0, steps, gate)
            _tile_gate(steps, gate, dgate)
        for n in range(n_state):
            for w in range(LANES):
                xs[0, n, w] = ckpt[b, d0 + w, c0 // chunk, n] if w < width else 0
        for i in range(steps):
            for w in range(LANES):
                dtus[i, w] = dts[i, w] * us[i, w]
                dys[i, w] = gouts[i, w] * gate[i, w]
                ys[i, w] = skip[w] * us[i, w]
                adj_b[i, w] = sum_qa[i, w] = 0
        # Recompute the chunk's states; dC needs only them, so it is accumulated here too.
        for i in range(steps):
            t = c0 + i
            for n in range(n_state):
                bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                acc_c = ZERO
                for w in range(LANES):
                    decay = exp(dts[i, w] * a[n, w])
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
            # Half the lanes at a time: the per-step sums over the state (adj_b, sum_qa) then
            # fit in registers across the loop over n.
            for v in range(0, LANES, HALF_LANES):
                for n in range(n_state):
                    bn, cn = Bt[b, g, t, n], Ct[b, g, t, n]
                    acc_b = ZERO
                    for w in range(v, v + HALF_LANES):
                        adj = carry[n, w] + dys[i, w] * cn
                        acc_b += adj * dtus[i, w]
                        adj_b[i, w] += adj * bn
                        decay = decays[i, n, w]
                        q = adj * decay * xs[i, n, w]
                        dA_acc[n, w] += q * dts[i, w]
                        sum_qa[i, w] += q * a[n, w]
                        carry[n, w] = adj * decay
                    dB_chunk[i, n] += acc_b
        for i in range(steps):
            for n in range(n_state):
                dB_part[b, g, s, c0 + i, n] += dB_chunk[i, n]
                dC_part[b, g, s, c0 + i, n] += dC_chunk[i, n]
        # The tiles of u, dout and y take du, ddelta and dz: each element is read before it
        # is overwritten, and stack memory is scarce.
        du_tile, ddelta_tile, dz_tile = us, gouts, ys
        for i in range(steps):
            for w in range(LANES):
                ut, gout, y, dy = us[i, w], gouts[i, w], ys[i, w], dys[i, w]
                dD_acc[w] += dy * ut
                dd = (sum_qa[i, w] + ut * adj_b[i, w]) * ddts[i, w]
                dbias_acc[w] += dd
                dz_tile[i, w] = y * (gout * dgate[i, w])
                du_tile[i, w] = dy * skip[w] + dts[i, w] * adj_b[i, w]
                ddelta_tile[i, w] = dd
        store_tile(du_tile, b, d0, width, c0, steps, du)
        store_tile(ddelta_tile, b, d0, width, c0, steps, ddelta)
        if has_z:
            store_tile(dz_tile, b, d0, width, c0, steps, dz)
    for w in range(width):
        for n in range(n_state):
            dA_part[b, d0 + w, n] = dA_acc[n, w]
        dD_part[b, d0 + w] = dD_acc[w]
        dbias_part[b, d0 + w] = dbias_acc[w]


@njit(cache=True, parallel=True)
def selective_scan_backward(dout, dlast, inputs, softplus, chunk, ckpt, grads):
    """Gradients of the forward above given ``dout`` (nb, nd, L) and ``dlast`` (nb, nd, N), into
    ``grads``, the tuple (du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part).

    ``du``, ``ddelta``, ``dz`` are written in full. ``dA_part`` (nb, nd, N), ``dD_part`` and
    ``dbias_part`` (nb, nd) hold per-batch terms (the caller sums over nb). ``dB_part`` and
    ``dC_part`` (nb, G, S, L, N) must be zero on entry: job (b, g, s) adds the terms of the s-th
    of S slices of group g's channel blocks; the caller sums over S.
    """
    u, Bt, dB_part = inputs[0], inputs[3], grads[6]
    n_batch, n_chan = u.shape[0], u.shape[1]
    n_group, n_split = Bt.shape[1], dB_part.shape[2]
    per_block = -(-(n_chan // n_group) // LANES)
    for job in prange(n_batch * n_group * n_split):
        b, rest = job // (n_group * n_split), job % (n_group * n_split)
        g, s = rest // n_split, rest % n_split
        for k in range(s * per_block // n_split, (s + 1) * per_block // n_split):
            _, d0, width = block_bounds(n_chan, n_group, g * per_block + k)
            _backward_block(b, g, s, d0, width, dout, dlast, inputs, softplus, chunk, ckpt, grads)


# One numba kernel at a time in this process. numba's workqueue threading layer (the one left
# where neither OpenMP nor TBB loads) aborts the process when two threads launch parallel
# kernels at once, and under the other layers every concurrent launch would start a team of
# torch's thread count on the same cores. A kernel already keeps every thread busy, so waiting
# for the one running costs no throughput.
_LAUNCH = threading.Lock()


@contextlib.contextmanager
def torch_thread_count() -> Iterator[int]:
    """Run a numba kernel alone (:data:`_LAUNCH`) with torch's thread count, and give torch its
    count back afterwards.

    The kernels' parallel loops call only serial functions and never call back into torch, so
    no parallel region ever runs inside another. numba's OpenMP layer shares the OpenMP runtime,
    and so the thread pool, with torch; it resets the runtime's thread count when numba sets its
    own, so a user's ``torch.set_num_threads`` would otherwise be lost.
    """
    with _LAUNCH:
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


def _arrays(x: ScanInputs, dtype: torch.dtype) -> tuple[np.ndarray, ...]:
    """The kernels' inputs (u, delta, A, Bt, Ct, Dv, z, bias) in ``dtype``."""
    u = x.u
    zeros = torch.zeros(u.shape[1], dtype=dtype)
    tensors = [
        u.to(dtype),
        x.delta.to(dtype),
        x.A.to(dtype).contiguous(),
        _state_last(x.B, dtype),
        _state_last(x.C, dtype),
        zeros if x.D is None else x.D.to(dtype).contiguous(),
        u.new_empty((*u.shape[:2], 0), dtype=dtype) if x.z is None else x.z.to(dtype),
        zeros if x.delta_bias is None else x.delta_bias.to(dtype).contiguous(),
    ]
    return tuple(t.numpy() for t in tensors)


def forward(x: ScanInputs, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward kernel on CPU tensors: (out in u's dtype, last state, chunk checkpoints)."""
    dtype = compute_dtype(x.u)
    n_batch, n_chan, length = x.u.shape
    n_state = x.A.shape[1]
    arrays = _arrays(x, dtype)
    out = torch.empty(n_batch, n_chan, length, dtype=dtype)
    last = torch.empty(n_batch, n_chan, n_state, dtype=dtype)
    ckpt = torch.empty(n_batch, n_chan, -(-length // chunk), n_state, dtype=dtype)
    with torch_thread_count():
        selective_scan_forward(
            arrays, x.delta_softplus, chunk, out.numpy(), last.numpy(), ckpt.numpy()
        )
    return out.to(x.u.dtype), last, ckpt


def backward(
    x: ScanInputs, checkpoints: Tensor, dout: Tensor, dlast: Tensor | None, chunk: int
) -> ScanGrads:
    """The gradients in the compute dtype; dB and dC come back in B's and C's layout."""
    dtype = checkpoints.dtype
    arrays = _arrays(x, dtype)
    n_batch, n_chan, length = x.u.shape
    n_state, n_group = x.A.shape[1], arrays[3].shape[1]
    if dlast is None:
        dlast = torch.zeros(n_batch, n_chan, n_state, dtype=dtype)
    du, ddelta = torch.empty_like(x.u, dtype=dtype), torch.empty_like(x.u, dtype=dtype)
    dz = torch.empty(arrays[6].shape, dtype=dtype)
    dA_part = torch.empty(n_batch, n_chan, n_state, dtype=dtype)
    dD_part, dbias_part = (torch.empty(n_batch, n_chan, dtype=dtype) for _ in range(2))
    with torch_thread_count() as threads:
        # Enough independent slices of each group to keep every thread busy; each slice owns
        # a partial dB/dC buffer, summed below.
        blocks = -(-(n_chan // n_group) // LANES)
        splits = min(blocks, max(1, -(-2 * threads // (n_batch * n_group))))
        dB_part, dC_part = (
            torch.zeros(n_batch, n_group, splits, length, n_state, dtype=dtype) for _ in range(2)
        )
        grads = (du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part)
        selective_scan_backward(
            dout.to(dtype).numpy(),
            dlast.to(dtype).contiguous().numpy(),
            arrays,
            x.delta_softplus,
            chunk,
            checkpoints.contiguous().numpy(),
            tuple(t.numpy() for t in grads),
        )
    dB, dC = (part.sum(2).transpose(-1, -2).reshape(x.B.shape) for part in (dB_part, dC_part))
    return ScanGrads(
        du,
        ddelta,
        dA_part.sum(0),
        dB,
        dC,
        None if x.D is None else dD_part.sum(0),
        None if x.z is None else dz,
        None if x.delta_bias is None else dbias_part.sum(0),
    )
