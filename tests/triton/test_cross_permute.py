"""The Triton backend of cross_permute (the row gather over k * L rows) and cross_merge (one
fused kernel): the permute bit for bit, the merge within the accuracy rule, against the
definitions. Interpreter on CPU tensors, or the GPU with ``ZIGZAG_MAMBA_CUDA_TESTS=1``."""

from __future__ import annotations

import pytest
import torch
from accuracy import ON_GPU, assert_within_2x

from zigzag_mamba.ops import Permutation, use_backend
from zigzag_mamba.ops.cross_permute import (
    cross_merge,
    cross_merge_reference,
    cross_permute,
    cross_permute_reference,
)
from zigzag_mamba.ops.utils import poisoned_outputs

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _orders(k: int, length: int, seed: int) -> Permutation:
    gen = torch.Generator().manual_seed(seed)
    perms = [Permutation.of(torch.randperm(length, generator=gen)) for _ in range(k)]
    return Permutation.stack(perms).to(DEVICE)


def _run(fn, *args):
    with use_backend(cross_permute="triton"), poisoned_outputs():
        return fn(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "length", "k", "channels"), [(2, 37, 4, 24), (1, 5, 2, 300)])
def test_triton_permute_and_merge_match_their_definitions(dtype, batch, length, k, channels):
    perm = _orders(k, length, seed=length)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(batch, length, channels, generator=gen).to(dtype).to(DEVICE)
    assert torch.equal(_run(cross_permute, x, perm), cross_permute_reference(x, perm.order))
    y = torch.randn(batch, length, k, channels, generator=gen).to(dtype).to(DEVICE)
    out = _run(cross_merge, y, perm)
    assert out.is_contiguous()
    with use_backend(cross_permute="torch"):
        torch_out = cross_merge(y, perm)
    assert_within_2x("merge", out, torch_out, cross_merge_reference(y.double(), perm.inverse))


def test_triton_merge_reads_the_scan_output_layout_and_differentiates():
    perm = _orders(4, 19, seed=3)
    scan_output = torch.randn(2, 4 * 8, 19, device=DEVICE, requires_grad=True)
    y = scan_output.transpose(1, 2).unflatten(2, (4, 8))  # (B, L, k, C), strided
    grad = torch.randn(2, 19, 8, device=DEVICE)
    out = _run(cross_merge, y, perm)
    (got,) = torch.autograd.grad(out, scan_output, grad)
    expected_out = cross_merge_reference(y, perm.inverse)
    (expected,) = torch.autograd.grad(expected_out, scan_output, grad)
    torch.testing.assert_close(out, expected_out)
    assert torch.equal(got, expected)  # the backward is the permute: a gather, exact


def test_cross_mixer_on_the_triton_kernels_matches_its_reference_loop():
    from helpers import randomise

    from zigzag_mamba.modules.cross_mamba import CrossMamba
    from zigzag_mamba.orders import layer_layout

    torch.manual_seed(0)
    cross = CrossMamba(8, k=4, d_state=4).to(DEVICE)
    randomise(cross, 1)
    permutation = layer_layout("sweep4", (3, 5), num_orders=4, device=DEVICE).permutation
    x = torch.randn(2, 15, 8, device=DEVICE, requires_grad=True)
    results = []
    kernels = {"selective_scan": "triton", "causal_conv1d": "triton", "cross_permute": "triton"}
    for forward, backends in ((cross, kernels), (cross.forward_reference, {})):
        with use_backend(**backends):
            out = forward(x, permutation)
            results.append(
                [out, *torch.autograd.grad(out.square().sum(), [x, *cross.parameters()])]
            )
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
