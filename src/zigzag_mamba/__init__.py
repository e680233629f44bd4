"""zigzag-mamba: ZigMa's zigzag-scan Mamba layers for vision.

Importing this package loads no optional dependency (Triton, mamba-ssm, causal-conv1d) and
touches no CUDA API; fast paths are probed at first use.
"""

from zigzag_mamba import orders
from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone, ZigMaConfig
from zigzag_mamba.modules.block import ZigMaBlock
from zigzag_mamba.modules.mamba import Mamba
from zigzag_mamba.ops.backends import backends, use_backend
from zigzag_mamba.orders import ZigzagScan, layer_orders, list_patterns, register_pattern

__version__ = "0.1.0"

__all__ = [
    "CONFIGS",
    "Mamba",
    "ZigMaBackbone",
    "ZigMaBlock",
    "ZigMaConfig",
    "ZigzagScan",
    "__version__",
    "backends",
    "layer_orders",
    "list_patterns",
    "orders",
    "register_pattern",
    "use_backend",
]
