"""Embeddings of a ZigMa backbone: patches, timesteps, class labels, text context, positions.

Parameter names follow the official ZigMa checkpoints (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``), so that they load without renaming.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) table laid out [sin, cos], frequencies 1 / 10000^(2k/dim)."""
    if dim % 2:
        raise ValueError(f"a sin-cos table needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """The fixed 2-D position table of MAE (and the official ZigMa), shape (height*width, dim).

    Tokens are in raster order. The first half of the width encodes the column, the second half
    the row, each as :func:`sincos_1d`; computed in float64 on the CPU.

    Example::

        >>> sincos_2d(8, 2, 3).shape
        torch.Size([6, 8])
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (any real values) -> (B, dim) features laid out [cos, sin], in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens: (B, C, H, W) -> (B, H/p * W/p, D), raster order.

    Example::

        >>> PatchEmbed(2, 4, 64)(torch.randn(1, 4, 8, 6)).shape
        torch.Size([1, 12, 64])
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_channels, dim, patch_size, stride=patch_size, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        # Initialised like an nn.Linear over the flattened patch, as in DiT and ZigMa.
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


def unpatchify(x: torch.Tensor, grid: tuple[int, ...], patch_size: int) -> torch.Tensor:
    """Patch pixels back to images: (B, L, p*p*C) -> (B, C, H, W), or (B, T, C, H, W) for a
    (T, h, w) grid; each token's pixels laid out (p, q, C), as DiT's final layer writes them.

    Example::

        >>> unpatchify(torch.randn(2, 6, 2 * 2 * 3), (2, 3), 2).shape
        torch.Size([2, 3, 4, 6])
    """
    h, w = grid[-2:]
    p = patch_size
    if len(grid) == 3:
        return rearrange(x, "b (t h w) (p q c) -> b t c (h p) (w q)", h=h, w=w, p=p, q=p)
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


class TimestepEmbedder(nn.Module):
    """Diffusion time to a conditioning vector: (B,) -> (B, D).

    ``t`` is used as given (the backbone passes ``1000 * t`` for t in [0, 1]); sinusoidal
    features of width ``frequency_size`` feed a Linear-SiLU-Linear MLP.

    Example::

        >>> TimestepEmbedder(64)(torch.rand(3) * 1000).shape
        torch.Size([3, 64])
    """

    def __init__(
        self,
        dim: int,
        frequency_size: int = 256,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, dim, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(dim, dim, device=device, dtype=dtype),
        )

    def reset_parameters(self) -> None:
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to conditioning vectors: (B,) int -> (B, D), with label dropout for CFG.

    With ``dropout_prob > 0`` the table has one extra row, the "null" class ``num_classes``:
    in training each label is replaced by it with probability ``dropout_prob``, and
    classifier-free guidance passes it explicitly for the unconditional half of a batch.

    Example::

        >>> LabelEmbedder(10, 64, dropout_prob=0.1)(torch.tensor([3, 10])).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        dropout_prob: float = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or not 0.0 <= dropout_prob < 1.0:
            raise ValueError(
                f"need num_classes >= 1 and 0 <= dropout_prob < 1, got {num_classes}, "
                f"{dropout_prob}"
            )
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(rows, dim, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def check(self, labels: torch.Tensor) -> None:
        """Raise a clear error for labels without a row (reads the values, so: eager only)."""
        rows = self.embedding_table.num_embeddings
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(
                f"class labels must be a (B,) integer tensor, got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= rows):
            null = f" or {self.num_classes} (the null class)" if rows > self.num_classes else ""
            raise ValueError(
                f"class labels must be in [0, {self.num_classes - 1}]{null}; got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class ContextEmbedder(nn.Linear):
    """Projects text-encoder tokens to the model width: (B, S, context_dim) -> (B, S, D).

    A plain linear layer (its state-dict keys are the official ``y_embedder.{weight,bias}``);
    the backbone conditions on the mean of the projected tokens and cross-attends to all of them.

    Example::

        >>> ContextEmbedder(768, 64)(torch.randn(2, 77, 768)).shape
        torch.Size([2, 77, 64])
    """

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        if context.dim() != 3 or context.shape[-1] != self.in_features:
            raise ValueError(
                f"context must have shape (B, S, {self.in_features}), got {tuple(context.shape)}"
            )
        return super().forward(context)
