"""Models: the ZigMa backbone, its presets, and loading of official checkpoints."""

from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone, ZigMaConfig
from zigzag_mamba.models.official import convert_official_state_dict, official_config

__all__ = [
    "CONFIGS",
    "ZigMaBackbone",
    "ZigMaConfig",
    "convert_official_state_dict",
    "official_config",
]
