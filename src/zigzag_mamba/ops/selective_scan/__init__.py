"""The Mamba-1 selective scan, with the semantics and layouts of mamba_ssm's ``selective_scan_fn``.

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L) with D % G == 0;
D, delta_bias (D,); the last state (B, D, N). Accumulation is in fp32 (float64 stays float64);
the output has u's dtype, the last state the accumulation dtype.

The recurrence, per batch element and channel d, for each state n (indices b, d, n dropped)::

    dt_t  = softplus(delta_t + delta_bias)          (without delta_softplus: the plain sum)
    a_t   = exp(dt_t * A)                           the decay
    x_t   = a_t * x_{t-1} + dt_t * u_t * B_t        x_{-1} = 0; x_{L-1} is the last state
    y_t   = sum_n C_t * x_t + D * u_t
    out_t = y_t * silu(z_t)                         (without z: out_t = y_t)

The backward, derived once here; every backend names its terms with these symbols. Given
g_t = dL/d out_t and g_last = dL/d x_{L-1}::

    dy_t     = g_t * silu(z_t)                       (without z: g_t)
    dz_t     = g_t * y_t * silu'(z_t)
    adj_t    = dL/dx_t = dy_t * C_t + a_{t+1} * adj_{t+1}, with adj_{L-1} = dy_{L-1} C + g_last
               (the "carry" a_{t+1} * adj_{t+1} is what step t+1 passes back to step t)
    q_t      = adj_t * a_t * x_{t-1}                 dL/d(dt_t A), through the decay
    adj_b_t  = sum_n adj_t * B_t                     dL/d(dt_t u_t)
    dA      += sum_t q_t * dt_t
    ddt_t    = sum_n q_t * A + u_t * adj_b_t
    du_t     = dt_t * adj_b_t + D * dy_t
    dB_t     = sum_d adj_t * dt_t * u_t              (over the channels of B's group)
    dC_t     = sum_d dy_t * x_t
    dD       = sum_t dy_t * u_t
    ddelta_t = ddt_t * sigmoid(delta_t + delta_bias) (without delta_softplus: ddt_t)
    ddelta_bias = sum_t ddelta_t

Stack: :func:`selective_scan` (the shape check, and the "reference" escape hatch) -> the custom
op ``zigzag_mamba::selective_scan_fwd``, with a fake and a hand-written backward (itself the
custom op ``zigzag_mamba::selective_scan_bwd``) -> the backend the registry picks:

- ``triton`` (CUDA): Triton kernels (:mod:`.triton`), with no CUDA build to install;
- ``mamba_ssm`` (CUDA, only when forced): mamba-ssm's kernel (:mod:`.mamba_ssm`);
- ``numba`` (CPU): fused kernels compiled by numba (:mod:`.numba`);
- ``torch`` (any device): a chunked scan in PyTorch (:mod:`.pytorch`);
- ``reference``: :func:`selective_scan_reference` (:mod:`.reference`), the loop every backend
  is tested against; when it is forced, :func:`selective_scan` calls it directly, bypassing the
  op, so that autograd differentiates it (twice, too).

Each backend module has ``forward(inputs, chunk) -> (out, last_state, checkpoints)`` and
``backward(inputs, checkpoints, dout, dlast, chunk) -> ScanGrads``. Every backend except
mamba-ssm keeps the state entering every :data:`CHUNK` steps (the checkpoints) and recomputes one
chunk at a time in the backward, so memory stays O(B * D * L).
"""

from __future__ import annotations

import importlib
import warnings

import torch

from zigzag_mamba.ops.backends import (
    backend_module,
    implementation,
    register_backend,
    register_triton_backend,
    requested,
)
from zigzag_mamba.ops.selective_scan.inputs import (
    ScanGrads,
    ScanInputs,
    check_inputs,
    zeros_like_state,
)
from zigzag_mamba.ops.selective_scan.reference import selective_scan_reference
from zigzag_mamba.ops.utils import (
    compute_dtype,
    double_backward_unsupported,
    no_autocast,
    no_context,
)

__all__ = ["CHUNK", "ScanGrads", "ScanInputs", "selective_scan", "selective_scan_reference"]

OP = "selective_scan"
#: Steps between state checkpoints (and the length of one chunk of work in the backward).
CHUNK = 64
_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _numba_probe(device_type: str) -> str | None:
    try:
        importlib.import_module(f"{__name__}.numba")
    except Exception as exc:  # numba missing or broken: the PyTorch path takes over
        warnings.warn(
            f"the numba CPU selective scan is unavailable ({type(exc).__name__}: {exc}); "
            "using the slower PyTorch scan",
            RuntimeWarning,
            stacklevel=2,
        )
        return f"{type(exc).__name__}: {exc}"
    return None


# Registration order is the preference of "auto". mamba-ssm runs only when forced: no GPU run
# has tested this adapter yet, so "auto" picks the kernels the project tests (docs/backends.md).
register_backend(
    OP,
    "mamba_ssm",
    f"{__name__}.mamba_ssm",
    (),
    dtypes=_KERNEL_DTYPES,
    forced_device_types=("cuda",),
)
register_triton_backend(OP, f"{__name__}.triton", dtypes=_KERNEL_DTYPES)
register_backend(OP, "numba", f"{__name__}.numba", ("cpu",), probe=_numba_probe)
register_backend(OP, "torch", f"{__name__}.pytorch", _ALL_DEVICES)
# Forced, "reference" makes selective_scan() run the loop itself, differentiated by autograd
# (a custom op cannot be); inside torch.compile the op runs the loop as a backend.
register_backend(OP, "reference", f"{__name__}.reference", _ALL_DEVICES)


def num_checkpoints(length: int) -> int:
    return -(-length // CHUNK)


def _backend(x: ScanInputs) -> str:
    return implementation(OP, x.u.device.type, *x.tensors)


@torch.library.custom_op("zigzag_mamba::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if u.numel() == 0:  # no batch, channel or step: no backend is needed (or ready for it)
        return _empty_forward(x)
    with no_autocast(u):
        return backend_module(OP, _backend(x)).forward(x, CHUNK)


def _empty_forward(x: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The results for an empty ``u``: an empty output, the zero initial state as the last
    state, and no checkpoints."""
    batch, channels, length = x.u.shape
    dtype = compute_dtype(x.u)
    checkpoints = x.u.new_zeros(
        (batch, channels, num_checkpoints(length), x.A.shape[1]), dtype=dtype
    )
    return x.u.new_zeros(x.u.shape), zeros_like_state(x, dtype), checkpoints


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, channels, length = u.shape
    state = (batch, channels, A.shape[1])
    dtype = compute_dtype(u)
    checkpoints = u.new_empty((batch, channels, num_checkpoints(length), A.shape[1]), dtype=dtype)
    return u.new_empty(u.shape), u.new_empty(state, dtype=dtype), checkpoints


@torch.library.custom_op("zigzag_mamba::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    delta_softplus: bool,
    checkpoints: torch.Tensor,
    backend: str,
) -> list[torch.Tensor]:
    x = ScanInputs(*inputs, delta_softplus)
    if x.u.numel() == 0:  # nothing was scanned: every gradient is zero
        grads = ScanGrads(*(None if t is None else torch.zeros_like(t) for t in x.tensors))
    else:
        with no_autocast(x.u):
            grads = backend_module(OP, backend).backward(x, checkpoints, dout, dlast, CHUNK)
    # In the inputs' dtypes; an absent optional input's gradient travels as an empty tensor.
    return [
        x.u.new_empty(0) if t is None else g.to(t.dtype).contiguous()
        for g, t in zip(grads, x.tensors, strict=True)
    ]


@_selective_scan_bwd.register_fake
def _(dout, dlast, inputs, delta_softplus, checkpoints, backend):
    return [dout.new_empty(0) if t is None else t.new_empty(t.shape) for t in inputs]


def _setup_context(ctx, inputs, output) -> None:
    x = ScanInputs(*inputs)
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*x.tensors, output[2])
    ctx.delta_softplus = x.delta_softplus
    # The backward must run the forward's backend, whatever is in force when it runs: the
    # checkpoints are that backend's (mamba-ssm's forward leaves none).
    ctx.backend = _backend(x)


def _backward(ctx, dout, dlast, _dcheckpoints):
    *tensors, checkpoints = ctx.saved_tensors
    x = ScanInputs(*tensors, ctx.delta_softplus)
    if dout is None:
        dout = torch.zeros_like(x.u)
    grads = _selective_scan_bwd(
        dout, dlast, list(x.tensors), x.delta_softplus, checkpoints, ctx.backend
    )
    return (*(None if t is None else g for g, t in zip(grads, x.tensors, strict=True)), None)


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)
_selective_scan_bwd.register_autograd(
    double_backward_unsupported(
        "selective_scan",
        "The 'reference' backend (use_backend(selective_scan='reference')) is plain PyTorch, "
        "which autograd differentiates as often as asked.",
    ),
    setup_context=no_context,
)


# Model FLOPs (gathered in zigzag_mamba.ops.FLOP_FORMULAS): 9 per step, channel and state in the
# forward (the decay's product and exponential, delta * B * u, the state update, its read-out by
# C), as VMamba counts the scan; the backward counts twice the forward, as for a matrix product.
def scan_flops(u, delta, A, *args, **kwargs) -> int:
    batch, channels, length = u
    return 9 * batch * channels * length * A[1]


def _scan_backward_flops(dout, dlast, inputs, *args, **kwargs) -> int:
    return 2 * scan_flops(*inputs[:3])


FLOPS = {
    torch.ops.zigzag_mamba.selective_scan_fwd: scan_flops,
    torch.ops.zigzag_mamba.selective_scan_bwd: _scan_backward_flops,
}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan: mamba_ssm's ``selective_scan_fn`` on any device.

    See the module docstring for shapes and the recurrence. Returns ``out`` (B, D, L) in u's
    dtype, and with ``return_last_state`` also the final state (B, D, N) in the accumulation
    dtype. Differentiable in every tensor argument (the last state too, except on mamba-ssm),
    once: the backward is hand-written, so gradients of gradients (``create_graph=True``, e.g.
    a gradient penalty) raise, except with the ``"reference"`` backend, which autograd
    differentiates as often as asked. Empty inputs (B, D or L = 0) give empty results.

    Example::

        >>> u = delta = torch.rand(2, 8, 64)
        >>> A = -torch.rand(8, 16)
        >>> B = C = torch.randn(2, 16, 64)
        >>> selective_scan(u, delta, A, B, C, delta_softplus=True).shape
        torch.Size([2, 8, 64])
    """
    x = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    check_inputs(x)
    # Under torch.compile the op runs (the forced choice lives in a context variable, which
    # Dynamo cannot read); forced to "reference", it runs the loop as its backend.
    if not torch.compiler.is_compiling() and requested(OP) == "reference":
        return selective_scan_reference(*x, return_last_state)
    out, last, _ = _selective_scan_fwd(*x)
    return (out, last) if return_last_state else out
