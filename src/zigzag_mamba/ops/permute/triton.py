"""The ``triton`` backend of ``permute_tokens``: a row gather along the token axis,
``out[b, i] = x[b, index[i]]`` for x of shape (B, L, C).

A permutation moves whole token rows, so the kernel is a copy whose source row is looked up:
each program copies a tile of ``BLOCK_L`` rows x ``BLOCK_C`` channels, reading the ``BLOCK_L``
indices once and moving each row as one contiguous, vectorised span. Any dtype is moved bit for
bit (no arithmetic is done on the values). ``x`` may be strided; the output is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zigzag_mamba.ops.utils import launch_device, new_empty, next_power_of_2

# Elements per program: large enough that a program moves a few KiB (so launch and index reads
# are amortised), small enough that a (8, 16384, 768) tensor still spreads over every SM.
_TILE = 4096
_CHANNEL_BLOCKS = (64, 128, 256, 512)


@triton.jit
def row_tile(n_rows, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a (B, n_rows, C) output: (batch, rows, cols, row mask, mask)."""
    # Batch and row blocks share grid axis 0, which (unlike axes 1 and 2) has no 65535 limit.
    row_blocks = tl.cdiv(n_rows, BLOCK_L)
    batch = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    return batch, rows, cols, row_ok, row_ok[:, None] & (cols < C)[None, :]


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    n_rows,
    C,
    stride_xb,
    stride_xl,
    stride_xc,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    batch, rows, cols, row_ok, mask = row_tile(n_rows, C, BLOCK_L, BLOCK_C)
    # int64 offsets: B * L * C may exceed 2**31 elements.
    src = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    x_offsets = batch * stride_xb + src[:, None] * stride_xl + cols[None, :] * stride_xc
    values = tl.load(x_ptr + x_offsets, mask=mask)
    out_offsets = (batch * n_rows + rows[:, None].to(tl.int64)) * C + cols[None, :]
    tl.store(out_ptr + out_offsets, values, mask=mask)


def channel_block(channels: int) -> int:
    """The channel tile that wastes the fewest masked lanes (ties: the larger tile)."""
    best = min(_CHANNEL_BLOCKS, key=lambda b: (triton.cdiv(channels, b) * b, -b))
    return min(best, next_power_of_2(channels))


def default_block_l(rows: int, channels: int) -> int:
    """Rows per program when the caller does not choose: one tile of about ``_TILE`` elements."""
    return max(1, min(_TILE // channel_block(channels), next_power_of_2(rows)))


def gather_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    block_l: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """``x[:, index]`` for x of shape (B, L, ...), as a new contiguous tensor.

    ``index`` is an int32 or int64 vector of row numbers in ``[0, L)``; it need not be a
    permutation, nor have length L. Trailing dimensions are flattened into channels (copying when
    they cannot be viewed so). ``block_l`` (rows per program, a power of two) and ``num_warps``
    override the launch shape, for benchmarking.
    """
    if x.dim() < 2 or index.dim() != 1:
        raise ValueError(f"expected x (B, L, ...) and index (L',), got {x.shape}, {index.shape}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    batch = x.shape[0]
    x3 = x.reshape(batch, x.shape[1], -1) if x.dim() != 3 else x
    channels = x3.shape[2]
    out = new_empty((batch, index.shape[0], channels), x.dtype, x.device)
    if out.numel() > 0:
        with launch_device(x):
            _launch(x3, index.contiguous(), out, block_l, num_warps)
    return out.view(batch, index.shape[0], *x.shape[2:])


def _launch(
    x: torch.Tensor, index: torch.Tensor, out: torch.Tensor, block_l: int | None, num_warps: int
) -> None:
    rows, channels = out.shape[1], out.shape[2]
    block_c = channel_block(channels)
    block_l = default_block_l(rows, channels) if block_l is None else block_l
    grid = (triton.cdiv(rows, block_l) * out.shape[0], triton.cdiv(channels, block_c))
    _gather_rows_kernel[grid](
        x,
        index,
        out,
        rows,
        channels,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_L=block_l,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
