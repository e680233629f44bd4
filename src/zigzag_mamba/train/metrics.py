"""Frechet distances in the feature space of any extractor network.

FID is the Frechet distance between Gaussians fitted to Inception-v3 pool features of real
and generated images. This module computes the distance for whatever ``nn.Module`` you pass;
to report a true FID, give it an Inception network loaded with the standard FID weights
(for example from the ``pytorch-fid`` or ``torch-fidelity`` packages; nothing here downloads
them) and feed it images prepared the way that network expects (``transform``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature distribution, in float64."""

    mean: Tensor
    cov: Tensor
    count: int


def feature_stats(features: Tensor | Iterable[Tensor]) -> GaussianStats:
    """Fit a Gaussian to (N, D) features, given at once or as an iterable of batches."""
    batches = [features] if isinstance(features, Tensor) else features
    total, outer, count = None, None, 0
    for batch in batches:
        batch = batch.detach().double().flatten(1).cpu()
        if total is None:
            total, outer = batch.sum(0), batch.T @ batch
        else:
            total, outer = total + batch.sum(0), outer + batch.T @ batch
        count += len(batch)
    if count < 2:
        raise ValueError("feature statistics need at least 2 samples")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return GaussianStats(mean, cov, count)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})``.

    The trace of the matrix square root is computed as the sum of the square roots of the
    eigenvalues of ``C_a^{1/2} C_b C_a^{1/2}``, which is symmetric, so no complex parts arise.

    Example::

        >>> x = torch.randn(500, 3)
        >>> frechet_distance(feature_stats(x), feature_stats(x)) < 1e-9
        True
    """
    root_a = _sqrt_psd(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (a.mean - b.mean).square().sum() + a.cov.trace() + b.cov.trace() - 2 * trace_root
    return float(distance.clamp_min(0))


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 256,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Run ``extractor`` (in eval mode) over ``images`` in batches; return (N, D) features."""
    was_training = extractor.training
    extractor.eval()
    weight = next(extractor.parameters(), None)  # parameter-free extractors are fine too
    device = images.device if weight is None else weight.device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        if transform is not None:
            batch = transform(batch)
        out.append(extractor(batch).flatten(1).cpu())
    extractor.train(was_training)
    return torch.cat(out)


class FrechetDistance:
    """A metric hook: the Frechet distance from generated images to a reference set.

    Args:
        extractor: any module mapping a batch of images to (N, D) features (or (N, D, 1, 1)).
        reference: real images, or precomputed :class:`GaussianStats` of their features.
        transform: applied to every batch before the extractor (resizing, normalising).
        name: the key it reports under.

    Calling it on ``(samples, labels)`` returns ``{name: distance}``, so it can be passed to
    :class:`~zigzag_mamba.train.trainer.Trainer` in ``metrics``.

    Example::

        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        >>> fd = FrechetDistance(net, torch.randn(200, 1, 8, 8))
        >>> sorted(fd(torch.randn(200, 1, 8, 8), None))
        ['fd']
    """

    def __init__(
        self,
        extractor: nn.Module,
        reference: Tensor | GaussianStats,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        batch_size: int = 256,
        name: str = "fd",
    ) -> None:
        self.extractor = extractor
        self.transform = transform
        self.batch_size = batch_size
        self.name = name
        self.reference = (
            reference if isinstance(reference, GaussianStats) else self.stats(reference)
        )

    def stats(self, images: Tensor) -> GaussianStats:
        features = extract_features(
            self.extractor, images, batch_size=self.batch_size, transform=self.transform
        )
        return feature_stats(features)

    def __call__(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return {self.name: frechet_distance(self.stats(samples), self.reference)}
