"""The ``triton`` backend of ``cross_permute`` and ``cross_merge``.

``permute`` is the row gather of ``permute_tokens`` over k * L rows, one launch. ``merge``
reads, for each output row, the k rows it sums (one per order) and writes it once, accumulating
in fp32; ``y`` may be strided (the selective scan's (B, k * C, L) output, viewed (B, L, k, C)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.permute.triton import (
    channel_block,
    default_block_l,
    gather_tokens,
    row_tile,
)
from zigzag_mamba.ops.utils import launch_device, new_empty


def permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, k, C) for k orders (k, L)."""
    k, length = order.shape
    out = gather_tokens(x, order.t().reshape(-1))
    return out.view(x.shape[0], length, k, *x.shape[2:])


@triton.jit
def _merge_rows_kernel(
    y_ptr,
    inverse_ptr,
    out_ptr,
    n_rows,
    C,
    stride_yb,
    stride_yl,
    stride_yk,
    stride_yc,
    K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    batch, rows, cols, row_ok, mask = row_tile(n_rows, C, BLOCK_L, BLOCK_C)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        src = tl.load(inverse_ptr + j * n_rows + rows, mask=row_ok, other=0).to(tl.int64)
        offsets = batch * stride_yb + src[:, None] * stride_yl + j * stride_yk
        values = tl.load(y_ptr + offsets + cols[None, :] * stride_yc, mask=mask, other=0.0)
        acc += values.to(tl.float32)
    out_offsets = (batch * n_rows + rows[:, None].to(tl.int64)) * C + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def merge(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, k, C) -> (B, L, C), a contiguous result."""
    batch, length, k, channels = y.shape
    out = new_empty((batch, length, channels), y.dtype, y.device)
    if out.numel() == 0:
        return out
    block_c = channel_block(channels)
    block_l = default_block_l(length, channels)
    grid = (triton.cdiv(length, block_l) * batch, triton.cdiv(channels, block_c))
    with launch_device(y):
        _merge_rows_kernel[grid](
            y,
            inverse.contiguous(),
            out,
            length,
            channels,
            *y.stride(),
            K=k,
            BLOCK_L=block_l,
            BLOCK_C=block_c,
        )
    return out
