"""Functional ops, each with a reference twin; devices pick their kernels via torch.library."""

from zigzag_mamba.ops.backends import backends, use_backend
from zigzag_mamba.ops.permute import inverse_order, permute_tokens, permute_tokens_reference

__all__ = [
    "backends",
    "inverse_order",
    "permute_tokens",
    "permute_tokens_reference",
    "use_backend",
]
