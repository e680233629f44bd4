import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise

from zigzag_mamba.modules import mamba as mamba_module
from zigzag_mamba.modules.mamba import BiMamba, Mamba
from zigzag_mamba.ops.backends import resolve


def upstream_shapes(d_model, d_state=16, d_conv=4, expand=2):
    """mamba_ssm.Mamba's state dict for these arguments, written out from its definition."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


def mamba_by_hand(m: Mamba, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The Mamba-1 forward written out step by step in float64, from the module's weights."""
    sfx = "_b" if reverse else ""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    E, N, K, R = m.d_inner, m.d_state, m.d_conv, m.dt_rank
    xz = x @ p["in_proj.weight"].T
    u, z = xz[..., :E], xz[..., E:]
    if reverse:
        u, z = u.flip(1), z.flip(1)
    L = x.shape[1]
    padded = F.pad(u, (0, 0, K - 1, 0))
    w = p[f"conv1d{sfx}.weight"][:, 0]
    u = F.silu(sum(padded[:, k : k + L] * w[:, k] for k in range(K)) + p[f"conv1d{sfx}.bias"])
    proj = u @ p[f"x_proj{sfx}.weight"].T
    dt, Bm, Cm = proj[..., :R], proj[..., R : R + N], proj[..., R + N :]
    delta = F.softplus(dt @ p[f"dt_proj{sfx}.weight"].T + p[f"dt_proj{sfx}.bias"])
    A = -torch.exp(p["A_b_log" if reverse else "A_log"])
    Dskip = p[f"D{sfx}"]
    state = torch.zeros(x.shape[0], E, N, dtype=torch.float64)
    ys = []
    for t in range(L):
        state = torch.exp(delta[:, t, :, None] * A) * state
        state = state + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((state * Cm[:, t, None, :]).sum(-1) + Dskip * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y.flip(1) if reverse else y


@pytest.mark.parametrize("d_model, kwargs", [(48, {}), (64, {"d_state": 8, "d_conv": 3})])
def test_state_dict_matches_upstream_names_and_shapes(d_model, kwargs):
    m = Mamba(d_model, **kwargs)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == upstream_shapes(d_model, **kwargs)


def test_loads_an_upstream_state_dict_strictly():
    sd = {k: torch.randn(s) for k, s in upstream_shapes(32).items()}
    m = Mamba(32)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.x_proj.weight, sd["x_proj.weight"])


def test_initialisation():
    m = Mamba(64, dt_min=0.002, dt_max=0.05, dtype=torch.bfloat16)
    assert m.A_log.dtype == m.D.dtype == torch.float32
    assert m.in_proj.weight.dtype == torch.bfloat16
    assert torch.allclose(m.A_log.exp(), torch.arange(1.0, 17.0).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias.float())
    assert dt.min() >= 0.002 * 0.99 and dt.max() <= 0.05 * 1.01
    assert m.dt_proj.weight.float().abs().max() <= m.dt_rank**-0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None


def test_meta_build_then_reset_parameters():
    m = Mamba(32, device="meta")
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.equal(m.D, torch.ones(64))
    assert torch.allclose(m.A_log.exp(), torch.arange(1.0, 17.0).expand(64, 16))
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_forward_equals_the_hand_written_composition():
    torch.manual_seed(0)
    m = Mamba(32)
    randomise(m, 1, scale=0.1)
    x = torch.randn(3, 11, 32)
    ref = mamba_by_hand(m, x) @ m.out_proj.weight.detach().double().T
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_bidirectional_forward_and_names():
    torch.manual_seed(0)
    m = BiMamba(32)
    extra = set(m.state_dict()) - set(upstream_shapes(32))
    assert extra == {
        "A_b_log",
        "D_b",
        "conv1d_b.weight",
        "conv1d_b.bias",
        "x_proj_b.weight",
        "dt_proj_b.weight",
        "dt_proj_b.bias",
    }
    assert torch.equal(m.A_b_log, m.A_log) and m.D_b._no_weight_decay
    randomise(m, 2, scale=0.1)
    x = torch.randn(2, 9, 32)
    y = mamba_by_hand(m, x) + mamba_by_hand(m, x, reverse=True)
    torch.testing.assert_close(
        m(x).double(), y @ m.out_proj.weight.detach().double().T, rtol=1e-4, atol=1e-5
    )


def test_gradients_reach_every_parameter():
    m = BiMamba(16)
    m(torch.randn(2, 7, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_extra_repr_names_the_selective_scan_backend():
    m = Mamba(16)
    assert f"selective_scan={resolve('selective_scan', 'cpu')!r}" in repr(m)


def test_bf16_autocast_on_cpu():
    m = Mamba(32)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 0}, r"d_model \(the block's dim\) must be a positive int"),
        ({"d_model": -4}, r"d_model \(the block's dim\) must be a positive int"),
        ({"d_state": 0}, "d_state must be a positive int"),
        ({"d_conv": -1}, "d_conv must be a positive int"),
        ({"expand": 0}, "expand must be a positive number"),
        ({"dt_rank": 0}, "dt_rank must be a positive int"),
        ({"layer_idx": 0.5}, "layer_idx must be a non-negative int"),
    ],
)
@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_constructor_arguments_are_checked_by_name(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"d_model": 16, **kwargs})


def test_a_wrong_token_width_names_d_model():
    with pytest.raises(ValueError, match=r"expected tokens \(B, L, d_model=16\), got \(2, 5, 8\)"):
        Mamba(16)(torch.randn(2, 5, 8))


def test_empty_sequences_and_batches():
    mixer = Mamba(16)
    for shape in ((2, 0, 16), (0, 5, 16)):
        x = torch.randn(shape, requires_grad=True)
        out = mixer(x)
        out.sum().backward()
        assert out.shape == shape and x.grad.shape == shape


def _outputs_and_grads(m: Mamba, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    leaf = x.detach().requires_grad_()
    out = m(leaf)
    params = list(m.parameters())
    return [out.detach(), *torch.autograd.grad(out, [leaf, *params], grad)]


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_recompute_gives_the_outputs_and_gradients_of_plain_autograd(cls):
    torch.manual_seed(0)
    m = cls(32, d_state=8)
    randomise(m, 3, scale=0.1)
    x, grad = torch.randn(2, 75, 32), torch.randn(2, 75, 32)
    m.recompute = True
    lean = _outputs_and_grads(m, x, grad)
    m.recompute = False
    kept = _outputs_and_grads(m, x, grad)
    names = ["out", "x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, lean, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)


def test_recompute_by_default_only_off_the_cpu(monkeypatch):
    ran = []
    monkeypatch.setattr(mamba_module, "ssm_branch", lambda *a, **k: ran.append("op") or _stop())
    monkeypatch.setattr(mamba_module, "ssm_branch_reference",
                        lambda *a, **k: ran.append("autograd") or _stop())  # fmt: skip
    for device in ("cpu", "meta"):  # meta stands in for an accelerator
        m = Mamba(16, d_state=4, device=device)
        for recompute in (None, True, False):
            m.recompute = recompute
            with pytest.raises(_Stop):
                m(torch.randn(1, 8, 16, device=device))
    assert ran == ["autograd", "op", "autograd", "op", "op", "autograd"]


class _Stop(Exception):
    pass


def _stop():
    raise _Stop


def test_recompute_under_bf16_autocast():
    torch.manual_seed(0)
    m = BiMamba(32)
    randomise(m, 4, scale=0.1)
    x, grad = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    results = []
    for recompute in (True, False):
        m.recompute = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_outputs_and_grads(m, x, grad.bfloat16()))
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype
        # Rounding to bf16 in a different order moves single elements by an ulp.
        assert (a.float() - b.float()).norm() <= 0.01 * b.float().norm()
