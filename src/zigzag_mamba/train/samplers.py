"""Samplers that carry noise at ``t = 0`` to data at ``t = 1`` along a velocity field.

``num_steps`` always means the number of steps on the uniform grid
``linspace(t_start, t_end, num_steps + 1)``: Euler makes one velocity call per step, Heun two,
and the Euler-Maruyama SDE one (its last step is a noise-free Euler step). ``dopri5`` and the other
torchdiffeq methods run through ``torchdiffeq.odeint`` when it is installed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from zigzag_mamba.train.interpolant import Interpolant, VelocityFn, time_dtype

# torchdiffeq's fixed-grid methods; they get a step size from num_steps.
_FIXED_GRID = ("midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: The ODE methods: the two built in, then torchdiffeq's (which need it installed).
ODE_METHODS = ("euler", "heun", *_ADAPTIVE, *_FIXED_GRID)


def _grid(t_start: float, t_end: float, num_steps: int) -> list[float]:
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=time_dtype(x), device=x.device)


def sample_ode(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    method: str = "euler",
    t_start: float = 0.0,
    t_end: float = 1.0,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """Integrate the probability-flow ODE from noise ``x0`` at ``t_start`` to ``t_end``.

    Args:
        velocity_fn: ``velocity_fn(x, t)`` with ``t`` of shape (B,), returning ``x``'s shape.
        x0: the state at ``t_start`` (noise when ``t_start`` is 0).
        num_steps: the number of steps on ``linspace(t_start, t_end, num_steps + 1)``. Ignored
            by torchdiffeq's adaptive methods, which use ``rtol`` and ``atol`` instead.
        method: ``"euler"`` (1 call a step, order 1), ``"heun"`` (2 calls a step, order 2), or
            any torchdiffeq method, e.g. ``"dopri5"`` (adaptive) or ``"rk4"``.

    Example::

        >>> x0 = torch.randn(16, 2)
        >>> x1 = sample_ode(lambda x, t: 3.0 - x0, x0, num_steps=4)  # straight lines to 3
        >>> torch.allclose(x1, torch.full_like(x1, 3.0))
        True
    """
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {', '.join(ODE_METHODS)}; got {method!r}")
    if method == "euler":
        return _euler(velocity_fn, x0, _grid(t_start, t_end, num_steps))
    if method == "heun":
        return _heun(velocity_fn, x0, _grid(t_start, t_end, num_steps))
    return _torchdiffeq(velocity_fn, x0, num_steps, method, t_start, t_end, rtol, atol)


def _euler(fn: VelocityFn, x: Tensor, grid: list[float]) -> Tensor:
    for t, t_next in itertools.pairwise(grid):
        x = x + (t_next - t) * fn(x, _times(x, t))
    return x


def _heun(fn: VelocityFn, x: Tensor, grid: list[float]) -> Tensor:
    for t, t_next in itertools.pairwise(grid):
        dt = t_next - t
        v = fn(x, _times(x, t))
        v_next = fn(x + dt * v, _times(x, t_next))
        x = x + 0.5 * dt * (v + v_next)
    return x


def _torchdiffeq(
    fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    method: str,
    t_start: float,
    t_end: float,
    rtol: float,
    atol: float,
) -> Tensor:
    try:
        from torchdiffeq import odeint
    except ImportError as exc:
        raise ImportError(
            f"ODE method {method!r} needs torchdiffeq (built in: 'euler', 'heun'); "
            "install it with: pip install torchdiffeq  (or the train extra, pip install -e "
            "'.[train]' in a clone)"
        ) from exc
    span = torch.tensor([t_start, t_end], dtype=time_dtype(x0), device=x0.device)
    options = {"step_size": (t_end - t_start) / num_steps} if method in _FIXED_GRID else None
    path = odeint(
        lambda t, x: fn(x, t.expand(x.shape[0])),
        x0,
        span,
        method=method,
        rtol=rtol,
        atol=atol,
        options=options,
    )
    return path[-1]


def sample_sde(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    interpolant: Interpolant | None = None,
    *,
    diffusion_scale: float = 1.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample the SDE ``dx = [v + (w_t / 2) score] dt + sqrt(w_t) dW`` with Euler-Maruyama.

    The SDE has the same marginals as the probability-flow ODE for any diffusion
    ``w_t = diffusion_scale * sigma_t``; the score comes from the velocity through
    ``interpolant`` (linear path by default). The last step is a noise-free Euler step, so
    ``num_steps`` steps cost ``num_steps`` velocity calls. Pass a seeded ``generator`` for
    reproducible samples.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = torch.randn(8, 2, generator=g)
        >>> x1 = sample_sde(lambda x, t: 1.0 - x0, x0, num_steps=10, generator=g)
        >>> x1.shape
        torch.Size([8, 2])
    """
    interpolant = interpolant or Interpolant()
    grid = _grid(t_start, t_end, num_steps)
    x = x0
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t
        times = _times(x, t)
        v = velocity_fn(x, times)
        if i == num_steps - 1:
            x = x + dt * v
            break
        # w_t = scale * sigma_t, so the drift's (w_t / 2) * score is (scale / 2) * sigma_t *
        # score, which stays finite at both ends even for a velocity model.
        drift = v + 0.5 * diffusion_scale * interpolant.sigma_score(v, x, times)
        w = diffusion_scale * interpolant.coefficients(times)[1]
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + dt * drift + (w * dt).sqrt().reshape(-1, *[1] * (x.dim() - 1)) * noise
    return x


def guided_model(
    model: nn.Module | Callable[..., Tensor],
    labels: Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    channels: Literal["all"] | int = "all",
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model(x, t, y)`` as a function of ``(x, t)`` with classifier-free guidance.

    The guided output is ``uncond + cfg_scale * (cond - uncond)``, with the unconditional pass
    using ``null_label`` (the backbone's extra class row, ``num_classes``). Guidance applies to
    every channel by default; ``channels=3`` guides only the first three and keeps the
    conditional output elsewhere, as DiT, SiT and ZigMa do on 4-channel latents. With
    ``labels=None`` the model runs unconditionally as ``model(x, t)``.

    Example::

        >>> net = lambda x, t, y: x * (y[:, None].float() + 1)
        >>> fn = guided_model(net, torch.tensor([2, 5]), cfg_scale=4.0, null_label=10)
        >>> fn(torch.ones(2, 3), torch.zeros(2)).shape
        torch.Size([2, 3])
    """
    if labels is None:
        return lambda x, t: model(x, t)
    if cfg_scale == 1.0 and null_label is None:
        return lambda x, t: model(x, t, labels)
    if null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the unconditional class id)")
    null = torch.full_like(labels, null_label)
    both_labels = torch.cat([labels, null])

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), both_labels)
        cond, uncond = out.chunk(2)
        mixed = uncond + cfg_scale * (cond - uncond)
        if channels == "all":
            return mixed
        return torch.cat([mixed[:, :channels], cond[:, channels:]], dim=1)

    return guided


@torch.no_grad()
def generate(
    model: nn.Module | Callable[..., Tensor],
    noise: Tensor,
    *,
    labels: Tensor | None = None,
    interpolant: Interpolant | None = None,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    channels: Literal["all"] | int = "all",
    sampler: Literal["ode", "sde"] = "ode",
    method: str = "heun",
    num_steps: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Turn ``noise`` into samples with a trained model (no gradients).

    Combines :func:`guided_model`, the interpolant's conversion to velocity and its default
    time interval, and :func:`sample_ode` or :func:`sample_sde`.

    Example::

        >>> net = lambda x, t, y: -x  # a stand-in for a trained ZigMaBackbone
        >>> out = generate(net, torch.randn(4, 1, 8, 8), labels=torch.arange(4),
        ...                cfg_scale=2.0, null_label=10, num_steps=5)
        >>> out.shape
        torch.Size([4, 1, 8, 8])
    """
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sampler must be 'ode' or 'sde', got {sampler!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    interpolant = interpolant or Interpolant()
    fn = interpolant.velocity_fn(
        guided_model(model, labels, cfg_scale=cfg_scale, null_label=null_label, channels=channels)
    )
    t_start, t_end = interpolant.sample_interval()
    if sampler == "sde":
        return sample_sde(
            fn, noise, num_steps, interpolant, t_start=t_start, t_end=t_end, generator=generator
        )
    return sample_ode(fn, noise, num_steps, method, t_start, t_end)
