"""The ``numba`` backend of ``cross_merge`` (CPU, float32 and float64): each output row read
from its k source rows and written once, so the merge is one pass over y instead of a gather
of k * L rows followed by a sum over k. ``cross_permute`` is a plain row gather, for which
``index_select`` is already at the memory's speed: this backend uses the ``torch`` one.

The kernel runs in torch's thread pool with torch's thread count, one launch at a time, as the
selective scan's numba kernels do (:func:`~zigzag_mamba.ops.selective_scan.numba.
torch_thread_count`).
"""

from __future__ import annotations

import torch
from numba import njit, prange

from zigzag_mamba.ops.cross_permute.pytorch import permute
from zigzag_mamba.ops.selective_scan.numba import torch_thread_count

__all__ = ["merge", "permute"]


@njit(parallel=True, cache=True, error_model="numpy")
def _merge_rows(y, inverse, out):
    n_batch, length, k, channels = y.shape
    for job in prange(n_batch * length):
        b, r = job // length, job % length
        first = inverse[0, r]
        for c in range(channels):
            out[b, r, c] = y[b, first, 0, c]
        for j in range(1, k):
            src = inverse[j, r]
            for c in range(channels):
                out[b, r, c] += y[b, src, j, c]


def merge(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, k, C) -> (B, L, C), contiguous."""
    y = y.contiguous()
    out = torch.empty(y.shape[0], y.shape[1], y.shape[3], dtype=y.dtype)
    if out.numel():
        with torch_thread_count():
            _merge_rows(y.numpy(), inverse.contiguous().numpy(), out.numpy())
    return out
