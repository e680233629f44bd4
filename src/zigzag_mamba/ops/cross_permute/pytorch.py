"""The ``torch`` backend of ``cross_permute`` and ``cross_merge``: one ``index_select`` each,
on every device."""

from __future__ import annotations

import torch


def permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, k, C) for k orders (k, L): one gather of k * L rows."""
    k, length = order.shape
    return x.index_select(1, order.t().reshape(-1)).view(x.shape[0], length, k, *x.shape[2:])


def merge(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, k, C) -> (B, L, C): at row r, the sum over j of row ``inverse[j, r]`` of order j."""
    k, length = inverse.shape
    # Row (i, j) of the (B, L * k, C) view is step i of order j.
    rows = inverse.t() * k + torch.arange(k, device=inverse.device)
    flat = y.reshape(y.shape[0], length * k, *y.shape[3:])
    return flat.index_select(1, rows.reshape(-1)).view(y.shape).sum(2)
