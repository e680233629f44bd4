"""ZigMa in other libraries' models (docs/integrations.md).

- :func:`replace_attention`: swap every attention of a vision transformer for a ZigMa mixer
  (:class:`~zigzag_mamba.modules.ZigMaMixer`): a Hugging Face transformers ViT (``ViTModel``,
  ``ViTForImageClassification``) or a timm ``VisionTransformer`` (or any model whose blocks
  hold an ``attn`` with timm's ``Attention`` signature). Needs neither package to be imported
  here: the model is recognised by its structure.
- :mod:`zigzag_mamba.integrations.diffusers`: ``ZigMaTransformer2DModel``, a diffusers model
  wrapping :class:`~zigzag_mamba.ZigMaBackbone`, and ``ZigMaPipeline``, which samples it with
  diffusers' ``FlowMatchEulerDiscreteScheduler`` (``pip install 'zigzag-mamba[diffusers]'``).

Importing :mod:`zigzag_mamba` never imports this package, transformers, timm or diffusers.
"""

from zigzag_mamba.integrations.grids import GridTracker
from zigzag_mamba.integrations.pretrained import from_pretrained
from zigzag_mamba.integrations.vit import ViTMixer, replace_attention
from zigzag_mamba.modules.block import ZigMaMixer

__all__ = ["GridTracker", "ViTMixer", "ZigMaMixer", "from_pretrained", "replace_attention"]
