"""The Triton row gather behind ``permute_tokens``: bit-exact against ``x[:, order]``.

Runs in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``), or on the GPU with
``ZIGZAG_MAMBA_CUDA_TESTS=1``. Every launch happens inside ``poisoned_outputs()``, so an output
element the kernel never writes stays NaN and fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops.backends import resolve, unavailable_reason
from zigzag_mamba.ops.permute import inverse_order, permute_tokens
from zigzag_mamba.ops.permute.triton import channel_block, gather_tokens
from zigzag_mamba.ops.utils import poisoned_outputs

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _tokens(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values plus the ones a lossy copy would mangle: -0.0, inf, subnormals."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    flat = x.view(-1)
    specials = torch.tensor([-0.0, float("inf"), -float("inf"), torch.finfo(dtype).tiny / 4])
    count = min(flat.numel(), specials.numel())
    flat[:count] = specials[:count].to(dtype)
    return x.to(DEVICE)


def _perm(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _assert_bit_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.is_contiguous()
    bits = _BITS[out.dtype]
    assert torch.equal(out.view(bits), expected.contiguous().view(bits))


def _gather(x: torch.Tensor, index: torch.Tensor, **launch: int) -> torch.Tensor:
    with poisoned_outputs():
        return gather_tokens(x, index, **launch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(2, 37, 600), (3, 1, 3), (1, 300, 64), (2, 64, 768), (2, 5, 1000)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_gather_matches_indexing_bit_for_bit(shape: tuple[int, int, int], dtype: torch.dtype):
    x = _tokens(shape, dtype)
    order = _perm(shape[1])
    _assert_bit_equal(_gather(x, order), x[:, order])


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_gather_undoes_the_gather(dtype: torch.dtype):
    x = _tokens((2, 50, 24), dtype)
    order = _perm(50, seed=1)
    _assert_bit_equal(_gather(_gather(x, order), inverse_order(order)), x)


def test_strided_inputs_are_read_in_place():
    base = _tokens((40, 3, 70), torch.float32)
    order = _perm(40)
    for x in (base.transpose(0, 1), base.transpose(0, 1)[:, :, 5:65], base.permute(1, 0, 2)[::2]):
        assert not x.is_contiguous()
        _assert_bit_equal(_gather(x, order), x[:, order])


def test_channel_strided_input():
    x = _tokens((2, 9, 30), torch.bfloat16).transpose(1, 2)  # (2, 30, 9), channel stride 30
    order = _perm(30)
    _assert_bit_equal(_gather(x, order), x[:, order])


@pytest.mark.parametrize("shape", [(4, 33), (2, 21, 3, 5)], ids=["BL", "BLHW"])
def test_other_ranks_flatten_to_channels(shape: tuple[int, ...]):
    x = _tokens(shape, torch.float16)
    order = _perm(shape[1])
    _assert_bit_equal(_gather(x, order), x[:, order])


def test_int32_and_repeating_indices():
    x = _tokens((2, 17, 40), torch.float32)
    index = torch.tensor([3, 3, 0, 16, 5], dtype=torch.int32, device=DEVICE)
    _assert_bit_equal(_gather(x, index), x[:, index.long()])


@pytest.mark.parametrize("shape", [(0, 8, 4), (2, 0, 4), (2, 8, 0)])
def test_empty_tensors(shape: tuple[int, int, int]):
    x = torch.zeros(shape, device=DEVICE)
    order = _perm(shape[1])
    assert _gather(x, order).shape == shape


@pytest.mark.parametrize(("block_l", "num_warps"), [(1, 1), (8, 2), (64, 8)])
def test_launch_overrides_give_the_same_result(block_l: int, num_warps: int):
    x = _tokens((2, 45, 200), torch.bfloat16)
    order = _perm(45)
    _assert_bit_equal(_gather(x, order, block_l=block_l, num_warps=num_warps), x[:, order])


def test_channel_block_choice():
    assert channel_block(768) == 256  # three unmasked blocks
    assert channel_block(3) == 4
    assert channel_block(600) == 128  # 640 lanes for 600 channels
    assert channel_block(64) == 64


def test_bad_index_is_rejected():
    x = torch.zeros(2, 4, 3, device=DEVICE)
    with pytest.raises(TypeError):
        gather_tokens(x, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.long, device=DEVICE))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only answer of the probe")
def test_probe_explains_why_triton_cannot_run_here():
    reason = unavailable_reason("permute_tokens", "triton", "cuda")
    assert reason is not None and "CUDA" in reason


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_tokens_op_runs_the_kernel(dtype: torch.dtype):
    if ON_GPU:
        assert zigzag_mamba.backends()["permute_tokens"]["cuda"] == "triton"
    x = _tokens((3, 129, 96), dtype).requires_grad_()
    order = _perm(129)
    grad = _tokens((3, 129, 96), dtype, seed=2)
    with zigzag_mamba.use_backend(permute_tokens="triton"), poisoned_outputs():
        assert resolve("permute_tokens", DEVICE) == "triton"
        out = permute_tokens(x, order)
        out.backward(grad)
    _assert_bit_equal(out.detach(), x.detach()[:, order])
    _assert_bit_equal(x.grad, grad[:, inverse_order(order)])


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_permute_tokens_compiles_without_graph_breaks_on_cuda():
    x = _tokens((2, 64, 32), torch.float32)
    order = _perm(64)
    # aot_eager: traces the op (fake rule, no graph break) without inductor's compile time.
    compiled = torch.compile(
        lambda t: permute_tokens(t, order) * 2, fullgraph=True, backend="aot_eager"
    )
    _assert_bit_equal(compiled(x), x[:, order] * 2)
