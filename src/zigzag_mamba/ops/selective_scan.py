"""Mamba-1 selective scan with the semantics and layouts of mamba_ssm's ``selective_scan_fn``.

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L) with D % G == 0;
D, delta_bias (D,); last state (B, D, N). The state recurrence, per channel d and state n::

    dt[t]   = softplus(delta[t] + delta_bias)          (softplus optional)
    x[t]    = exp(dt[t] * A[d, n]) * x[t-1] + dt[t] * B[n, t] * u[t]
    y[t]    = sum_n x[t] * C[n, t] + D[d] * u[t]        then  y * silu(z)   (z optional)

Accumulation is in fp32 (float64 stays float64); the output has u's dtype, the last state the
accumulation dtype.

Stack: :func:`selective_scan` (checks, and the "reference" escape hatch) -> the custom op
``zigzag_mamba::selective_scan_fwd`` with a fake and a hand-written backward (itself the custom op
``zigzag_mamba::selective_scan_bwd``) -> one kernel per device type, each running the backend
that :func:`~zigzag_mamba.ops.backends.resolve` picks from :data:`IMPLEMENTATIONS`:

- ``mamba_ssm`` (CUDA): mamba-ssm's kernel, when it imports;
- ``triton`` (CUDA): Triton kernels in :mod:`zigzag_mamba.ops.triton.selective_scan`, when
  mamba-ssm is not importable (no CUDA build needed);
- ``fused`` (CPU): numba kernels in :mod:`zigzag_mamba.ops.cpu.selective_scan`;
- ``torch`` (any device): a chunked scan in PyTorch (:mod:`.selective_scan_chunked`);
- ``reference``: :func:`selective_scan_reference`, the sequential loop every backend is tested
  against; when it is forced, :func:`selective_scan` calls it directly, bypassing the op.

Every backend except mamba-ssm checkpoints the state every :data:`CHUNK` steps in the forward and
recomputes one chunk at a time in the backward, so memory stays O(B * D * L).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from zigzag_mamba.ops import triton as triton_kernels
from zigzag_mamba.ops.backends import register_backend, requested, resolve
from zigzag_mamba.ops.selective_scan_chunked import CHUNK, chunked_backward, chunked_forward
from zigzag_mamba.ops.selective_scan_chunked import compute_dtype as _compute_dtype

OP = "selective_scan"
_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _expand_groups(bc: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, L) -> (B, 1, N, L); (B, G, N, L) -> (B, D, N, L), channel d in group d // (D/G)."""
    if bc.dim() == 3:
        return bc.unsqueeze(1)
    groups = bc.shape[1]
    return bc.repeat_interleave(channels // groups, dim=1)


def selective_scan_reference(
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
    """A plain sequential loop over L: slow, obviously correct, differentiable by autograd."""
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = _expand_groups(B.to(compute), channels)
    C = _expand_groups(C.to(compute), channels)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((state * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y


def _probe_mamba_ssm() -> str | None:
    importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return None


def _probe_fused() -> str | None:
    try:
        importlib.import_module("zigzag_mamba.ops.cpu.selective_scan")
    except Exception as exc:  # numba missing or broken: the PyTorch path takes over
        warnings.warn(
            f"the fused CPU selective scan is unavailable ({type(exc).__name__}: {exc}); "
            "using the slower PyTorch scan",
            RuntimeWarning,
            stacklevel=2,
        )
        return f"{type(exc).__name__}: {exc}"
    return None


# Order is preference for "auto".
register_backend(OP, "mamba_ssm", ("cuda",), _probe_mamba_ssm)
register_backend(OP, "triton", ("cuda",), triton_kernels.unavailable_reason)
register_backend(OP, "fused", ("cpu",), _probe_fused)
register_backend(OP, "torch", _ALL_DEVICES)
register_backend(OP, "reference", _ALL_DEVICES)


# --------------------------------------------------------------------------------------------
# mamba-ssm on CUDA. Its autograd function is the only public entry point, so the backward
# recomputes the forward under autograd (one extra forward) rather than call private kernels.


def _mamba_ssm_inputs(u, delta, A, B, C, D, z, delta_bias):
    # Its kernels take float32 A, D and delta_bias whatever the activation dtype.
    as_f32 = lambda t: None if t is None else t.float()
    return u, delta, as_f32(A), B, C, as_f32(D), z, as_f32(delta_bias)


def _mamba_ssm_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if u.dtype == torch.float64:  # not among its kernel's dtypes
        return chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    inputs = _mamba_ssm_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_fn(*inputs, delta_softplus, return_last_state=True)
    return out, last.float(), _checkpoint_buffer(u, A)  # it saves its own checkpoints


def _mamba_ssm_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    if u.dtype == torch.float64:
        return chunked_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                               delta_softplus)  # fmt: skip
    if bool(dlast.any()):
        raise NotImplementedError(
            "mamba-ssm's selective scan has no gradient for the last state; "
            "use zigzag_mamba.use_backend(selective_scan='torch') to differentiate through it"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    leaves = _leaves(u, delta, A, B, C, D, z, delta_bias)
    with torch.enable_grad():
        out = selective_scan_fn(*_mamba_ssm_inputs(*leaves), delta_softplus)
        return _grads(out, leaves, dout)


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def _grads(outputs, leaves, grad_outputs) -> tuple[torch.Tensor | None, ...]:
    """Vector-Jacobian product for every leaf that is not None."""
    grads = iter(torch.autograd.grad(outputs, [t for t in leaves if t is not None], grad_outputs))
    return tuple(None if t is None else next(grads) for t in leaves)


# --------------------------------------------------------------------------------------------
# Dispatch: backend name -> (forward, backward). Forward returns (out, last state, checkpoints);
# backward returns the eight input gradients (None for absent optional inputs).


def _fused_forward(*args):
    from zigzag_mamba.ops.cpu import selective_scan as kernels

    return kernels.forward(*args, chunk=CHUNK)


def _fused_backward(*args):
    from zigzag_mamba.ops.cpu import selective_scan as kernels

    return kernels.backward(*args, chunk=CHUNK)


def _triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if u.dtype == torch.float64:  # the kernels compute in fp32
        return chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from zigzag_mamba.ops.triton.selective_scan import selective_scan_triton_fwd

    with torch.cuda.device(u.device):  # Triton launches on the current device
        return selective_scan_triton_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                         chunk_size=CHUNK)  # fmt: skip


def _triton_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    args = (dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus)
    if u.dtype == torch.float64:
        return chunked_backward(*args)
    from zigzag_mamba.ops.triton.selective_scan import selective_scan_triton_bwd

    with torch.cuda.device(u.device):
        return selective_scan_triton_bwd(*args)


class Implementation(NamedTuple):
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor | None, ...]]


#: Backend name -> implementation; a new backend registers itself here and with
#: :func:`~zigzag_mamba.ops.backends.register_backend`.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "mamba_ssm": Implementation(_mamba_ssm_forward, _mamba_ssm_backward),
    "triton": Implementation(_triton_forward, _triton_backward),
    "fused": Implementation(_fused_forward, _fused_backward),
    "torch": Implementation(chunked_forward, chunked_backward),
}
# Forcing "reference" makes selective_scan() run the loop itself, differentiated by autograd,
# which a custom op cannot do under tracing; a direct call of the op then runs the exact
# chunked scan.
IMPLEMENTATIONS["reference"] = IMPLEMENTATIONS["torch"]


def _checkpoint_buffer(u: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Zeros of the checkpoints' shape, for backends that keep no checkpoints of their own."""
    shape = (u.shape[0], u.shape[1], -(-u.shape[2] // CHUNK), A.shape[1])
    return u.new_zeros(shape, dtype=_compute_dtype(u))


@torch.library.custom_op("zigzag_mamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(
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
    # Devices without a kernel of their own run the portable PyTorch scan.
    return chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _forward_on(device_type: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        impl = IMPLEMENTATIONS[resolve(OP, device_type)]
        return impl.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return kernel


_scan_fwd.register_kernel("cpu")(_forward_on("cpu"))
_scan_fwd.register_kernel("cuda")(_forward_on("cuda"))


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    last = u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_compute_dtype(u))
    return u.new_empty(u.shape), last, _checkpoint_buffer(u, A)


@torch.library.custom_op("zigzag_mamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    dout: torch.Tensor,
    dlast: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    ckpt: torch.Tensor,
    delta_softplus: bool,
    backend: str,
) -> list[torch.Tensor]:
    grads = chunked_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                            delta_softplus)  # fmt: skip
    return _pack_grads(grads, (u, delta, A, B, C, D, z, delta_bias))


def _pack_grads(grads, inputs) -> list[torch.Tensor]:
    """Gradients in their inputs' dtypes; an absent optional input gets an empty tensor."""
    u = inputs[0]
    return [
        u.new_empty(0) if x is None else g.to(x.dtype).contiguous()
        for g, x in zip(grads, inputs, strict=True)
    ]


def _backward_kernel(
    dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, backend
) -> list[torch.Tensor]:
    impl = IMPLEMENTATIONS[backend]
    grads = impl.backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus)
    return _pack_grads(grads, (u, delta, A, B, C, D, z, delta_bias))


_scan_bwd.register_kernel("cpu")(_backward_kernel)
_scan_bwd.register_kernel("cuda")(_backward_kernel)


@_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, backend):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return [u.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    # The backward must run the forward's implementation, whatever is in force when it runs:
    # the checkpoints are that implementation's (mamba-ssm's forward leaves none).
    device = u.device.type
    ctx.backend = resolve(OP, device) if device in ("cpu", "cuda") else "torch"


def _backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    if dlast is None:
        dlast = ckpt.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    grads = _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                      ctx.delta_softplus, ctx.backend)  # fmt: skip
    optional = (None, None, None, None, None, D, z, delta_bias)
    return (*(g if i < 5 or optional[i] is not None else None for i, g in enumerate(grads)), None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    dtype. Differentiable in every tensor argument (the last state too, except on mamba-ssm).

    Example::

        >>> u = delta = torch.rand(2, 8, 64)
        >>> A = -torch.rand(8, 16)
        >>> B = C = torch.randn(2, 16, 64)
        >>> selective_scan(u, delta, A, B, C, delta_softplus=True).shape
        torch.Size([2, 8, 64])
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if requested(OP) == "reference":
        return selective_scan_reference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("u, delta (and z) must share one shape (B, D, L)")
    n_batch, n_chan, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != n_chan:
        raise ValueError(f"A must be real with shape (D, N) = ({n_chan}, N), got {tuple(A.shape)}")
    for name, bc in (("B", B), ("C", C)):
        n_group = bc.shape[1] if bc.dim() == 4 else 1
        expected = (n_batch, *((n_group,) if bc.dim() == 4 else ()), A.shape[1], length)
        if tuple(bc.shape) != expected or n_chan % n_group:
            raise ValueError(
                f"{name} must have shape (B, N, L) or (B, G, N, L) with D % G == 0, "
                f"got {tuple(bc.shape)} for u {tuple(u.shape)} and A {tuple(A.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (n_chan,):
            raise ValueError(f"{name} must have shape ({n_chan},), got {tuple(vec.shape)}")
