"""Token permutation along the sequence axis: ``permute_tokens(x, order) == x[:, order]``.

One ``torch.library`` custom op with a fake (shape) rule and an autograd rule, so that
``torch.compile`` traces through it without a graph break and each device picks its backend
without callers changing: a Triton row gather (:mod:`.triton`) for CUDA tensors when Triton can
run, ``index_select`` everywhere else (backend ``"torch"``). The backward of a permutation is
the permutation by the inverse order, i.e. the same op with ``order`` and ``inverse`` swapped,
so it uses the same kernel and higher derivatives come free.
"""

from __future__ import annotations

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)

OP = "permute_tokens"

# Registration order is preference order for "auto": Triton first wherever it can run.
register_triton_backend(OP, f"{__name__}.triton")
register_backend(OP, "torch", __name__, ("cpu", "cuda", "mps", "xpu"))


def permute_tokens_reference(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The definition: ``x[:, order]``."""
    return x[:, order]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The ``torch`` backend: ``x[:, index]`` by ``index_select``, up to twice as fast as
    advanced indexing on the CPU."""
    return x.index_select(1, index)


@torch.library.custom_op("zigzag_mamba::permute_tokens", mutates_args=())
def _permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    backend = implementation(OP, x.device.type)
    return backend_module(OP, backend).gather_tokens(x, order)


@_permute_tokens.register_fake
def _(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], order.shape[0], *x.shape[2:]))


def _setup_context(ctx, inputs, output) -> None:
    _, order, inverse = inputs
    ctx.save_for_backward(order, inverse)


def _backward(ctx, grad: torch.Tensor):
    order, inverse = ctx.saved_tensors
    return _permute_tokens(grad.contiguous(), inverse, order), None, None


_permute_tokens.register_autograd(_backward, setup_context=_setup_context)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` such that ``inverse[order[i]] == i`` (``argsort`` of a permutation, in O(L))."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse


def permute_tokens(
    x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """Reorder the tokens of ``x`` (B, L, C): returns ``x[:, order]``.

    ``order`` (L,) must be a permutation of ``range(L)`` (int64, on ``x``'s device); it is not
    re-checked here because this runs in every layer (:class:`zigzag_mamba.ZigzagScan` validates
    orders once, when it is built). ``inverse`` is ``argsort(order)``; pass it when you have it
    cached, otherwise it is computed.

    Example::

        >>> x = torch.randn(2, 16, 8)
        >>> order = zigzag_mamba.scans.zigzag_orders(4, 4)[0]
        >>> torch.equal(permute_tokens(x, order), x[:, order])
        True
    """
    if x.dim() < 2:
        raise ValueError(f"permute_tokens expects x of shape (B, L, ...), got {tuple(x.shape)}")
    if order.dim() != 1 or order.shape[0] != x.shape[1]:
        raise ValueError(
            f"order must have shape (L,) = ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(order.shape)}"
        )
    if inverse is None:
        inverse = inverse_order(order)
    return _permute_tokens(x, order, inverse)
