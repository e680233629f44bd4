"""The k-way permute of the cross mixer and its adjoint, the merge.

``cross_permute(x, permutation)`` reads the tokens x (B, L, C) in k orders at once, (B, L, k,
C): ``out[:, i, j] = x[:, order[j, i]]``, so that the k sequences lie side by side as k * C
channels. ``cross_merge(y, permutation)`` puts each of the k sequences of y (B, L, k, C) back
in raster order and sums them, (B, L, C): ``out[:, r] = sum_j y[:, inverse[j, r], j]``. Each
is the other's adjoint, so each op's backward is the other op (higher derivatives come free).

``permutation`` is a :class:`~zigzag_mamba.ops.permute.Permutation` of k orders (its tensors
(k, L)), made by :meth:`Permutation.stack` or given by a cross mixer's layout. Backends
(registry op ``"cross_permute"``): Triton on CUDA (the permute's row gather over k * L rows for
the permute, one fused kernel that reads the k rows of each output row for the merge); numba on
the CPU (the same fused merge; float32 and float64); ``index_select`` everywhere else.
"""

from __future__ import annotations

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)
from zigzag_mamba.ops.cross_permute.reference import (
    cross_merge_reference,
    cross_permute_reference,
)
from zigzag_mamba.ops.permute import Permutation

__all__ = ["cross_merge", "cross_merge_reference", "cross_permute", "cross_permute_reference"]

OP = "cross_permute"

register_triton_backend(OP, f"{__name__}.triton")
register_backend(OP, "numba", f"{__name__}.numba", ("cpu",), dtypes=(torch.float32, torch.float64))
register_backend(OP, "torch", f"{__name__}.pytorch", ("cpu", "cuda", "mps", "xpu"))


def _backend(x: torch.Tensor):
    return backend_module(OP, implementation(OP, x.device.type, x))


@torch.library.custom_op("zigzag_mamba::cross_permute", mutates_args=())
def _cross_permute(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _backend(x).permute(x, order)


@_cross_permute.register_fake
def _(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], order.shape[1], order.shape[0], *x.shape[2:]))


@torch.library.custom_op("zigzag_mamba::cross_merge", mutates_args=())
def _cross_merge(y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _backend(y).merge(y, inverse)


@_cross_merge.register_fake
def _(y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return y.new_empty((y.shape[0], y.shape[1], *y.shape[3:]))


def _save_permutation(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _permute_backward(ctx, grad: torch.Tensor):
    return _cross_merge(grad, *ctx.saved_tensors), None, None


def _merge_backward(ctx, grad: torch.Tensor):
    return _cross_permute(grad.contiguous(), *ctx.saved_tensors), None, None


_cross_permute.register_autograd(_permute_backward, setup_context=_save_permutation)
_cross_merge.register_autograd(_merge_backward, setup_context=_save_permutation)


def _check(name: str, tokens: torch.Tensor, rank: int, permutation: Permutation) -> None:
    shape = "(B, L, C)" if rank == 3 else "(B, L, k, C)"
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != rank:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be tokens {shape}, got {got}")
    if not isinstance(permutation, Permutation) or permutation.order.dim() != 2:
        got = type(permutation).__name__
        if isinstance(permutation, Permutation):
            got = f"orders of shape {tuple(permutation.order.shape)}"
        raise TypeError(
            f"permutation must be a Permutation of k orders, (k, L) tensors (Permutation.stack), "
            f"got {got}"
        )
    k, length = permutation.order.shape
    if tokens.shape[1] != length or (rank == 4 and tokens.shape[2] != k):
        raise ValueError(
            f"{name} {tuple(tokens.shape)} does not fit {k} orders of {length} tokens: "
            f"expected {shape} with L = {length}" + (f" and k = {k}" if rank == 4 else "")
        )
    if permutation.order.device != tokens.device:
        raise ValueError(
            f"the orders are on {permutation.order.device} but {name} is on {tokens.device}"
        )


def cross_permute(x: torch.Tensor, permutation: Permutation) -> torch.Tensor:
    """The tokens x (B, L, C) read in each of k orders: (B, L, k, C), contiguous.

    Example::

        >>> p = Permutation.stack([Permutation.of(torch.tensor(o)) for o in ([0, 1, 2], [2, 0, 1])])
        >>> x = torch.arange(3.0).view(1, 3, 1)
        >>> cross_permute(x, p)[0, :, :, 0].tolist()  # column j: x in order j
        [[0.0, 2.0], [1.0, 0.0], [2.0, 1.0]]
    """
    _check("x", x, 3, permutation)
    return _cross_permute(x, *permutation)


def cross_merge(y: torch.Tensor, permutation: Permutation) -> torch.Tensor:
    """k sequences y (B, L, k, C), each in its order, put back in raster order and summed:
    (B, L, C). The adjoint of :func:`cross_permute`.

    Example::

        >>> p = Permutation.stack([Permutation.of(torch.tensor(o)) for o in ([0, 1, 2], [2, 0, 1])])
        >>> x = torch.randn(2, 3, 4)
        >>> torch.allclose(cross_merge(cross_permute(x, p), p), 2 * x)
        True
    """
    _check("y", y, 4, permutation)
    return _cross_merge(y, *permutation)
