"""causal_conv1d on CPU: against a direct loop over the kernel taps, its hand-written backward
against autograd, its custom ops (opcheck, torch.compile) and its backends."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import zigzag_mamba
from zigzag_mamba.ops import causal_conv1d, causal_conv1d_reference
from zigzag_mamba.ops.backends import _registry


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


def test_double_backward_is_a_clear_error():
    x = torch.randn(1, 3, 6, requires_grad=True)
    out = causal_conv1d(x, torch.randn(3, 4), torch.randn(3), activation="silu")
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="causal_conv1d does not support double backward"):
        grad.sum().backward()
    # The definition, plain PyTorch, is differentiated twice by autograd.
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
              for shape in ((1, 3, 6), (3, 4), (3,))]  # fmt: skip
    fn = lambda x, w, b: causal_conv1d_reference(x, w, b, activation="silu")
    assert torch.autograd.gradgradcheck(fn, leaves)


def _channels_last(batch: int, channels: int, length: int, **kwargs) -> torch.Tensor:
    """x as the mixer has it: a (B, D, L) view of the first half of a (B, L, 2D) tensor."""
    return torch.randn(batch, length, 2 * channels, **kwargs)[..., :channels].transpose(1, 2)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_gradcheck_of_the_hand_written_backward(activation, use_bias):
    x = _channels_last(2, 3, 9, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True) if use_bias else None
    leaves = (x, weight) if bias is None else (x, weight, bias)
    fn = lambda x, w, b=None: causal_conv1d(x, w, b, activation)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_autograd_through_the_definition(dtype):
    x = _channels_last(2, 6, 17).to(dtype)
    weight, bias = torch.randn(6, 4).to(dtype), torch.randn(6).to(dtype)
    dout = torch.randn(2, 6, 17)

    def grads(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (x, weight, bias)]
        out = fn(*leaves, activation="silu")
        out.backward(cast(dout).to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    ours = grads(causal_conv1d, lambda t: t)
    exact = grads(causal_conv1d_reference, lambda t: t.double())
    plain = grads(causal_conv1d_reference, lambda t: t)
    for got, want, torch_own in zip(ours, exact, plain, strict=True):
        assert got.dtype == torch_own.dtype
        err, torch_err = (got.double() - want).abs().max(), (torch_own.double() - want).abs().max()
        assert err <= max(2 * torch_err, 8 * torch.finfo(torch.float32).eps * want.abs().max())


def test_the_torch_backend_returns_contiguous_tensors_for_any_layout():
    # Its natural layout: F.conv1d writes contiguous tensors (the Triton kernels keep x's
    # layout instead, tests/triton/test_conv.py).
    x = _channels_last(2, 5, 11).requires_grad_()
    out = causal_conv1d(x, torch.randn(5, 4), torch.randn(5), "silu")
    assert out.is_contiguous()
    (grad,) = torch.autograd.grad(out, x, torch.randn(2, 5, 11))
    assert grad.is_contiguous()
    contiguous = torch.randn(2, 5, 11)
    assert causal_conv1d(contiguous, torch.randn(5, 3)).is_contiguous()


def test_opcheck():
    x = _channels_last(2, 4, 9).requires_grad_()
    weight, bias = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    ops = torch.ops.zigzag_mamba
    for b in (bias, None):
        torch.library.opcheck(ops.causal_conv1d_fwd.default, (x, weight, b, True))
        torch.library.opcheck(ops.causal_conv1d_fwd.default, (x, weight, b, False))
        b = None if b is None else b.detach()
        args = (torch.randn(2, 4, 9), x.detach(), weight.detach(), b, True, "torch")
        torch.library.opcheck(ops.causal_conv1d_bwd.default, args)


def test_compiles_without_graph_breaks():
    weight, bias = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)

    def branch(xz):
        x = xz[..., :6].transpose(1, 2)
        return causal_conv1d(x, weight, bias, "silu").transpose(1, 2) * xz[..., 6:]

    xz = torch.randn(2, 13, 12)
    assert torch._dynamo.explain(branch)(xz).graph_break_count == 0
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)
    leaves = [xz.clone().requires_grad_() for _ in range(2)]
    outs = [compiled(leaves[0]), branch(leaves[1])]
    torch.testing.assert_close(outs[0], outs[1])
    grads = []
    for out, leaf in zip(outs, leaves, strict=True):
        grads.append(torch.autograd.grad(out.square().sum(), (leaf, weight, bias)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_backends_are_listed_and_forced():
    assert zigzag_mamba.backends()["causal_conv1d"]["cpu"] == "torch"
    names = [b.name for b in _registry["causal_conv1d"]]
    assert names == ["triton", "causal_conv1d", "torch"]
    x, weight = torch.randn(1, 3, 8), torch.randn(3, 4)
    with zigzag_mamba.use_backend(causal_conv1d="torch"):
        torch.testing.assert_close(causal_conv1d(x, weight), causal_conv1d_reference(x, weight))
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            zigzag_mamba.use_backend(causal_conv1d="triton")


@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 7)], ids=["L0", "B0"])
def test_empty_sequences_and_batches(shape):
    x = torch.randn(shape, requires_grad=True)
    weight, bias = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    out = causal_conv1d(x, weight, bias, "silu")
    out.sum().backward()
    assert out.shape == x.grad.shape == shape
    assert torch.equal(weight.grad, torch.zeros(3, 4)) and torch.equal(bias.grad, torch.zeros(3))


def test_autocast_does_not_reach_inside_the_op():
    x, weight = torch.randn(2, 4, 9), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv1d(x, weight, activation="silu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, causal_conv1d_reference(x, weight, activation="silu"))
