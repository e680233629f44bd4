"""The ``mamba_ssm`` backend: mamba-ssm's CUDA kernel, when the package imports.

Importing this module imports mamba-ssm; the registry's probe does that lazily, so a missing or
CPU-only mamba-ssm only makes this backend unavailable. mamba-ssm's autograd function is its
only public entry point, so the backward recomputes the forward under autograd (one extra
forward) rather than call private kernels; it has no gradient for the last state.
"""

from __future__ import annotations

import torch
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from torch import Tensor

from zigzag_mamba.ops.selective_scan.inputs import ScanGrads, ScanInputs
from zigzag_mamba.ops.utils import compute_dtype


def _as_mamba_ssm(x: ScanInputs) -> ScanInputs:
    # Its kernels take float32 A, D and delta_bias whatever the activation dtype.
    as_f32 = lambda t: None if t is None else t.float()
    return x._replace(A=as_f32(x.A), D=as_f32(x.D), delta_bias=as_f32(x.delta_bias))


def forward(x: ScanInputs, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    out, last = selective_scan_fn(*_as_mamba_ssm(x), return_last_state=True)
    # It keeps checkpoints of its own; the op's slot gets zeros of the shape it promises.
    u = x.u
    shape = (u.shape[0], u.shape[1], -(-u.shape[2] // chunk), x.A.shape[1])
    return out, last.float(), u.new_zeros(shape, dtype=compute_dtype(u))


def backward(
    x: ScanInputs, checkpoints: Tensor, dout: Tensor, dlast: Tensor | None, chunk: int
) -> ScanGrads:
    if dlast is not None and bool(dlast.any()):
        raise NotImplementedError(
            "mamba-ssm's selective scan has no gradient for the last state; "
            "use zigzag_mamba.use_backend(selective_scan='triton') to differentiate through it"
        )
    leaves = [None if t is None else t.detach().requires_grad_() for t in x.tensors]
    with torch.enable_grad():
        out = selective_scan_fn(*_as_mamba_ssm(ScanInputs(*leaves, x.delta_softplus)))
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, dout))
    return ScanGrads(*(None if t is None else next(grads) for t in leaves))
