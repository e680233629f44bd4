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
    1. ``chunk_end_kernel``: each chunk's end state from a zero start,
       ``sum_t exp(A * (dt_{t+1} + ... + dt_last)) * dt_t u_t B_t`` (a sum, no scan), and its
       total dt;
    2. ``chain_kernel``: the states entering the chunks, ``x <- exp(A * sum dt) * x + end``,
       chunk after chunk (a scan over blocks of chunks): the *checkpoints*, (B, D, n_chunks, N)
       fp32, and the last state;
    3. ``output_kernel``: each chunk's states from its checkpoint, the readout and the gate.

backward (the symbols adj, carry, q, adj_b, dy are those derived in
:mod:`zigzag_mamba.ops.selective_scan`)
    1. ``chunk_carry_kernel``: what each chunk passes back to the one before it from a zero
       carry, ``sum_t exp(A * (dt_first + ... + dt_t)) * dy_t C_t``, and its total dt;
    2. ``chain_kernel`` in reverse: the carry entering each chunk from the one after it
       (starting from the last state's gradient);
    3. ``gradient_kernel``: per tile of a few chunks, the states by a forward scan from the
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

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.selective_scan.triton_kernels import (
    chain_kernel,
    chunk_carry_kernel,
    chunk_end_kernel,
    gradient_kernel,
    output_kernel,
)
from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

# Launch defaults on a GPU, (channels per program, warps): see docs/triton_scan.md.
_FWD_LAUNCH = (16, 4)  # the forward's chunk kernels and the backward's first pass
_BWD_LAUNCH = (4, 4)  # the backward's gradient kernel (with tiles of _TILE_CHUNKS chunks)
# The chains: (state rows per program, chunks per step of the chain).
_CHAIN_ROWS, _CHAIN_CHUNKS = 32, 32
# Chunks per program of the gradient kernel.
_TILE_CHUNKS = 4
# Programs the gradient kernel aims at per SM when it picks the number of splits.
_PROGRAMS_PER_SM = 4


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
    """Run ``chain_kernel`` over every (batch, channel, state) row of ``values``."""
    batch, channels, n_chunks, n_state = values.shape
    rows = batch * channels * n_state
    # Short sequences take fewer chunks per step (in the interpreter, every element costs).
    block_rows = min(_CHAIN_ROWS, next_power_of_2(rows))
    chain_kernel[(triton.cdiv(rows, block_rows),)](
        values,
        sums,
        A,
        values if init is None else init,
        values if last is None else last,
        rows,
        channels,
        n_state,
        n_chunks,
        REVERSE=reverse,
        HAS_INIT=init is not None,
        STORE_LAST=last is not None,
        ROWS=block_rows,
        K=min(_CHAIN_CHUNKS, next_power_of_2(n_chunks)),
        num_warps=4,
    )


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
            chunk_end_kernel[grid](
                u_,
                delta,
                A,
                Bg,
                bias,
                ckpt,
                sums,
                *sizes,
                BLOCK_D=block_d,
                T=chunk,
                num_warps=warps,
                **_flags(x),
            )
        _chain(ckpt, sums, A, None, last, reverse=False)
        if n_chunks:
            output_kernel[grid](
                u_,
                delta,
                A,
                Bg,
                Cg,
                D,
                z,
                bias,
                ckpt,
                out,
                *sizes,
                HAS_D=x.D is not None,
                HAS_Z=x.z is not None,
                BLOCK_D=block_d,
                T=chunk,
                num_warps=warps,
                **_flags(x),
            )
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
            chunk_carry_kernel[(batch * groups * fwd_blocks, n_chunks)](
                gout,
                delta,
                A,
                Cg,
                z,
                bias,
                carries,
                sums,
                *sizes,
                fwd_blocks,
                n_state,
                n_chunks,
                BLOCK_D=fwd_block,
                T=chunk,
                num_warps=_warps(num_warps, _FWD_LAUNCH[1]),
                **has,
            )
        _chain(carries, sums, A, None if dlast is None else dlast.contiguous(), None, reverse=True)
        if n_chunks:
            gradient_kernel[(batch * groups * split, n_tiles)](
                gout,
                u_,
                delta,
                A,
                Bg,
                Cg,
                D,
                z,
                bias,
                checkpoints.contiguous(),
                carries,
                scratch,
                du,
                ddelta,
                du if dz is None else dz,
                dA,
                dD,
                dbias,
                dB,
                dC,
                *sizes,
                blocks,
                split,
                n_state,
                n_chunks,
                n_tiles,
                HAS_D=x.D is not None,
                BLOCK_D=block,
                T=chunk,
                TILE=tile,
                num_warps=warps,
                **has,
            )
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
