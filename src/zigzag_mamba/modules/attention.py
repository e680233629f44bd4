"""Cross-attention from image tokens to text tokens, as in the text-conditioned ZigMa block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, L, D) over a context (B, S, context_dim) -> (B, L, D).

    ``heads`` x ``dim_head`` is the inner width (8 x 64 in ZigMa, whatever D is); q, k, v have no
    bias, the output projection has one. Parameter names are the official ones (``to_q``,
    ``to_k``, ``to_v``, ``to_out.0``).

    Example::

        >>> attn = CrossAttention(64, context_dim=32)
        >>> attn(torch.randn(2, 16, 64), torch.randn(2, 7, 32)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        context_dim = query_dim if context_dim is None else context_dim
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **factory)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **factory)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **factory)
        # A Sequential so that the key is the official "to_out.0" (their index 1 was a Dropout).
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **factory))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b l (heads d) -> b heads l d", heads=self.heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        width = self.to_k.in_features
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != width:
            raise ValueError(
                f"context must have shape (B, S, context_dim) = ({x.shape[0]}, S, {width}), got "
                f"{tuple(context.shape)}"
            )
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b heads l d -> b l (heads d)"))
