import importlib

import pytest
import torch
from torch import nn

from zigzag_mamba import ZigzagScan
from zigzag_mamba.ops import Permutation, inverse_order, permute_tokens
from zigzag_mamba.ops.permute import _permute_tokens


def random_order(L: int) -> torch.Tensor:
    return torch.randperm(L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 1, 3), (3, 17, 5), (1, 64, 600), (2, 9)])
def test_permute_tokens_is_the_gather(dtype, shape):
    x = torch.randn(shape).to(dtype)
    order = random_order(shape[1])
    assert torch.equal(permute_tokens(x, order), x[:, order])


def test_strided_input():
    x = torch.randn(4, 10, 6).transpose(0, 2)  # (6, 10, 4), not contiguous
    order = random_order(10)
    assert torch.equal(permute_tokens(x, order), x[:, order])


def test_inverse_order_is_argsort():
    order = random_order(50)
    assert torch.equal(inverse_order(order), torch.argsort(order))


def test_gradient_is_the_inverse_gather():
    x = torch.randn(2, 13, 4, requires_grad=True)
    order = random_order(13)
    grad = torch.randn(2, 13, 4)
    (ours,) = torch.autograd.grad(permute_tokens(x, order), x, grad)
    (expected,) = torch.autograd.grad(x[:, order], x, grad)
    assert torch.equal(ours, expected)


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    order = random_order(7)
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, order), (x,))
    assert torch.autograd.gradgradcheck(lambda t: permute_tokens(t, order), (x,))


def test_opcheck():
    order = random_order(11)
    for x in (torch.randn(2, 11, 5), torch.randn(2, 11, 5, requires_grad=True)):
        torch.library.opcheck(_permute_tokens, (x, order, inverse_order(order)))


def test_bad_order_shape():
    with pytest.raises(ValueError, match=r"\(L,\)"):
        permute_tokens(torch.randn(2, 5, 3), torch.arange(4))
    with pytest.raises(ValueError, match="B, L"):
        permute_tokens(torch.randn(5), torch.arange(5))


class ScanRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.zigzag = ZigzagScan((4, 6), "zigzag8", layer_idx=3)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zigzag.unpermute(self.proj(self.zigzag.permute(x)))


def test_compile_fullgraph_has_no_graph_breaks():
    model = ScanRoundTrip()
    x = torch.randn(2, 24, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_bf16_autocast():
    model = ScanRoundTrip()
    x = torch.randn(2, 24, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), model(x), atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert model.proj.weight.grad is not None


@pytest.mark.parametrize(
    ("order", "match"),
    [
        ([0, 1, 1, 2, 3], r"repeats \[1\], misses \[4\]"),
        ([0, 1, 2, 3, 9], r"out-of-range values \[9\]"),
    ],
)
def test_an_order_that_is_not_a_permutation_is_refused(order, match):
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=rf"not a permutation of range\(5\): {match}"):
        permute_tokens(x, torch.tensor(order))
    with pytest.raises(ValueError, match=match):
        Permutation.of(torch.tensor(order))


def test_a_permutation_is_checked_once_a_plain_order_at_every_call(monkeypatch):
    module = importlib.import_module("zigzag_mamba.ops.permute")
    calls = []
    check = module.check_permutation
    monkeypatch.setattr(module, "check_permutation", lambda o: calls.append(1) or check(o))
    x = torch.randn(2, 8, 3)
    order = random_order(8)
    permutation = Permutation.of(order)
    assert torch.equal(permutation.inverse, torch.argsort(order)) and len(calls) == 1
    for _ in range(3):
        assert torch.equal(permute_tokens(x, permutation), x[:, order])
    assert len(calls) == 1
    for _ in range(2):
        assert torch.equal(permute_tokens(x, order), x[:, order])
    assert len(calls) == 3


def test_the_inverted_permutation_undoes_it():
    x = torch.randn(2, 10, 3)
    permutation = Permutation.of(random_order(10))
    assert torch.equal(permute_tokens(permute_tokens(x, permutation), permutation.inverted()), x)


@pytest.mark.parametrize("which", ["order", "inverse"])
def test_indices_on_another_device_are_named(which):
    x = torch.randn(2, 6, 3)
    pair = {"order": torch.arange(6), "inverse": torch.arange(6)}
    pair[which] = pair[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but the tokens are on cpu"):
        permute_tokens(x, Permutation(**pair))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_indices_must_be_integers(dtype):
    with pytest.raises(TypeError, match="order must be an integer tensor"):
        permute_tokens(torch.randn(2, 4, 3), torch.arange(4).to(dtype))


@pytest.mark.parametrize("shape", [(0, 7, 3), (2, 0, 3)], ids=["B0", "L0"])
def test_empty_batches_and_sequences(shape):
    x = torch.randn(shape, requires_grad=True)
    order = random_order(shape[1])
    y = permute_tokens(x, order)
    assert y.shape == shape
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))


def test_inference_tensors():
    with torch.inference_mode():
        x = torch.randn(2, 16, 3)
        order = random_order(16)
        assert torch.equal(permute_tokens(x, Permutation.of(order)), x[:, order])
        with pytest.raises(ValueError, match="not a permutation"):
            permute_tokens(x, order.clamp(max=3))
        zigzag = ZigzagScan((4, 4), "zigzag8", layer_idx=2)
        assert torch.equal(zigzag.unpermute(zigzag.permute(x)), x)
