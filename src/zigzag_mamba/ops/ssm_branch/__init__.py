"""The Mamba mixer's SSM branch as one op whose backward recomputes instead of keeping.

From the in_proj output ``xz`` (B, L, 2E), with ``x = xz[..., :E]`` and ``z = xz[..., E:]`` read
as (B, E, L) views, R = dt_rank and N = d_state::

    u        = silu(causal_conv1d(x, conv_weight, conv_bias))            (B, E, L)
    dt, B, C = split(u^T @ x_proj_weight^T, [R, N, N])                   (B, L, R + 2N)
    delta    = dt @ dt_proj_weight^T                                     (B, L, E)
    y        = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

``reverse`` runs the branch on the time-reversed sequence and returns y in natural order (the
second branch of a bidirectional mixer).

Differentiated by autograd (:func:`ssm_branch_reference`), the branch keeps xz, the conv's
pre-activation and output, the projections, delta, and the scan's own inputs and checkpoints.
:func:`ssm_branch` is one custom op (``zigzag_mamba::ssm_branch_fwd``, with a fake rule and a
backward that is itself the custom op ``zigzag_mamba::ssm_branch_bwd``) that saves only xz, the
weights and the scan's checkpoints. Its backward recomputes u, the projections and delta with the
backends the forward ran (the same values, bit for bit), runs the scan's backward from the
checkpoints, and then the projections' and the conv's backward. It has no backends of its own:
it runs the ``causal_conv1d`` and ``selective_scan`` backends the registry picks, as their ops
do. Autocast is off inside it: the caller casts the weights to xz's dtype, as autocast would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.backends import backend_module, implementation
from zigzag_mamba.ops.conv import conv_backend, conv_flops
from zigzag_mamba.ops.selective_scan import CHUNK, ScanInputs, scan_flops
from zigzag_mamba.ops.ssm_branch.inputs import BranchInputs
from zigzag_mamba.ops.ssm_branch.reference import split_xz, ssm_branch_reference
from zigzag_mamba.ops.utils import (
    compute_dtype,
    double_backward_unsupported,
    no_autocast,
    no_context,
)

__all__ = ["BranchInputs", "ssm_branch", "ssm_branch_reference"]


def _backends(b: BranchInputs) -> list[str]:
    """[conv backend, scan backend] for these inputs (the scan's u, delta, B, C and z have xz's
    dtype)."""
    x, _ = split_xz(b.xz)
    scan = implementation("selective_scan", b.xz.device.type, b.xz, b.A, b.D, b.delta_bias)
    return [conv_backend(x, b.conv_weight, b.conv_bias), scan]


def _recompute(b: BranchInputs, conv: str) -> tuple[torch.Tensor, torch.Tensor, ScanInputs]:
    """(x, dt, the scan's inputs): the branch up to the scan."""
    rank, n_state = b.dt_proj_weight.shape[1], b.A.shape[1]
    x, z = split_xz(b.xz)
    u = backend_module("causal_conv1d", conv).forward(x, b.conv_weight, b.conv_bias, True)
    projected = F.linear(u.transpose(1, 2), b.x_proj_weight)
    dt, B, C = projected.split([rank, n_state, n_state], dim=-1)  # (B, L, R), (B, L, N) x 2
    delta = F.linear(dt, b.dt_proj_weight).transpose(1, 2)
    return (
        x,
        dt,
        ScanInputs(u, delta, b.A, B.transpose(1, 2), C.transpose(1, 2), b.D, z, b.delta_bias, True),
    )


@torch.library.custom_op("zigzag_mamba::ssm_branch_fwd", mutates_args=())
def _ssm_branch_fwd(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the scan's checkpoints)."""
    if xz.numel() == 0:  # no batch, step or channel: nothing to run (or ready for it)
        y, checkpoints = _fake_outputs(xz, A)
        return y.zero_(), checkpoints.zero_()
    b = BranchInputs(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias)
    conv, scan = _backends(b)
    with no_autocast(xz):
        b = b._replace(xz=xz.flip(1)) if reverse else b
        *_, inputs = _recompute(b, conv)
        y, _, checkpoints = backend_module("selective_scan", scan).forward(inputs, CHUNK)
    return (y.flip(-1) if reverse else y.contiguous()), checkpoints.contiguous()


def _fake_outputs(xz: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, channels = xz.shape[0], xz.shape[1], xz.shape[2] // 2
    shape = (batch, channels, -(-length // CHUNK), A.shape[1])
    return xz.new_empty((batch, channels, length)), xz.new_empty(shape, dtype=compute_dtype(xz))


@_ssm_branch_fwd.register_fake
def _(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, reverse):
    return _fake_outputs(xz, A)


@torch.library.custom_op("zigzag_mamba::ssm_branch_bwd", mutates_args=())
def _ssm_branch_bwd(
    dy: torch.Tensor,
    inputs: list[torch.Tensor | None],
    checkpoints: torch.Tensor,
    reverse: bool,
    conv: str,
    scan: str,
) -> list[torch.Tensor]:
    """Gradients of the eight tensor inputs of ``ssm_branch_fwd`` (``inputs``), in their dtypes
    (an absent optional input's gradient travels as an empty tensor); ``conv`` and ``scan`` name
    the backends the forward ran."""
    b = BranchInputs(*inputs)
    if b.xz.numel() == 0:
        return [b.xz.new_empty(0) if t is None else torch.zeros_like(t) for t in inputs]
    with no_autocast(b.xz):
        if reverse:
            b, dy = b._replace(xz=b.xz.flip(1)), dy.flip(-1)
        x, dt, branch = _recompute(b, conv)
        scan_backend = backend_module("selective_scan", scan)
        grads = scan_backend.backward(branch, checkpoints, dy, None, CHUNK)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = (
            None if g is None else g.to(t.dtype) for g, t in zip(grads, branch.tensors, strict=True)
        )
        u = branch.u
        del branch, grads
        # Every product below takes the scan's (B, ., L) gradients as they are (no transposed
        # copies); the weights' gradients sum per-batch products.
        # delta = dt @ dt_proj_weight^T
        d_dt_proj_weight = (ddelta @ dt).sum(0)
        d_dt = b.dt_proj_weight.T @ ddelta  # (B, R, L)
        del ddelta, dt
        # (dt, B, C) = u^T @ x_proj_weight^T
        dproj = torch.cat([d_dt, dB, dC], dim=1)  # (B, R + 2N, L)
        del d_dt, dB, dC
        d_x_proj_weight = (dproj @ u.transpose(1, 2)).sum(0)
        du = du.add_(b.x_proj_weight.T @ dproj)  # du is the scan's fresh output
        del dproj, u
        dx, d_conv_weight, d_conv_bias = backend_module("causal_conv1d", conv).backward(
            du, x, b.conv_weight, b.conv_bias, True
        )
        del du
        # Channel-major, as autograd's backward of split_xz makes it: one copy of whatever
        # layout dx and dz have, and the in_proj's backward takes its transpose as it is.
        dxz = torch.cat([dx, dz], dim=1).to(b.xz.dtype)
        if reverse:
            dxz = dxz.flip(-1)
    found = (d_conv_weight, d_conv_bias, d_x_proj_weight, d_dt_proj_weight, dA, dD, ddelta_bias)
    weights = (
        b.xz.new_empty(0) if t is None else g.to(t.dtype).contiguous()
        for g, t in zip(found, inputs[1:], strict=True)
    )
    return [dxz.transpose(1, 2), *weights]


@_ssm_branch_bwd.register_fake
def _(dy, inputs, checkpoints, reverse, conv, scan):
    xz, *weights = inputs
    dxz = xz.new_empty((xz.shape[0], xz.shape[2], xz.shape[1])).transpose(1, 2)
    return [dxz, *(dy.new_empty(0) if t is None else t.new_empty(t.shape) for t in weights)]


def _setup_context(ctx, inputs, output) -> None:
    *tensors, reverse = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, output[1])
    ctx.reverse = reverse
    # The backward runs the forward's backends, whatever is forced when it runs.
    ctx.backends = _backends(BranchInputs(*tensors))


def _backward(ctx, dy, _dcheckpoints):
    *tensors, checkpoints = ctx.saved_tensors
    if dy is None:
        xz = tensors[0]
        dy = xz.new_zeros((xz.shape[0], xz.shape[2] // 2, xz.shape[1]))
    grads = _ssm_branch_bwd(dy, tensors, checkpoints, ctx.reverse, *ctx.backends)
    return (*(None if t is None else g for g, t in zip(grads, tensors, strict=True)), None)


_ssm_branch_fwd.register_autograd(_backward, setup_context=_setup_context)
_ssm_branch_bwd.register_autograd(
    double_backward_unsupported(
        "ssm_branch",
        "ssm_branch_reference (Mamba.recompute = False) computes the same in plain PyTorch "
        "around the custom ops; with the 'reference' selective scan and causal_conv1d_reference "
        "nothing in it is a custom op.",
    ),
    setup_context=no_context,
)


# Model FLOPs (gathered in zigzag_mamba.ops.FLOP_FORMULAS): the conv's, the two projections' and
# the scan's, as each op counts them; the backward counts twice the forward (its recomputation
# is not counted).
def _branch_flops(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, *args, **kwargs):
    batch, length, _ = xz
    channels, rank = dt_proj_weight
    tokens = batch * length
    projections = 2 * tokens * channels * (x_proj_weight[0] + rank)
    scan = scan_flops((batch, channels, length), None, A)
    return conv_flops((batch, channels, length), conv_weight) + projections + scan


def _branch_backward_flops(dy, inputs, *args, **kwargs) -> int:
    return 2 * _branch_flops(*inputs)


FLOPS = {
    torch.ops.zigzag_mamba.ssm_branch_fwd: _branch_flops,
    torch.ops.zigzag_mamba.ssm_branch_bwd: _branch_backward_flops,
}


def ssm_branch(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    reverse: bool = False,
) -> torch.Tensor:
    """The mixer's SSM branch on the in_proj output, saving only xz and the scan's checkpoints.

    Args:
        xz: (B, L, 2E) the in_proj output: x, then the gate z.
        conv_weight, conv_bias: (E, K) and (E,) or None, the depthwise conv.
        x_proj_weight: (R + 2N, E); dt_proj_weight: (E, R).
        A: (E, N); D, delta_bias: (E,) or None (the scan's arguments; float32 in a mixer).
        reverse: run on the time-reversed sequence (y is returned in natural order).

    Returns:
        y (B, E, L) in xz's dtype, what :func:`ssm_branch_reference` returns; the weights are
        used in their dtypes (cast them to xz's, as autocast would).

    Example::

        >>> E, R, N = 8, 2, 4
        >>> xz = torch.randn(2, 16, 2 * E)
        >>> y = ssm_branch(xz, torch.randn(E, 4), None, torch.randn(R + 2 * N, E),
        ...                torch.randn(E, R), -torch.rand(E, N), None, None)
        >>> y.shape
        torch.Size([2, 8, 16])
    """
    if xz.dim() != 3 or xz.shape[2] % 2 or conv_weight.shape[0] != xz.shape[2] // 2:
        shapes = f"xz {tuple(xz.shape)} and conv_weight {tuple(conv_weight.shape)}"
        raise ValueError(f"expected xz (B, L, 2E) and conv_weight (E, K), got {shapes}")
    b = BranchInputs(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias)
    y, _ = _ssm_branch_fwd(*b, reverse)
    return y
