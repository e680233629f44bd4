"""The definition of the causal depthwise conv1d: a grouped ``F.conv1d`` after left padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """A grouped ``F.conv1d`` over the sequence padded with K - 1 zeros on the left."""
    length = x.shape[2]
    # An empty sequence gets one more zero on the right (conv1d needs K inputs); its one output
    # is then cut off, which keeps the empty result attached to the graph.
    padded = F.pad(x, (weight.shape[1] - 1, int(length == 0)))
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[1])[..., :length]
    return out if activation is None else F.silu(out)
