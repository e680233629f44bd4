"""Helpers every op shares: the compute-dtype rule, output buffers, and launch helpers.

Nothing here imports Triton or numba.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

_poison = False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype every op accumulates in: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(x: torch.Tensor) -> torch.autocast:
    """Autocast off on x's device: a custom op's implementation still runs under the caller's
    autocast, which would change the dtypes its PyTorch code computes in (and returns)."""
    return torch.autocast(x.device.type, enabled=False)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every buffer a kernel launcher allocates with NaN (integers: their maximum).

    Tests run kernels inside it, so that an element no program writes fails the comparison
    instead of passing by luck.
    """
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


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current one: Triton launches on the current device.

    CPU tensors (the Triton interpreter) need no context.
    """
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def or_empty(like: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def double_backward_unsupported(op: str, alternative: str) -> Callable[..., tuple]:
    """The autograd rule of a hand-written backward op: differentiating it raises a clear error.

    Without it, a gradient of a gradient (``create_graph=True``) fails deep inside torch with
    "no autograd formula"; with it, only a second backward that reaches the op fails, and says
    why. ``alternative`` tells what can be differentiated twice instead.
    """

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op} does not support double backward (a gradient of a gradient, as in a gradient "
            "penalty): its backward is a hand-written kernel without a derivative of its own. "
            f"{alternative}"
        )

    return backward


def no_context(ctx, inputs, output) -> None:
    """An autograd ``setup_context`` that saves nothing."""


def physical_memory() -> int | None:
    """Bytes of RAM this machine has, or None where that cannot be asked."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """A MemoryError that says how much ``what`` would need, before anything is allocated,
    when that is more than the machine's RAM (a far smaller shortfall is left to the allocator)."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise MemoryError(
            f"{what} would need about {nbytes / 2**30:.1f} GiB, more than this machine's "
            f"{total / 2**30:.1f} GiB of RAM"
        )
