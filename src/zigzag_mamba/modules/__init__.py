"""Layers: the Mamba mixer, the ZigMa block, embeddings and cross-attention."""

from zigzag_mamba.modules.attention import CrossAttention
from zigzag_mamba.modules.block import ZigMaBlock, ZigMaMixer
from zigzag_mamba.modules.embed import (
    ContextEmbedder,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    timestep_embedding,
)
from zigzag_mamba.modules.mamba import BiMamba, Mamba

__all__ = [
    "BiMamba",
    "ContextEmbedder",
    "CrossAttention",
    "LabelEmbedder",
    "Mamba",
    "PatchEmbed",
    "TimestepEmbedder",
    "ZigMaBlock",
    "ZigMaMixer",
    "sincos_2d",
    "timestep_embedding",
]
