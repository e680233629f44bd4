"""selective_scan: every CPU backend against the sequential reference in float64."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops import selective_scan, selective_scan_reference
from zigzag_mamba.ops.selective_scan import ScanInputs

# The package re-exports functions under their modules' names, so fetch the modules themselves.
scan_module = importlib.import_module("zigzag_mamba.ops.selective_scan")
backend_registry = importlib.import_module("zigzag_mamba.ops.backends")

BACKENDS = ["numba", "torch", "reference"]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    channels: int = 4
    state: int = 3
    length: int = 100  # not a multiple of the checkpoint interval
    groups: int | None = None  # None: B and C are (B, N, L)
    z: bool = True
    D: bool = True
    delta_bias: bool = True
    softplus: bool = True
    last_state: bool = True


CASES = [
    Case(),
    Case(batch=1, length=1),
    Case(length=130, groups=1, state=5),
    Case(channels=6, length=70, groups=2, z=False, D=False, delta_bias=False, softplus=False),
    Case(channels=8, state=16, length=scan_module.CHUNK, groups=2, last_state=False),
    Case(batch=1, length=200, softplus=False, z=False, last_state=False),
]


def make_inputs(case: Case, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    b, d, n, length = case.batch, case.channels, case.state, case.length
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    bc_shape = (b, n, length) if case.groups is None else (b, case.groups, n, length)
    # Without softplus dt = delta (+ bias) must stay positive for a decaying, stable scan.
    delta = randn(b, d, length) if case.softplus else 0.5 * torch.rand(b, d, length, generator=g)
    return {
        "u": randn(b, d, length),
        "delta": delta.to(dtype),
        "A": -torch.rand(d, n, generator=g, dtype=dtype) * 2,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(d) if case.D else None,
        "z": randn(b, d, length) if case.z else None,
        "delta_bias": (0.1 * torch.rand(d, generator=g, dtype=dtype)) if case.delta_bias else None,
    }


def run(inputs, case: Case, fn=selective_scan, grads=None):
    """Outputs and the gradients of <outputs, grads> w.r.t. every tensor input."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = fn(**leaves, delta_softplus=case.softplus, return_last_state=True)
    if grads is None:
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (out, last)]
    loss = (out * grads[0].to(out.dtype)).sum()
    if case.last_state:
        loss = loss + (last * grads[1].to(last.dtype)).sum()
    got = torch.autograd.grad(loss, list(leaves.values()))
    return out, last, dict(zip(leaves, got, strict=True)), grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected).norm()
    return 0.0 if diff == 0 else (diff / expected.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c.length}-G{c.groups}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, case):
    inputs = make_inputs(case)
    as64 = {k: None if v is None else v.double() for k, v in inputs.items()}
    ref_out, ref_last, ref_grads, grads = run(as64, case, selective_scan_reference)
    with zigzag_mamba.use_backend(selective_scan=backend):
        out, last, got_grads, _ = run(inputs, case, grads=grads)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5
    if case.last_state:
        assert rel_err(last, ref_last) < 1e-5
    for name in ref_grads:
        assert got_grads[name].dtype == inputs[name].dtype, name
        assert rel_err(got_grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_bfloat16_runs_in_float32_and_returns_bfloat16(backend):
    case = Case(length=80, groups=2)
    inputs = make_inputs(case)
    low = {k: v if k in ("A", "D", "delta_bias") or v is None else v.bfloat16()
           for k, v in inputs.items()}  # fmt: skip
    rounded = {k: None if v is None else v.float() for k, v in low.items()}
    with zigzag_mamba.use_backend(selective_scan=backend):
        out, last, grads, g = run(low, case)
        ref_out, ref_last, ref_grads, _ = run(rounded, case, grads=g)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert grads["u"].dtype == torch.bfloat16 and grads["A"].dtype == torch.float32
    assert rel_err(out, ref_out.double()) < 1e-2
    assert rel_err(last, ref_last.double()) < 1e-5  # the state itself stays float32
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name].double()) < 1e-2, name


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_gradcheck_float64(backend):
    case = Case(batch=1, channels=2, state=2, length=5, groups=1)
    inputs = make_inputs(case, dtype=torch.float64)
    leaves = [inputs[k].requires_grad_() for k in NAMES]
    fn = lambda *args: selective_scan(*args, delta_softplus=True, return_last_state=True)
    with zigzag_mamba.use_backend(selective_scan=backend):
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_opcheck(backend):
    case = Case(batch=1, channels=4, state=2, length=9, groups=2)
    inputs = make_inputs(case)
    args = [inputs[k].requires_grad_() for k in NAMES]
    with zigzag_mamba.use_backend(selective_scan=backend):
        torch.library.opcheck(torch.ops.zigzag_mamba.selective_scan_fwd, (*args, True))
        out, _, ckpt = torch.ops.zigzag_mamba.selective_scan_fwd(*args, True)
        grads = (torch.randn_like(out), torch.randn(1, 4, 2))
        bwd_args = (*grads, [a.detach() for a in args], True, ckpt, backend)
        torch.library.opcheck(torch.ops.zigzag_mamba.selective_scan_bwd, bwd_args)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_token_major_views_give_the_same_results(backend):
    # A Mamba mixer passes (B, D, L) views of (B, L, D) memory; they are read in place.
    case = Case(batch=2, channels=40, state=4, length=70, groups=1)
    inputs = make_inputs(case)
    token_major = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.randn(2, 40, 70, generator=torch.Generator().manual_seed(1))

    def run(layout):
        leaves = {k: inputs[k].detach().clone() for k in NAMES}
        for k in ("u", "delta", "z"):
            leaves[k] = layout(leaves[k])
        for leaf in leaves.values():
            leaf.requires_grad_()
        with zigzag_mamba.use_backend(selective_scan=backend):
            out = selective_scan(*(leaves[k] for k in NAMES), delta_softplus=True)
            out.backward(layout(grad_out))
        return [out, *(leaves[k].grad for k in NAMES)]

    assert not token_major(inputs["u"]).is_contiguous()
    for a, b in zip(run(token_major), run(lambda t: t), strict=True):
        if backend == "numba":  # the same arithmetic in the same order
            assert torch.equal(a, b)
        else:  # PyTorch's reductions (dD, ddelta_bias) follow the memory order: sums of 140
            # fp32 terms in another order, a few ulps of their magnitude apart
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_caller_autocast_does_not_reach_inside_the_op(backend):
    # The op computes in its inputs' dtypes; the torch backend's matmuls once ran in bf16 here.
    case = Case(batch=2, channels=16, state=4, length=70, groups=1)
    inputs = make_inputs(case)
    grad_out = torch.randn(2, 16, 70, generator=torch.Generator().manual_seed(2))

    def run(autocast: bool):
        leaves = {k: inputs[k].detach().clone().requires_grad_() for k in NAMES}
        with (
            zigzag_mamba.use_backend(selective_scan=backend),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            out = selective_scan(*(leaves[k] for k in NAMES), delta_softplus=True)
            out.backward(grad_out)
        return [out, *(leaves[k].grad for k in NAMES)]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def test_backward_runs_the_forwards_implementation():
    # Checkpoints belong to the implementation that wrote them (mamba-ssm's forward leaves
    # none), so a backward run under another backend choice must still use the forward's.
    case = Case(batch=2, channels=64, state=4, length=150, groups=1)
    inputs = make_inputs(case)

    def grads(forward_backend: str, backward_backend: str) -> list[torch.Tensor]:
        leaves = [inputs[k].detach().requires_grad_() for k in NAMES]
        with zigzag_mamba.use_backend(selective_scan=forward_backend):
            out = selective_scan(*leaves, delta_softplus=True)
        with zigzag_mamba.use_backend(selective_scan=backward_backend):
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

    torch_only, numba_only = grads("torch", "torch"), grads("numba", "numba")
    assert any(not torch.equal(a, b) for a, b in zip(torch_only, numba_only, strict=True))
    for forward, backward in (("torch", "numba"), ("numba", "torch")):
        expected = torch_only if forward == "torch" else numba_only
        mixed = grads(forward, backward)
        assert all(torch.equal(a, b) for a, b in zip(mixed, expected, strict=True))


def test_numba_kernels_write_every_output():
    kernels = importlib.import_module("zigzag_mamba.ops.selective_scan.numba")
    case = Case(batch=2, channels=4, state=3, length=70, groups=2)
    inputs = make_inputs(case)
    arrays = kernels._arrays(ScanInputs(*(inputs[k] for k in NAMES), True), torch.float32)
    b, d, length, n, chunk = 2, 4, 70, 3, 16
    nan = lambda *shape: torch.full(shape, float("nan"))
    out, last, ckpt = nan(b, d, length), nan(b, d, n), nan(b, d, -(-length // chunk), n)
    kernels.selective_scan_forward(arrays, True, chunk, out.numpy(), last.numpy(), ckpt.numpy())
    grads = [nan(b, d, length) for _ in range(3)] + [nan(b, d, n), nan(b, d), nan(b, d)]
    parts = [torch.zeros(b, 2, 1, length, n) for _ in range(2)]
    dout, dlast = torch.randn(b, d, length).numpy(), torch.randn(b, d, n).numpy()
    outputs = tuple(t.numpy() for t in grads + parts)
    kernels.selective_scan_backward(dout, dlast, arrays, True, chunk, ckpt.numpy(), outputs)
    for tensor in (out, last, ckpt, *grads, *parts):
        assert torch.isfinite(tensor).all()


def test_numba_kernels_leave_torch_thread_count_alone():
    inputs = make_inputs(Case(length=8))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with zigzag_mamba.use_backend(selective_scan="numba"):
            run(inputs, Case(length=8))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_use_backend_and_environment_variable_pick_the_implementation(monkeypatch):
    calls = []
    pytorch = importlib.import_module("zigzag_mamba.ops.selective_scan.pytorch")
    forward = pytorch.forward
    monkeypatch.setattr(pytorch, "forward", lambda *a: calls.append("torch") or forward(*a))
    reference = scan_module.selective_scan_reference
    spy_ref = lambda *args, **kw: calls.append("reference") or reference(*args, **kw)
    monkeypatch.setattr(scan_module, "selective_scan_reference", spy_ref)
    inputs = make_inputs(Case(length=8))
    with zigzag_mamba.use_backend(selective_scan="torch"):
        selective_scan(**inputs)
    with zigzag_mamba.use_backend(selective_scan="reference"):
        selective_scan(**inputs)
    assert calls == ["torch", "reference"]
    monkeypatch.setenv("ZIGZAG_MAMBA_SELECTIVE_SCAN", "torch")
    assert zigzag_mamba.backends()["selective_scan"]["cpu"] == "torch"
    selective_scan(**inputs)
    assert calls[-1] == "torch"
    monkeypatch.delenv("ZIGZAG_MAMBA_SELECTIVE_SCAN")
    assert zigzag_mamba.backends()["selective_scan"]["cpu"] == "numba"


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm present")
def test_forcing_mamba_ssm_without_it_is_a_clear_error():
    with (
        pytest.raises(RuntimeError, match="selective_scan backend 'mamba_ssm' is not available"),
        zigzag_mamba.use_backend(selective_scan="mamba_ssm"),
    ):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_triton_is_the_cuda_fallback_and_refuses_cpu_tensors():
    names = [b.name for b in backend_registry._registry["selective_scan"]]
    assert names.index("triton") < names.index("numba") < names.index("torch")
    mamba_ssm = backend_registry._find("selective_scan", "mamba_ssm")
    assert not mamba_ssm.serves("cuda", forced=False) and mamba_ssm.serves("cuda", forced=True)
    with (
        pytest.raises(RuntimeError, match="'triton' is not available"),
        zigzag_mamba.use_backend(selective_scan="triton"),
    ):
        pass


def test_without_numba_the_torch_scan_runs_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "zigzag_mamba.ops.selective_scan.numba", None)
    backend_registry.unavailable_reason.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numba CPU selective scan is unavailable") as rec:
            assert backend_registry.resolve("selective_scan", "cpu") == "torch"
            assert backend_registry.resolve("selective_scan", "cpu") == "torch"
        assert len(rec) == 1
    finally:
        backend_registry.unavailable_reason.cache_clear()


def test_torch_compile_fullgraph_forward_and_backward():
    case = Case(length=20, groups=2)
    inputs = make_inputs(case)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}

    def loss_fn(**kw):
        return selective_scan(**kw, delta_softplus=True).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(loss_fn(**leaves), list(leaves.values()))
    got = torch.autograd.grad(compiled(**leaves), list(leaves.values()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_rejects_bad_shapes():
    inputs = make_inputs(Case(channels=4, groups=2))
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :, :-1]})
    with pytest.raises(ValueError, match="A must be real"):
        selective_scan(**{**inputs, "A": inputs["A"][:3]})


@pytest.mark.parametrize("shape", [(2, 4, 0), (0, 4, 70), (0, 4, 0)], ids=["L0", "B0", "B0-L0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_empty_results_and_zero_gradients(backend, shape):
    batch, channels, length = shape
    case = Case(batch=batch, channels=channels, length=length, groups=2)
    leaves = {k: v.requires_grad_() for k, v in make_inputs(case).items()}
    with zigzag_mamba.use_backend(selective_scan=backend):
        out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
        loss = out.sum() + last.sum()
        # The reference loop never touches delta when L = 0: autograd gives it no gradient.
        grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
    assert out.shape == shape
    # The last state of an empty sequence is the initial state, zero.
    assert torch.equal(last, torch.zeros(batch, channels, case.state))
    for (name, leaf), grad in zip(leaves.items(), grads, strict=True):
        assert torch.equal(grad, torch.zeros_like(leaf)), name


@pytest.mark.parametrize("name", ["u", "delta", "A", "z"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_inputs_are_a_type_error(name, dtype):
    inputs = make_inputs(Case())
    inputs[name] = inputs[name].to(dtype)
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor"):
        selective_scan(**inputs)


@pytest.mark.parametrize(
    "name, message",
    [
        ("A", "A is on meta"),
        ("B", "B is on meta"),
        ("D", "D is on meta"),
        ("u", r"u's device \(meta\)"),
    ],
)
def test_an_input_on_another_device_is_named(name, message):
    # A meta tensor among CPU ones used to run the shape-only kernel: uninitialised output.
    inputs = make_inputs(Case())
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_all_meta_inputs_give_shapes_only():
    inputs = {k: None if v is None else v.to("meta") for k, v in make_inputs(Case()).items()}
    out, last = selective_scan(**inputs, return_last_state=True)
    assert out.is_meta and out.shape == inputs["u"].shape and last.shape == (2, 4, 3)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_double_backward_is_a_clear_error(backend):
    case = Case(length=10)
    leaves = {k: v.requires_grad_() for k, v in make_inputs(case).items()}
    with zigzag_mamba.use_backend(selective_scan=backend):
        out = selective_scan(**leaves, delta_softplus=True)
        (du,) = torch.autograd.grad(out.square().sum(), leaves["u"], create_graph=True)
        with pytest.raises(RuntimeError, match="selective_scan does not support double backward"):
            du.square().sum().backward()


def test_reference_backend_supports_double_backward():
    case = Case(batch=1, channels=2, state=2, length=4, groups=1)
    leaves = [make_inputs(case, dtype=torch.float64)[k].requires_grad_() for k in NAMES]
    fn = lambda *args: selective_scan(*args, delta_softplus=True)
    with zigzag_mamba.use_backend(selective_scan="reference"):
        assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["z-D-bias", "grouped-plain"])
def test_the_reference_backend_runs_the_loop_inside_the_op(case):
    # Inside torch.compile selective_scan cannot step around its custom op: forced to
    # "reference", the op runs the loop as its backend, and autograd through it as the backward.
    inputs = make_inputs(case)
    fn = lambda **kw: selective_scan(**kw)
    with zigzag_mamba.use_backend(selective_scan="reference"):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        out, last, grads, seeds = run(inputs, case, compiled)
    ref_out, ref_last, ref_grads, _ = run(inputs, case, selective_scan_reference, seeds)
    assert torch.equal(out, ref_out) and torch.equal(last, ref_last)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)
