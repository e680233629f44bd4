"""End to end on a CUDA device: the ops dispatch to the Triton kernels by default, a ZigMa
block on the GPU computes what the same block computes on the CPU, forward and backward (with and
without recomputing in the mixer's backward), and blocks and backbones compile (fullgraph,
inductor, CUDA graphs).

Run on a GPU with ``ZIGZAG_MAMBA_CUDA_TESTS=1 python -m pytest tests/triton`` (as
``benchmarks/gpu_check.sh`` does); skipped elsewhere.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.models import ZigMaBackbone
from zigzag_mamba.modules import ZigMaBlock
from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.selective_scan import selective_scan

pytestmark = pytest.mark.skipif(
    not (os.environ.get("ZIGZAG_MAMBA_CUDA_TESTS") and torch.cuda.is_available()),
    reason="needs a CUDA device",
)


def _random_inputs(seed: int, batch: int, channels: int, n_state: int, length: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    inputs = {
        "u": rand(batch, channels, length),
        "delta": 0.5 * rand(batch, channels, length),
        "A": -torch.exp(0.5 * rand(channels, n_state)),
        "B": rand(batch, n_state, length),
        "C": rand(batch, n_state, length),
        "D": rand(channels),
        "z": rand(batch, channels, length),
        "delta_bias": 0.1 * rand(channels),
    }
    return {k: v.cuda().requires_grad_() for k, v in inputs.items()}


def _scan_with_grads(inputs: dict, grad: torch.Tensor) -> list[torch.Tensor]:
    out = selective_scan(**inputs, delta_softplus=True)
    return [out.detach(), *torch.autograd.grad(out, list(inputs.values()), grad)]


def test_selective_scan_runs_triton_by_default_and_matches_the_torch_backend():
    assert zigzag_mamba.backends()["selective_scan"]["cuda"] in ("triton", "mamba_ssm")
    inputs = _random_inputs(0, batch=2, channels=96, n_state=16, length=300)
    grad = torch.randn_like(inputs["u"])
    with zigzag_mamba.use_backend(selective_scan="triton"):
        fast = _scan_with_grads(inputs, grad)
    with zigzag_mamba.use_backend(selective_scan="torch"):
        slow = _scan_with_grads(inputs, grad)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["zigzag8", None])
def test_block_on_cuda_matches_the_block_on_cpu(pattern: str | None):
    torch.manual_seed(0)
    cpu = ZigMaBlock(64, (6, 10), pattern, layer_idx=3)
    with torch.no_grad():  # move the adaLN layer off zero so every gate and branch is exercised
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gpu = copy.deepcopy(cpu).cuda()
    x, c = torch.randn(2, 60, 64), torch.randn(2, 64)
    grad = torch.randn(2, 60, 64)
    results = []
    for block, device in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(device, copy=True).requires_grad_()
        out = block(xi, c.to(device))
        out.backward(grad.to(device))
        grads = [p.grad.cpu() for p in block.parameters()]
        results.append([out.detach().cpu(), xi.grad.cpu(), *grads])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_block_compiles_without_graph_breaks_on_cuda():
    block = ZigMaBlock(64, (8, 8), "zigzag8", layer_idx=1).cuda()
    x, c = torch.randn(2, 64, 64, device="cuda"), torch.randn(2, 64, device="cuda")
    # aot_eager: traces every op through its fake rule without inductor's compile time.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c), block(x, c), rtol=1e-4, atol=1e-4)


def test_causal_conv1d_runs_triton_by_default_and_matches_the_torch_backend():
    assert zigzag_mamba.backends()["causal_conv1d"]["cuda"] == "triton"
    g = torch.Generator().manual_seed(1)
    # As the mixer has it: the first half of a (B, L, 2D) tensor, as a (B, D, L) view.
    x = torch.randn(2, 300, 192, generator=g)[..., :96].transpose(1, 2).cuda()
    weight, bias = torch.randn(96, 4, generator=g).cuda(), torch.randn(96, generator=g).cuda()
    grad = torch.randn(2, 96, 300, generator=g).cuda()
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        with zigzag_mamba.use_backend(causal_conv1d=backend):
            out = causal_conv1d(*leaves, activation="silu")
            results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba", "bidirectional"])
def test_recompute_matches_plain_autograd_on_cuda(mixer: str):
    torch.manual_seed(0)
    block = ZigMaBlock(64, (6, 10), "zigzag8", layer_idx=1, mixer=mixer).cuda()
    x, c = torch.randn(2, 60, 64, device="cuda"), torch.randn(2, 64, device="cuda")
    results = []
    for recompute in (True, False):
        block.mixer.recompute = recompute
        leaf = x.clone().requires_grad_()
        out = block(leaf, c)
        grads = torch.autograd.grad(out.square().sum(), [leaf, *block.parameters()])
        results.append([out.detach(), *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_backbone_compiles_fullgraph_with_inductor_on_cuda():
    torch.manual_seed(0)
    model = ZigMaBackbone(input_size=8, in_channels=4, dim=64, depth=2, patch_size=2).cuda()
    x, t = torch.randn(2, 4, 8, 8, device="cuda"), torch.rand(2, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (compiled, model):
        out = fn(x, t)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        results.append([out.detach(), *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_block_forward_replays_cuda_graphs():
    """Sampling with torch.compile(mode="reduce-overhead"): the block's forward as CUDA graphs."""
    block = ZigMaBlock(64, (8, 8), "zigzag8", layer_idx=1).cuda()
    x, c = torch.randn(2, 64, 64, device="cuda"), torch.randn(2, 64, device="cuda")
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = block(x, c)
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x, c)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
