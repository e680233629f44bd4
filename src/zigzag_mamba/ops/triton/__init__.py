"""Triton kernels for CUDA tensors, and the helpers their launchers share.

Importing this package does not import Triton: only its kernel modules
(:mod:`zigzag_mamba.ops.triton.permute`, :mod:`zigzag_mamba.ops.triton.fused`) do, and the ops
import those lazily, the first time a CUDA tensor reaches them. :func:`unavailable_reason` is the
backend probe; it touches the Triton driver only when called.

Launchers allocate their outputs through :func:`new_empty`. Inside :func:`poisoned_outputs` those
buffers start out as NaN, so a test can tell an element a kernel never wrote from a correct one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison = False


def unavailable_reason() -> str | None:
    """None when Triton kernels can run on this machine's CUDA device, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'zigzag-mamba[triton]'"
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # no driver, or a Triton built for another platform
        return f"triton has no usable GPU driver: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every buffer the launchers allocate with NaN (integers: their maximum) while active."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill; poisoned inside :func:`poisoned_outputs`."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
    return torch.full(shape, fill, dtype=dtype, device=device)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (and >= 1): Triton block sizes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()
