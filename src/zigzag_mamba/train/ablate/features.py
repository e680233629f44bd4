"""A fixed feature space for Frechet distances that needs no download: random conv features.

FID needs Inception-v3 weights, which this library never downloads, and Inception features
of 16x16 crops say little anyway. :class:`RandomConvFeatures` is a small network whose weights
are drawn once from a seeded generator and never trained: at each of several scales, a bank
of random 3x3 filters, a ReLU, and the mean and standard deviation of every response map.

Why it is a fair proxy for comparing generators on small natural-image crops:

- it is identical for every model scored and for the real images (same seed, float64, CPU),
  and trained on neither, so it cannot favour one model;
- the spatial statistics of random-filter responses describe natural textures well enough to
  synthesise them (Ustyuzhaninov et al., 2017, "What does it take to generate natural
  textures?", matched the correlations of one layer of random filters at several scales); here
  the means capture colour and local contrast, the standard deviations how strongly edges and
  textures of each orientation and scale occur;
- three scales (the crop, and the crop average-pooled 2x and 4x) see structure from a few
  pixels up to most of a 16-pixel crop.

What it is not: FID. Its values are not comparable with any published FID, it knows nothing of
objects or semantics, and a global pooling ignores where in a crop things are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RandomConvFeatures(nn.Module):
    """Fixed random 3x3 filters at several scales -> (N, 2 * width * len(scales)) features.

    Args:
        channels: image channels.
        width: random filters per scale.
        scales: average-pooling factors at which the filters are applied.
        seed: draws the filters and biases; the same seed always gives the same network.

    Example::

        >>> net = RandomConvFeatures(channels=3)
        >>> net(torch.rand(5, 3, 16, 16) * 2 - 1).shape
        torch.Size([5, 96])
    """

    def __init__(
        self, channels: int = 3, width: int = 16, scales: tuple[int, ...] = (1, 2, 4), seed: int = 0
    ) -> None:
        super().__init__()
        self.scales = tuple(scales)
        g = torch.Generator().manual_seed(seed)
        fan_in = channels * 9
        # He-normal weights keep every ReLU map alive; small biases shift the thresholds.
        shape = (len(self.scales), width, channels, 3, 3)
        weight = torch.randn(shape, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5
        bias = torch.randn((len(self.scales), width), generator=g, dtype=torch.float64) * 0.1
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.double()
        features = []
        for k, scale in enumerate(self.scales):
            pooled = nn.functional.avg_pool2d(x, scale) if scale > 1 else x
            maps = nn.functional.relu(
                nn.functional.conv2d(pooled, self.weight[k], self.bias[k], padding=1)
            )
            features += [maps.mean(dim=(2, 3)), maps.std(dim=(2, 3))]
        return torch.cat(features, dim=1)
