"""The two memory-bound stages around a ZigMa block's mixer, each one pass over the tokens.

A block (docs/design.md, "The official model") is, with ``permute``/``unpermute`` the gathers
by ``order``/``inverse``::

    residual = residual + h                      (block 0: residual = h), kept in fp32
    h_norm   = RMSNorm(residual)                 (eps 1e-5, weight; output in h's dtype)
    x        = permute(h_norm * (1 + scale) + shift)        <- mixer_in
    y        = Mamba(x)
    h        = h_norm + gate * unpermute(y)                 <- mixer_out

:func:`mixer_in` reads ``h`` and ``residual`` once and writes the new residual, ``h_norm`` and
the mixer's input, already permuted; :func:`mixer_out` reads ``h_norm`` and ``y`` once and
writes the block's output. Each is a ``torch.library`` custom op with a fake rule and a
hand-written backward (itself a custom op), so ``torch.compile`` traces them without graph
breaks. Their backend (registry op ``"mixer_io"``): Triton kernels (:mod:`.triton`) for CUDA
tensors when Triton can run, else the PyTorch code in :mod:`.pytorch`, which computes in fp32
(float64 for float64 inputs) and rounds once at the end; :mod:`.reference` holds the
definitions. Double backward is not supported: the
backward ops raise a clear error when differentiated (the ``*_reference`` functions can be).
"""

from __future__ import annotations

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)
from zigzag_mamba.ops.mixer_io.inputs import MixerIn, MixerInSaved, MixerOut, MixerOutSaved
from zigzag_mamba.ops.mixer_io.reference import mixer_in_reference, mixer_out_reference
from zigzag_mamba.ops.permute import Permutation, as_permutation
from zigzag_mamba.ops.utils import compute_dtype, double_backward_unsupported, no_context, or_empty

__all__ = [
    "MixerIn",
    "MixerInSaved",
    "MixerOut",
    "MixerOutSaved",
    "mixer_in",
    "mixer_in_reference",
    "mixer_out",
    "mixer_out_reference",
]

OP = "mixer_io"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DIFFERENTIABLE_TWICE = (
    "mixer_in_reference and mixer_out_reference compute the same in plain PyTorch, which "
    "autograd differentiates as often as asked."
)

register_triton_backend(OP, f"{__name__}.triton", dtypes=_KERNEL_DTYPES)
register_backend(OP, "torch", f"{__name__}.pytorch", ("cpu", "cuda", "mps", "xpu"))


def _backend(*tensors: torch.Tensor | None) -> str:
    return implementation(OP, tensors[0].device.type, *tensors)


@torch.library.custom_op("zigzag_mamba::mixer_in", mutates_args=())
def _mixer_in(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = MixerIn(h, residual, norm_weight, shift, scale, order, inverse, eps)
    return backend_module(OP, _backend(*a[:5])).mixer_in_forward(a)


@_mixer_in.register_fake
def _(h, residual, norm_weight, shift, scale, order, inverse, eps):
    return h.new_empty(h.shape, dtype=compute_dtype(h)), h.new_empty(h.shape), h.new_empty(h.shape)


@torch.library.custom_op("zigzag_mamba::mixer_in_backward", mutates_args=())
def _mixer_in_backward(
    grads: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    has_residual: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grads``: (g_residual, g_h_norm, g_x); ``saved``: the tensors of a MixerInSaved."""
    kept = MixerInSaved(*saved, has_residual, eps)
    g_h, *rest = backend_module(OP, backend).mixer_in_backward(kept, *grads)
    return g_h, *or_empty(kept.residual_out, *rest)


@_mixer_in_backward.register_fake
def _(grads, saved, has_residual, eps, backend):
    kept = MixerInSaved(*saved, has_residual, eps)
    none = kept.residual_out.new_empty(0)
    like = lambda t: none if t is None else t.new_empty(t.shape)
    residual = like(kept.residual_out) if has_residual else none
    return like(grads[1]), residual, like(kept.norm_weight), like(kept.shift), like(kept.scale)


def _mixer_in_setup_context(ctx, inputs, output) -> None:
    a = MixerIn(*inputs)
    ctx.save_for_backward(output[0], a.norm_weight, a.shift, a.scale, a.order, a.inverse)
    ctx.has_residual = a.residual is not None
    ctx.eps = a.eps
    # The backward runs where the forward ran, whatever is forced when it runs.
    ctx.backend = _backend(*a[:5])


def _mixer_in_grad(ctx, g_residual, g_h_norm, g_x):
    saved = list(ctx.saved_tensors)
    g_h, g_residual_in, g_weight, g_shift, g_scale = _mixer_in_backward(
        [g_residual, g_h_norm, g_x], saved, ctx.has_residual, ctx.eps, ctx.backend
    )
    shift, scale = saved[2], saved[3]
    return (
        g_h,
        g_residual_in if ctx.has_residual else None,
        g_weight,
        None if shift is None else g_shift,
        None if scale is None else g_scale,
        None,
        None,
        None,
    )


_mixer_in.register_autograd(_mixer_in_grad, setup_context=_mixer_in_setup_context)
_mixer_in_backward.register_autograd(
    double_backward_unsupported("mixer_in", _DIFFERENTIABLE_TWICE), setup_context=no_context
)


@torch.library.custom_op("zigzag_mamba::mixer_out", mutates_args=())
def _mixer_out(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
) -> torch.Tensor:
    a = MixerOut(h_norm, gate, y, order, inverse)
    return backend_module(OP, _backend(h_norm, gate, y)).mixer_out_forward(a)


@_mixer_out.register_fake
def _(h_norm, gate, y, order, inverse):
    return h_norm.new_empty(h_norm.shape)


@torch.library.custom_op("zigzag_mamba::mixer_out_backward", mutates_args=())
def _mixer_out_backward(
    g_out: torch.Tensor, saved: list[torch.Tensor | None], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``saved``: the tensors of a MixerOutSaved."""
    g_y, g_gate = backend_module(OP, backend).mixer_out_backward(MixerOutSaved(*saved), g_out)
    return g_y, *or_empty(g_out, g_gate)


@_mixer_out_backward.register_fake
def _(g_out, saved, backend):
    gate, y = saved[0], saved[1]
    return y.new_empty(y.shape), g_out.new_empty(0) if gate is None else gate.new_empty(gate.shape)


def _mixer_out_setup_context(ctx, inputs, output) -> None:
    a = MixerOut(*inputs)
    ctx.save_for_backward(a.gate, a.y, a.order, a.inverse)
    ctx.h_norm_dtype = a.h_norm.dtype
    ctx.backend = _backend(a.h_norm, a.gate, a.y)


def _mixer_out_grad(ctx, g_out):
    saved = list(ctx.saved_tensors)
    g_y, g_gate = _mixer_out_backward(g_out, saved, ctx.backend)
    return g_out.to(ctx.h_norm_dtype), None if saved[0] is None else g_gate, g_y, None, None


_mixer_out.register_autograd(_mixer_out_grad, setup_context=_mixer_out_setup_context)
_mixer_out_backward.register_autograd(
    double_backward_unsupported("mixer_out", _DIFFERENTIABLE_TWICE), setup_context=no_context
)


def mixer_in(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    order: torch.Tensor | Permutation | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm, adaLN modulation and permutation, in one pass over the tokens.

    Args:
        h: (B, L, D) the previous block's output (float32, float16 or bfloat16; float64 runs
            the PyTorch path).
        residual: (B, L, D) the running residual in float32 (float64 for float64 ``h``), or
            None in block 0, where the residual starts as ``h``.
        norm_weight: (D,) the RMSNorm weight.
        shift, scale: (B, D) per-sample adaLN modulation, or None without conditioning.
        order: the token order, an int64 tensor (L,) on ``h``'s device (checked at this call)
            or a :class:`~zigzag_mamba.ops.permute.Permutation` (checked when it was made); None
            for no permutation.
        eps: RMSNorm epsilon.

    Returns:
        ``(residual, h_norm, x)``: ``residual = residual + h`` in float32 (float64 for float64
        ``h``); ``h_norm = RMSNorm(residual)`` in ``h``'s dtype, for :func:`mixer_out`; and
        ``x = (h_norm * (1 + scale) + shift)[:, order]`` in ``h``'s dtype, the mixer's input.
        ``x`` is modulated from the unrounded normalised value, so in low precision it can
        differ by one rounding from modulating ``h_norm``.

    Example::

        >>> h, w = torch.randn(2, 16, 8), torch.ones(8)
        >>> order = zigzag_mamba.orders.zigzag_orders(4, 4)[1]
        >>> residual, h_norm, x = mixer_in(h, None, w, order=order)
        >>> torch.equal(x, h_norm[:, order])
        True
    """
    _check_tokens("h", h)
    _check_like("residual", residual, h, h.shape, compute_dtype(h))
    _check_like("norm_weight", norm_weight, h, h.shape[2:])
    _check_like("shift", shift, h, (h.shape[0], h.shape[2]))
    _check_like("scale", scale, h, (h.shape[0], h.shape[2]))
    order, inverse = _permutation(order, h)
    return _mixer_in(h, residual, norm_weight, shift, scale, order, inverse, eps)


def mixer_out(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y: torch.Tensor,
    order: torch.Tensor | Permutation | None = None,
) -> torch.Tensor:
    """Unpermute, gate and add, in one pass: ``h_norm + gate * y[:, inverse]``.

    Args:
        h_norm: (B, L, D) the normalised tokens returned by :func:`mixer_in`.
        gate: (B, D) the per-sample adaLN gate, or None for a gate of 1.
        y: (B, L, D) the mixer's output, in the mixer's (permuted) order.
        order: the token order given to :func:`mixer_in`.

    Returns:
        (B, L, D) the block's output in natural token order, in ``h_norm``'s dtype.

    Example::

        >>> h_norm, y = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
        >>> order = zigzag_mamba.orders.zigzag_orders(4, 4)[1]
        >>> out = mixer_out(h_norm, None, y, order)
        >>> torch.allclose(out[:, order], h_norm[:, order] + y)
        True
    """
    _check_tokens("h_norm", h_norm)
    _check_like("gate", gate, h_norm, (h_norm.shape[0], h_norm.shape[2]))
    _check_like("y", y, h_norm, h_norm.shape)
    order, inverse = _permutation(order, h_norm)
    return _mixer_out(h_norm, gate, y, order, inverse)


def _check_tokens(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_kind(x)}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, L, D), got {tuple(x.shape)}")


def _check_like(
    name: str,
    x: torch.Tensor | None,
    like: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> None:
    """``x`` (if given) is a floating-point tensor of ``shape`` on ``like``'s device."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_kind(x)}")
    if x.device != like.device:
        # A meta tensor among real ones would run the shape-only kernel: uninitialised output.
        raise ValueError(f"{name} is on {x.device} but the tokens are on {like.device}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")


def _kind(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _permutation(
    order: torch.Tensor | Permutation | None, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if order is None else as_permutation(order, x)
