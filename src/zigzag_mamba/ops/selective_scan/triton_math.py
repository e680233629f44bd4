"""The Triton selective scan's building blocks: tiles, dt, the affine map the scans compose, and
the decayed sums the chunk kernels share (:mod:`.triton_kernels` has the kernels)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(v) = exp2(v * LOG2E)


@triton.jit
def _log1p(e):
    # log(y) * e / (y - 1) with y = 1 + e undoes the rounding of 1 + e (Goldberg's trick), so
    # tiny e keep their relative accuracy; y == 1 only when e is below fp32's epsilon.
    y = 1.0 + e
    return tl.where(y == 1.0, e, tl.log(y) * (e / tl.where(y == 1.0, 1.0, y - 1.0)))


@triton.jit
def delta_tile(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, pre-softplus value) of a tile; dt is 0 on masked elements, so they never move."""
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        # Above 20, softplus(x) == x in fp32 (torch's threshold too); clamping avoids exp overflow.
        dt = tl.where(raw > 20.0, raw, _log1p(tl.exp(tl.minimum(raw, 20.0))))
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def compose(a1, b1, a2, b2):
    """The affine map x -> a1 x + b1, then x -> a2 x + b2: one step of the recurrence after
    another (in a scan backward in time, (a1, b1) is the later steps', so the same rule
    serves)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def chunk_tile(L, channels, per_group, blocks, BLOCK_D: tl.constexpr, T: tl.constexpr):
    """Indices of this program's (BLOCK_D, T) tile: program (batch, group, block), chunk."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    groups = channels // per_group
    batch = (pid // (groups * blocks)).to(tl.int64)
    group = (pid // blocks) % groups
    local = (pid % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d = group * per_group + local
    t = chunk * T + tl.arange(0, T)
    mask = (local < per_group)[:, None] & (t < L)[None, :]
    return batch, group, chunk, d, local < per_group, t, mask


@triton.jit
def chunk_dt(
    delta_ptr,
    bias_ptr,
    sums_ptr,
    L,
    channels,
    per_group,
    blocks,
    n_chunks,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T: tl.constexpr,
):
    """This program's tile and its dt; stores the chunk's total dt, by which the chain decays."""
    batch, group, chunk, d, d_mask, t, mask = chunk_tile(L, channels, per_group, blocks, BLOCK_D, T)
    rows = (batch * channels + d) * L
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dt, _ = delta_tile(delta_ptr + rows[:, None] + t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
    cell = (batch * channels + d) * n_chunks + chunk  # (B, D, n_chunks) offsets
    tl.store(sums_ptr + cell, tl.sum(dt, axis=1), mask=d_mask)
    return batch, group, d, d_mask, t, mask, rows, dt, cell


@triton.jit
def decayed_sums(
    exponents, weights, A_ptr, X_ptr, out_ptr, batch, group, d, d_mask, t, cell, L, groups, n_state
):
    """For every state n: ``out[cell, n] = sum_t exp(A[d, n] * exponents_t) weights_t X[n, t]``,
    with X the chunk's rows of B or C."""
    bc = ((batch * groups + group) * n_state) * L + t
    for n in range(n_state):
        a2 = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
        x_n = tl.load(X_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        total = tl.sum(tl.exp2(exponents * a2[:, None]) * (weights * x_n[None, :]), axis=1)
        tl.store(out_ptr + cell * n_state + n, total, mask=d_mask)
