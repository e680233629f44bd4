"""The backends that wrap the optional CUDA packages, mamba-ssm and causal-conv1d, against the
project's Triton kernels on a GPU, forward and backward; and mamba-ssm's own fused Mamba as the
mixer of the benchmark's block.

Run on a GPU where the packages are built with ``ZIGZAG_MAMBA_CUDA_TESTS=1 python -m pytest
tests/triton/test_cuda_packages.py`` (``benchmarks/gpu_check.sh`` does, in its optional section
that builds them); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.selective_scan import selective_scan

pytestmark = pytest.mark.skipif(
    not (os.environ.get("ZIGZAG_MAMBA_CUDA_TESTS") and torch.cuda.is_available()),
    reason="needs a CUDA device",
)
needs = {
    name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"needs {name}")
    for name in ("mamba_ssm", "causal_conv1d")
}


def _outputs_and_grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


@needs["mamba_ssm"]
def test_mamba_ssm_scan_matches_the_triton_scan():
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 96, 16, 300
    inputs = [
        torch.randn(b, d, length, generator=g),  # u
        0.5 * torch.randn(b, d, length, generator=g),  # delta
        -torch.exp(0.5 * torch.randn(d, n, generator=g)),  # A
        torch.randn(b, n, length, generator=g),  # B
        torch.randn(b, n, length, generator=g),  # C
        torch.randn(d, generator=g),  # D
        torch.randn(b, d, length, generator=g),  # z
        0.1 * torch.randn(d, generator=g),  # delta_bias
    ]
    inputs = [t.cuda() for t in inputs]
    grad = torch.randn(b, d, length, device="cuda")
    scan = lambda *a: selective_scan(*a, delta_softplus=True)
    results = []
    for backend in ("mamba_ssm", "triton"):
        with zigzag_mamba.use_backend(selective_scan=backend):
            results.append(_outputs_and_grads(scan, inputs, grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@needs["causal_conv1d"]
@pytest.mark.parametrize("layout", ["channels last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_package_matches_the_triton_kernel(layout: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    if layout == "channels last":  # as the mixer has it: half of a (B, L, 2D) tensor
        x = torch.randn(2, 300, 192, generator=g)[..., :96].transpose(1, 2)
    else:
        x = torch.randn(2, 96, 300, generator=g)
    inputs = [t.to("cuda", dtype) for t in (x, torch.randn(96, 4), torch.randn(96))]
    grad = torch.randn(2, 96, 300, generator=g).to("cuda", dtype)
    conv = lambda x, w, b: causal_conv1d(x, w, b, activation="silu")
    results = []
    for backend in ("causal_conv1d", "triton"):
        with zigzag_mamba.use_backend(causal_conv1d=backend):
            results.append(_outputs_and_grads(conv, inputs, grad))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in zip(*results, strict=True):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs["mamba_ssm"]
@needs["causal_conv1d"]
def test_the_benchmark_block_with_mamba_ssm_fused_mixer_runs():
    from zigzag_mamba.bench.contenders import block_workload

    workload = block_workload("zigma-mamba-ssm", 64, 256, 2, torch.device("cuda"), torch.bfloat16)
    assert type(workload.module.mixer).__module__.startswith("mamba_ssm")
    workload.forward_backward()
    assert all(p.grad is not None for p in workload.module.mixer.parameters())
