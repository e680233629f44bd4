"""Causal depthwise conv1d: ``out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - K + 1 + k]``.

Stack: :func:`causal_conv1d` (argument checks) -> the custom op
``zigzag_mamba::causal_conv1d_fwd``, with a fake rule and a hand-written backward (itself the
custom op ``zigzag_mamba::causal_conv1d_bwd``), so ``torch.compile(fullgraph=True)`` traces every
backend -> the backend the registry picks (registry op ``"causal_conv1d"``), in "auto" order:

- ``triton`` (CUDA): Triton kernels with a fused SiLU (:mod:`.triton`), any number of taps;
- ``causal_conv1d`` (CUDA): the causal-conv1d package's kernel (:mod:`.causal_conv1d`), 2 to 4
  taps (other widths run the ``torch`` backend);
- ``torch`` (any device): ``F.conv1d`` with K - 1 zeros of left padding and one group per
  channel (:mod:`.pytorch`); its backward runs the kernels autograd would (SiLU's backward on
  the recomputed pre-activation, then the convolution's), in x's dtype.

:mod:`.reference` holds the definition, :func:`causal_conv1d_reference`.

Each backend module has ``forward(x, weight, bias, silu) -> out`` and ``backward(dout, x,
weight, bias, silu) -> (dx, dweight, dbias)``. With the CUDA kernels (Triton, the package) the
output and x's gradient have x's layout (:func:`.layout.empty_in_layout`): channels last for the
mixer's transposed views of the in_proj output. The ``torch`` backend returns contiguous tensors,
``F.conv1d``'s own layout. The backward saves x, weight and bias, not the output.
"""

from __future__ import annotations

import torch

from zigzag_mamba.ops.backends import (
    PORTABLE,
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
)
from zigzag_mamba.ops.conv.layout import empty_in_layout, in_layout_of
from zigzag_mamba.ops.conv.reference import causal_conv1d_reference
from zigzag_mamba.ops.utils import (
    double_backward_unsupported,
    no_autocast,
    no_context,
    or_empty,
)

__all__ = ["causal_conv1d", "causal_conv1d_reference"]

OP = "causal_conv1d"
_ACTIVATIONS = (None, "silu", "swish")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PACKAGE_TAPS = range(2, 5)  # the causal-conv1d package's kernel takes 2 to 4 taps

# Registration order is the preference of "auto": the Triton kernels, which the project's GPU
# check tests, before the package's (docs/backends.md says why).
register_triton_backend(OP, f"{__name__}.triton", dtypes=_KERNEL_DTYPES)
register_backend(OP, "causal_conv1d", f"{__name__}.causal_conv1d", ("cuda",), dtypes=_KERNEL_DTYPES)
register_backend(OP, "torch", f"{__name__}.pytorch", ("cpu", "cuda", "mps", "xpu"))


def conv_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The backend that runs this convolution (the package's kernel only for 2 to 4 taps and
    non-empty sequences)."""
    name = implementation(OP, x.device.type, x, weight, bias)
    if name == "causal_conv1d" and (weight.shape[1] not in _PACKAGE_TAPS or x.shape[2] == 0):
        return PORTABLE
    return name


@torch.library.custom_op("zigzag_mamba::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    backend = conv_backend(x, weight, bias)
    with no_autocast(x):
        out = backend_module(OP, backend).forward(x, weight, bias, silu)
    return _in_layout(x, out, backend)


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu):
    return _empty_in_layout(x, conv_backend(x, weight, bias))


def _empty_in_layout(x: torch.Tensor, backend: str) -> torch.Tensor:
    """The CUDA kernels write x's layout (no transposed copy on either side); ``F.conv1d``
    writes contiguous tensors, and forcing x's layout on it would cost a copy."""
    return x.new_empty(x.shape) if backend == "torch" else empty_in_layout(x)


def _in_layout(x: torch.Tensor, t: torch.Tensor, backend: str) -> torch.Tensor:
    return t.contiguous() if backend == "torch" else in_layout_of(x, t)


@torch.library.custom_op("zigzag_mamba::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in the output's layout, dweight, dbias; an empty tensor without bias)."""
    with no_autocast(x):
        dx, dweight, dbias = backend_module(OP, backend).backward(dout, x, weight, bias, silu)
    return _in_layout(x, dx, backend), dweight.contiguous(), *or_empty(x, dbias)


@_causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, silu, backend):
    dbias = x.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return _empty_in_layout(x, backend), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu
    # The backward runs the forward's backend, whatever is forced when it runs.
    ctx.backend = conv_backend(x, weight, bias)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _causal_conv1d_bwd(dout, x, weight, bias, ctx.silu, ctx.backend)
    return dx, dweight, None if bias is None else dbias, None


_causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)
_causal_conv1d_bwd.register_autograd(
    double_backward_unsupported(
        "causal_conv1d",
        "causal_conv1d_reference computes the same in plain PyTorch, which autograd "
        "differentiates as often as asked.",
    ),
    setup_context=no_context,
)


# Model FLOPs (gathered in zigzag_mamba.ops.FLOP_FORMULAS): a multiply-add per tap, channel and
# step; the backward counts twice the forward.
def conv_flops(x, weight, *args, **kwargs) -> int:
    batch, channels, length = x
    return 2 * batch * channels * length * weight[1]


def _conv_backward_flops(dout, x, weight, *args, **kwargs) -> int:
    return 2 * conv_flops(x, weight)


FLOPS = {
    torch.ops.zigzag_mamba.causal_conv1d_fwd: conv_flops,
    torch.ops.zigzag_mamba.causal_conv1d_bwd: _conv_backward_flops,
}


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution of x (B, D, L) with weight (D, K) and bias (D,).

    ``activation`` is None or "silu" (alias "swish"). Returns (B, D, L) in x's dtype and
    layout (channels last when x is a transposed (B, L, D) tensor).

    Example::

        >>> x, w = torch.randn(2, 8, 32), torch.randn(8, 4)
        >>> causal_conv1d(x, w, activation="silu").shape
        torch.Size([2, 8, 32])
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.shape[0] != x.shape[1] or weight.dim() != 2:
        shapes = f"{tuple(x.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected x (B, D, L) and weight (D, K), got {shapes}")
    return _causal_conv1d_fwd(x, weight, bias, activation is not None)
