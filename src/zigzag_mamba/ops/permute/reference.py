"""The definition of ``permute_tokens``: advanced indexing along the token axis."""

from __future__ import annotations

import torch


def permute_tokens_reference(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[:, order]``: the tokens of x (B, L, ...) in ``order``."""
    return x[:, order]
