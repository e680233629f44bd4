"""Functional ops, each with a reference twin; devices pick their kernels via torch.library."""

from zigzag_mamba.ops.backends import backends, use_backend
from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.fused import scan_in, scan_out
from zigzag_mamba.ops.permute import inverse_order, permute_tokens, permute_tokens_reference
from zigzag_mamba.ops.selective_scan import selective_scan, selective_scan_reference

__all__ = [
    "backends",
    "causal_conv1d",
    "inverse_order",
    "permute_tokens",
    "permute_tokens_reference",
    "scan_in",
    "scan_out",
    "selective_scan",
    "selective_scan_reference",
    "use_backend",
]
