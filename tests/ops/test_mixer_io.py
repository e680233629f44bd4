"""mixer_in / mixer_out on CPU: their definitions, hand-written backwards and op registrations.

On CPU the ops run the PyTorch references, so forwards are compared exactly; the hand-written
backwards are compared with autograd through the references (float64 closely; float32 and
bfloat16 by the rule of docs/design.md: at most twice PyTorch's own error against float64).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops.mixer_io import mixer_in, mixer_in_reference, mixer_out, mixer_out_reference
from zigzag_mamba.ops.permute import Permutation, inverse_order

B, L, D = 2, 12, 10


def _inputs(dtype: torch.dtype, seed: int = 0, residual: bool = True, conditioned: bool = True):
    """h, residual, weight, shift, scale, gate, y, order; residual in fp32 (fp64 for fp64)."""
    gen = torch.Generator().manual_seed(seed)
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dt)

    cond = [randn(B, D) for _ in range(3)] if conditioned else [None] * 3
    return (
        randn(B, L, D),
        randn(B, L, D, dt=compute) if residual else None,
        1 + 0.1 * randn(D),
        *cond,
        randn(B, L, D),
        torch.randperm(L, generator=gen),
    )


def _official_block_front(h, residual, weight, shift, scale, order, eps=1e-5):
    """The block of docs/design.md ("The block and the backbone") written out: add, RMSNorm
    (fp32), modulate, permute."""
    residual = h.float() if residual is None else residual + h.float()
    normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps) * weight
    h_norm = normed.to(h.dtype)
    x = normed * (1 + scale[:, None]) + shift[:, None]
    return residual, h_norm, x.to(h.dtype)[:, order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_in_matches_the_block_definition(dtype: torch.dtype):
    h, residual, weight, shift, scale, _, _, order = _inputs(dtype)
    got = mixer_in(h, residual, weight, shift, scale, order)
    expected = _official_block_front(
        h, residual, weight.float(), shift.float(), scale.float(), order
    )
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_scan_out_is_unscan_gate_add():
    h_norm, _, _, _, _, gate, y, order = _inputs(torch.float32)
    out = mixer_out(h_norm, gate, y, order)
    torch.testing.assert_close(out, h_norm + gate[:, None] * y[:, inverse_order(order)])
    torch.testing.assert_close(
        mixer_out(h_norm, None, y, order), h_norm + y[:, inverse_order(order)]
    )


def test_identity_mixer_round_trip():
    """With no conditioning, mixer_out(h_norm, 1, mixer_in's tokens) is 2 * h_norm."""
    h, residual, weight, *_, order = _inputs(torch.float32, conditioned=False)
    _, h_norm, x = mixer_in(h, residual, weight, order=order)
    torch.testing.assert_close(mixer_out(h_norm, None, x, order), 2 * h_norm)


def test_a_permutation_or_a_plain_order_and_no_order():
    h, residual, weight, shift, scale, _, _, order = _inputs(torch.float32)
    args = (h, residual, weight, shift, scale)
    for a, b in zip(mixer_in(*args, order), mixer_in(*args, Permutation.of(order)), strict=True):
        assert torch.equal(a, b)
    unscanned = mixer_in(*args, None)
    assert torch.equal(unscanned[2][:, order], mixer_in(*args, order)[2])


VARIANTS = {
    "full": {},
    "block0": {"residual": False},
    "unconditioned": {"conditioned": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scanned", [True, False], ids=["scan", "no_scan"])
def test_gradcheck_float64(variant: str, scanned: bool):
    h, residual, weight, shift, scale, gate, y, order = _inputs(torch.float64, **VARIANTS[variant])
    order = order if scanned else None
    for t in (h, residual, weight, shift, scale, gate, y):
        if t is not None:
            t.requires_grad_()

    def front(h, residual, weight, shift, scale):
        return mixer_in(h, residual, weight, shift, scale, order)

    def back(h_norm, gate, y):
        return mixer_out(h_norm, gate, y, order)

    assert torch.autograd.gradcheck(front, (h, residual, weight, shift, scale))
    assert torch.autograd.gradcheck(back, (h, gate, y))


def _grads(fn, inputs, upstream):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs, strict=True)])
    return [None if t is None else t.grad for t in leaves]


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_written_backward_matches_autograd_of_the_reference(dtype: torch.dtype, variant):
    h, residual, weight, shift, scale, gate, y, order = _inputs(dtype, **VARIANTS[variant])
    gen = torch.Generator().manual_seed(7)
    # Rounded to the test dtype, so that every run differentiates against the same values.
    upstream = [torch.randn(B, L, D, generator=gen).to(dtype).double() for _ in range(3)]
    front_inputs = (h, residual, weight, shift, scale)
    back_inputs = (h, gate, y)

    def run(fn_in, fn_out, to):
        front = _grads(lambda *a: fn_in(*a, order), [to(t) for t in front_inputs], upstream)
        back = _grads(lambda *a: fn_out(*a, order), [to(t) for t in back_inputs], upstream[:1])
        return front + back

    def reference_out(h_norm, gate, y, order):
        return mixer_out_reference(h_norm, gate, y, inverse_order(order))

    def keep(t):
        return t

    def as_f64(t):
        return None if t is None else t.double()

    fused = run(mixer_in, mixer_out, keep)
    autograd = run(mixer_in_reference, reference_out, keep)
    exact = run(mixer_in_reference, reference_out, as_f64)
    for got, torch_grad, ref in zip(fused, autograd, exact, strict=True):
        assert (got is None) == (ref is None)
        if got is None:
            continue
        assert got.dtype == torch_grad.dtype
        if dtype == torch.float64:
            torch.testing.assert_close(got, torch_grad, rtol=1e-12, atol=1e-12)
        else:  # both compute in fp32; allow 8 fp32 ulps where PyTorch's error is tiny by luck
            floor = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()
            assert _max_err(got, ref) <= max(2 * _max_err(torch_grad, ref), floor)


def test_opcheck():
    h, residual, weight, shift, scale, gate, y, order = _inputs(torch.float32)
    inverse = inverse_order(order)
    ops = torch.ops.zigzag_mamba

    def grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone().requires_grad_() for t in tensors]

    front = (*grad(h, residual, weight, shift, scale), order, inverse, 1e-5)
    torch.library.opcheck(ops.mixer_in.default, front)
    block0 = (*grad(h.bfloat16()), None, *grad(weight), None, None, None, None, 1e-6)
    torch.library.opcheck(ops.mixer_in.default, block0)
    torch.library.opcheck(ops.mixer_out.default, (*grad(h, gate, y), order, inverse))
    torch.library.opcheck(ops.mixer_out.default, (*grad(h), None, *grad(y), None, None))
    saved = [residual, weight, shift, None, order, inverse]
    torch.library.opcheck(
        ops.mixer_in_backward.default, ([residual, h, y], saved, True, 1e-5, "torch")
    )
    torch.library.opcheck(ops.mixer_out_backward.default, (h, [gate, y, order, inverse], "torch"))


def test_block_front_and_back_compile_without_graph_breaks():
    h, residual, weight, shift, scale, gate, _, order = _inputs(torch.float32)
    permutation = Permutation.of(order)

    def block(h, residual, weight, c):
        shift, scale, gate = c.chunk(3, dim=-1)
        residual, h_norm, x = mixer_in(h, residual, weight, shift, scale, permutation)
        return mixer_out(h_norm, gate, torch.tanh(x), permutation), residual

    c = torch.cat([shift, scale, gate], dim=-1)
    assert torch._dynamo.explain(block)(h, residual, weight, c).graph_break_count == 0
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (h, residual, weight, c)]
    out, res = compiled(*leaves)
    (out.sum() + res.sum()).backward()
    eager = [t.clone().requires_grad_() for t in (h, residual, weight, c)]
    eager_out, eager_res = block(*eager)
    (eager_out.sum() + eager_res.sum()).backward()
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_arguments_are_rejected():
    h, residual, weight, shift, _, gate, y, order = _inputs(torch.float32)
    with pytest.raises(ValueError, match="h must have shape"):
        mixer_in(h[0], None, weight)
    with pytest.raises(TypeError, match="residual must be"):
        mixer_in(h, residual.bfloat16(), weight)
    with pytest.raises(ValueError, match="shift must have shape"):
        mixer_in(h, residual, weight, shift[:1])
    with pytest.raises(ValueError, match="order must have shape"):
        mixer_in(h, residual, weight, order=order[:-1])
    with pytest.raises(ValueError, match="y must have shape"):
        mixer_out(h, gate, y[:, :-1], order)


def test_backend_is_reported_and_can_be_forced():
    assert zigzag_mamba.backends()["mixer_io"]["cpu"] == "torch"
    with zigzag_mamba.use_backend(mixer_io="torch"):
        h, residual, weight, *_ = _inputs(torch.float32)
        mixer_in(h, residual, weight)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            zigzag_mamba.use_backend(mixer_io="triton")


def test_cpu_use_loads_no_triton_kernels():
    """Importing loads no Triton; CPU calls load none of our kernel modules.

    (Calling any custom op imports ``torch._dynamo``, which itself imports Triton when it is
    installed, so after a call only our own kernel modules can be checked.)
    """
    code = (
        "import sys, torch\n"
        "from zigzag_mamba.ops.mixer_io import mixer_in, mixer_out\n"
        "from zigzag_mamba.ops import permute_tokens\n"
        "assert 'triton' not in sys.modules, 'importing imported triton'\n"
        "h = torch.randn(1, 4, 3)\n"
        "r, hn, x = mixer_in(h, None, torch.ones(3), order=torch.arange(4))\n"
        "mixer_out(hn, None, permute_tokens(x, torch.arange(4)), torch.arange(4))\n"
        "loaded = [m for m in sys.modules if m.startswith('zigzag_mamba') and 'triton' in m]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["residual", "norm_weight", "shift", "order"])
def test_mixer_in_names_an_argument_on_another_device(name):
    h, residual, weight, shift, scale, _, _, order = _inputs(torch.float32)
    args = {"residual": residual, "norm_weight": weight, "shift": shift, "scale": scale}
    args["order"] = order
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but the tokens are on cpu"):
        mixer_in(h, **args)


def test_mixer_out_names_an_argument_on_another_device():
    h_norm, *_, gate, y, order = _inputs(torch.float32)
    with pytest.raises(ValueError, match="y is on meta but the tokens are on cpu"):
        mixer_out(h_norm, gate, y.to("meta"), order)


def test_integer_tokens_are_a_type_error():
    h, residual, weight, *_ = _inputs(torch.float32)
    with pytest.raises(TypeError, match="h must be a floating-point tensor"):
        mixer_in(h.long(), None, weight)
    with pytest.raises(TypeError, match="norm_weight must be a floating-point tensor"):
        mixer_in(h, residual, weight.long())


def test_an_order_that_is_not_a_permutation_is_refused():
    h, residual, weight, _, _, gate, y, order = _inputs(torch.float32)
    repeated = order.clone()
    repeated[0] = repeated[1]
    with pytest.raises(ValueError, match="order is not a permutation"):
        mixer_in(h, residual, weight, order=repeated)
    with pytest.raises(ValueError, match="order is not a permutation"):
        mixer_out(h, gate, y, repeated)


@pytest.mark.parametrize("stage", ["mixer_in", "mixer_out"])
def test_double_backward_is_a_clear_error(stage):
    h, residual, weight, shift, scale, gate, y, order = _inputs(torch.float32)
    if stage == "mixer_in":
        leaf = h.requires_grad_()
        out = mixer_in(h, residual, weight, shift, scale, order)[2]
    else:
        leaf = y.requires_grad_()
        out = mixer_out(h, gate, y, order)
    (grad,) = torch.autograd.grad(out.square().sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{stage} does not support double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("batch, length", [(0, L), (B, 0)], ids=["B0", "L0"])
def test_empty_batches_and_sequences(batch, length):
    h = torch.randn(batch, length, D, requires_grad=True)
    weight, gate = torch.ones(D), torch.randn(batch, D)
    order = torch.randperm(length)
    residual, h_norm, x = mixer_in(h, None, weight, gate, gate, order)
    out = mixer_out(h_norm, gate, x, order)
    assert out.shape == residual.shape == (batch, length, D)
    (out.sum() + residual.sum()).backward()
    assert h.grad.shape == h.shape
