"""The ``torch`` backend of ``permute_tokens``: ``index_select``, on every device."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]``; ``index_select`` is up to twice as fast as advanced indexing on the CPU."""
    return x.index_select(1, index)
