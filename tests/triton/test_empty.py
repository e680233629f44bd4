"""Empty batches and sequences through the ops with every Triton backend forced."""

from __future__ import annotations

import os

import pytest
import torch

import zigzag_mamba
from zigzag_mamba import ZigMaBlock
from zigzag_mamba.ops import mixer_in, mixer_out, permute_tokens, selective_scan
from zigzag_mamba.ops.utils import poisoned_outputs

pytestmark = pytest.mark.triton

DEVICE = (
    "cuda" if os.environ.get("ZIGZAG_MAMBA_CUDA_TESTS") and torch.cuda.is_available() else "cpu"
)
TRITON_EVERYWHERE = {"selective_scan": "triton", "permute_tokens": "triton", "mixer_io": "triton"}


@pytest.mark.parametrize("shape", [(2, 4, 0), (0, 4, 9)], ids=["L0", "B0"])
def test_selective_scan(shape):
    batch, channels, length = shape
    u = torch.rand(shape, device=DEVICE, requires_grad=True)
    A = (-torch.rand(channels, 3, device=DEVICE)).requires_grad_()
    B = torch.randn(batch, 3, length, device=DEVICE, requires_grad=True)
    with zigzag_mamba.use_backend(selective_scan="triton"), poisoned_outputs():
        out, last = selective_scan(u, u, A, B, B, return_last_state=True, delta_softplus=True)
        (out.sum() + last.sum()).backward()
    assert out.shape == shape and torch.equal(last, torch.zeros(batch, channels, 3, device=DEVICE))
    for leaf in (u, A, B):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 6, 8)], ids=["L0", "B0"])
def test_permute_and_mixer_io(shape):
    batch, length, dim = shape
    h = torch.randn(shape, device=DEVICE, requires_grad=True)
    weight, gate = torch.ones(dim, device=DEVICE), torch.randn(batch, dim, device=DEVICE)
    order = torch.randperm(length, device=DEVICE)
    with zigzag_mamba.use_backend(**TRITON_EVERYWHERE), poisoned_outputs():
        residual, h_norm, x = mixer_in(h, None, weight, gate, gate, order)
        out = mixer_out(h_norm, gate, permute_tokens(x, order), order)
        (out.sum() + residual.sum()).backward()
    assert out.shape == shape and h.grad.shape == shape


def test_a_block_with_an_empty_batch():
    block = ZigMaBlock(16, (2, 3), "zigzag8").to(DEVICE)
    x = torch.randn(0, 6, 16, device=DEVICE, requires_grad=True)
    with zigzag_mamba.use_backend(**TRITON_EVERYWHERE):
        out = block(x, torch.randn(0, 16, device=DEVICE))
        out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
