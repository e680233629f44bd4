import math

import pytest
import torch

from zigzag_mamba.train.interpolant import PATHS, PREDICTIONS, Interpolant

T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


def test_linear_and_gvp_closed_forms():
    alpha, sigma, d_alpha, d_sigma = Interpolant("linear").coefficients(T)
    torch.testing.assert_close(alpha, T)
    torch.testing.assert_close(sigma, 1 - T)
    assert torch.all(d_alpha == 1) and torch.all(d_sigma == -1)
    alpha, sigma, d_alpha, d_sigma = Interpolant("gvp").coefficients(T)
    torch.testing.assert_close(alpha, torch.sin(math.pi * T / 2))
    torch.testing.assert_close(sigma, torch.cos(math.pi * T / 2))


def test_vp_matches_the_linear_beta_schedule():
    alpha, sigma, _, _ = Interpolant("vp").coefficients(T)
    # log alpha = -1/2 int_0^{1-t} beta(s) ds with beta(s) = 0.1 + 19.9 s, by the trapezoid rule
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for t, a in zip(T, alpha, strict=True):
        grid = s * (1 - t)
        integral = torch.trapezoid(0.1 + 19.9 * grid, grid)
        assert a.item() == pytest.approx(math.exp(-0.5 * integral.item()), rel=1e-9)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T))
    ends = Interpolant("vp").coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends[0][0].item() == pytest.approx(math.exp(-0.5 * (0.1 + 19.9 / 2)))
    assert ends[0][1].item() == 1.0 and ends[1][1].item() == 0.0


@pytest.mark.parametrize("path", PATHS)
def test_derivatives_match_finite_differences(path):
    itp, h = Interpolant(path), 1e-6
    _, _, d_alpha, d_sigma = itp.coefficients(T)
    hi, lo = itp.coefficients(T + h), itp.coefficients(T - h)
    torch.testing.assert_close(d_alpha, (hi[0] - lo[0]) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_sigma, (hi[1] - lo[1]) / (2 * h), rtol=1e-6, atol=1e-8)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, noise, t


def test_default_is_linear_velocity_with_target_data_minus_noise():
    x, noise, t = _batch()
    x_t, target = Interpolant().interpolate(x, noise, t)
    torch.testing.assert_close(
        x_t, t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    )
    torch.testing.assert_close(target, x - noise)
    assert Interpolant().train_interval() == (0.0, 1.0)
    assert Interpolant().sample_interval() == (0.0, 1.0)


@pytest.mark.parametrize("path", PATHS)
def test_targets(path):
    x, noise, t = _batch()
    h = 1e-6
    x_t, velocity = Interpolant(path, "velocity").interpolate(x, noise, t)
    ahead, _ = Interpolant(path).interpolate(x, noise, t + h)
    behind, _ = Interpolant(path).interpolate(x, noise, t - h)
    torch.testing.assert_close(velocity, (ahead - behind) / (2 * h), rtol=1e-6, atol=1e-6)
    assert torch.equal(Interpolant(path, "noise").interpolate(x, noise, t)[1], noise)
    # the score target is the gradient of log N(x_t; alpha x, sigma^2 I) in x_t
    _, score = Interpolant(path, "score").interpolate(x, noise, t)
    alpha, sigma, _, _ = (c[:, None, None, None] for c in Interpolant(path).coefficients(t))
    x_t = x_t.clone().requires_grad_(True)
    log_p = -(((x_t - alpha * x) / sigma) ** 2).sum() / 2
    (grad,) = torch.autograd.grad(log_p, x_t)
    torch.testing.assert_close(score, grad)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_converts_to_the_velocity(path, prediction):
    x, noise, t = _batch()
    x_t, velocity = Interpolant(path).interpolate(x, noise, t)
    itp = Interpolant(path, prediction)
    _, target = itp.interpolate(x, noise, t)
    torch.testing.assert_close(itp.to_velocity(target, x_t, t), velocity)
    torch.testing.assert_close(itp.velocity_fn(lambda *_: target)(x_t, t), velocity)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sigma_score_is_finite_at_both_ends(path):
    itp = Interpolant(path, "score")
    x, noise, _ = _batch(2)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x_t, velocity = Interpolant(path).interpolate(x, noise, t)
    sigma_score = itp.sigma_score(velocity, x_t, t)
    torch.testing.assert_close(sigma_score, -noise)  # sigma * (-noise / sigma)


def test_eps_only_moves_singular_ends_and_train_and_sample_eps_are_independent():
    vp = Interpolant("vp", train_eps=1e-4, sample_eps=1e-2)
    assert vp.train_interval() == (0.0, 1 - 1e-4)
    assert vp.sample_interval() == (0.0, 1 - 1e-2)
    noise = Interpolant("linear", "noise", train_eps=0.3, sample_eps=0.05)
    assert noise.train_interval() == (0.0, 1.0)
    assert noise.sample_interval() == (0.05, 1.0)
    assert Interpolant("gvp", "score").train_interval() == (0.0, 1 - 1e-5)


def test_sample_time_is_seeded_and_in_the_interval():
    itp = Interpolant("vp", train_eps=0.25)
    a = itp.sample_time(1000, generator=torch.Generator().manual_seed(3))
    b = itp.sample_time(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 0.75 and a.max() > 0.7


def test_default_loss_is_plain_mse_on_the_velocity():
    x, noise, t = _batch()
    itp = Interpolant()
    model = lambda x_t, t: 0.5 * x_t
    loss = itp.loss(model, x, noise=noise, t=t)
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    expected = ((0.5 * x_t - (x - noise)) ** 2).mean()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_velocity_weighting_is_the_mse_of_the_implied_velocity(path, prediction):
    x, noise, t = _batch()
    itp = Interpolant(path, prediction, "velocity")
    model = lambda x_t, t: 0.3 * x_t - 0.1  # any prediction will do
    x_t, velocity = Interpolant(path).interpolate(x, noise, t)
    implied = itp.to_velocity(model(x_t, t), x_t, t)
    expected = ((implied - velocity) ** 2).reshape(len(t), -1).mean(1).mean()
    torch.testing.assert_close(
        itp.loss(model, x, noise=noise, t=t).double(), expected, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_likelihood_weighting_is_sigma_times_the_score_error(prediction):
    x, noise, t = _batch()
    itp = Interpolant("gvp", prediction, "likelihood")
    score_itp = Interpolant("gvp", "score")
    model = lambda x_t, t: torch.sin(x_t)
    x_t, score = score_itp.interpolate(x, noise, t)
    # the score implied by the model's output, through the velocity
    velocity = itp.to_velocity(model(x_t, t), x_t, t)
    sigma = score_itp.coefficients(t)[1]
    implied = score_itp.sigma_score(velocity, x_t, t) / sigma[:, None, None, None]
    expected = (sigma * ((implied - score) ** 2).reshape(len(t), -1).mean(1)).mean()
    torch.testing.assert_close(
        itp.loss(model, x, noise=noise, t=t).double(), expected, rtol=1e-5, atol=0
    )


def test_bad_choices_are_rejected():
    with pytest.raises(ValueError, match="path must be one of"):
        Interpolant("cosine")
    with pytest.raises(ValueError, match="prediction"):
        Interpolant(prediction="x0")
