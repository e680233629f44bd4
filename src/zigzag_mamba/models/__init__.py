"""Models: the ZigMa backbone, its presets, and loading of official checkpoints."""

from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone
from zigzag_mamba.models.official import convert_official_state_dict, official_config

__all__ = ["CONFIGS", "ZigMaBackbone", "convert_official_state_dict", "official_config"]
