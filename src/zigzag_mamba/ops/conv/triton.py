"""The ``triton`` backend of ``causal_conv1d``: a causal depthwise conv1d with an optional SiLU,
forward and backward, on x (B, D, L) of any strides.

The mixer's x is a transposed view of the in_proj output (B, L, 2 * d_inner), channel stride 1:
the kernels take every tensor's strides (Triton specialises a stride of 1, so the contiguous
axis is loaded as vectors), and the launchers write the output and dx in x's layout
(:func:`~zigzag_mamba.ops.conv.layout.empty_in_layout`): no transposed copy on either side.

Forward: a program owns a tile of ``BLOCK_D`` channels x ``BLOCK_L`` steps and sums the K taps
as K shifted loads of x (the overlapping loads hit the cache). Backward, with ``g`` the gradient
of the pre-activation (``dout * silu'(pre)``, or ``dout`` without SiLU)::

    dx[t]      = sum_j weight[K - 1 - j] * g[t + j]
    dweight[k] = sum_(b, t) g[t] * x[t - K + 1 + k]
    dbias      = sum_(b, t) g[t]

``g`` at the K - 1 steps past a tile is recomputed from x (the pre-activation is not stored), so
the backward reads x and dout once from memory and writes dx once. dweight and dbias are sums
over tokens: each program sums its ``CHUNK_L`` steps into one partial row per channel and the
launcher adds the partials, which keeps the result deterministic and free of atomics. Arithmetic
is in fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.conv.layout import empty_in_layout
from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

# Tile of channels x steps: 64 x 64 fp32 accumulators, 32 per thread with 4 warps.
BLOCK_D = 64
BLOCK_L = 64
# Steps one backward program reduces into its partial rows of dweight and dbias.
CHUNK_L = 256


@triton.jit
def _tap(ptr, base, ds, ts, d_ok, L, s_d, s_l):
    """The fp32 tile ``ptr[base + d * s_d + t * s_l]`` for channels ``ds`` and steps ``ts``,
    zero outside ``[0, L)`` (the causal padding)."""
    mask = d_ok[:, None] & ((ts >= 0) & (ts < L))[None, :]
    offsets = base + ds[:, None] * s_d + ts[None, :].to(tl.int64) * s_l
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(
    x_ptr,
    x_base,
    w_ptr,
    b_ptr,
    ds,
    ts,
    d_ok,
    L,
    s_xd,
    s_xl,
    s_wd,
    s_wk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """bias + sum_k weight[k] * x[t - K + 1 + k] at steps ``ts`` (fp32)."""
    acc = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + ds * s_wd + k * s_wk, mask=d_ok, other=0.0).to(tl.float32)
        acc += w[:, None] * _tap(x_ptr, x_base, ds, ts - (K - 1) + k, d_ok, L, s_xd, s_xl)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    D,
    L,
    s_xb,
    s_xd,
    s_xl,
    s_ob,
    s_od,
    s_ol,
    s_wd,
    s_wk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Batch and step tiles share grid axis 0, which (unlike axis 1) has no 65535 limit.
    l_blocks = tl.cdiv(L, BLOCK_L)
    batch = (tl.program_id(0) // l_blocks).to(tl.int64)
    ts = (tl.program_id(0) % l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = _pre_activation(
        x_ptr,
        batch * s_xb,
        w_ptr,
        b_ptr,
        ds,
        ts,
        d_ok,
        L,
        s_xd,
        s_xl,
        s_wd,
        s_wk,
        K,
        HAS_BIAS,
        BLOCK_D,
        BLOCK_L,
    )
    if SILU:
        acc = acc * tl.sigmoid(acc)
    mask = d_ok[:, None] & (ts < L)[None, :]
    offsets = batch * s_ob + ds[:, None] * s_od + ts[None, :].to(tl.int64) * s_ol
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    g_ptr,
    dx_ptr,
    part_w_ptr,
    part_b_ptr,
    D,
    L,
    s_xb,
    s_xd,
    s_xl,
    s_gb,
    s_gd,
    s_gl,
    s_dxb,
    s_dxd,
    s_dxl,
    s_wd,
    s_wk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    CHUNK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunks = tl.cdiv(L, CHUNK_L)
    batch = (tl.program_id(0) // chunks).to(tl.int64)
    first = (tl.program_id(0) % chunks) * CHUNK_L
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ks = tl.arange(0, BLOCK_K)
    x_base = batch * s_xb
    g_base = batch * s_gb
    acc_w = tl.zeros((BLOCK_D, BLOCK_K), tl.float32)
    acc_b = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, CHUNK_L, BLOCK_L):
        ts = first + start + tl.arange(0, BLOCK_L)
        dx = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        # The pre-activation's gradient at steps ts + j reaches x[ts] through tap K - 1 - j.
        for j in tl.static_range(K):
            g = _tap(g_ptr, g_base, ds, ts + j, d_ok, L, s_gd, s_gl)
            if SILU:
                pre = _pre_activation(
                    x_ptr,
                    x_base,
                    w_ptr,
                    b_ptr,
                    ds,
                    ts + j,
                    d_ok,
                    L,
                    s_xd,
                    s_xl,
                    s_wd,
                    s_wk,
                    K,
                    HAS_BIAS,
                    BLOCK_D,
                    BLOCK_L,
                )
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            w = tl.load(w_ptr + ds * s_wd + (K - 1 - j) * s_wk, mask=d_ok, other=0.0)
            dx += w.to(tl.float32)[:, None] * g
            if j == 0:  # the tile's own steps: their share of dweight and dbias
                acc_b += tl.sum(g, axis=1)
                for k in tl.static_range(K):
                    x = _tap(x_ptr, x_base, ds, ts - (K - 1) + k, d_ok, L, s_xd, s_xl)
                    acc_w += tl.where(ks[None, :] == k, tl.sum(g * x, axis=1)[:, None], 0.0)
        mask = d_ok[:, None] & (ts < L)[None, :]
        offsets = batch * s_dxb + ds[:, None] * s_dxd + ts[None, :].to(tl.int64) * s_dxl
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = tl.program_id(0).to(tl.int64) * D + ds
    tl.store(
        part_w_ptr + part[:, None] * K + ks[None, :], acc_w, mask=d_ok[:, None] & (ks < K)[None, :]
    )
    if HAS_BIAS:
        tl.store(part_b_ptr + part, acc_b, mask=d_ok)


def _block_l(length: int, block_l: int | None) -> int:
    return block_l or max(1, min(BLOCK_L, next_power_of_2(length)))


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    *,
    block_d: int = BLOCK_D,
    block_l: int | None = None,
) -> torch.Tensor:
    """The convolution (and SiLU), in x's dtype and layout. ``block_d`` / ``block_l`` (powers of
    two) override the tile, for tests and benchmarks."""
    batch, channels, length = x.shape
    out = empty_in_layout(x)
    if out.numel() == 0:
        return out
    block_l = _block_l(length, block_l)
    grid = (batch * triton.cdiv(length, block_l), triton.cdiv(channels, block_d))
    with launch_device(x):
        _conv_fwd_kernel[grid](
            x,
            weight,
            x if bias is None else bias,
            out,
            channels,
            length,
            *x.stride(),
            *out.stride(),
            *weight.stride(),
            K=weight.shape[1],
            HAS_BIAS=bias is not None,
            SILU=silu,
            BLOCK_D=block_d,
            BLOCK_L=block_l,
        )
    return out


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    *,
    block_d: int = BLOCK_D,
    block_l: int | None = None,
    chunk_l: int = CHUNK_L,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype and layout, dweight, dbias in their inputs' dtypes; None without bias).

    ``chunk_l`` (a multiple of the step tile) is the steps each program reduces."""
    batch, channels, length = x.shape
    taps = weight.shape[1]
    dx = empty_in_layout(x)
    block_l = _block_l(length, block_l)
    chunk_l = max(block_l, min(chunk_l, triton.cdiv(length, block_l) * block_l))
    chunks = triton.cdiv(length, chunk_l)
    part_w = new_empty((batch * chunks, channels, taps), torch.float32, x.device)
    part_b = None
    if bias is not None:
        part_b = new_empty((batch * chunks, channels), torch.float32, x.device)
    if x.numel() > 0:
        grid = (batch * chunks, triton.cdiv(channels, block_d))
        with launch_device(x):
            _conv_bwd_kernel[grid](
                x,
                weight,
                x if bias is None else bias,
                dout,
                dx,
                part_w,
                part_w if part_b is None else part_b,
                channels,
                length,
                *x.stride(),
                *dout.stride(),
                *dx.stride(),
                *weight.stride(),
                K=taps,
                HAS_BIAS=bias is not None,
                SILU=silu,
                CHUNK_L=chunk_l,
                BLOCK_D=block_d,
                BLOCK_L=block_l,
                BLOCK_K=next_power_of_2(taps),
            )
    dweight = part_w.sum(0).to(weight.dtype)
    dbias = None if part_b is None else part_b.sum(0).to(bias.dtype)
    return dx, dweight, dbias
