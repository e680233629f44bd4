"""The two memory-bound ends of a ZigMa block, each fused into one pass over the tokens.

A block (DESIGN.md section 6) is, with ``scan``/``unscan`` the gathers by ``order``/``inverse``::

    residual = residual + h                      (block 0: residual = h), kept in fp32
    h_norm   = RMSNorm(residual)                 (eps 1e-5, weight; output in h's dtype)
    x        = scan(h_norm * (1 + scale) + shift)          <- scan_in
    y        = Mamba(x)
    h        = h_norm + gate * unscan(y)                   <- scan_out

:func:`scan_in` reads ``h`` and ``residual`` once and writes the new residual, ``h_norm`` and the
modulated tokens already in scan order; :func:`scan_out` reads ``h_norm`` and ``y`` once and
writes the block output. Each is a ``torch.library`` custom op with a fake rule and a hand-written
backward (itself a custom op), so ``torch.compile`` traces them without graph breaks. The
implementation is chosen per device through the ``"fused_scan"`` backend: Triton kernels for CUDA
tensors when Triton can run, else the PyTorch references below (which compute in fp32, or
float64 for float64 inputs, and round once at the end). Double backward is not supported.
"""

from __future__ import annotations

import torch

from zigzag_mamba.ops import triton as triton_kernels
from zigzag_mamba.ops.backends import register_backend, resolve
from zigzag_mamba.ops.permute import inverse_order

register_backend("fused_scan", "triton", ("cuda",), triton_kernels.unavailable_reason)
register_backend("fused_scan", "torch", ("cpu", "cuda", "mps", "xpu", "meta"))

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]``: index_select is up to twice as fast as advanced indexing on the CPU."""
    return x.index_select(1, index)


def _per_sample(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, D) -> (B, 1, D), broadcasting one row per sample over the tokens."""
    return v.to(dtype)[:, None]


def scan_in_reference(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    order: torch.Tensor | None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition of :func:`scan_in` in plain PyTorch (differentiable by autograd)."""
    compute = _compute_dtype(h)
    r = h.to(compute, copy=True) if residual is None else residual + h.to(compute)
    y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(compute)
    # copy: with no shift/scale/order, x_scan would otherwise be the same tensor as h_norm.
    h_norm = y.to(h.dtype, copy=True)
    if scale is not None:
        y = y * (1 + _per_sample(scale, compute))
    if shift is not None:
        y = y + _per_sample(shift, compute)
    x_scan = y.to(h.dtype)
    return r, h_norm, x_scan if order is None else _gather(x_scan, order)


def scan_out_reference(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y_seq: torch.Tensor,
    inverse: torch.Tensor | None,
) -> torch.Tensor:
    """The definition of :func:`scan_out` in plain PyTorch (differentiable by autograd)."""
    compute = _compute_dtype(h_norm)
    y = y_seq.to(compute) if inverse is None else _gather(y_seq.to(compute), inverse)
    if gate is not None:
        y = y * _per_sample(gate, compute)
    return (h_norm.to(compute) + y).to(h_norm.dtype)


def _contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The fake rules promise contiguous outputs; elementwise math would follow input strides."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the CUDA kernels take this call (Triton computes in fp32: no float64 inputs)."""
    if resolve("fused_scan", "cuda") != "triton":
        return False
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in tensors)


def _scan_in_backward_torch(
    g_residual: torch.Tensor,
    g_h_norm: torch.Tensor,
    g_x_scan: torch.Tensor,
    residual_out: torch.Tensor,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    has_residual: bool,
    inverse: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Gradients (h, residual, norm_weight, shift, scale) of ``scan_in``, by hand.

    With r the summed residual, n = r * rstd, y = n * w and x = y * (1 + scale) + shift:
    dy = dh_norm + unscan(dx) * (1 + scale), dn = dy * w and, RMSNorm's own backward,
    dr = rstd * (dn - n * mean(dn * n)) + dresidual_out.
    """
    r, compute = residual_out, residual_out.dtype
    rstd = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    n = r * rstd
    w = norm_weight.to(compute)
    g_x = g_x_scan.to(compute) if inverse is None else _gather(g_x_scan.to(compute), inverse)
    g_shift = None if shift is None else g_x.sum(1).to(shift.dtype)
    g_scale = None if scale is None else (g_x * n * w).sum(1).to(scale.dtype)
    if scale is not None:
        g_x = g_x * (1 + _per_sample(scale, compute))
    g_y = g_h_norm.to(compute) + g_x
    g_weight = (g_y * n).sum((0, 1)).to(norm_weight.dtype)
    g_n = g_y * w
    g_r = rstd * (g_n - n * (g_n * n).mean(-1, keepdim=True)) + g_residual
    # Outputs may not alias each other, hence the copy when h is float32 like the residual.
    g_h = g_r.to(g_h_norm.dtype, copy=True)
    g_residual_in = g_r if has_residual else None
    return g_h, *_or_empty(residual_out, g_residual_in, g_weight, g_shift, g_scale)


@torch.library.custom_op("zigzag_mamba::scan_in", mutates_args=())
def _scan_in(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, residual = _contiguous(h, residual)
    return scan_in_reference(h, residual, norm_weight, shift, scale, order, eps)


@_scan_in.register_kernel("cuda")
def _(h, residual, norm_weight, shift, scale, order, inverse, eps):
    if not _use_triton(h, residual, norm_weight, shift, scale):
        return scan_in_reference(h, residual, norm_weight, shift, scale, order, eps)
    # Imported here, not at module import: importing zigzag_mamba must not import Triton.
    from zigzag_mamba.ops.triton.fused import scan_in_forward

    with torch.cuda.device(h.device):  # Triton launches on the current device
        return scan_in_forward(h, residual, norm_weight, shift, scale, inverse, eps)


@_scan_in.register_fake
def _(h, residual, norm_weight, shift, scale, order, inverse, eps):
    return h.new_empty(h.shape, dtype=_compute_dtype(h)), h.new_empty(h.shape), h.new_empty(h.shape)


@torch.library.custom_op("zigzag_mamba::scan_in_backward", mutates_args=())
def _scan_in_backward(
    g_residual: torch.Tensor,
    g_h_norm: torch.Tensor,
    g_x_scan: torch.Tensor,
    residual_out: torch.Tensor,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    has_residual: bool,
    inverse: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g_residual, g_h_norm, g_x_scan = _contiguous(g_residual, g_h_norm, g_x_scan)
    return _scan_in_backward_torch(
        g_residual, g_h_norm, g_x_scan, residual_out, norm_weight, shift, scale,
        has_residual, inverse, eps,
    )  # fmt: skip


@_scan_in_backward.register_kernel("cuda")
def _(g_residual, g_h_norm, g_x_scan, residual_out, norm_weight, shift, scale, has_residual,
      inverse, eps):  # fmt: skip
    args = (g_residual, g_h_norm, g_x_scan, residual_out, norm_weight, shift, scale)
    if not _use_triton(*args):
        return _scan_in_backward_torch(*args, has_residual, inverse, eps)
    from zigzag_mamba.ops.triton.fused import scan_in_backward

    with torch.cuda.device(g_h_norm.device):
        g_h, *grads = scan_in_backward(*args, has_residual, inverse, eps)
    return g_h, *_or_empty(residual_out, *grads)


@_scan_in_backward.register_fake
def _(g_residual, g_h_norm, g_x_scan, residual_out, norm_weight, shift, scale, has_residual,
      inverse, eps):  # fmt: skip
    none = residual_out.new_empty(0)
    return (
        g_h_norm.new_empty(g_h_norm.shape),
        residual_out.new_empty(residual_out.shape) if has_residual else none,
        norm_weight.new_empty(norm_weight.shape),
        none if shift is None else shift.new_empty(shift.shape),
        none if scale is None else scale.new_empty(scale.shape),
    )


def _or_empty(like: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def _scan_in_setup_context(ctx, inputs, output) -> None:
    _, residual, norm_weight, shift, scale, _, inverse, eps = inputs
    ctx.save_for_backward(output[0], norm_weight, shift, scale, inverse)
    ctx.has_residual = residual is not None
    ctx.eps = eps


def _scan_in_grad(ctx, g_residual, g_h_norm, g_x_scan):
    residual_out, norm_weight, shift, scale, inverse = ctx.saved_tensors
    g_h, g_residual_in, g_weight, g_shift, g_scale = _scan_in_backward(
        g_residual, g_h_norm, g_x_scan, residual_out, norm_weight, shift, scale,
        ctx.has_residual, inverse, ctx.eps,
    )  # fmt: skip
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


_scan_in.register_autograd(_scan_in_grad, setup_context=_scan_in_setup_context)


def _scan_out_backward_torch(
    g_out: torch.Tensor,
    gate: torch.Tensor | None,
    y_seq: torch.Tensor,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (y_seq, gate) of ``scan_out``: dy = scan(gate * dout), dgate = sum(dout * y)."""
    compute = _compute_dtype(g_out)
    g = g_out.to(compute)
    g_gate = None
    if gate is not None:
        y = y_seq.to(compute) if inverse is None else _gather(y_seq.to(compute), inverse)
        g_gate = (g * y).sum(1).to(gate.dtype)
        g = g * _per_sample(gate, compute)
    # copy: without gate and order, g_y would otherwise be the input g_out itself.
    g_y = g.to(y_seq.dtype, copy=True) if order is None else _gather(g, order).to(y_seq.dtype)
    return g_y, *_or_empty(g_out, g_gate)


@torch.library.custom_op("zigzag_mamba::scan_out", mutates_args=())
def _scan_out(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y_seq: torch.Tensor,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
) -> torch.Tensor:
    h_norm, y_seq = _contiguous(h_norm, y_seq)
    return scan_out_reference(h_norm, gate, y_seq, inverse)


@_scan_out.register_kernel("cuda")
def _(h_norm, gate, y_seq, order, inverse):
    if not _use_triton(h_norm, gate, y_seq):
        return scan_out_reference(h_norm, gate, y_seq, inverse)
    from zigzag_mamba.ops.triton.fused import scan_out_forward

    with torch.cuda.device(h_norm.device):
        return scan_out_forward(h_norm, gate, y_seq, inverse)


@_scan_out.register_fake
def _(h_norm, gate, y_seq, order, inverse):
    return h_norm.new_empty(h_norm.shape)


@torch.library.custom_op("zigzag_mamba::scan_out_backward", mutates_args=())
def _scan_out_backward(
    g_out: torch.Tensor,
    gate: torch.Tensor | None,
    y_seq: torch.Tensor,
    order: torch.Tensor | None,
    inverse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_out, y_seq = _contiguous(g_out, y_seq)
    return _scan_out_backward_torch(g_out, gate, y_seq, order, inverse)


@_scan_out_backward.register_kernel("cuda")
def _(g_out, gate, y_seq, order, inverse):
    if not _use_triton(g_out, gate, y_seq):
        return _scan_out_backward_torch(g_out, gate, y_seq, order, inverse)
    from zigzag_mamba.ops.triton.fused import scan_out_backward

    with torch.cuda.device(g_out.device):
        g_y, g_gate = scan_out_backward(g_out, gate, y_seq, inverse)
    return g_y, *_or_empty(g_out, g_gate)


@_scan_out_backward.register_fake
def _(g_out, gate, y_seq, order, inverse):
    g_gate = g_out.new_empty(0) if gate is None else gate.new_empty(gate.shape)
    return y_seq.new_empty(y_seq.shape), g_gate


def _scan_out_setup_context(ctx, inputs, output) -> None:
    h_norm, gate, y_seq, order, inverse = inputs
    ctx.save_for_backward(gate, y_seq, order, inverse)
    ctx.h_norm_dtype = h_norm.dtype


def _scan_out_grad(ctx, g_out):
    gate, y_seq, order, inverse = ctx.saved_tensors
    g_y, g_gate = _scan_out_backward(g_out, gate, y_seq, order, inverse)
    return g_out.to(ctx.h_norm_dtype), None if gate is None else g_gate, g_y, None, None


_scan_out.register_autograd(_scan_out_grad, setup_context=_scan_out_setup_context)


def scan_in(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    inverse: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm, adaLN modulation and scan, in one pass over the tokens.

    Args:
        h: (B, L, D) the previous block's output (float32, float16 or bfloat16; float64 runs
            the PyTorch path).
        residual: (B, L, D) the running residual in float32 (float64 for float64 ``h``), or
            None in block 0, where the residual starts as ``h``.
        norm_weight: (D,) the RMSNorm weight.
        shift, scale: (B, D) per-sample adaLN modulation, or None without conditioning.
        order: (L,) int64 scan order on ``h``'s device, or None for no scan (identity).
        inverse: ``argsort(order)``; pass the cached one, otherwise it is computed.
        eps: RMSNorm epsilon.

    Returns:
        ``(residual, h_norm, x)``: ``residual = residual + h`` in float32 (float64 for float64
        ``h``); ``h_norm = RMSNorm(residual)`` in ``h``'s dtype, for :func:`scan_out`; and
        ``x = (h_norm * (1 + scale) + shift)[:, order]`` in ``h``'s dtype, the mixer's input.
        ``x`` is modulated from the unrounded normalised value, so in low precision it can
        differ by one rounding from modulating ``h_norm``.
    """
    _check_tokens("h", h)
    _check_like("residual", residual, h.shape, _compute_dtype(h))
    _check_like("norm_weight", norm_weight, h.shape[2:])
    _check_like("shift", shift, (h.shape[0], h.shape[2]))
    _check_like("scale", scale, (h.shape[0], h.shape[2]))
    inverse = _inverse_for(order, inverse, h)
    return _scan_in(h, residual, norm_weight, shift, scale, order, inverse, eps)


def scan_out(
    h_norm: torch.Tensor,
    gate: torch.Tensor | None,
    y_seq: torch.Tensor,
    order: torch.Tensor | None = None,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unscan, gate and add, in one pass: ``h_norm + gate * y_seq[:, inverse]``.

    Args:
        h_norm: (B, L, D) the normalised tokens returned by :func:`scan_in`.
        gate: (B, D) the per-sample adaLN gate, or None for a gate of 1.
        y_seq: (B, L, D) the mixer's output, in scan order.
        order, inverse: the same scan order (and cached inverse) given to :func:`scan_in`.

    Returns:
        (B, L, D) the block's output in natural token order, in ``h_norm``'s dtype.
    """
    _check_tokens("h_norm", h_norm)
    _check_like("gate", gate, (h_norm.shape[0], h_norm.shape[2]))
    _check_like("y_seq", y_seq, h_norm.shape)
    inverse = _inverse_for(order, inverse, h_norm)
    return _scan_out(h_norm, gate, y_seq, order, inverse)


def _check_tokens(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, L, D), got {tuple(x.shape)}")


def _check_like(
    name: str, x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> None:
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")


def _inverse_for(
    order: torch.Tensor | None, inverse: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor | None:
    if order is None:
        if inverse is not None:
            raise ValueError("inverse given without order")
        return None
    if order.shape != (x.shape[1],):
        raise ValueError(f"order must have shape ({x.shape[1]},), got {tuple(order.shape)}")
    return inverse_order(order) if inverse is None else inverse
