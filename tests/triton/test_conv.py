"""The Triton causal conv1d against its PyTorch reference, forward and backward.

Tolerance (docs/design.md, "Testing and measuring"): the kernel's largest error against a
float64 evaluation of the reference may be at most twice the error PyTorch itself makes with the
same inputs in the same dtype, with a floor (see ``accuracy.floor``). Launches happen inside
``poisoned_outputs()``, so an element no program writes stays NaN and fails. Runs in the Triton
interpreter on CPU tensors, or on the GPU with ``ZIGZAG_MAMBA_CUDA_TESTS=1``.
"""

from __future__ import annotations

import pytest
import torch
from accuracy import ON_GPU, assert_within_2x

import zigzag_mamba
from zigzag_mamba.ops.backends import resolve
from zigzag_mamba.ops.conv import causal_conv1d, causal_conv1d_reference
from zigzag_mamba.ops.conv import triton as kernels
from zigzag_mamba.ops.ssm_branch import ssm_branch, ssm_branch_reference
from zigzag_mamba.ops.utils import poisoned_outputs

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Small tiles, so that a small shape has several channel tiles, step tiles and backward chunks,
# each with a ragged last one.
SMALL_TILES = {"block_d": 16, "block_l": 8}
FLAGS = {
    "bias+silu": (True, True),
    "plain": (False, False),
    "bias": (True, False),
    "silu": (False, True),
}


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)


def channels_last(gen: torch.Generator, batch: int, channels: int, length: int, dtype):
    """x as the mixer has it: the first half of the channels of a (B, L, 2D) tensor, as a
    (B, D, L) view."""
    return _randn(gen, batch, length, 2 * channels, dtype=dtype)[..., :channels].transpose(1, 2)


def _inputs(shape, dtype, taps, use_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, channels, length = shape
    x = channels_last(gen, batch, channels, length, dtype)
    weight = (0.5 * _randn(gen, channels, taps)).to(dtype)
    bias = _randn(gen, channels, dtype=dtype) if use_bias else None
    dout = _randn(gen, batch, channels, length, dtype=dtype)
    return x, weight, bias, dout


def _reference(x, weight, bias, dout, silu, to=lambda t: t):
    """Output and (dx, dweight, dbias) of the reference through autograd, on ``to(inputs)``."""
    leaves = [None if t is None else to(t).detach().requires_grad_() for t in (x, weight, bias)]
    out = causal_conv1d_reference(*leaves, "silu" if silu else None)
    out.backward(to(dout))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _check(x, weight, bias, dout, silu, **tiles):
    ref_out, ref_grads = _reference(x, weight, bias, dout, silu, to=_f64)
    torch_out, torch_grads = _reference(x, weight, bias, dout, silu)
    launch = {k: v for k, v in tiles.items() if k != "chunk_l"}
    with poisoned_outputs():
        out = kernels.forward(x, weight, bias, silu, **launch)
        grads = kernels.backward(dout, x, weight, bias, silu, **tiles)
    assert out.stride() == grads[0].stride(), "dx must have the output's (x's) layout"
    assert_within_2x("out", out, torch_out, ref_out)
    for name, grad, torch_grad, ref in zip(
        ("x", "weight", "bias"), grads, torch_grads, ref_grads, strict=True
    ):
        assert (grad is None) == (ref is None), name
        if grad is not None:
            assert_within_2x(f"grad {name}", grad, torch_grad, ref)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("taps", [1, 2, 3, 4, 5])
def test_every_width_forward_and_backward(taps, dtype):
    x, weight, bias, dout = _inputs((2, 37, 45), dtype, taps, use_bias=True, seed=taps)
    _check(x, weight, bias, dout, silu=True, **SMALL_TILES, chunk_l=16)


@pytest.mark.parametrize("flags", list(FLAGS))
def test_with_and_without_bias_and_silu(flags):
    use_bias, silu = FLAGS[flags]
    x, weight, bias, dout = _inputs((2, 37, 45), torch.float32, 4, use_bias, seed=7)
    _check(x, weight, bias, dout, silu, **SMALL_TILES, chunk_l=16)


def _layouts(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    base = _randn(gen, 3, 24, 2 * 19, dtype=dtype)
    return {
        "contiguous": _randn(gen, 3, 19, 24, dtype=dtype),
        "channels last": base[..., :19].transpose(1, 2),
        "second half": base[..., 19:].transpose(1, 2),
        "strided": _randn(gen, 3, 19, 48, dtype=dtype)[..., ::2],
        "one step": _randn(gen, 3, 1, 19, dtype=dtype).transpose(1, 2),
        "one channel": _randn(gen, 3, 24, 1, dtype=dtype).transpose(1, 2),
    }


@pytest.mark.parametrize("layout", list(_layouts(torch.Generator(), torch.float32)))
def test_strided_inputs_are_read_in_place_and_the_output_keeps_their_layout(layout):
    gen = torch.Generator().manual_seed(3)
    x = _layouts(gen, torch.float32)[layout]
    weight, bias = _randn(gen, x.shape[1], 4), _randn(gen, x.shape[1])
    dout = _randn(gen, *x.shape[::-1]).transpose(0, 2)  # a strided gradient too
    out, _ = _check(x, weight, bias, dout, silu=True)
    if layout in ("channels last", "second half"):
        assert out.transpose(1, 2).is_contiguous()
    elif layout in ("contiguous", "strided"):
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_dispatches_to_the_kernels(dtype):
    """Through the custom op and autograd, the Triton backend agrees with the torch one."""
    x, weight, bias, dout = _inputs((2, 96, 130) if ON_GPU else (2, 24, 45), dtype, 4, True)

    def run(backend: str) -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        with zigzag_mamba.use_backend(causal_conv1d=backend), poisoned_outputs():
            assert resolve("causal_conv1d", DEVICE) == backend
            out = causal_conv1d(*leaves, activation="silu")
            out.backward(dout)
        return [out.detach(), *(t.grad for t in leaves)]

    if ON_GPU:
        assert zigzag_mamba.backends()["causal_conv1d"]["cuda"] == "triton"
    for fast, slow in zip(run("triton"), run("torch"), strict=True):
        assert fast.dtype == slow.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
        else:  # the torch backend, like autograd, rounds the SiLU gradient to bf16 first
            assert (fast.float() - slow.float()).norm() <= 0.02 * slow.float().norm()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_mixer_branch_with_the_kernels(reverse):
    """ssm_branch with the Triton conv, whose channels-last dx goes into the branch's
    channel-major dxz, against autograd through the reference branch."""
    gen = torch.Generator().manual_seed(1)
    batch, length, channels, rank, state = 2, 70, 16, 3, 4
    inputs = [
        _randn(gen, batch, length, 2 * channels),
        0.5 * _randn(gen, channels, 4),
        0.5 * _randn(gen, channels),
        _randn(gen, rank + 2 * state, channels) / channels**0.5,
        _randn(gen, channels, rank) / rank**0.5,
        -torch.arange(1, state + 1, dtype=torch.float32, device=DEVICE).repeat(channels, 1),
        torch.ones(channels, device=DEVICE),
        -4 + torch.rand(channels, generator=gen).to(DEVICE),
    ]
    dy = _randn(gen, batch, channels, length)

    def grads(branch):
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = branch(*leaves, reverse=reverse)
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    with zigzag_mamba.use_backend(causal_conv1d="triton"):
        ours = grads(ssm_branch)
    expected = grads(ssm_branch_reference)
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_float64_goes_to_the_torch_backend():
    gen = torch.Generator().manual_seed(0)
    x, weight = _randn(gen, 2, 5, 9).double(), _randn(gen, 5, 4).double()
    with zigzag_mamba.use_backend(causal_conv1d="triton"):
        out = causal_conv1d(x, weight, activation="silu")
    torch.testing.assert_close(out, causal_conv1d_reference(x, weight, activation="silu"))


@pytest.mark.parametrize("shape", [(2, 5, 0), (0, 5, 9)], ids=["L0", "B0"])
def test_empty_sequences_and_batches(shape):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = _randn(gen, *shape), _randn(gen, shape[1], 4), _randn(gen, shape[1])
    with poisoned_outputs():
        out = kernels.forward(x, weight, bias, True)
        dx, dweight, dbias = kernels.backward(torch.ones_like(x), x, weight, bias, True)
    assert out.shape == dx.shape == shape
    assert torch.equal(dweight, torch.zeros_like(weight)) and torch.equal(dbias, torch.zeros(5))
