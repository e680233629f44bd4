"""The definition of ``cross_permute`` and ``cross_merge``: one gather per order, in a loop."""

from __future__ import annotations

import torch


def cross_permute_reference(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) read in each of the k orders (k, L): (B, L, k, C), ``out[:, i, j] =
    x[:, order[j, i]]``."""
    return torch.stack([x[:, o] for o in order], dim=2)


def cross_merge_reference(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """y (B, L, k, C), one sequence per order, each put back in raster order and summed: (B, L,
    C), ``out[:, r] = sum_j y[:, inverse[j, r], j]``."""
    return sum(y[:, inv, j] for j, inv in enumerate(inverse))
