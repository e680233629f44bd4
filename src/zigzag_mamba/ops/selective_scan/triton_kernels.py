"""The Triton selective scan's kernels; :mod:`.triton` has their design and launches them, and
:mod:`.triton_math` their building blocks."""

from __future__ import annotations

import triton
import triton.language as tl

from zigzag_mamba.ops.selective_scan.triton_math import (
    LOG2E,
    chunk_dt,
    chunk_tile,
    compose,
    decayed_sums,
    delta_tile,
)


@triton.jit
def chunk_end_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    bias_ptr,
    ends_ptr,
    sums_ptr,
    L,
    channels,
    per_group,
    blocks,
    n_state,
    n_chunks,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T: tl.constexpr,
):
    batch, group, d, d_mask, t, mask, rows, dt, cell = chunk_dt(
        delta_ptr,
        bias_ptr,
        sums_ptr,
        L,
        channels,
        per_group,
        blocks,
        n_chunks,
        HAS_BIAS,
        SOFTPLUS,
        BLOCK_D,
        T,
    )
    u = tl.load(u_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    # dt summed over the steps after t, to the chunk's end: the decay from step t to the end.
    after = tl.cumsum(dt, axis=1, reverse=True) - dt
    groups = channels // per_group
    decayed_sums(
        after, dt * u, A_ptr, B_ptr, ends_ptr, batch, group, d, d_mask, t, cell, L, groups, n_state
    )


@triton.jit
def chunk_carry_kernel(
    gout_ptr,
    delta_ptr,
    A_ptr,
    C_ptr,
    z_ptr,
    bias_ptr,
    carries_ptr,
    sums_ptr,
    L,
    channels,
    per_group,
    blocks,
    n_state,
    n_chunks,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T: tl.constexpr,
):
    batch, group, d, d_mask, t, mask, rows, dt, cell = chunk_dt(
        delta_ptr,
        bias_ptr,
        sums_ptr,
        L,
        channels,
        per_group,
        blocks,
        n_chunks,
        HAS_BIAS,
        SOFTPLUS,
        BLOCK_D,
        T,
    )
    dy = tl.load(gout_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zt = tl.load(z_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
        dy *= zt * tl.sigmoid(zt)
    # dt summed from the chunk's start through step t: the decay from step t to the chunk's
    # start, including a_start (the carry is what the chunk passes to the step before it).
    through = tl.cumsum(dt, axis=1)
    groups = channels // per_group
    decayed_sums(
        through, dy, A_ptr, C_ptr, carries_ptr, batch, group, d, d_mask, t, cell, L, groups, n_state
    )


@triton.jit
def chain_kernel(
    values_ptr,
    sums_ptr,
    A_ptr,
    init_ptr,
    last_ptr,
    rows,
    channels,
    n_state,
    n_chunks,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    STORE_LAST: tl.constexpr,
    ROWS: tl.constexpr,
    K: tl.constexpr,
):
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
            (tl.exp2(prev_sums * a2[:, None]), prev_vals), 1, compose
        )
        entering = offset + decay * s[:, None]
        tl.store(values_ptr + (at + c[None, :]) * n_state + n[:, None], entering, mask=live)
        # Past the step's last chunk: s through it (padding columns are identity maps).
        total_decay, total = tl.associative_scan((tl.exp2(sums * a2[:, None]), vals), 1, compose)
        is_last = (j == K - 1)[None, :]
        s = tl.sum(tl.where(is_last, total + total_decay * s[:, None], 0.0), axis=1)
    if STORE_LAST:
        tl.store(last_ptr + row, s, mask=row_mask)


@triton.jit
def output_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    ckpt_ptr,
    out_ptr,
    L,
    channels,
    per_group,
    blocks,
    n_state,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T: tl.constexpr,
):
    batch, group, chunk, d, d_mask, t, mask = chunk_tile(L, channels, per_group, blocks, BLOCK_D, T)
    rows = (batch * channels + d) * L
    tile = rows[:, None] + t[None, :]
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dt, _ = delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
    u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    dtu = dt * u
    cell = (batch * channels + d) * n_chunks + chunk
    bc = ((batch * (channels // per_group) + group) * n_state) * L + t
    y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
    for n in range(n_state):
        a2 = tl.load(A_ptr + d * n_state + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
        b_n = tl.load(B_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + bc + n * L, mask=t < L, other=0.0).to(tl.float32)
        decay, x = tl.associative_scan((tl.exp2(dt * a2[:, None]), dtu * b_n[None, :]), 1, compose)
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
def gradient_kernel(
    gout_ptr,
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    ckpt_ptr,
    carries_ptr,
    scratch_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    dB_ptr,
    dC_ptr,
    L,
    channels,
    per_group,
    blocks,
    splits,
    n_state,
    n_chunks,
    n_tiles,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T: tl.constexpr,
    TILE: tl.constexpr,
):
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
        dt, _ = delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(gout_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            dy *= zt * tl.sigmoid(zt)
        # The adjoint's inputs, last step first (loaded in order and flipped: a load in reverse
        # gets a layout of its own, and the scans with it).
        next_mask = mask & (t + 1 < L)[None, :] & (steps < TILE - 1)[None, :]
        dt_next, _ = delta_tile(delta_ptr + tile + 1, next_mask, bias, HAS_BIAS, SOFTPLUS)
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
            decay, x = tl.associative_scan((tl.exp2(dt * a2[:, None]), inp), 1, compose)
            entering = tl.load(ckpt_ptr + (cell + first_chunk) * n_state + n, mask=d_mask)
            x += decay * entering[:, None]
            back_decay, adj_back = tl.associative_scan(
                (tl.exp2(dt_next * a2[:, None]), dy_back * c_back[None, :]), 1, compose
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
            _, raw = delta_tile(delta_ptr + tile, mask, bias, HAS_BIAS, SOFTPLUS)
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
