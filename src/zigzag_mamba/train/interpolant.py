"""Stochastic interpolants between Gaussian noise and data.

Time runs the SiT code way: ``t = 0`` is pure noise and ``t = 1`` is data, with

    x_t = alpha_t * x_data + sigma_t * noise.

The SiT and ZigMa papers write time the other way round; ``paper_t = 1 - t``.

Paths (``alpha_t``, ``sigma_t``):

- ``linear``: ``t``, ``1 - t`` (rectified flow; velocity target ``x_data - noise``);
- ``gvp``: ``sin(pi t / 2)``, ``cos(pi t / 2)`` (variance preserving, trigonometric);
- ``vp``: the DDPM/score-SDE schedule with ``beta`` rising linearly from 0.1 to 20 over paper
  time, i.e. ``alpha_t = exp(-1/2 * int_0^{1-t} beta)`` and ``sigma_t = sqrt(1 - alpha_t^2)``.

A model predicts one of three things at ``(x_t, t)``:

- ``velocity``: ``d_alpha * x_data + d_sigma * noise`` (the probability-flow drift);
- ``noise``: ``noise``;
- ``score``: ``-noise / sigma_t`` (the score of ``x_t`` given ``x_data``).

Every prediction converts to a velocity (:meth:`Interpolant.to_velocity`), which is what the
samplers integrate. The conversions from noise and score divide by ``alpha_t`` and the VP
derivatives by ``sigma_t``, so those choices keep ``eps`` away from the singular ends of time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

PathName = Literal["linear", "gvp", "vp"]
Prediction = Literal["velocity", "noise", "score"]
Weighting = Literal["none", "velocity", "likelihood"]

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
WEIGHTINGS = ("none", "velocity", "likelihood")

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class Interpolant:
    """A noise-to-data path, the quantity the model predicts, and the training loss.

    Args:
        path: ``"linear"``, ``"gvp"`` or ``"vp"``.
        prediction: ``"velocity"``, ``"noise"`` or ``"score"``.
        weighting: per-sample loss weight. ``"none"`` is plain MSE on the prediction.
            ``"velocity"`` weights the error so that it equals the squared error of the velocity
            the prediction implies. ``"likelihood"`` weights it as the squared error of the
            implied score times the default SDE diffusion ``w_t = sigma_t``, the weighting
            under which the loss bounds the KL divergence of the SDE sampler.
        train_eps: training times are drawn from ``U[t0, t1]``; where the target or the loss
            weight is singular at an end of ``[0, 1]``, that end moves in by ``train_eps``. The
            default (linear or gvp, velocity, plain MSE) is regular: ``t ~ U[0, 1]``.
        sample_eps: the same for the sampler's default interval (:meth:`sample_interval`),
            independent of ``train_eps``.
        vp_beta: ``(beta_min, beta_max)`` of the VP path.

    Example::

        >>> itp = Interpolant()  # linear path, velocity prediction, plain MSE
        >>> x, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        >>> x_t, target = itp.interpolate(x, noise, torch.rand(4))
        >>> torch.allclose(target, x - noise)
        True
    """

    def __init__(
        self,
        path: PathName = "linear",
        prediction: Prediction = "velocity",
        weighting: Weighting = "none",
        *,
        train_eps: float = 1e-5,
        sample_eps: float = 1e-3,
        vp_beta: tuple[float, float] = (0.1, 20.0),
    ) -> None:
        _check_choice("path", path, PATHS)
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("weighting", weighting, WEIGHTINGS)
        self.path = path
        self.prediction = prediction
        self.weighting = weighting
        self.vp_beta = vp_beta
        self.train_eps = float(train_eps)
        self.sample_eps = float(sample_eps)

    def __repr__(self) -> str:
        return (
            f"Interpolant(path={self.path!r}, prediction={self.prediction!r}, "
            f"weighting={self.weighting!r}, train_eps={self.train_eps}, "
            f"sample_eps={self.sample_eps})"
        )

    # -- the path --------------------------------------------------------------------------

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(alpha, sigma, d_alpha, d_sigma)`` at code time ``t`` (any shape)."""
        if self.path == "linear":
            one = torch.ones_like(t)
            return t, 1 - t, one, -one
        if self.path == "gvp":
            half_pi = math.pi / 2
            s, c = torch.sin(half_pi * t), torch.cos(half_pi * t)
            return s, c, half_pi * c, -half_pi * s
        return self._vp_coefficients(t)

    def _vp_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b0, b1 = self.vp_beta
        s = 1 - t  # paper time
        log_alpha = -0.5 * (b0 * s + 0.5 * (b1 - b0) * s**2)
        alpha = torch.exp(log_alpha)
        # d/dt = -d/ds, and d(log_alpha)/ds = -beta(s) / 2.
        d_alpha = alpha * 0.5 * (b0 + (b1 - b0) * s)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))  # 1 - alpha^2 without cancellation
        d_sigma = -alpha * d_alpha / sigma
        return alpha, sigma, d_alpha, d_sigma

    def _coefficients_like(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(time_dtype(x))
        return self.coefficients(t)

    # -- training --------------------------------------------------------------------------

    def train_interval(self) -> tuple[float, float]:
        """The interval training times are drawn from (uniformly)."""
        # Targets and weights divide by sigma (zero at t = 1) for VP, scores and the likelihood
        # weighting, and by alpha (zero at t = 0 off VP) for the velocity weighting of noise
        # and score predictions.
        near_zero = (
            self.weighting == "velocity" and self.prediction != "velocity" and self.path != "vp"
        )
        near_one = self.path == "vp" or self.prediction == "score" or self.weighting == "likelihood"
        return _interval(self.train_eps, near_zero, near_one)

    def sample_interval(self) -> tuple[float, float]:
        """The ``(t_start, t_end)`` that samplers should integrate over by default."""
        # Converting noise or score to velocity divides by alpha; VP's d_sigma by sigma.
        near_zero = self.prediction != "velocity" and self.path != "vp"
        return _interval(self.sample_eps, near_zero, self.path == "vp")

    def sample_time(
        self, batch: int, *, generator: torch.Generator | None = None, device=None
    ) -> Tensor:
        """Draw ``batch`` training times uniformly from :meth:`train_interval`."""
        t0, t1 = self.train_interval()
        u = torch.rand(batch, generator=generator, device=device)
        return t0 + (t1 - t0) * u

    def interpolate(self, x_data: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_t, target)`` for data, noise of its shape and times ``t`` of shape (B,).

        The target is what a model of this interpolant's ``prediction`` type should output.
        """
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(t, x_data)
        x_t = alpha * x_data + sigma * noise
        if self.prediction == "velocity":
            target = d_alpha * x_data + d_sigma * noise
        elif self.prediction == "noise":
            target = noise
        else:
            target = -noise / sigma
        return x_t, target

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weight of the squared error at times ``t`` (None for plain MSE)."""
        if self.weighting == "none" or (
            self.weighting == "velocity" and self.prediction == "velocity"
        ):
            return None
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t.double())
        # Errors in the three predictions are multiples of the noise error e:
        #   velocity -(det / alpha) e, noise e, score -e / sigma,
        # with det = d_alpha * sigma - alpha * d_sigma (> 0 on every path).
        det = d_alpha * sigma - alpha * d_sigma
        if self.weighting == "velocity":
            weight = (
                (det / alpha) ** 2 if self.prediction == "noise" else (det * sigma / alpha) ** 2
            )
        elif self.prediction == "velocity":  # likelihood: sigma * (score error)^2
            weight = alpha**2 / (det**2 * sigma)
        else:
            weight = 1 / sigma if self.prediction == "noise" else sigma
        return weight.to(t.dtype)

    def loss(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x_data: Tensor,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean training loss of ``model_fn(x_t, t)`` on a batch of data.

        ``noise`` and ``t`` are drawn (from ``generator``) when not given.

        Example::

            >>> itp = Interpolant("gvp")
            >>> model = lambda x, t: torch.zeros_like(x)
            >>> itp.loss(model, torch.randn(8, 2)).shape
            torch.Size([])
        """
        if noise is None:
            noise = torch.randn(
                x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype
            )
        if t is None:
            t = self.sample_time(x_data.shape[0], generator=generator, device=x_data.device)
        x_t, target = self.interpolate(x_data, noise, t)
        error = (model_fn(x_t, t).float() - target.float()) ** 2
        per_sample = error.reshape(error.shape[0], -1).mean(dim=1)
        weight = self.loss_weight(t)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.dtype)
        return per_sample.mean()

    # -- sampling --------------------------------------------------------------------------

    def to_velocity(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a model output of this interpolant's ``prediction`` type into a velocity."""
        if self.prediction == "velocity":
            return prediction
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(t, x_t)
        # From x_t = alpha x + sigma n and v = d_alpha x + d_sigma n, eliminating x:
        #   v = (d_alpha / alpha) x_t + (d_sigma - d_alpha sigma / alpha) n.
        noise = prediction if self.prediction == "noise" else -sigma * prediction
        return (d_alpha * x_t + (alpha * d_sigma - d_alpha * sigma) * noise) / alpha

    def sigma_score(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``sigma_t`` times the score implied by a velocity (finite wherever alpha or sigma is 0).

        Eliminating the data from ``x_t`` and ``v`` gives the noise,
        ``n = (alpha v - d_alpha x_t) / (alpha d_sigma - d_alpha sigma)``, and the score is
        ``-n / sigma``; multiplying by ``sigma`` removes the only division that can blow up.
        """
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(t, x_t)
        return (alpha * velocity - d_alpha * x_t) / (d_alpha * sigma - alpha * d_sigma)

    def velocity_fn(self, model_fn: Callable[[Tensor, Tensor], Tensor]) -> VelocityFn:
        """Wrap ``model_fn(x_t, t)`` (this interpolant's prediction type) as a velocity field."""
        if self.prediction == "velocity":
            return model_fn
        return lambda x, t: self.to_velocity(model_fn(x, t), x, t)


def _interval(eps: float, near_zero: bool, near_one: bool) -> tuple[float, float]:
    return (eps if near_zero else 0.0, 1.0 - eps if near_one else 1.0)


def time_dtype(x: Tensor) -> torch.dtype:
    """Times carry at least fp32 precision, and fp64 when the state is fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
