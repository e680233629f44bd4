"""cross_permute and cross_merge: the k-way permute of the cross mixer and its adjoint, against
their definitions (one gather per order) on fresh random inputs."""

import pytest
import torch

from zigzag_mamba.ops import Permutation, use_backend
from zigzag_mamba.ops.cross_permute import (
    _cross_merge,
    _cross_permute,
    cross_merge,
    cross_merge_reference,
    cross_permute,
    cross_permute_reference,
)


def random_orders(k: int, length: int, seed: int) -> Permutation:
    gen = torch.Generator().manual_seed(seed)
    return Permutation.stack(
        [Permutation.of(torch.randperm(length, generator=gen)) for _ in range(k)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "length", "k", "channels"), [(2, 17, 4, 5), (1, 1, 2, 3), (3, 40, 1, 8)]
)
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_permute_is_one_gather_per_order_and_merge_sums_them_back(
    backend, dtype, batch, length, k, channels
):
    perm = random_orders(k, length, seed=length + k)
    x = torch.randn(batch, length, channels).to(dtype)
    y = torch.randn(batch, length, k, channels, dtype=torch.float64).to(dtype)
    with use_backend(cross_permute=backend):
        permuted, merged = cross_permute(x, perm), cross_merge(y, perm)
    assert permuted.shape == (batch, length, k, channels) and permuted.is_contiguous()
    assert torch.equal(permuted, cross_permute_reference(x, perm.order))
    expected = cross_merge_reference(y.double(), perm.inverse)
    tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(merged.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_merge_takes_a_strided_input(backend):
    perm = random_orders(3, 11, seed=1)
    # The selective scan's output (B, k * C, L), viewed (B, L, k, C): not contiguous.
    scan_output = torch.randn(2, 3 * 4, 11)
    y = scan_output.transpose(1, 2).unflatten(2, (3, 4))
    assert not y.is_contiguous()
    with use_backend(cross_permute=backend):
        merged = cross_merge(y, perm)
    torch.testing.assert_close(merged, cross_merge_reference(y, perm.inverse))


def test_merge_is_the_adjoint_of_permute_and_both_differentiate_twice():
    perm = random_orders(4, 9, seed=2)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 9, 4, 3, dtype=torch.float64, requires_grad=True)
    # <permute(x), y> == <x, merge(y)>
    torch.testing.assert_close((cross_permute(x, perm) * y).sum(), (x * cross_merge(y, perm)).sum())
    assert torch.autograd.gradcheck(lambda t: cross_permute(t, perm), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, perm), (y,))
    assert torch.autograd.gradgradcheck(
        lambda t: cross_merge(cross_permute(t, perm) ** 2, perm), (x,)
    )


def test_opcheck():
    perm = random_orders(3, 7, seed=3)
    for grad in (False, True):
        x = torch.randn(2, 7, 5, requires_grad=grad)
        y = torch.randn(2, 7, 3, 5, requires_grad=grad)
        torch.library.opcheck(_cross_permute, (x, *perm))
        torch.library.opcheck(_cross_merge, (y, *perm))


def test_compile_fullgraph_matches_eager():
    perm = random_orders(4, 12, seed=4)
    x = torch.randn(2, 12, 6)
    weights = torch.randn(1, 1, 4, 6)
    roundtrip = lambda t: cross_merge(cross_permute(t, perm) * weights, perm)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), roundtrip(x))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: cross_permute(torch.randn(2, 5), p), r"x must be tokens \(B, L, C\)"),
        (lambda p: cross_permute(torch.randn(2, 6, 3), p), "does not fit 2 orders of 5 tokens"),
        (lambda p: cross_merge(torch.randn(2, 5, 3, 4), p), "k = 2"),
        (
            lambda p: cross_permute(torch.randn(2, 5, 3), Permutation.of(torch.arange(5))),
            "k orders",
        ),
        (lambda p: cross_merge(torch.randn(2, 5, 2, 4), "orders"), "Permutation of k orders"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(random_orders(2, 5, seed=0))


def test_stack_refuses_orders_of_different_lengths():
    with pytest.raises(ValueError, match="one L"):
        Permutation.stack([Permutation.of(torch.arange(3)), Permutation.of(torch.arange(4))])
