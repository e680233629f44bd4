"""Token permutation along the sequence axis: ``permute_tokens(x, order) == x[:, order]``.

One ``torch.library`` custom op with a fake (shape) rule and an autograd rule, so that
``torch.compile`` traces through it without a graph break and each device picks its backend
without callers changing: a Triton row gather (:mod:`.triton`) for CUDA tensors when Triton can
run, ``index_select`` everywhere else (backend ``"torch"``). The backward of a permutation is
the permutation by the inverse order, i.e. the same op with ``order`` and ``inverse`` swapped,
so it uses the same kernel and higher derivatives come free.

That backward is only right if ``inverse`` really is the inverse of ``order``, so a caller's
``inverse`` is verified on its first use with that ``order`` (and again after either changes in
place); verified pairs are remembered by identity in a small table (:func:`checked_inverse`).
"""

from __future__ import annotations

import weakref

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)
from zigzag_mamba.ops.utils import tensor_version

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


# Verified pairs, by identity: ids -> (weak references, versions). A model holds a few pairs
# per layer; when the table is full it starts over (and pairs are verified again).
_VERIFIED_LIMIT = 1024
_verified: dict[tuple[int, ...], tuple] = {}


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int | None, ...]:
    return tuple(tensor_version(t) for t in tensors)


def _is_verified(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether these very tensors were verified together, and are unchanged since."""
    entry = _verified.get(tuple(map(id, tensors)))
    if entry is None:
        return False
    refs, versions = entry
    alive = all(ref() is t for ref, t in zip(refs, tensors, strict=True))
    return alive and versions == _versions(tensors)


def _remember(tensors: tuple[torch.Tensor, ...]) -> None:
    versions = _versions(tensors)
    if None in versions:  # inference tensors keep no version: they are verified at every use
        return
    if len(_verified) >= _VERIFIED_LIMIT:
        _verified.clear()
    _verified[tuple(map(id, tensors))] = (tuple(weakref.ref(t) for t in tensors), versions)


def _is_permutation(order: torch.Tensor) -> bool:
    index = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return bool(torch.equal(order.sort().values, index))


def _is_inverse_pair(order: torch.Tensor, inverse: torch.Tensor) -> bool:
    """Whether ``inverse[order[i]] == i`` for all i, with both in range (one device sync)."""
    n = order.numel()
    if n == 0:
        return True
    in_range = ((order >= 0) & (order < n)).all() & ((inverse >= 0) & (inverse < n)).all()
    # Clamped, so that an out-of-range index cannot fault the device before the check says so.
    round_trip = inverse.clamp(0, n - 1)[order.clamp(0, n - 1)]
    index = torch.arange(n, device=order.device, dtype=round_trip.dtype)
    return bool(in_range & (round_trip == index).all())


def _check_index(name: str, index: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"{name} is on {index.device} but the tokens are on {x.device}")
    if index.shape != (x.shape[1],):
        raise ValueError(
            f"{name} must have shape (L,) = ({x.shape[1]},) for tokens of shape "
            f"{tuple(x.shape)}, got {tuple(index.shape)}"
        )


def checked_inverse(
    order: torch.Tensor, inverse: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``inverse`` (or, when None, ``inverse_order(order)``) for permuting ``x`` (B, L, ...).

    Checks dtypes, devices and shapes against ``x`` at every call (metadata only), and on the
    first use of a pair (or of ``order`` alone, when ``inverse`` is None) that ``order`` is a
    permutation and ``inverse`` its inverse: a wrong ``inverse`` would give a right forward and
    a wrong gradient. The values are not read inside ``torch.compile`` or on the meta device.
    """
    _check_index("order", order, x)
    if inverse is not None:
        _check_index("inverse", inverse, x)
    tensors = (order,) if inverse is None else (order, inverse)
    readable = not torch.compiler.is_compiling() and order.device.type != "meta"
    if readable and not _is_verified(tensors):
        if inverse is None and not _is_permutation(order):
            raise ValueError(f"order is not a permutation of range({order.numel()})")
        if inverse is not None and not _is_inverse_pair(order, inverse):
            raise ValueError(
                "inverse is not the inverse of order (inverse[order[i]] must be i, and order a "
                "permutation); pass inverse=None to have it computed"
            )
        _remember(tensors)
    return inverse_order(order) if inverse is None else inverse


def permute_tokens(
    x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """Reorder the tokens of ``x`` (B, L, C): returns ``x[:, order]``.

    ``order`` (L,) must be a permutation of ``range(L)`` (int64, on ``x``'s device).
    ``inverse`` is ``argsort(order)``; pass it when you have it cached, otherwise it is
    computed. Both are verified on their first use together (:func:`checked_inverse`), so that
    a wrong ``inverse`` cannot silently give wrong gradients.

    Example::

        >>> x = torch.randn(2, 16, 8)
        >>> order = zigzag_mamba.orders.zigzag_orders(4, 4)[0]
        >>> torch.equal(permute_tokens(x, order), x[:, order])
        True
    """
    if x.dim() < 2:
        raise ValueError(f"permute_tokens expects x of shape (B, L, ...), got {tuple(x.shape)}")
    return _permute_tokens(x, order, checked_inverse(order, inverse, x))
