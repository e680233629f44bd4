"""The ``triton`` backend of the two stages around the mixer (:mod:`zigzag_mamba.ops.mixer_io`).

Every kernel walks tokens in their natural (raster) order, a tile of ``BLOCK_L`` whole rows per
program (RMSNorm needs the full row of D channels), and reaches the permuted tensor through
``inverse``: token ``l`` sits at position ``inverse[l]`` of the mixer's sequence. So the tensors
in natural order are read and written contiguously and only the permuted one is gathered or
scattered, a row at a time. Arithmetic is in fp32 whatever the storage dtype.

The backward kernels also reduce over tokens (the gradients of the norm weight, shift, scale and
gate). Each program sums its ``CHUNK`` rows into one partial row; the launcher adds the partials,
which keeps the result deterministic and free of atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.mixer_io.inputs import MixerIn, MixerInSaved, MixerOut, MixerOutSaved
from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

# fp32 elements per tile: with whole rows of up to 2048 channels, a few rows per program.
_TILE = 4096
# Rows a backward program reduces: bounds the partial-sum buffers to B * L / 64 rows.
_CHUNK = 64


@triton.jit
def _tile(batch, rows, L, D, cols, inv_ptr, PERMUTE: tl.constexpr):
    """A tile of whole token rows: its mask, its offsets in natural order, and the offsets of the
    same tokens in the mixer's order (token l sits at row ``inverse[l]`` there)."""
    row_ok = rows < L
    mask = row_ok[:, None] & (cols < D)[None, :]
    natural = (batch * L + rows[:, None].to(tl.int64)) * D + cols[None, :]
    moved = rows.to(tl.int64)
    if PERMUTE:
        moved = tl.load(inv_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return mask, natural, (batch * L + moved[:, None]) * D + cols[None, :]


@triton.jit
def _program_rows(L, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch element, its BLOCK_L token rows and the BLOCK_D channel columns."""
    row_blocks = tl.cdiv(L, BLOCK_L)
    batch = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    return batch, rows, tl.arange(0, BLOCK_D)


@triton.jit
def _mixer_in_fwd_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    shift_ptr,
    scale_ptr,
    inv_ptr,
    res_out_ptr,
    hn_out_ptr,
    xs_out_ptr,
    L,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PERMUTE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch, rows, cols = _program_rows(L, BLOCK_L, BLOCK_D)
    col_ok = cols < D
    mask, offsets, xs_offsets = _tile(batch, rows, L, D, cols, inv_ptr, PERMUTE)

    r = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(res_ptr + offsets, mask=mask, other=0.0)
    tl.store(res_out_ptr + offsets, r, mask=mask)
    rstd = tl.rsqrt(tl.sum(r * r, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = r * rstd[:, None] * w[None, :]
    tl.store(hn_out_ptr + offsets, y.to(hn_out_ptr.dtype.element_ty), mask=mask)

    if HAS_SCALE:
        y *= 1.0 + tl.load(scale_ptr + batch * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        y += tl.load(shift_ptr + batch * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(xs_out_ptr + xs_offsets, y.to(xs_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixer_in_bwd_kernel(
    g_res_ptr,
    g_hn_ptr,
    g_xs_ptr,
    r_ptr,
    w_ptr,
    scale_ptr,
    inv_ptr,
    g_h_ptr,
    g_res_in_ptr,
    part_w_ptr,
    part_shift_ptr,
    part_scale_ptr,
    L,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PERMUTE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunks = tl.cdiv(L, CHUNK)
    batch = (tl.program_id(0) // chunks).to(tl.int64)
    first_row = (tl.program_id(0) % chunks) * CHUNK
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    one_plus_scale = tl.full((BLOCK_D,), 1.0, tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + batch * D + cols, mask=col_ok, other=0.0)
        one_plus_scale += scale.to(tl.float32)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, CHUNK, BLOCK_L):
        rows = first_row + start + tl.arange(0, BLOCK_L)
        mask, offsets, xs_offsets = _tile(batch, rows, L, D, cols, inv_ptr, PERMUTE)

        # Recompute the normalised row instead of storing it: the row is loaded anyway.
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
        rstd = tl.rsqrt(tl.sum(r * r, axis=1) / D + eps)
        n = r * rstd[:, None]
        g_x = tl.load(g_xs_ptr + xs_offsets, mask=mask, other=0.0).to(tl.float32)
        g_y = tl.load(g_hn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g_y += g_x * one_plus_scale[None, :]
        if HAS_SHIFT:
            acc_shift += tl.sum(g_x, axis=0)
        if HAS_SCALE:
            acc_scale += tl.sum(g_x * n * w[None, :], axis=0)
        acc_w += tl.sum(g_y * n, axis=0)

        g_n = g_y * w[None, :]
        g_r = rstd[:, None] * (g_n - n * (tl.sum(g_n * n, axis=1) / D)[:, None])
        g_r += tl.load(g_res_ptr + offsets, mask=mask, other=0.0)
        tl.store(g_h_ptr + offsets, g_r.to(g_h_ptr.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(g_res_in_ptr + offsets, g_r, mask=mask)

    part = tl.program_id(0).to(tl.int64) * D + cols
    tl.store(part_w_ptr + part, acc_w, mask=col_ok)
    if HAS_SHIFT:
        tl.store(part_shift_ptr + part, acc_shift, mask=col_ok)
    if HAS_SCALE:
        tl.store(part_scale_ptr + part, acc_scale, mask=col_ok)


@triton.jit
def _mixer_out_fwd_kernel(
    hn_ptr,
    gate_ptr,
    y_ptr,
    inv_ptr,
    out_ptr,
    L,
    D,
    HAS_GATE: tl.constexpr,
    PERMUTE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch, rows, cols = _program_rows(L, BLOCK_L, BLOCK_D)
    col_ok = cols < D
    mask, offsets, y_offsets = _tile(batch, rows, L, D, cols, inv_ptr, PERMUTE)
    y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        y *= tl.load(gate_ptr + batch * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = tl.load(hn_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + y
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixer_out_bwd_kernel(
    g_out_ptr,
    gate_ptr,
    y_ptr,
    inv_ptr,
    g_y_ptr,
    part_gate_ptr,
    L,
    D,
    HAS_GATE: tl.constexpr,
    PERMUTE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunks = tl.cdiv(L, CHUNK)
    batch = (tl.program_id(0) // chunks).to(tl.int64)
    first_row = (tl.program_id(0) % chunks) * CHUNK
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    gate = tl.full((BLOCK_D,), 1.0, tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + batch * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, CHUNK, BLOCK_L):
        rows = first_row + start + tl.arange(0, BLOCK_L)
        mask, offsets, y_offsets = _tile(batch, rows, L, D, cols, inv_ptr, PERMUTE)
        g_out = tl.load(g_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g_y = g_out * gate[None, :]
        tl.store(g_y_ptr + y_offsets, g_y.to(g_y_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:
            y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(g_out * y, axis=0)
    if HAS_GATE:
        tl.store(part_gate_ptr + tl.program_id(0).to(tl.int64) * D + cols, acc_gate, mask=col_ok)


def _row_tiling(length: int, channels: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D): whole rows, and as many of them as fit in one tile."""
    block_d = next_power_of_2(channels)
    return max(1, min(_TILE // block_d, next_power_of_2(length))), block_d


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def _chunk(length: int, block_l: int) -> int:
    return max(block_l, min(_CHUNK, next_power_of_2(length)))


def _partials(batch: int, chunks: int, channels: int, device: torch.device) -> torch.Tensor:
    return new_empty((batch, chunks, channels), torch.float32, device)


def mixer_in_forward(a: MixerIn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new residual fp32, h_norm in h's dtype, modulated tokens permuted); see ``mixer_in``."""
    h = a.h.contiguous()
    batch, length, channels = h.shape
    res_out = new_empty(h.shape, torch.float32, h.device)
    h_norm = new_empty(h.shape, h.dtype, h.device)
    x = new_empty(h.shape, h.dtype, h.device)
    if h.numel() == 0:
        return res_out, h_norm, x
    block_l, block_d = _row_tiling(length, channels)
    grid = (triton.cdiv(length, block_l) * batch,)
    with launch_device(h):
        _mixer_in_fwd_kernel[grid](
            h,
            _or(a.residual, h),
            a.norm_weight.contiguous(),
            _or(a.shift, h),
            _or(a.scale, h),
            _or(a.inverse, h),
            res_out,
            h_norm,
            x,
            length,
            channels,
            a.eps,
            HAS_RESIDUAL=a.residual is not None,
            HAS_SHIFT=a.shift is not None,
            HAS_SCALE=a.scale is not None,
            PERMUTE=a.inverse is not None,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            num_warps=_num_warps(block_d),
        )
    return res_out, h_norm, x


def mixer_in_backward(
    saved: MixerInSaved, g_residual: torch.Tensor, g_h_norm: torch.Tensor, g_x: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (h, residual, weight, shift, scale) of ``mixer_in``; None for absent inputs."""
    residual_out, shift, scale = saved.residual_out, saved.shift, saved.scale
    batch, length, channels = residual_out.shape
    device = residual_out.device
    g_h = new_empty(residual_out.shape, g_h_norm.dtype, device)
    g_res_in = new_empty(residual_out.shape, torch.float32, device) if saved.has_residual else None
    block_l, block_d = _row_tiling(length, channels)
    chunk = _chunk(length, block_l)
    chunks = triton.cdiv(length, chunk)
    part_w = _partials(batch, chunks, channels, device)
    part_shift = _partials(batch, chunks, channels, device) if shift is not None else None
    part_scale = _partials(batch, chunks, channels, device) if scale is not None else None
    if residual_out.numel() > 0:
        with launch_device(g_h):
            _mixer_in_bwd_kernel[(chunks * batch,)](
                g_residual.contiguous(),
                g_h_norm.contiguous(),
                g_x.contiguous(),
                residual_out.contiguous(),
                saved.norm_weight.contiguous(),
                _or(scale, g_h),
                _or(saved.inverse, g_h),
                g_h,
                _or(g_res_in, g_h),
                part_w,
                _or(part_shift, part_w),
                _or(part_scale, part_w),
                length,
                channels,
                saved.eps,
                HAS_RESIDUAL=saved.has_residual,
                HAS_SHIFT=shift is not None,
                HAS_SCALE=scale is not None,
                PERMUTE=saved.inverse is not None,
                CHUNK=chunk,
                BLOCK_L=block_l,
                BLOCK_D=block_d,
                num_warps=_num_warps(block_d),
            )
    g_weight = part_w.sum((0, 1)).to(saved.norm_weight.dtype)
    return g_h, g_res_in, g_weight, _reduce(part_shift, shift), _reduce(part_scale, scale)


def mixer_out_forward(a: MixerOut) -> torch.Tensor:
    """``h_norm + gate * unpermute(y)`` in h_norm's dtype; see ``mixer_out``."""
    h_norm = a.h_norm.contiguous()
    batch, length, channels = h_norm.shape
    out = new_empty(h_norm.shape, h_norm.dtype, h_norm.device)
    if h_norm.numel() == 0:
        return out
    block_l, block_d = _row_tiling(length, channels)
    with launch_device(out):
        _mixer_out_fwd_kernel[(triton.cdiv(length, block_l) * batch,)](
            h_norm,
            _or(a.gate, h_norm),
            a.y.contiguous(),
            _or(a.inverse, h_norm),
            out,
            length,
            channels,
            HAS_GATE=a.gate is not None,
            PERMUTE=a.inverse is not None,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            num_warps=_num_warps(block_d),
        )
    return out


def mixer_out_backward(
    saved: MixerOutSaved, g_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients (y, gate) of ``mixer_out`` (h_norm's gradient is ``g_out`` itself)."""
    gate = saved.gate
    batch, length, channels = g_out.shape
    g_y = new_empty(g_out.shape, saved.y.dtype, g_out.device)
    block_l, block_d = _row_tiling(length, channels)
    chunk = _chunk(length, block_l)
    chunks = triton.cdiv(length, chunk)
    part_gate = _partials(batch, chunks, channels, g_out.device) if gate is not None else None
    if g_out.numel() > 0:
        with launch_device(g_y):
            _mixer_out_bwd_kernel[(chunks * batch,)](
                g_out.contiguous(),
                _or(gate, g_y),
                saved.y.contiguous(),
                _or(saved.inverse, g_y),
                g_y,
                _or(part_gate, g_y),
                length,
                channels,
                HAS_GATE=gate is not None,
                PERMUTE=saved.inverse is not None,
                CHUNK=chunk,
                BLOCK_L=block_l,
                BLOCK_D=block_d,
                num_warps=_num_warps(block_d),
            )
    return g_y, _reduce(part_gate, gate)


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor, made contiguous, or a placeholder pointer for an argument the kernel skips."""
    return placeholder if tensor is None else tensor.contiguous()


def _reduce(partials: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """Sum per-chunk partial rows (B, chunks, D) into (B, D) in ``like``'s dtype."""
    if partials is None or like is None:
        return None
    return partials.sum(1).to(like.dtype)
