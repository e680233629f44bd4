import itertools
import sys

import pytest
import torch

from zigzag_mamba.train.interpolant import Interpolant
from zigzag_mamba.train.samplers import generate, guided_model, sample_ode, sample_sde


def _noise(n, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Counted:
    """A velocity function that counts its calls (the sampler's NFE)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _calls(sampler, fn, *args, **kwargs) -> int:
    counted = Counted(fn)
    sampler(counted, *args, **kwargs)
    return counted.calls


def _errors(target, method, steps):
    x0 = _noise(512)
    exact = target.exact_map(x0)
    return [(sample_ode(target.velocity, x0, n, method) - exact).abs().max().item() for n in steps]


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize(("method", "ratio"), [("euler", 2.0), ("heun", 4.0)])
def test_convergence_order_on_a_gaussian_target(gaussian, path, method, ratio):
    errors = _errors(gaussian(path), method, [16, 32, 64])
    for coarse, fine in itertools.pairwise(errors):
        assert coarse / fine == pytest.approx(ratio, rel=0.15)


def test_step_count_and_model_calls(gaussian):
    target = gaussian()
    x0 = _noise(4)
    assert _calls(sample_ode, target.velocity, x0, 7, "euler") == 7
    assert _calls(sample_ode, target.velocity, x0, 7, "heun") == 14
    assert _calls(sample_sde, target.velocity, x0, 7) == 7
    seen = []
    sample_ode(lambda x, t: seen.append(t) or torch.zeros_like(x), x0, 4, t_start=0.2, t_end=0.6)
    assert [t.shape for t in seen] == [(4,)] * 4
    torch.testing.assert_close(
        torch.stack([t[0] for t in seen]), torch.tensor([0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="at least 1"):
        sample_ode(target.velocity, x0, 0)


def test_dopri5_through_torchdiffeq(gaussian):
    pytest.importorskip("torchdiffeq")
    target = gaussian("gvp")
    x0 = _noise(256)
    counted = Counted(target.velocity)
    x1 = sample_ode(counted, x0, 1, "dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x1, target.exact_map(x0), rtol=0, atol=1e-4)
    assert counted.calls > 6
    rk4 = sample_ode(target.velocity, x0, 32, "rk4")
    torch.testing.assert_close(rk4, target.exact_map(x0), rtol=0, atol=1e-4)


def test_missing_torchdiffeq_is_explained(gaussian, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        sample_ode(gaussian().velocity, _noise(2), 10, "dopri5")


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sde_reaches_the_exact_moments(gaussian, path):
    target = gaussian(path)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16_000, 2, dtype=torch.float64, generator=g)
    x1 = sample_sde(target.velocity, x0, 100, target.interpolant, generator=g)
    assert torch.isfinite(x1).all()
    torch.testing.assert_close(x1.mean(0), target.mean, rtol=0, atol=0.05)
    # sampling error of a covariance entry is about |S| sqrt(2 / n) plus the O(dt) bias
    assert ((torch.cov(x1.T) - target.cov).abs() <= 0.08 * (target.cov.abs() + 0.2)).all()


def test_sde_is_finite_for_a_velocity_model_on_every_path():
    for path in ["linear", "gvp", "vp"]:
        itp = Interpolant(path)
        x = sample_sde(
            lambda x, t: -x, _noise(8), 5, itp, t_start=0.0, t_end=itp.sample_interval()[1]
        )
        assert torch.isfinite(x).all(), path


def test_sde_is_deterministic_under_a_seed(gaussian):
    target = gaussian()
    run = lambda seed: sample_sde(
        target.velocity, _noise(8), 10, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


class _ClassNet(torch.nn.Module):
    """A conditional stand-in whose output depends on the label in every channel."""

    def forward(self, x, t, y):
        return (
            x * t[:, None, None, None]
            + y[:, None, None, None].float() * torch.arange(1, x.shape[1] + 1)[None, :, None, None]
        )


def _image_batch():
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    return x, torch.full((3,), 0.3), torch.tensor([1, 4, 7])


def test_cfg_scale_one_is_the_conditional_model():
    net, (x, t, y) = _ClassNet(), _image_batch()
    guided = guided_model(net, y, cfg_scale=1.0, null_label=10)
    torch.testing.assert_close(guided(x, t), net(x, t, y))


def test_cfg_mixes_every_channel_by_default_and_three_in_parity_mode():
    net, (x, t, y) = _ClassNet(), _image_batch()
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 10))
    expected = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(guided_model(net, y, cfg_scale=4.0, null_label=10)(x, t), expected)
    parity = guided_model(net, y, cfg_scale=4.0, null_label=10, channels=3)(x, t)
    torch.testing.assert_close(parity[:, :3], expected[:, :3])
    torch.testing.assert_close(parity[:, 3:], cond[:, 3:])
    with pytest.raises(ValueError, match="null_label"):
        guided_model(net, y, cfg_scale=4.0)


def test_generate_conditional_and_unconditional_are_seeded():
    net = _ClassNet()
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    a = generate(net, noise, labels=labels, cfg_scale=3.0, null_label=10, num_steps=4)
    b = generate(net, noise, labels=labels, cfg_scale=3.0, null_label=10, num_steps=4)
    assert torch.equal(a, b) and a.shape == noise.shape
    uncond = generate(
        lambda x, t: -x,
        noise,
        sampler="sde",
        num_steps=4,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.isfinite(uncond).all()
    noise_model = generate(
        lambda x, t: x, noise, interpolant=Interpolant("linear", "noise"), num_steps=4
    )
    assert torch.isfinite(noise_model).all()
