import numpy as np
import pytest
import torch
from scipy import linalg

from zigzag_mamba.train.metrics import (
    FrechetDistance,
    GaussianStats,
    feature_stats,
    frechet_distance,
)


def _random_stats(dim, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return GaussianStats(torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim, 100)


def test_matches_the_definition_with_a_general_matrix_square_root():
    a, b = _random_stats(6, 0), _random_stats(6, 1)
    root = linalg.sqrtm(a.cov.numpy() @ b.cov.numpy()).real
    expected = ((a.mean - b.mean) ** 2).sum().item() + np.trace(
        a.cov.numpy() + b.cov.numpy() - 2 * root
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_diagonal_gaussians_have_the_closed_form():
    a = GaussianStats(
        torch.tensor([0.0, 1.0]).double(), torch.diag(torch.tensor([4.0, 1.0])).double(), 2
    )
    b = GaussianStats(
        torch.tensor([1.0, 1.0]).double(), torch.diag(torch.tensor([1.0, 9.0])).double(), 2
    )
    # |dm|^2 + sum (sqrt a - sqrt b)^2 = 1 + (2 - 1)^2 + (1 - 3)^2
    assert frechet_distance(a, b) == pytest.approx(6.0)


def test_feature_stats_accumulate_batches():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    whole, parts = feature_stats(x), feature_stats(x.split(64))
    torch.testing.assert_close(whole.mean, x.double().mean(0))
    torch.testing.assert_close(whole.cov, torch.cov(x.double().T))
    torch.testing.assert_close(parts.cov, whole.cov)
    assert parts.count == 300
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])


def test_hook_accepts_any_extractor_and_a_transform():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 1, 4, 4, generator=g)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
    metric = FrechetDistance(extractor, real, transform=lambda x: x * 2, batch_size=64, name="fid")
    same = metric(torch.randn(400, 1, 4, 4, generator=g))["fid"]
    shifted = metric(torch.randn(400, 1, 4, 4, generator=g) + 1)["fid"]
    assert 0 <= same < 0.5 < shifted
