"""ssm_branch: the mixer's SSM branch as one op that recomputes in its backward, against the same
branch differentiated by autograd (ssm_branch_reference), on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops.ssm_branch import ssm_branch, ssm_branch_reference

NAMES = ("xz", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "bias")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    length: int = 70  # two checkpoints, the second one ragged
    channels: int = 12
    taps: int = 4
    rank: int = 3
    state: int = 5
    conv_bias: bool = True
    D: bool = True
    delta_bias: bool = True


CASES = {
    "full": Case(),
    "one step": Case(batch=1, length=1),
    "bare": Case(taps=2, conv_bias=False, D=False, delta_bias=False),
    "wide conv": Case(length=130, taps=5, state=16),
}


def make_inputs(case: Case, dtype=torch.float32, seed=0) -> list[torch.Tensor | None]:
    """The branch's arguments with the magnitudes of an initialised mixer (A and the vectors in
    float32 or float64, as a mixer passes them)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(dtype)
    vector = torch.float64 if dtype == torch.float64 else torch.float32
    e, r, n = case.channels, case.rank, case.state
    return [
        randn(case.batch, case.length, 2 * e),
        randn(e, case.taps, scale=0.5),
        randn(e, scale=0.5) if case.conv_bias else None,
        randn(r + 2 * n, e, scale=e**-0.5),
        randn(e, r, scale=r**-0.5),
        -torch.arange(1, n + 1, dtype=vector).repeat(e, 1),
        torch.ones(e, dtype=vector) if case.D else None,
        (-4 + torch.rand(e, generator=g)).to(vector) if case.delta_bias else None,
    ]


def run(fn, inputs, grad_y, reverse=False):
    """y and the gradient of every present input."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves, reverse=reverse)
    present = [t for t in leaves if t is not None]
    return [y.detach(), *torch.autograd.grad(y, present, grad_y)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_matches_autograd_through_the_reference(backend, case, reverse):
    inputs = make_inputs(CASES[case])
    x = inputs[0]
    grad_y = torch.randn(x.shape[0], x.shape[2] // 2, x.shape[1])
    with zigzag_mamba.use_backend(selective_scan=backend):
        ours = run(ssm_branch, inputs, grad_y, reverse)
        expected = run(ssm_branch_reference, inputs, grad_y, reverse)
    for name, got, want in zip(("y", *NAMES), ours, expected, strict=False):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=name)


def test_float64_gradients_are_exact():
    inputs = make_inputs(CASES["full"], torch.float64)
    grad_y = torch.randn(2, 12, 70, dtype=torch.float64)
    with zigzag_mamba.use_backend(selective_scan="torch"):
        ours = run(ssm_branch, inputs, grad_y, reverse=True)
        expected = run(ssm_branch_reference, inputs, grad_y, reverse=True)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    inputs = make_inputs(Case(batch=1, length=9, channels=3, rank=2, state=2), torch.float64)
    leaves = [t.requires_grad_() for t in inputs]
    with zigzag_mamba.use_backend(selective_scan="torch"):
        assert torch.autograd.gradcheck(lambda *a: ssm_branch(*a), leaves)
        assert torch.autograd.gradcheck(lambda *a: ssm_branch(*a, reverse=True), leaves)


def test_bf16_within_twice_the_reference_error():
    inputs = make_inputs(CASES["full"], torch.bfloat16)
    grad_y = torch.randn(2, 12, 70).bfloat16()
    exact = run(ssm_branch_reference, [None if t is None else t.double() for t in inputs],
                grad_y.double())  # fmt: skip
    ours, plain = run(ssm_branch, inputs, grad_y), run(ssm_branch_reference, inputs, grad_y)
    for name, got, torch_own, want in zip(("y", *NAMES), ours, plain, exact, strict=False):
        assert got.dtype == torch_own.dtype, name
        err = (got.double() - want).abs().max()
        torch_err = (torch_own.double() - want).abs().max()
        floor = torch.finfo(torch.bfloat16).eps * want.abs().max()
        assert err <= max(2 * torch_err, floor), (name, err, torch_err)


def test_saves_only_the_in_proj_output_and_the_checkpoints():
    inputs = make_inputs(Case(batch=1, length=256, channels=64, rank=4, state=16))
    leaves = [None if t is None else t.requires_grad_() for t in inputs]

    def saved_bytes(fn) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*leaves)
        return sum(storages.values())

    xz = inputs[0]
    checkpoints = 64 * 4 * 16 * 4  # (B, E, L / CHUNK, N) float32
    weights = sum(t.untyped_storage().nbytes() for t in inputs[1:] if t is not None)
    lean = saved_bytes(ssm_branch)
    assert lean == xz.untyped_storage().nbytes() + checkpoints + weights
    assert saved_bytes(ssm_branch_reference) > 2 * lean


def test_opcheck():
    inputs = make_inputs(Case(batch=2, length=9, channels=4, rank=2, state=3))
    args = [None if t is None else t.requires_grad_() for t in inputs]
    ops = torch.ops.zigzag_mamba
    for reverse in (False, True):
        torch.library.opcheck(ops.ssm_branch_fwd.default, (*args, reverse))
    y, checkpoints = ops.ssm_branch_fwd(*args, False)
    detached = [t.detach() for t in args]
    for reverse in (False, True):
        bwd_args = (torch.randn_like(y), detached, checkpoints, reverse, "torch", "numba")
        torch.library.opcheck(ops.ssm_branch_bwd.default, bwd_args)


def test_compiles_without_graph_breaks():
    inputs = make_inputs(Case(length=20))
    leaves = [t.requires_grad_() for t in inputs]
    loss = lambda *a: ssm_branch(*a).square().sum() + ssm_branch(*a, reverse=True).sum()
    assert torch._dynamo.explain(loss)(*leaves).graph_break_count == 0
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_no_grad_forward_and_empty_batch():
    inputs = make_inputs(Case())
    with torch.no_grad():
        torch.testing.assert_close(ssm_branch(*inputs), ssm_branch_reference(*inputs))
    empty = make_inputs(Case(batch=0))
    leaves = [t.requires_grad_() for t in empty]
    y = ssm_branch(*leaves)
    y.sum().backward()
    assert y.shape == (0, 12, 70) and leaves[0].grad.shape == leaves[0].shape


def test_rejects_a_bad_in_proj_output():
    inputs = make_inputs(Case())
    with pytest.raises(ValueError, match=r"xz \(B, L, 2E\)"):
        ssm_branch(inputs[0][..., :-1], *inputs[1:])
