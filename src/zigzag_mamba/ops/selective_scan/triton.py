"""The ``triton`` backend: the selective scan as Triton kernels, parallel over time.

Semantics and layouts are those of
:func:`zigzag_mamba.ops.selective_scan.selective_scan_reference`: u, delta, z (B, D, L);
A (D, N); B, C (B, N, L) or grouped (B, G, N, L); D, delta_bias (D,); last state (B, D, N).
Inputs may be fp32, fp16 or bf16; every value is converted to fp32 on load, every state and sum
is fp32, and results are stored in their tensor's dtype (the output in u's).

The sequence is cut into chunks of ``chunk`` (:data:`~zigzag_mamba.ops.selective_scan.CHUNK`)
steps, and every kernel but the two short chains runs one program per chunk and block of
channels, so the work is parallel over time as well as over channels. Per chunk, a program holds
(channels, steps) tiles of u, dt, ... in registers and loops over the N states; for each state
it runs the recurrence over the chunk's steps as a scan (``tl.associative_scan`` over the pairs
(decay a_t, input b_t), composed as affine maps x -> a x + b), so no step waits on the one
before it in a serial loop. The chunks are joined through the state entering each one:

forward
    1. ``_chunk_end_kernel``: each chunk's end state from a zero start,
       ``sum_t exp(A * (dt_{t+1} + ... + dt_last)) * dt_t u_t B_t`` (a sum, no scan), and its
       total dt;
    2. ``_chain_kernel``: the states entering the chunks, ``x <- exp(A * sum dt) * x + end``,
       chunk after chunk (a scan over blocks of chunks): the *checkpoints*, (B, D, n_chunks, N)
       fp32, and the last state;
    3. ``_output_kernel``: each chunk's states from its checkpoint, the readout and the gate.

backward (the symbols adj, carry, q, adj_b, dy are those derived in
:mod:`zigzag_mamba.ops.selective_scan`)
    1. ``_chunk_carry_kernel``: what each chunk passes back to the one before it from a zero
       carry, ``sum_t exp(A * (dt_first + ... + dt_t)) * dy_t C_t``, and its total dt;
    2. ``_chain_kernel`` in reverse: the carry entering each chunk from the one after it
       (starting from the last state's gradient);
    3. ``_gradient_kernel``: per tile of a few chunks, the states by a forward scan from the
       checkpoint, adj by a second forward scan over the tile's inputs taken last step first
       (Triton's reverse scan flips its operands across lanes with shuffles), put back in time
       order through a small scratch, then every gradient. adj decays by a_{t+1}: dt is loaded
       a second time, one step later. q_t = adj_t a_t x_{t-1} is evaluated as
       adj_t (x_t - dt_t u_t B_t), as mamba-ssm's kernel does, so no state has to be shifted.

Reductions without atomics, and bit-identical from run to run: dB and dC (sums over the
channels of a group) are summed over channel blocks inside a program, which walks all the
channel blocks of one *split* of its group, adding into its own rows of a (B, G, splits, N, L)
partial; a launch has just enough splits to fill the GPU, and torch adds them. dA, dD and
d(delta_bias) are written per tile ((B, D, n_tiles, N) and (B, D, n_tiles)) and summed by
torch. The backward's extra memory is thus the carries (as large as the checkpoints) and small
buffers; none grows with the number of channel blocks. docs/triton_scan.md has the design, the
alternatives compiled and counted against it, and its distance to the hardware's floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(v) = exp2(v * LOG2E)
# Launch defaults on a GPU, (channels per program, warps): see docs/triton_scan.md.
_FWD_LAUNCH = (16, 4)  # the forward's chunk kernels and the backward's first pass
_BWD_LAUNCH = (4, 4)  # the backward's gradient kernel (with tiles of _TILE_CHUNKS chunks)
# The chains: (state rows per program, chunks per step of the chain).
_CHAIN_ROWS, _CHAIN_CHUNKS = 32, 32
# Chunks per program of the gradient kernel.
_TILE_CHUNKS = 4
# Programs the gradient kernel aims at per SM when it picks the number of splits.
_PROGRAMS_PER_SM = 4


@triton.jit
def _log1p(e):
    # log(y) * e / (y - 1) with y = 1 + e undoes the rounding of 1 + e (Goldberg's trick), so
    # tiny e keep their relative accuracy; y == 1 only when e is below fp32's epsilon.
    y = 1.0 + e
    return tl.where(y == 1.0, e, tl.log(y) * (e / tl.where(y == 1.0, 1.0, y - 1.0)))


@triton.jit
def _delta_tile(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
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
def _compose(a1, b1, a2, b2):
    """The affine map x -> a1 x + b1, then x -> a2 x + b2: one step of the recurrence after
    another (in a scan backward in time, (a1, b1) is the later steps', so the same rule
    serves)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chunk_tile(L, channels, per_group, blocks, BLOCK_D: tl.constexpr, T: tl.constexpr):
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
def _chunk_end_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, ends_ptr, sums_ptr,
    L, channels, per_group, blocks, n_state, n_chunks,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    batch, group, chunk, d, d_mask, t, mask = _chunk_tile(
        L, channels, per_group, blocks, BLOCK_D, T
    )
    rows = (batch * channels + d) * L
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dt, _ = _delta_tile(delta_ptr + rows[:, None] + t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
    u = tl.load(u_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    dtu = dt * u
    # dt summed over the steps after t, to the chunk's end: the decay from step t to the end.
    after = tl.cumsum(dt, axis=1, reverse=True) - dt
    cell = (batch * channels + d) * n_chunks + chunk  # (B, D, n_chunks) offsets
    tl.store(sums_ptr + cell, tl.sum(dt, axis=1), mask=d_mask)
    bc = ((batch * (channels // per_group) + group) * n_state) * L + t
    for n in range(n_state):
        a2 = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
        b_n = tl.load(B_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        end = tl.sum(tl.exp2(after * a2[:, None]) * (dtu * b_n[None, :]), axis=1)
        tl.store(ends_ptr + cell * n_state + n, end, mask=d_mask)


@triton.jit
def _chunk_carry_kernel(
    gout_ptr, delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, carries_ptr, sums_ptr,
    L, channels, per_group, blocks, n_state, n_chunks,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    batch, group, chunk, d, d_mask, t, mask = _chunk_tile(
        L, channels, per_group, blocks, BLOCK_D, T
    )
    rows = (batch * channels + d) * L
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dt, _ = _delta_tile(delta_ptr + rows[:, None] + t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
    dy = tl.load(gout_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zt = tl.load(z_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
        dy *= zt * tl.sigmoid(zt)
    # dt summed from the chunk's start through step t: the decay from step t to the chunk's
    # start, including a_start (the carry is what the chunk passes to the step before it).
    through = tl.cumsum(dt, axis=1)
    cell = (batch * channels + d) * n_chunks + chunk
    tl.store(sums_ptr + cell, tl.sum(dt, axis=1), mask=d_mask)
    bc = ((batch * (channels // per_group) + group) * n_state) * L + t
    for n in range(n_state):
        a2 = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
        c_n = tl.load(C_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        carry = tl.sum(tl.exp2(through * a2[:, None]) * (dy * c_n[None, :]), axis=1)
        tl.store(carries_ptr + cell * n_state + n, carry, mask=d_mask)


@triton.jit
def _chain_kernel(
    values_ptr, sums_ptr, A_ptr, init_ptr, last_ptr,
    rows, channels, n_state, n_chunks,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr,
    ROWS: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    """Join the chunks: s <- exp(A * sums[c]) * s + values[c], chunk after chunk (last to first
    when REVERSE), from ``init`` (or zero). Each values[c] is replaced by the s entering chunk
    c; the final s goes to ``last`` (with STORE_LAST). One row is one (batch, channel, state),
    and the chunks are taken K at a time, as a scan over a (ROWS, K) tile."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows
    cell = row // n_state  # batch * channels + channel
    n = row % n_state
    a2 = tl.load(A_ptr + (cell % channels) * n_state + n, mask=row_mask, other=0.0)
    a2 = a2.to(tl.float32) * LOG2E
    if HAS_INIT:
        s = tl.load(init_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((ROWS,), dtype=tl.float32)
    j = tl.arange(0, K)
    for k0 in range(0, n_chunks, K):
        # Column j is the j-th chunk of this step in the chain's order; `prev` the one before it
        # in that order (none for column 0: the identity map, so the scan yields what enters
        # each chunk from the step's start).
        if REVERSE:
            c = n_chunks - 1 - k0 - j
            prev = c + 1
        else:
            c = k0 + j
            prev = c - 1
        live = row_mask[:, None] & ((c >= 0) & (c < n_chunks))[None, :]
        has_prev = live & (j > 0)[None, :]
        at = cell[:, None] * n_chunks
        sums = tl.load(sums_ptr + at + c[None, :], mask=live, other=0.0)
        vals = tl.load(values_ptr + (at + c[None, :]) * n_state + n[:, None], mask=live, other=0.0)
        prev_sums = tl.load(sums_ptr + at + prev[None, :], mask=has_prev, other=0.0)
        prev_vals = tl.load(
            values_ptr + (at + prev[None, :]) * n_state + n[:, None], mask=has_prev, other=0.0
        )
        decay, offset = tl.associative_scan(
            (tl.exp2(prev_sums * a2[:, None]), prev_vals), 1, _compose
        )
        entering = offset + decay * s[:, None]
        tl.store(values_ptr + (at + c[None, :]) * n_state + n[:, None], entering, mask=live)
        # Past the step's last chunk: s through it (padding columns are identity maps).
        total_decay, total = tl.associative_scan((tl.exp2(sums * a2[:, None]), vals), 1, _compose)
        is_last = (j == K - 1)[None, :]
        s = tl.sum(tl.where(is_last, total + total_decay * s[:, None], 0.0), axis=1)
    if STORE_LAST:
        tl.store(last_ptr + row, s, mask=row_mask)


@triton.jit
def _output_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, out_ptr,
    L, channels, per_group, blocks, n_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    batch, group, chunk, d, d_mask, t, mask = _chunk_tile(
        L, channels, per_group, blocks, BLOCK_D, T
    )
    rows = (batch * channels + d) * L
    tile = rows[:, None] + t[None, :]
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dt, _ = _delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
    u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    dtu = dt * u
    cell = (batch * channels + d) * n_chunks + chunk
    bc = ((batch * (channels // per_group) + group) * n_state) * L + t
    y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
    for n in range(n_state):
        a2 = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
        b_n = tl.load(B_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        decay, x = tl.associative_scan((tl.exp2(dt * a2[:, None]), dtu * b_n[None, :]), 1, _compose)
        entering = tl.load(ckpt_ptr + cell * n_state + n, mask=d_mask, other=0.0)
        x += decay * entering[:, None]
        y += x * c_n[None, :]
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None] * u
    if HAS_Z:
        zt = tl.load(z_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        y *= zt * tl.sigmoid(zt)
    tl.store(out_ptr + tile, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_kernel(
    gout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    ckpt_ptr, carries_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    L, channels, per_group, blocks, splits, n_state, n_chunks, n_tiles,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """Program (batch, group, split), tile of TILE steps (a whole number of chunks): every
    gradient of the tile for the channel blocks split, split + splits, ... of the group.

    Per state n, the states come from a forward scan from the tile's checkpoint. adj runs
    backward in time: it is scanned forward over the tile's inputs last step first, from the
    carry entering the tile's last chunk, then stored to this program's scratch last step first
    and loaded back in time order. (``tl.associative_scan(..., reverse=True)`` flips both
    operands and both results across the warp's lanes, five shuffles per value and flip in
    Triton 3.6.) Its decay is a_{t+1}, from dt one step later; the tile's last step decays by 1
    into the carry, which holds a_{t+1} already.
    """
    pid = tl.program_id(0)
    tile_id = tl.program_id(1)
    groups = channels // per_group
    batch = (pid // (groups * splits)).to(tl.int64)
    group = (pid // splits) % groups
    split = pid % splits
    start = tile_id * TILE
    steps = tl.arange(0, TILE)
    t = start + steps
    t_mask = t < L
    r = start + TILE - 1 - steps  # the tile's steps, last first
    r_mask = r < L
    first_chunk = tile_id * (TILE // T)
    last_chunk = tl.minimum(first_chunk + TILE // T, n_chunks) - 1
    bc = ((batch * groups + group) * n_state) * L
    rows_local = tl.arange(0, BLOCK_D)
    # B and C rows as (BLOCK_D, TILE) tiles (every row the same), in the layout of the others.
    along = rows_local[:, None] * 0 + t[None, :]
    # Two (BLOCK_D, TILE) slots of scratch, used by turns: one barrier per state suffices.
    program = tile_id.to(tl.int64) * tl.num_programs(0) + pid
    slot = scratch_ptr + program * (2 * BLOCK_D * TILE) + rows_local[:, None] * TILE
    part = (pid.to(tl.int64) * n_state) * L + t  # this split's rows of the dB, dC partials
    for block in range(split, blocks, splits):
        local = block * BLOCK_D + rows_local
        d_mask = local < per_group
        d = group * per_group + local
        mask = d_mask[:, None] & t_mask[None, :]
        tile = ((batch * channels + d) * L)[:, None] + t[None, :]
        bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        skip = 0.0
        if HAS_D:
            skip = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
        dt, _ = _delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(gout_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            dy *= zt * tl.sigmoid(zt)
        # The adjoint's inputs, last step first (loaded in order and flipped: a load in reverse
        # gets a layout of its own, and the scans with it).
        next_mask = mask & (t + 1 < L)[None, :] & (steps < TILE - 1)[None, :]
        dt_next, _ = _delta_tile(delta_ptr + tile + 1, next_mask, bias, HAS_BIAS, SOFTPLUS)
        dt_next = tl.flip(dt_next, 1)
        dy_back = tl.flip(dy, 1)
        cell = (batch * channels + d) * n_chunks
        tile_cell = (batch * channels + d) * n_tiles + tile_id
        adj_b = tl.zeros((BLOCK_D, TILE), dtype=tl.float32)  # sum_n adj B
        q_a = tl.zeros((BLOCK_D, TILE), dtype=tl.float32)  # sum_n q A
        y = tl.zeros((BLOCK_D, TILE), dtype=tl.float32)  # sum_n C x
        for n in range(n_state):
            a_n = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32)
            a2 = a_n * LOG2E
            b_n = tl.load(B_ptr + bc + n * L + along, mask=t_mask[None, :], other=0.0)
            b_n = b_n.to(tl.float32)
            c_n = tl.load(C_ptr + bc + n * L + along, mask=t_mask[None, :], other=0.0)
            c_n = c_n.to(tl.float32)
            c_back = tl.load(C_ptr + bc + n * L + r, mask=r_mask, other=0.0).to(tl.float32)
            inp = dtu * b_n
            decay, x = tl.associative_scan((tl.exp2(dt * a2[:, None]), inp), 1, _compose)
            entering = tl.load(ckpt_ptr + (cell + first_chunk) * n_state + n, mask=d_mask)
            x += decay * entering[:, None]
            back_decay, adj_back = tl.associative_scan(
                (tl.exp2(dt_next * a2[:, None]), dy_back * c_back[None, :]), 1, _compose
            )
            carry = tl.load(carries_ptr + (cell + last_chunk) * n_state + n, mask=d_mask)
            adj_back += back_decay * carry[:, None]
            # Uses alternate slots (across blocks too, whatever the parity of n_state).
            turn = slot + (((block - split) // splits * n_state + n) % 2) * (BLOCK_D * TILE)
            tl.store(turn + (TILE - 1 - steps)[None, :], adj_back)
            tl.debug_barrier()
            adj = tl.load(turn + steps[None, :])
            adj_b += adj * b_n
            q = adj * (x - inp)  # = adj_t a_t x_{t-1}
            q_a += q * a_n[:, None]
            tl.store(dA_ptr + tile_cell * n_state + n, tl.sum(q * dt, axis=1), mask=d_mask)
            if HAS_Z:
                y += x * c_n
            # This split's dB and dC rows, summed over its blocks in order.
            db = tl.sum(adj * dtu, axis=0)
            dc = tl.sum(dy * x, axis=0)
            if block != split:
                db += tl.load(dB_ptr + part + n * L, mask=t_mask, other=0.0)
                dc += tl.load(dC_ptr + part + n * L, mask=t_mask, other=0.0)
            tl.store(dB_ptr + part + n * L, db, mask=t_mask)
            tl.store(dC_ptr + part + n * L, dc, mask=t_mask)
        # What only the last steps need is loaded again (from cache), not kept in registers.
        u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        ddt = q_a + u * adj_b
        if SOFTPLUS:
            _, raw = _delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
            ddt *= tl.sigmoid(raw)
        # Past the end, adj holds the last state's gradient and q need not vanish.
        ddt = tl.where(mask, ddt, 0.0)
        tl.store(du_ptr + tile, (dt * adj_b + skip * dy).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + tile, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            g = tl.load(gout_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            zt = tl.load(z_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            gate = tl.sigmoid(zt)
            dz = g * (y + skip * u) * gate * (1.0 + zt * (1.0 - gate))
            tl.store(dz_ptr + tile, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_D:
            tl.store(dD_ptr + tile_cell, tl.sum(dy * u, axis=1), mask=d_mask)
        if HAS_BIAS:
            tl.store(dbias_ptr + tile_cell, tl.sum(ddt, axis=1), mask=d_mask)


def _grouped(bc: torch.Tensor) -> torch.Tensor:
    """B or C as a contiguous (B, G, N, L) tensor; ungrouped (B, N, L) is the case G = 1."""
    return (bc.unsqueeze(1) if bc.dim() == 3 else bc).contiguous()


def _channel_block(per_group: int, block_d: int | None, default: int, device) -> int:
    """Channels per program: the override, else the default (on the CPU, at most the group)."""
    if block_d is not None:
        return block_d
    if device.type != "cuda":
        return min(default, next_power_of_2(per_group))
    return default


def _tile_steps(chunk: int, length: int, device: torch.device, tile: int | None) -> int:
    """Steps per program of the gradient kernel: ``_TILE_CHUNKS`` chunks (on the CPU two, so
    that tests cover tiles of several chunks), no more than the sequence needs."""
    if tile is None:
        tile = chunk * (_TILE_CHUNKS if device.type == "cuda" else 2)
        tile = max(chunk, min(tile, next_power_of_2(length)))
    if tile % chunk:
        raise ValueError(f"tile must be a multiple of chunk ({chunk}), got {tile}")
    _check_powers_of_two(tile=tile)
    return tile


def _warps(num_warps: int | None, default: int) -> int:
    return default if num_warps is None else num_warps


def _splits(programs: int, blocks: int, device: torch.device, splits: int | None) -> int:
    """How many programs share a group's channel blocks in the gradient kernel.

    As few as fill the GPU (``_PROGRAMS_PER_SM`` programs per SM, counting ``programs``, the
    batch x groups x tiles there are already), since each split costs a (N, L) partial of dB
    and of dC; on the CPU, two, so that tests cover both a split and a walk over blocks.
    """
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = triton.cdiv(_PROGRAMS_PER_SM * sms, max(programs, 1))
        else:
            splits = 2
    return max(1, min(splits, blocks))


def _flags(x: ScanInputs) -> dict[str, bool]:
    return {"HAS_BIAS": x.delta_bias is not None, "SOFTPLUS": x.delta_softplus}


def _optional(x: ScanInputs, placeholder: torch.Tensor) -> list[torch.Tensor]:
    """D, z and delta_bias made contiguous; an absent one passes a placeholder pointer."""
    return [placeholder if t is None else t.contiguous() for t in (x.D, x.z, x.delta_bias)]


def _check_powers_of_two(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def _chain(values, sums, A, init, last, reverse: bool) -> None:
    """Run ``_chain_kernel`` over every (batch, channel, state) row of ``values``."""
    batch, channels, n_chunks, n_state = values.shape
    rows = batch * channels * n_state
    # Short sequences take fewer chunks per step (in the interpreter, every element costs).
    block_rows = min(_CHAIN_ROWS, next_power_of_2(rows))
    _chain_kernel[(triton.cdiv(rows, block_rows),)](
        values, sums, A, values if init is None else init, values if last is None else last,
        rows, channels, n_state, n_chunks,
        REVERSE=reverse, HAS_INIT=init is not None, STORE_LAST=last is not None,
        ROWS=block_rows, K=min(_CHAIN_CHUNKS, next_power_of_2(n_chunks)), num_warps=4,
    )  # fmt: skip


def forward(
    x: ScanInputs,
    chunk: int,
    *,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the scan; return ``(out, last_state, checkpoints)``.

    ``out`` (B, D, L) has u's dtype; ``last_state`` (B, D, N) and ``checkpoints``
    (B, D, ceil(L / chunk), N), the state entering each chunk, are fp32. ``chunk`` (a power of
    two) is also the number of steps one program scans. ``block_d`` (channels per program, a
    power of two) and ``num_warps`` override the launch defaults, for benchmarking.
    """
    _check_powers_of_two(chunk=chunk, block_d=block_d or 1)
    u = x.u
    batch, channels, length = u.shape
    n_state = x.A.shape[1]
    Bg, Cg = _grouped(x.B), _grouped(x.C)
    per_group = channels // x.groups
    n_chunks = triton.cdiv(length, chunk)
    block_d = _channel_block(per_group, block_d, _FWD_LAUNCH[0], u.device)
    warps = _warps(num_warps, _FWD_LAUNCH[1])
    blocks = triton.cdiv(per_group, block_d)
    out = new_empty((batch, channels, length), u.dtype, u.device)
    last = new_empty((batch, channels, n_state), torch.float32, u.device)
    ckpt = new_empty((batch, channels, n_chunks, n_state), torch.float32, u.device)
    sums = new_empty((batch, channels, n_chunks), torch.float32, u.device)
    u_, delta, A = u.contiguous(), x.delta.contiguous(), x.A.contiguous()
    D, z, bias = _optional(x, u_)
    grid = (batch * x.groups * blocks, n_chunks)
    sizes = (length, channels, per_group, blocks, n_state, n_chunks)
    with launch_device(u):
        if n_chunks:
            _chunk_end_kernel[grid](
                u_, delta, A, Bg, bias, ckpt, sums, *sizes,
                BLOCK_D=block_d, T=chunk, num_warps=warps, **_flags(x),
            )  # fmt: skip
        _chain(ckpt, sums, A, None, last, reverse=False)
        if n_chunks:
            _output_kernel[grid](
                u_, delta, A, Bg, Cg, D, z, bias, ckpt, out, *sizes,
                HAS_D=x.D is not None, HAS_Z=x.z is not None,
                BLOCK_D=block_d, T=chunk, num_warps=warps, **_flags(x),
            )  # fmt: skip
    return out, last, ckpt


def backward(
    x: ScanInputs,
    checkpoints: torch.Tensor,
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    chunk: int,
    *,
    block_d: int | None = None,
    num_warps: int | None = None,
    splits: int | None = None,
    tile: int | None = None,
) -> ScanGrads:
    """The gradients, each in its input's dtype, from the forward's ``checkpoints``.

    ``dlast`` may be None (no gradient flows from the last state). ``block_d`` and
    ``num_warps`` override the launch defaults as in the forward (they need not match the
    forward's), ``splits`` the number of programs that share a group's channels, ``tile`` the
    steps of one program of the gradient kernel (a power-of-two multiple of ``chunk``).
    """
    _check_powers_of_two(chunk=chunk, block_d=block_d or 1)
    u = x.u
    batch, channels, length = u.shape
    n_state = x.A.shape[1]
    n_chunks = triton.cdiv(length, chunk)
    if checkpoints.shape != (batch, channels, n_chunks, n_state):
        raise ValueError(
            f"checkpoints of shape {tuple(checkpoints.shape)} do not fit chunks of {chunk} "
            f"over {length} steps"
        )
    Bg, Cg = _grouped(x.B), _grouped(x.C)
    groups = x.groups
    per_group = channels // groups
    device = u.device
    fwd_block = _channel_block(per_group, block_d, _FWD_LAUNCH[0], device)
    block = _channel_block(per_group, block_d, _BWD_LAUNCH[0], device)
    warps = _warps(num_warps, _BWD_LAUNCH[1])
    fwd_blocks, blocks = triton.cdiv(per_group, fwd_block), triton.cdiv(per_group, block)
    tile = _tile_steps(chunk, length, device, tile)
    n_tiles = triton.cdiv(length, tile)
    split = _splits(batch * groups * n_tiles, blocks, device, splits)
    du = new_empty(u.shape, u.dtype, device)
    ddelta = new_empty(u.shape, x.delta.dtype, device)
    dz = new_empty(u.shape, x.z.dtype, device) if x.z is not None else None
    carries = new_empty((batch, channels, n_chunks, n_state), torch.float32, device)
    sums = new_empty((batch, channels, n_chunks), torch.float32, device)
    dA = new_empty((batch, channels, n_tiles, n_state), torch.float32, device)
    dD = new_empty((batch, channels, n_tiles), torch.float32, device)
    dbias = new_empty((batch, channels, n_tiles), torch.float32, device)
    dB = new_empty((batch, groups, split, n_state, length), torch.float32, device)
    dC = new_empty((batch, groups, split, n_state, length), torch.float32, device)
    programs = batch * groups * split * n_tiles
    scratch = new_empty((programs, 2, block, tile), torch.float32, device)
    u_, delta, A, gout = u.contiguous(), x.delta.contiguous(), x.A.contiguous(), dout.contiguous()
    D, z, bias = _optional(x, u_)
    sizes = (length, channels, per_group)
    has = {"HAS_Z": x.z is not None, **_flags(x)}
    with launch_device(u):
        if n_chunks:
            _chunk_carry_kernel[(batch * groups * fwd_blocks, n_chunks)](
                gout, delta, A, Cg, z, bias, carries, sums, *sizes, fwd_blocks, n_state, n_chunks,
                BLOCK_D=fwd_block, T=chunk, num_warps=_warps(num_warps, _FWD_LAUNCH[1]), **has,
            )  # fmt: skip
        _chain(carries, sums, A, None if dlast is None else dlast.contiguous(), None, reverse=True)
        if n_chunks:
            _gradient_kernel[(batch * groups * split, n_tiles)](
                gout, u_, delta, A, Bg, Cg, D, z, bias, checkpoints.contiguous(), carries,
                scratch, du, ddelta, du if dz is None else dz, dA, dD, dbias, dB, dC,
                *sizes, blocks, split, n_state, n_chunks, n_tiles,
                HAS_D=x.D is not None, BLOCK_D=block, T=chunk, TILE=tile, num_warps=warps,
                **has,
            )  # fmt: skip
    return ScanGrads(
        du,
        ddelta,
        dA.sum((0, 2)).to(x.A.dtype),
        _reduce_bc(dB, x.B),
        _reduce_bc(dC, x.C),
        None if x.D is None else dD.sum((0, 2)).to(x.D.dtype),
        dz,
        None if x.delta_bias is None else dbias.sum((0, 2)).to(x.delta_bias.dtype),
    )


def _reduce_bc(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, G, splits, N, L) partial sums -> the layout and dtype of B or C."""
    total = partial.sum(2).to(like.dtype)
    return (total.squeeze(1) if like.dim() == 3 else total).contiguous()
