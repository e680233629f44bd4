"""causal_conv1d against a direct loop over the kernel taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zigzag_mamba.ops import causal_conv1d


def direct_loop(x, weight, bias, activation):
    length, taps = x.shape[2], weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(length):
        for k in range(taps):
            src = t - taps + 1 + k
            if src >= 0:
                out[:, :, t] += weight[:, k] * x[:, :, src]
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(("length", "taps"), [(1, 4), (7, 4), (20, 2)])
def test_matches_direct_loop(activation, use_bias, length, taps):
    g = torch.Generator().manual_seed(length * 10 + taps)
    x = torch.randn(2, 5, length, generator=g, dtype=torch.float64)
    weight = torch.randn(5, taps, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64) if use_bias else None
    got = causal_conv1d(x, weight, bias, activation)
    torch.testing.assert_close(got, direct_loop(x, weight, bias, activation))


def test_is_causal_and_differentiable():
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = causal_conv1d(x, weight, activation="silu")
    (grad,) = torch.autograd.grad(out[:, :, 5].sum(), x)
    assert grad[:, :, 6:].abs().sum() == 0 and grad[:, :, 2:6].abs().sum() > 0
    assert torch.autograd.gradcheck(lambda a, w: causal_conv1d(a, w, None, "silu"), (x, weight))


def test_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 2), activation="relu")


@pytest.mark.parametrize("shape", [(2, 5, 0), (0, 5, 7)], ids=["L0", "B0"])
def test_empty_sequences_and_batches(shape):
    x = torch.randn(shape, requires_grad=True)
    weight, bias = torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    out = causal_conv1d(x, weight, bias, activation="silu")
    assert out.shape == shape
    out.sum().backward()
    for t in (x, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_double_backward_works():
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
              for shape in ((1, 3, 6), (3, 4), (3,))]  # fmt: skip
    fn = lambda x, w, b: causal_conv1d(x, w, b, activation="silu")
    assert torch.autograd.gradgradcheck(fn, leaves)
