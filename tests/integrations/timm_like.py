"""A small model shaped like timm's VisionTransformer: the duck-typed contract of
replace_attention, testable without timm (which needs torchvision).

Its parts have timm's names and calling conventions: ``patch_embed.proj`` (the patch Conv2d)
and ``patch_embed.grid_size``, ``cls_token``, ``reg_token``, ``num_prefix_tokens``, and
``blocks``, a Sequential of blocks whose ``attn`` is called as ``attn(norm1(x),
attn_mask=attn_mask, is_causal=is_causal)`` and maps (B, N, C) to (B, N, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm.layers.Attention's parameters and signature."""

    def __init__(self, dim: int, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn if attn is not None else Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class TimmLikeViT(nn.Module):
    """Class token + ``reg_tokens`` register tokens, any image size (no position table)."""

    def __init__(
        self,
        img_size=(8, 8),
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=2,
        reg_tokens=2,
        num_classes=10,
        attn_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.num_prefix_tokens = 1 + reg_tokens
        self.blocks = nn.Sequential(*[Block(embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.attn_mask = attn_mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        if self.attn_mask is not None:
            for block in self.blocks:
                x = block(x, attn_mask=self.attn_mask)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])
