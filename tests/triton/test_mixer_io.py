"""Triton kernels of mixer_in / mixer_out against their PyTorch references, forward and backward.

Tolerance (docs/design.md, "Testing and measuring"): a kernel's largest error against a float64
evaluation of the reference may be at most twice the error the PyTorch reference itself makes
with the same inputs in the same dtype. Launches happen inside ``poisoned_outputs()`` (outputs
and partial-sum buffers start as NaN), so an element no program writes fails. Runs in the Triton
interpreter on CPU tensors, or on the GPU with ``ZIGZAG_MAMBA_CUDA_TESTS=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from accuracy import ON_GPU, assert_within_2x

import zigzag_mamba
from zigzag_mamba.ops.backends import resolve
from zigzag_mamba.ops.mixer_io import (
    MixerIn,
    MixerInSaved,
    MixerOut,
    MixerOutSaved,
    mixer_in,
    mixer_in_reference,
    mixer_out,
    mixer_out_reference,
)
from zigzag_mamba.ops.mixer_io import triton as kernels
from zigzag_mamba.ops.permute import inverse_order
from zigzag_mamba.ops.utils import poisoned_outputs

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, L, D): one token, three channels, L not a multiple of the row tile, several backward
# chunks with a ragged last one, and a width whose row tile is padded.
SHAPES = [(3, 1, 3), (2, 37, 600), (2, 150, 24), (1, 200, 96)]


def _matrix(variants: list[str]) -> list:
    """Every variant at one shape, the first variant at every other shape.

    Each combination of flags, tile and dtype is a separate Triton compilation on a GPU (about a
    second each), so the full product would dominate the GPU check.
    """
    cases = [(SHAPES[1], v) for v in variants] + [
        (s, variants[0]) for s in SHAPES if s != SHAPES[1]
    ]
    return [pytest.param(s, v, id=f"{'x'.join(map(str, s))}-{v}") for s, v in cases]


@dataclass
class Case:
    """Inputs of one mixer_in/mixer_out call; absent optional inputs are None."""

    h: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    shift: torch.Tensor | None
    scale: torch.Tensor | None
    order: torch.Tensor | None

    @property
    def inverse(self) -> torch.Tensor | None:
        return None if self.order is None else inverse_order(self.order)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _case(shape, dtype, residual=True, shift=True, scale=True, order=True, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    b, length, d = shape
    return Case(
        h=_randn(gen, b, length, d, dtype=dtype),
        residual=_randn(gen, b, length, d) if residual else None,
        weight=(1 + 0.1 * _randn(gen, d)).to(dtype),
        shift=_randn(gen, b, d, dtype=dtype) if shift else None,
        scale=(0.5 * _randn(gen, b, d)).to(dtype) if scale else None,
        order=torch.randperm(length, generator=gen).to(DEVICE) if order else None,
    )


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _mixer_in_grads(case: Case, upstream, fn=mixer_in_reference, to=lambda t: t):
    """Outputs of ``fn`` on the case's inputs mapped by ``to``, and their input gradients."""
    inputs = [to(t) for t in (case.h, case.residual, case.weight, case.shift, case.scale)]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves, order=case.order, eps=1e-5)
    torch.autograd.backward(outs, [to(g).to(o.dtype) for g, o in zip(upstream, outs, strict=True)])
    return outs, [None if t is None else t.grad for t in leaves]


def _upstream_mixer_in(case: Case, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape, dtype = case.h.shape, case.h.dtype
    # In the dtypes of the outputs (residual, h_norm, x), so every run sees equal values.
    return [_randn(gen, *shape), _randn(gen, *shape, dtype=dtype), _randn(gen, *shape, dtype=dtype)]


VARIANTS = {
    "full": {},
    "block0": {"residual": False},
    "unconditioned": {"shift": False, "scale": False},
    "no_scan": {"order": False, "shift": False},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "variant"), _matrix(list(VARIANTS)))
def test_mixer_in_forward_and_backward(shape, dtype, variant):
    case = _case(shape, dtype, **VARIANTS[variant])
    upstream = _upstream_mixer_in(case)
    ref_outs, ref_grads = _mixer_in_grads(case, upstream, to=_f64)
    torch_outs, torch_grads = _mixer_in_grads(case, upstream)
    inverse = case.inverse
    with poisoned_outputs():
        args = MixerIn(case.h, case.residual, case.weight, case.shift, case.scale, case.order,
                       inverse, 1e-5)  # fmt: skip
        outs = kernels.mixer_in_forward(args)
        g = [u.to(o.dtype) for u, o in zip(upstream, outs, strict=True)]
        saved = MixerInSaved(outs[0], case.weight, case.shift, case.scale, case.order, inverse,
                             case.residual is not None, 1e-5)  # fmt: skip
        grads = kernels.mixer_in_backward(saved, *g)
    for name, out, torch_out, ref in zip(
        ("residual", "h_norm", "x"), outs, torch_outs, ref_outs, strict=True
    ):
        assert_within_2x(name, out, torch_out.detach(), ref.detach())
    for name, grad, torch_grad, ref in zip(("h", "residual", "weight", "shift", "scale"), grads,
                                           torch_grads, ref_grads, strict=True):  # fmt: skip
        assert (grad is None) == (ref is None), name
        if grad is not None:
            assert_within_2x(f"grad {name}", grad, torch_grad, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "variant"), _matrix(["gate", "no_gate", "gate_no_scan"]))
def test_mixer_out_forward_and_backward(shape, dtype, variant):
    gated, scanned = variant != "no_gate", variant != "gate_no_scan"
    gen = torch.Generator().manual_seed(3)
    b, length, d = shape
    h_norm, y, g_out = (_randn(gen, b, length, d, dtype=dtype) for _ in range(3))
    gate = _randn(gen, b, d, dtype=dtype) if gated else None
    order = torch.randperm(length, generator=gen).to(DEVICE) if scanned else None
    inverse = None if order is None else inverse_order(order)

    def reference(to):
        leaves = [None if t is None else to(t).detach().requires_grad_() for t in (y, gate)]
        out = mixer_out_reference(to(h_norm), leaves[1], leaves[0], inverse)
        out.backward(to(g_out))
        return out.detach(), [None if t is None else t.grad for t in leaves]

    ref_out, ref_grads = reference(_f64)
    torch_out, torch_grads = reference(lambda t: t)
    with poisoned_outputs():
        out = kernels.mixer_out_forward(MixerOut(h_norm, gate, y, order, inverse))
        grads = kernels.mixer_out_backward(MixerOutSaved(gate, y, order, inverse), g_out)
    assert_within_2x("out", out, torch_out, ref_out)
    for name, grad, torch_grad, ref in zip(
        ("y", "gate"), grads, torch_grads, ref_grads, strict=True
    ):
        assert (grad is None) == (ref is None), name
        if grad is not None:
            assert_within_2x(f"grad {name}", grad, torch_grad, ref)


def test_strided_conditioning_is_accepted():
    """adaLN's shift/scale/gate arrive as column slices of one (B, 3D) tensor."""
    case = _case((2, 19, 40), torch.float32)
    c = _randn(torch.Generator().manual_seed(5), 2, 120)
    shift, scale, gate = c.chunk(3, dim=-1)
    inverse = case.inverse
    with poisoned_outputs():
        args = MixerIn(case.h, case.residual, case.weight, shift, scale, case.order, inverse, 1e-5)
        outs = kernels.mixer_in_forward(args)
        out = kernels.mixer_out_forward(MixerOut(outs[1], gate, outs[2], case.order, inverse))
    ref = mixer_in_reference(case.h, case.residual, case.weight, shift, scale, case.order)
    for got, expected in zip(outs, ref, strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out, mixer_out_reference(ref[1], gate, ref[2], inverse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ops_dispatch_to_the_kernels(dtype):
    """Through the custom ops and autograd, the Triton backend agrees with the torch one."""

    def run(case: Case, backend: str) -> list[torch.Tensor]:
        with zigzag_mamba.use_backend(mixer_io=backend), poisoned_outputs():
            assert resolve("mixer_io", DEVICE) == backend
            outs, grads = _mixer_in_grads(case, _upstream_mixer_in(case), fn=mixer_in)
        return [o.detach() for o in outs] + grads

    case = _case((2, 300, 768) if ON_GPU else (2, 45, 24), dtype)
    if ON_GPU:
        assert zigzag_mamba.backends()["mixer_io"]["cuda"] == "triton"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for fast, slow in zip(run(case, "triton"), run(case, "torch"), strict=True):
        torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    gate, y = case.shift.clone(), case.h.flip(1)
    with zigzag_mamba.use_backend(mixer_io="triton"):
        fast = mixer_out(case.h, gate, y, case.order)
    torch.testing.assert_close(fast, mixer_out_reference(case.h, gate, y, case.inverse))
