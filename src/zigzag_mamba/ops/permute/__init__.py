"""Token permutation along the sequence axis: ``permute_tokens(x, order) == x[:, order]``.

A :class:`Permutation` is an order together with its inverse, checked once when it is made: the
backward of a permutation is the gather by the inverse, so a wrong inverse would give a right
forward and wrong gradients. The ops that permute (this one and the mixer's stages in
:mod:`zigzag_mamba.ops.mixer_io`) take a Permutation as it is, and check a plain order tensor
at every call.

One ``torch.library`` custom op with a fake (shape) rule and an autograd rule whose backward is
the same op with ``order`` and ``inverse`` swapped (so higher derivatives come free);
``torch.compile`` traces it without a graph break. Backends (registry op ``"permute_tokens"``):
a Triton row gather (:mod:`.triton`) for CUDA tensors when Triton can run, ``index_select``
(:mod:`.pytorch`) everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)
from zigzag_mamba.ops.permute.reference import permute_tokens_reference

__all__ = [
    "Permutation",
    "check_permutation",
    "inverse_order",
    "permute_tokens",
    "permute_tokens_reference",
]

OP = "permute_tokens"

# Registration order is preference order for "auto": Triton first wherever it can run.
register_triton_backend(OP, f"{__name__}.triton")
register_backend(OP, "torch", f"{__name__}.pytorch", ("cpu", "cuda", "mps", "xpu"))


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` such that ``inverse[order[i]] == i`` (``argsort`` of a permutation, in O(L))."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse


def check_permutation(order: torch.Tensor) -> None:
    """Raise a ValueError, naming values out of range, repeated or missing, unless the flat
    ``order`` is a permutation of ``range(L)``. Reads the values (one device sync)."""
    flat = order.reshape(-1)
    n = flat.numel()
    in_range = (flat >= 0) & (flat < n)
    if not bool(in_range.all()):
        bad = flat[~in_range][:5].tolist()
        raise ValueError(f"order is not a permutation of range({n}): out-of-range values {bad}")
    counts = torch.bincount(flat, minlength=n)
    if not bool((counts == 1).all()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        repeated = (counts > 1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"order is not a permutation of range({n}): repeats {repeated}, misses {missing}"
        )


class Permutation(NamedTuple):
    """A token order (L,) and its inverse, ``inverse[order[i]] == i``, both int64 on one device;
    or k of them, (k, L) tensors (:meth:`stack`), for the cross mixer's ops.

    Make one with :meth:`of`, which checks the order and computes the inverse;
    :meth:`~zigzag_mamba.ZigzagScan.layout` gives the ones of a pattern. The ops take it without
    reading its values again (so it costs no device sync per call, and traces under
    ``torch.compile``).

    Example::

        >>> p = Permutation.of(torch.tensor([2, 0, 1]))
        >>> p.inverse.tolist()
        [1, 2, 0]
    """

    order: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, order: torch.Tensor) -> Permutation:
        """The permutation of ``order`` (L,), checked (:func:`check_permutation`)."""
        _check_index("order", order)
        check_permutation(order)
        return cls(order, inverse_order(order))

    def to(self, device: torch.device | str) -> Permutation:
        """Both tensors on ``device``."""
        return Permutation(self.order.to(device), self.inverse.to(device))

    @classmethod
    def stack(cls, permutations: Sequence[Permutation]) -> Permutation:
        """k permutations of L tokens as one, with (k, L) tensors: what a cross mixer reads
        (:func:`~zigzag_mamba.ops.cross_permute.cross_permute`)."""
        orders = [p.order for p in permutations]
        if not orders or any(o.shape != orders[0].shape or o.dim() != 1 for o in orders):
            shapes = [tuple(o.shape) for o in orders]
            raise ValueError(f"expected one or more permutations (L,) of one L, got {shapes}")
        return cls(torch.stack(orders), torch.stack([p.inverse for p in permutations]))

    def inverted(self) -> Permutation:
        """The permutation that undoes this one (the gather back into raster order)."""
        return Permutation(self.inverse, self.order)


def _check_index(name: str, index: object, x: torch.Tensor | None = None) -> None:
    """An int tensor (L,), with L and the device of the tokens ``x`` when given."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {index.dtype}")
    if x is None:
        if index.dim() != 1:
            raise ValueError(f"{name} must have shape (L,), got {tuple(index.shape)}")
        return
    if index.device != x.device:
        raise ValueError(f"{name} is on {index.device} but the tokens are on {x.device}")
    if index.shape != (x.shape[1],):
        raise ValueError(
            f"{name} must have shape (L,) = ({x.shape[1]},) for tokens of shape "
            f"{tuple(x.shape)}, got {tuple(index.shape)}"
        )


def as_permutation(order: torch.Tensor | Permutation, x: torch.Tensor) -> Permutation:
    """``order`` as a :class:`Permutation` for permuting the tokens of ``x`` (B, L, ...).

    Checks dtypes, devices and shapes against ``x`` at every call (metadata only). A plain
    tensor is checked to be a permutation (its values are read, except inside
    ``torch.compile`` or on the meta device) and its inverse computed.
    """
    if isinstance(order, Permutation):
        _check_index("order", order.order, x)
        _check_index("inverse", order.inverse, x)
        return order
    _check_index("order", order, x)
    if not torch.compiler.is_compiling() and order.device.type != "meta":
        check_permutation(order)
    return Permutation(order, inverse_order(order))


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


def permute_tokens(x: torch.Tensor, order: torch.Tensor | Permutation) -> torch.Tensor:
    """Reorder the tokens of ``x`` (B, L, ...): returns ``x[:, order]``.

    ``order``: an int64 tensor (L,) on ``x``'s device, checked to be a permutation of
    ``range(L)`` at this call, or a :class:`Permutation` (checked when it was made).

    Example::

        >>> x = torch.randn(2, 16, 8)
        >>> order = zigzag_mamba.orders.zigzag_orders(4, 4)[0]
        >>> torch.equal(permute_tokens(x, order), x[:, order])
        True
    """
    if x.dim() < 2:
        raise ValueError(f"permute_tokens expects x of shape (B, L, ...), got {tuple(x.shape)}")
    return _permute_tokens(x, *as_permutation(order, x))
