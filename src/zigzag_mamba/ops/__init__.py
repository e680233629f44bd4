"""Functional ops, each in its own package with a reference twin and its backends.

``selective_scan`` (the SSM), ``permute_tokens`` (token orders), ``cross_permute`` /
``cross_merge`` (k orders at once, for the cross mixer), ``mixer_in`` / ``mixer_out``
(the block's stages around the mixer) and ``causal_conv1d``; :func:`backends` reports what runs
where and :class:`use_backend` forces a backend (docs/design.md has the rules).
"""

from zigzag_mamba.ops.backends import backends, use_backend
from zigzag_mamba.ops.conv import FLOPS as _CONV_FLOPS
from zigzag_mamba.ops.conv import causal_conv1d, causal_conv1d_reference
from zigzag_mamba.ops.cross_permute import (
    cross_merge,
    cross_merge_reference,
    cross_permute,
    cross_permute_reference,
)
from zigzag_mamba.ops.mixer_io import (
    mixer_in,
    mixer_in_reference,
    mixer_out,
    mixer_out_reference,
)
from zigzag_mamba.ops.permute import (
    Permutation,
    inverse_order,
    permute_tokens,
    permute_tokens_reference,
)
from zigzag_mamba.ops.selective_scan import FLOPS as _SCAN_FLOPS
from zigzag_mamba.ops.selective_scan import selective_scan, selective_scan_reference
from zigzag_mamba.ops.ssm_branch import FLOPS as _BRANCH_FLOPS

#: The FLOP formulas of the ops that compute (each beside its op), for
#: ``torch.utils.flop_counter.FlopCounterMode(custom_mapping=FLOP_FORMULAS)``; not registered
#: there at import, since importing the flop counter imports Triton. The gathers and merges
#: move memory and count nothing.
FLOP_FORMULAS = {**_CONV_FLOPS, **_SCAN_FLOPS, **_BRANCH_FLOPS}

__all__ = [
    "FLOP_FORMULAS",
    "Permutation",
    "backends",
    "causal_conv1d",
    "causal_conv1d_reference",
    "cross_merge",
    "cross_merge_reference",
    "cross_permute",
    "cross_permute_reference",
    "inverse_order",
    "mixer_in",
    "mixer_in_reference",
    "mixer_out",
    "mixer_out_reference",
    "permute_tokens",
    "permute_tokens_reference",
    "selective_scan",
    "selective_scan_reference",
    "use_backend",
]
