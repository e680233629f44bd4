"""The ``triton`` backend: Triton forward and backward kernels for the selective scan.

Semantics and layouts are those of
:func:`zigzag_mamba.ops.selective_scan.selective_scan_reference`: u, delta, z (B, D, L);
A (D, N); B, C (B, N, L) or grouped (B, G, N, L); D, delta_bias (D,); last state (B, D, N).
Inputs may be fp32, fp16 or bf16; every value is converted to fp32 on load, the state and all
sums are fp32, and results are stored in their tensor's dtype (the output in u's).

Work split: one program owns ``BLOCK_D`` channels of one batch element (and one group of B/C,
so ungrouped B/C are the case G = 1) and keeps their whole state as a (BLOCK_D, N) tile in
registers while it walks the sequence one step at a time, storing the results of every
``STEPS`` steps together. The sequence is cut into chunks of
``CHUNK`` steps; the forward stores the state entering every chunk (the *checkpoints*,
(B, D, n_chunks, N) fp32), so the backward never needs all L states: it walks the chunks last to
first, replays the chunk forward from its checkpoint into a per-program scratch buffer
(``CHUNK`` states, small enough to stay in L2), then runs the adjoint recurrence backward over
the chunk, carrying dL/dx across chunk boundaries in registers. The backward's symbols (adj,
carry, q, adj_b) are those derived in :mod:`zigzag_mamba.ops.selective_scan`.

Reductions across programs are deterministic (no atomics): each program writes its share of
dB and dC (summed over its own channels) to a (B, G, n_blocks, L, N) fp32 buffer, and of dA,
dD and d(delta_bias) to (B, D, ...) buffers; torch sums those afterwards. The dB/dC partials
cost ``2 * n_blocks * L * N * 4`` bytes per batch element and group, about as much traffic as
the scan's own inputs and outputs; the scan is bound by its steps' latency, not by bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

# State elements per program, and steps whose results are stored together: the fastest of the
# launch sweep in benchmarks/bench_triton_scan.py on an H100 (docs/triton_scan.md has the
# numbers); 8 channels x 16 steps spill registers in the backward.
_TILE_FWD, _STEPS_FWD = 64, 4
_TILE_BWD, _STEPS_BWD = 64, 4


@triton.jit
def _log1p(e):
    # log(y) * e / (y - 1) with y = 1 + e undoes the rounding of 1 + e (Goldberg's trick), so
    # tiny e keep their relative accuracy; y == 1 only when e is below fp32's epsilon.
    y = 1.0 + e
    return tl.where(y == 1.0, e, tl.log(y) * (e / tl.where(y == 1.0, 1.0, y - 1.0)))


@triton.jit
def _delta_at(delta_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, pre-softplus value) for one step; dt is 0 on masked lanes, so they never move."""
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    dt = raw
    if SOFTPLUS:
        # Above 20, softplus(x) == x in fp32 (torch's threshold too); clamping avoids exp overflow.
        dt = tl.where(raw > 20.0, raw, _log1p(tl.exp(tl.minimum(raw, 20.0))))
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _program_tile(channels, channels_per_group, blocks_per_group, n_state, BLOCK_D, BLOCK_N):
    """Batch, group, channel indices and masks of this program's (BLOCK_D, BLOCK_N) tile."""
    pid = tl.program_id(0)
    groups_blocks = (channels // channels_per_group) * blocks_per_group
    batch = (pid // groups_blocks).to(tl.int64)
    group = (pid % groups_blocks) // blocks_per_group
    local = (pid % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = local < channels_per_group
    states = tl.arange(0, BLOCK_N)
    n_mask = states < n_state
    return batch, group, group * channels_per_group + local, d_mask, states, n_mask


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, ckpt_ptr,
    L, channels, channels_per_group, blocks_per_group, n_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr,
):  # fmt: skip
    batch, group, d, d_mask, n, n_mask = _program_tile(
        channels, channels_per_group, blocks_per_group, n_state, BLOCK_D, BLOCK_N
    )
    tile_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * n_state + n[None, :], mask=tile_mask, other=0.0)
    A = A.to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    skip = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    rows = (batch * channels + d) * L  # (BLOCK_D,) offsets of row t = 0 in u, delta, z, out
    bc_row = ((batch * (channels // channels_per_group) + group) * n_state + n) * L
    ckpt = ckpt_ptr + ((batch * channels + d[:, None]) * n_chunks) * n_state + n[None, :]
    steps = tl.arange(0, STEPS)
    x = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        tl.store(ckpt + c * n_state, x, mask=tile_mask)
        for t0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L), STEPS):
            # The outputs of STEPS steps are stored together after them, one (BLOCK_D, STEPS)
            # tile, so that no store (which the next step's loads might alias) sits between two
            # steps.
            ys = tl.zeros((BLOCK_D, STEPS), dtype=tl.float32)
            for j in tl.static_range(STEPS):
                t = t0 + j
                # Past the end, dt = u = B = 0 leave the state as it is. (tl.where: `mask & scalar`
                # loses the boolean dtype in the interpreter.)
                live_d = tl.where(t < L, d_mask, False)
                live_n = tl.where(t < L, n_mask, False)
                dt, _ = _delta_at(delta_ptr + rows + t, live_d, bias, HAS_BIAS, SOFTPLUS)
                u = tl.load(u_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                b_t = tl.load(B_ptr + bc_row + t, mask=live_n, other=0.0).to(tl.float32)
                c_t = tl.load(C_ptr + bc_row + t, mask=live_n, other=0.0).to(tl.float32)
                x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * b_t[None, :]
                y = tl.sum(x * c_t[None, :], axis=1) + skip * u
                if HAS_Z:
                    g = tl.load(z_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                    y *= g * tl.sigmoid(g)
                ys = tl.where(steps[None, :] == j, y[:, None], ys)
            ts = t0 + steps
            out = out_ptr + rows[:, None] + ts[None, :]
            tl.store(out, ys.to(out_ptr.dtype.element_ty), mask=d_mask[:, None] & (ts < L)[None, :])
    last = last_ptr + (batch * channels + d[:, None]) * n_state + n[None, :]
    tl.store(last, x, mask=tile_mask)


@triton.jit
def _scan_bwd_kernel(
    gout_ptr, glast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    L, channels, channels_per_group, blocks_per_group, n_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    STEPS: tl.constexpr,
):  # fmt: skip
    batch, group, d, d_mask, n, n_mask = _program_tile(
        channels, channels_per_group, blocks_per_group, n_state, BLOCK_D, BLOCK_N
    )
    tile_mask = d_mask[:, None] & n_mask[None, :]
    tile = d[:, None] * n_state + n[None, :]
    A = tl.load(A_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    skip = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    rows = (batch * channels + d) * L
    bc_row = ((batch * (channels // channels_per_group) + group) * n_state + n) * L
    state = batch * channels * n_state + tile  # (B, D, N) offsets
    ckpt = ckpt_ptr + ((batch * channels + d[:, None]) * n_chunks) * n_state + n[None, :]
    # Partial dB / dC of this program: (B, G, blocks_per_group, L, N), one N-vector per step.
    part = (tl.program_id(0).to(tl.int64) * L) * n_state + n
    # Each program replays its chunk into its own CHUNK x (BLOCK_D, BLOCK_N) slice of scratch.
    slots = scratch_ptr + tl.program_id(0).to(tl.int64) * (CHUNK * BLOCK_D * BLOCK_N)
    slots += tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    # carry = a_{t+1} adj_{t+1}, what the steps after t pass back to x_t; the last state's
    # gradient at t = L - 1.
    if HAS_GLAST:
        carry = tl.load(glast_ptr + state, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    steps = tl.arange(0, STEPS)
    for k in range(n_chunks):
        start = (n_chunks - 1 - k) * CHUNK
        stop = tl.minimum(start + CHUNK, L)
        # Replay: slot s holds the state entering step start + s. Each step's inputs are loaded
        # one step ahead, before the slot store that would otherwise hold their loads back.
        x = tl.load(ckpt + (start // CHUNK) * n_state, mask=tile_mask, other=0.0)
        next_dt, _ = _delta_at(delta_ptr + rows + start, d_mask, bias, HAS_BIAS, SOFTPLUS)
        next_u = tl.load(u_ptr + rows + start, mask=d_mask, other=0.0).to(tl.float32)
        next_b = tl.load(B_ptr + bc_row + start, mask=n_mask, other=0.0).to(tl.float32)
        for t in range(start, stop):
            dt, u, b_t = next_dt, next_u, next_b
            more = tl.where(t + 1 < stop, d_mask, False)
            next_dt, _ = _delta_at(delta_ptr + rows + t + 1, more, bias, HAS_BIAS, SOFTPLUS)
            next_u = tl.load(u_ptr + rows + t + 1, mask=more, other=0.0).to(tl.float32)
            next_b = tl.load(B_ptr + bc_row + t + 1, mask=tl.where(t + 1 < stop, n_mask, False))
            next_b = next_b.to(tl.float32)
            tl.store(slots + (t - start) * (BLOCK_D * BLOCK_N), x)
            x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * b_t[None, :]
        # The reverse walk may read slots written by other threads of the program.
        tl.debug_barrier()
        # The reverse walk, STEPS steps at a time (the latest first); as in the forward, their
        # results are stored together after them. Steps before `start` (the chunk's first group
        # may be partial) load zeros, which leave the carry and every sum unchanged.
        for r0 in range(0, stop - start, STEPS):
            top = stop - 1 - r0
            du_s = tl.zeros((BLOCK_D, STEPS), dtype=tl.float32)
            ddt_s = tl.zeros((BLOCK_D, STEPS), dtype=tl.float32)
            dz_s = tl.zeros((BLOCK_D, STEPS), dtype=tl.float32)
            db_s = tl.zeros((STEPS, BLOCK_N), dtype=tl.float32)
            dc_s = tl.zeros((STEPS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(STEPS):
                t = top - j
                live_d = tl.where(t >= start, d_mask, False)
                live_n = tl.where(t >= start, n_mask, False)
                live = live_d[:, None] & live_n[None, :]
                x_prev = tl.load(slots + (t - start) * (BLOCK_D * BLOCK_N), mask=live, other=0.0)
                dt, raw = _delta_at(delta_ptr + rows + t, live_d, bias, HAS_BIAS, SOFTPLUS)
                u = tl.load(u_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                b_t = tl.load(B_ptr + bc_row + t, mask=live_n, other=0.0).to(tl.float32)
                c_t = tl.load(C_ptr + bc_row + t, mask=live_n, other=0.0).to(tl.float32)
                g = tl.load(gout_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                decay = tl.exp(dt[:, None] * A)
                x = decay * x_prev + (dt * u)[:, None] * b_t[None, :]
                dy = g
                if HAS_Z:
                    zt = tl.load(z_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                    gate = tl.sigmoid(zt)
                    y = tl.sum(x * c_t[None, :], axis=1) + skip * u
                    dz = g * y * gate * (1.0 + zt * (1.0 - gate))
                    dz_s = tl.where(steps[None, :] == j, dz[:, None], dz_s)
                    dy = g * (zt * gate)
                adj = carry + dy[:, None] * c_t[None, :]
                adj_b = tl.sum(adj * b_t[None, :], axis=1)
                carry = adj * decay
                # ddt = sum_n q A + u adj_b, with q = carry * x_prev (= adj * decay * x_prev).
                ddt = tl.sum(carry * x_prev * A, axis=1) + u * adj_b
                dA += dt[:, None] * carry * x_prev
                if SOFTPLUS:
                    ddt *= tl.sigmoid(raw)
                dD += dy * u
                dbias += ddt
                du = dt * adj_b + skip * dy
                du_s = tl.where(steps[None, :] == j, du[:, None], du_s)
                ddt_s = tl.where(steps[None, :] == j, ddt[:, None], ddt_s)
                db = tl.sum(adj * (dt * u)[:, None], axis=0)
                dc = tl.sum(x * dy[:, None], axis=0)
                db_s = tl.where(steps[:, None] == j, db[None, :], db_s)
                dc_s = tl.where(steps[:, None] == j, dc[None, :], dc_s)
            ts = top - steps
            keep = ts >= start
            per_d = rows[:, None] + ts[None, :]
            d_keep = d_mask[:, None] & keep[None, :]
            tl.store(du_ptr + per_d, du_s.to(du_ptr.dtype.element_ty), mask=d_keep)
            tl.store(ddelta_ptr + per_d, ddt_s.to(ddelta_ptr.dtype.element_ty), mask=d_keep)
            if HAS_Z:
                tl.store(dz_ptr + per_d, dz_s.to(dz_ptr.dtype.element_ty), mask=d_keep)
            per_n = part[None, :] + ts[:, None] * n_state
            n_keep = keep[:, None] & n_mask[None, :]
            tl.store(dB_ptr + per_n, db_s, mask=n_keep)
            tl.store(dC_ptr + per_n, dc_s, mask=n_keep)
        # The next chunk's replay overwrites slots that other threads may still be reading.
        tl.debug_barrier()
    tl.store(dA_ptr + state, dA, mask=tile_mask)
    if HAS_D:
        tl.store(dD_ptr + batch * channels + d, dD, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + batch * channels + d, dbias, mask=d_mask)


def _grouped(bc: torch.Tensor) -> torch.Tensor:
    """B or C as a contiguous (B, G, N, L) tensor; ungrouped (B, N, L) is the case G = 1."""
    return (bc.unsqueeze(1) if bc.dim() == 3 else bc).contiguous()


def _launch_shape(
    sequences: int,
    channels_per_group: int,
    n_state: int,
    device: torch.device,
    block_d: int | None,
    tile: int,
) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, blocks_per_group): whole states per program, enough programs per SM.

    Each program is one sequential walk over L, so the GPU is latency-bound unless every SM gets
    several programs; halve the channel block (down to 4) until there are about two per SM.
    ``sequences`` is batch x groups, the number of channel groups to split.
    """
    block_n = next_power_of_2(n_state)
    if block_d is not None:
        return block_d, block_n, triton.cdiv(channels_per_group, block_d)
    block_d = min(max(1, tile // block_n), next_power_of_2(channels_per_group))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while block_d > 4 and sequences * triton.cdiv(channels_per_group, block_d) < 2 * sms:
            block_d //= 2
    return block_d, block_n, triton.cdiv(channels_per_group, block_d)


def _flags(x: ScanInputs) -> dict[str, bool]:
    return {
        "HAS_D": x.D is not None,
        "HAS_Z": x.z is not None,
        "HAS_BIAS": x.delta_bias is not None,
        "SOFTPLUS": x.delta_softplus,
    }


def _optional(x: ScanInputs, placeholder: torch.Tensor) -> list[torch.Tensor]:
    """D, z and delta_bias made contiguous; an absent one passes a placeholder pointer."""
    return [placeholder if t is None else t.contiguous() for t in (x.D, x.z, x.delta_bias)]


def _check_powers_of_two(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def forward(
    x: ScanInputs,
    chunk: int,
    *,
    block_d: int | None = None,
    steps: int = _STEPS_FWD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the scan; return ``(out, last_state, checkpoints)``.

    ``out`` (B, D, L) has u's dtype; ``last_state`` (B, D, N) and ``checkpoints``
    (B, D, ceil(L / chunk), N), the state entering each chunk, are fp32. ``chunk`` (a power of
    two) trades checkpoint memory against the backward's scratch. ``block_d`` (channels per
    program) and ``steps`` (steps whose outputs are stored together, capped at N and the
    chunk), both powers of two, override the launch defaults, for benchmarking.
    """
    _check_powers_of_two(chunk=chunk, block_d=block_d or 1, steps=steps)
    u = x.u
    batch, channels, length = u.shape
    n_state = x.A.shape[1]
    Bg, Cg = _grouped(x.B), _grouped(x.C)
    per_group = channels // x.groups
    n_chunks = triton.cdiv(length, chunk)
    out = new_empty((batch, channels, length), u.dtype, u.device)
    last = new_empty((batch, channels, n_state), torch.float32, u.device)
    ckpt = new_empty((batch, channels, n_chunks, n_state), torch.float32, u.device)
    block_d, block_n, blocks = _launch_shape(
        batch * x.groups, per_group, n_state, u.device, block_d, _TILE_FWD
    )
    u_ = u.contiguous()
    with launch_device(u):
        _scan_fwd_kernel[(batch * x.groups * blocks,)](
            u_, x.delta.contiguous(), x.A.contiguous(), Bg, Cg, *_optional(x, u_),
            out, last, ckpt,
            length, channels, per_group, blocks, n_state, n_chunks,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
            STEPS=min(steps, block_n, chunk), num_warps=1, **_flags(x),
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
    steps: int = _STEPS_BWD,
) -> ScanGrads:
    """The gradients, each in its input's dtype, from the forward's ``checkpoints``.

    ``dlast`` may be None (no gradient flows from the last state). ``block_d`` and ``steps``
    override the launch defaults as in the forward (they need not match the forward's).
    """
    _check_powers_of_two(block_d=block_d or 1, steps=steps)
    u = x.u
    batch, channels, length = u.shape
    n_state = x.A.shape[1]
    Bg, Cg = _grouped(x.B), _grouped(x.C)
    groups = x.groups
    per_group = channels // groups
    n_chunks = checkpoints.shape[2]
    # One chunk of replayed states per program; a single chunk needs only the next power of
    # two above L, which keeps the scratch small for short sequences.
    chunk = min(chunk, next_power_of_2(length))
    block_d, block_n, blocks = _launch_shape(
        batch * groups, per_group, n_state, u.device, block_d, _TILE_BWD
    )
    programs = batch * groups * blocks
    device = u.device
    du = new_empty(u.shape, u.dtype, device)
    ddelta = new_empty(u.shape, x.delta.dtype, device)
    dz = new_empty(u.shape, x.z.dtype, device) if x.z is not None else None
    dA = new_empty((batch, channels, n_state), torch.float32, device)
    dD = new_empty((batch, channels), torch.float32, device)
    dbias = new_empty((batch, channels), torch.float32, device)
    dB = new_empty((batch, groups, blocks, length, n_state), torch.float32, device)
    dC = new_empty((batch, groups, blocks, length, n_state), torch.float32, device)
    scratch = torch.empty(programs * chunk * block_d * block_n, dtype=torch.float32, device=device)
    u_ = u.contiguous()
    with launch_device(u):
        _scan_bwd_kernel[(programs,)](
            dout.contiguous(), u_ if dlast is None else dlast.contiguous(),
            u_, x.delta.contiguous(), x.A.contiguous(), Bg, Cg, *_optional(x, u_),
            checkpoints.contiguous(), scratch,
            du, ddelta, du if dz is None else dz, dA, dD, dbias, dB, dC,
            length, channels, per_group, blocks, n_state, n_chunks,
            HAS_GLAST=dlast is not None,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, STEPS=min(steps, block_n, chunk),
            num_warps=1, **_flags(x),
        )  # fmt: skip
    return ScanGrads(
        du,
        ddelta,
        dA.sum(0).to(x.A.dtype),
        _reduce_bc(dB, x.B),
        _reduce_bc(dC, x.C),
        None if x.D is None else dD.sum(0).to(x.D.dtype),
        dz,
        None if x.delta_bias is None else dbias.sum(0).to(x.delta_bias.dtype),
    )


def _reduce_bc(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, G, blocks, L, N) per-program sums -> the layout and dtype of B or C."""
    total = partial.sum(2).transpose(-1, -2).to(like.dtype)
    return (total.squeeze(1) if like.dim() == 3 else total).contiguous()
