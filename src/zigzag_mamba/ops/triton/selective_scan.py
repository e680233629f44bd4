"""Triton forward and backward kernels for the Mamba-1 selective scan.

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
the chunk, carrying dL/dx across chunk boundaries in registers.

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

from zigzag_mamba.ops.triton import new_empty, next_power_of_2

# Steps per checkpoint: the backward replays at most this many steps per chunk and keeps their
# states in scratch; the checkpoints cost N * 4 bytes per channel per CHUNK steps.
DEFAULT_CHUNK = 64
# State elements per program, and steps whose results are stored together. Measured on an H100
# at B=2, D=1536, N=16, L=4096 (bf16), in two sweeps: 4 channels x 4 steps ran fastest for both
# kernels, 15% (forward) and 17% (backward) ahead of 4 x 16 and 2 x 8 (one shape timed twice
# varied by 8%); 8 channels x 16 steps spill registers in the backward.
_TILE_FWD, _STEPS_FWD = 64, 4
_TILE_BWD, _STEPS_BWD = 64, 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); the last three are None without D, z, delta_bias.
Grads = tuple[torch.Tensor | None, ...]


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
            # steps. On an H100 this alone gained little; the tile sizes mattered more.
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
    # adj = dL/dx_t flowing in from steps after t; at t = L - 1 that is the last state's grad.
    if HAS_GLAST:
        adj = tl.load(glast_ptr + state, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        adj = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
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
        # may be partial) load zeros, which leave adj and every sum unchanged.
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
                if HAS_Z:
                    zt = tl.load(z_ptr + rows + t, mask=live_d, other=0.0).to(tl.float32)
                    gate = tl.sigmoid(zt)
                    y = tl.sum(x * c_t[None, :], axis=1) + skip * u
                    dz = g * y * gate * (1.0 + zt * (1.0 - gate))
                    dz_s = tl.where(steps[None, :] == j, dz[:, None], dz_s)
                    g *= zt * gate
                # h = dL/dx_t: through y_t now, and through x_{t+1} (adj) later.
                h = adj + g[:, None] * c_t[None, :]
                h_b = tl.sum(h * b_t[None, :], axis=1)
                adj = h * decay
                # d/d(dt) of exp(dt A) x_prev + dt u B  is  A exp(dt A) x_prev + u B.
                ddt = tl.sum(adj * x_prev * A, axis=1) + u * h_b
                dA += dt[:, None] * adj * x_prev
                if SOFTPLUS:
                    ddt *= tl.sigmoid(raw)
                dD += g * u
                dbias += ddt
                du = dt * h_b + skip * g
                du_s = tl.where(steps[None, :] == j, du[:, None], du_s)
                ddt_s = tl.where(steps[None, :] == j, ddt[:, None], ddt_s)
                db = tl.sum(h * (dt * u)[:, None], axis=0)
                dc = tl.sum(x * g[:, None], axis=0)
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


def _flags(
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None
) -> dict[str, bool]:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None}


def _check(*tensors: torch.Tensor | None) -> None:
    """Shapes the kernels index by, and dtypes they compute in fp32 without losing precision."""
    u, delta, A, B = tensors[:4]
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"expected u, delta (B, D, L) and A (D, N), got {u.shape}, {A.shape}")
    groups = B.shape[1] if B.dim() == 4 else 1
    if u.shape[1] % groups:
        raise ValueError(f"channels ({u.shape[1]}) must be divisible by B/C groups ({groups})")
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"the Triton scan takes fp32, fp16 or bf16 tensors, not {t.dtype}")


def _check_powers_of_two(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def selective_scan_triton_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    block_d: int | None = None,
    steps: int = _STEPS_FWD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the scan; return ``(out, last_state, checkpoints)``.

    ``out`` (B, D, L) has u's dtype; ``last_state`` (B, D, N) and ``checkpoints``
    (B, D, ceil(L / chunk_size), N), the state entering each chunk, are fp32. ``chunk_size``
    (a power of two) trades checkpoint memory against the backward's scratch. ``block_d``
    (channels per program) and ``steps`` (steps whose outputs are stored together, capped at N
    and the chunk), both powers of two, override the launch defaults, for benchmarking.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    _check_powers_of_two(chunk_size=chunk_size, block_d=block_d or 1, steps=steps)
    batch, channels, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    per_group = channels // Bg.shape[1]
    n_chunks = max(1, triton.cdiv(length, chunk_size))
    out = new_empty((batch, channels, length), u.dtype, u.device)
    last = new_empty((batch, channels, n_state), torch.float32, u.device)
    ckpt = new_empty((batch, channels, n_chunks, n_state), torch.float32, u.device)
    block_d, block_n, blocks = _launch_shape(
        batch * Bg.shape[1], per_group, n_state, u.device, block_d, _TILE_FWD
    )
    u_ = u.contiguous()
    _scan_fwd_kernel[(batch * Bg.shape[1] * blocks,)](
        u_, delta.contiguous(), A.contiguous(), Bg, Cg,
        u_ if D is None else D.contiguous(),
        u_ if z is None else z.contiguous(),
        u_ if delta_bias is None else delta_bias.contiguous(),
        out, last, ckpt,
        length, channels, per_group, blocks, n_state, n_chunks,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk_size,
        STEPS=min(steps, block_n, chunk_size), num_warps=1, **_flags(D, z, delta_bias),
    )  # fmt: skip
    return out, last, ckpt


def selective_scan_triton_bwd(
    grad_out: torch.Tensor | None,
    grad_last_state: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    checkpoints: torch.Tensor,
    delta_softplus: bool,
    *,
    block_d: int | None = None,
    steps: int = _STEPS_BWD,
) -> Grads:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, each in its input's dtype.

    Takes the forward's inputs and its ``checkpoints`` (the chunk size is recovered from their
    count); ``grad_out`` or ``grad_last_state`` may be None (no gradient flows from it). The
    gradients of absent optional inputs (D, z, delta_bias) are None. ``block_d`` and ``steps``
    override the launch defaults as in the forward (they need not match the forward's).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    _check_powers_of_two(block_d=block_d or 1, steps=steps)
    batch, channels, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    per_group = channels // groups
    n_chunks = checkpoints.shape[2]
    # Chunks are powers of two and ceil(L / chunk) == n_chunks, which pins chunk down (for one
    # chunk, to anything >= L: the smallest such power of two also keeps the scratch smallest).
    chunk = next_power_of_2(triton.cdiv(length, n_chunks))
    block_d, block_n, blocks = _launch_shape(
        batch * Bg.shape[1], per_group, n_state, u.device, block_d, _TILE_BWD
    )
    programs = batch * groups * blocks
    device = u.device
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    du = new_empty(u.shape, u.dtype, device)
    ddelta = new_empty(u.shape, delta.dtype, device)
    dz = new_empty(u.shape, z.dtype, device) if z is not None else None
    dA = new_empty((batch, channels, n_state), torch.float32, device)
    dD = new_empty((batch, channels), torch.float32, device)
    dbias = new_empty((batch, channels), torch.float32, device)
    dB = new_empty((batch, groups, blocks, length, n_state), torch.float32, device)
    dC = new_empty((batch, groups, blocks, length, n_state), torch.float32, device)
    scratch = torch.empty(programs * chunk * block_d * block_n, dtype=torch.float32, device=device)
    u_ = u.contiguous()
    _scan_bwd_kernel[(programs,)](
        grad_out.contiguous(),
        u_ if grad_last_state is None else grad_last_state.contiguous(),
        u_, delta.contiguous(), A.contiguous(), Bg, Cg,
        u_ if D is None else D.contiguous(),
        u_ if z is None else z.contiguous(),
        u_ if delta_bias is None else delta_bias.contiguous(),
        checkpoints.contiguous(), scratch,
        du, ddelta, du if dz is None else dz, dA, dD, dbias, dB, dC,
        length, channels, per_group, blocks, n_state, n_chunks,
        SOFTPLUS=delta_softplus, HAS_GLAST=grad_last_state is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, STEPS=min(steps, block_n, chunk),
        num_warps=1, **_flags(D, z, delta_bias),
    )  # fmt: skip
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        _reduce_bc(dB, B),
        _reduce_bc(dC, C),
        None if D is None else dD.sum(0).to(D.dtype),
        dz,
        None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
    )


def _reduce_bc(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, G, blocks, L, N) per-program sums -> the layout and dtype of B or C."""
    total = partial.sum(2).transpose(-1, -2).to(like.dtype)
    return (total.squeeze(1) if like.dim() == 3 else total).contiguous()


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):  # type: ignore[override]
        out, last, ckpt = selective_scan_triton_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):  # type: ignore[override]
        grads = selective_scan_triton_bwd(
            grad_out, grad_last, *ctx.saved_tensors, ctx.delta_softplus
        )
        return (*grads, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton scan with the signature of ``selective_scan_reference``."""
    out, last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size
    )
    return (out, last) if return_last_state else out
