"""Helpers shared by the training tests.

A Gaussian data distribution whose interpolant velocity is known in closed form.

With data ``X1 ~ N(m, S)`` and noise ``X0 ~ N(0, I)``, ``x_t = alpha X1 + sigma X0`` is Gaussian
with mean ``alpha m`` and covariance ``C_t = alpha^2 S + sigma^2 I``, and the velocity
``E[d_alpha X1 + d_sigma X0 | x_t = x]`` is
``d_alpha m + (alpha d_alpha S + sigma d_sigma I) C_t^{-1} (x - alpha m)``.
In the eigenbasis of ``S`` each coordinate ``y`` obeys ``dy/dt = (c_t' / 2 c_t) y`` with
``c_t = alpha^2 s + sigma^2``, so the flow is
``x_t = alpha_t m + C_t^{1/2} C_0^{-1/2} (x_0 - alpha_0 m)`` and, for paths with
``alpha_0 = 0, sigma_0 = 1``, ``X_1 = m + S^{1/2} X_0``.

Also a tiny conditional conv net and data set standing in for the backbone and real data, and
a fault injection for checkpoint files.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zigzag_mamba.train.interpolant import Interpolant


class GaussianTarget:
    def __init__(self, mean: Tensor, cov: Tensor, interpolant: Interpolant) -> None:
        self.mean = mean.double()
        self.cov = cov.double()
        self.eigvals, self.basis = torch.linalg.eigh(self.cov)
        self.interpolant = interpolant

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in self.interpolant.coefficients(t))
        gain = (alpha * d_alpha * self.eigvals + sigma * d_sigma) / (
            alpha**2 * self.eigvals + sigma**2
        )
        centred = (x - alpha * self.mean) @ self.basis
        return d_alpha * self.mean + (gain * centred) @ self.basis.T

    def exact_map(self, x0: Tensor) -> Tensor:
        """Where the flow from t = 0 (alpha 0, sigma 1) lands at t = 1."""
        return self.mean + (x0 @ self.basis) * self.eigvals.sqrt() @ self.basis.T


def example_target(path: str = "linear") -> GaussianTarget:
    mean = torch.tensor([1.5, -0.5], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    return GaussianTarget(mean, cov, Interpolant(path))


class TinyNet(torch.nn.Module):
    """A small conditional conv net standing in for the backbone: forward(x, t, y) -> x.shape."""

    def __init__(self, channels: int = 1, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.time = torch.nn.Linear(1, width)
        self.label = torch.nn.Embedding(num_classes + 1, width)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(x) + self.time(t[:, None].to(x.dtype))[:, :, None, None]
        if y is not None:
            h = h + self.label(y)[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


class TinyData(torch.utils.data.Dataset):
    """40 labelled 1x4x4 images: 5 micro-batches of 8 per epoch, so short runs cross epochs."""

    num_classes = 4

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
        self.y = torch.arange(n) % self.num_classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def tiny_config(out_dir, **overrides):
    from zigzag_mamba.train.config import TrainConfig

    values = dict(
        out_dir=str(out_dir),
        steps=6,
        batch_size=16,
        grad_accum=2,
        lr=1e-2,
        ema_decay=0.9,
        log_every=2,
        ckpt_every=0,
        sample_every=0,
        sample_steps=2,
        grid_rows=2,
        grid_columns=2,
        progress=False,
        weight_decay=0.01,
    )
    values.update(overrides)
    return TrainConfig(**values)


def flip_bit_in_tensor_data(path, tensor: Tensor) -> None:
    """Flip one bit inside the stored bytes of ``tensor`` in the file ``path`` (a fault
    injection: the tensor is found by its first 64 bytes, the bit flipped a little further)."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.numpy().tobytes()[:64])
    assert start > 0, "the tensor's bytes were not found in the file"
    data[start + 20] ^= 0x04
    path.write_bytes(bytes(data))
