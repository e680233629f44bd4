"""Token orders: which token the selective scan reads at each step, for every layer.

Convention: ``order[i]`` is the raster index ``r * W + c`` of the token visited at step ``i``;
permuting is the gather ``x[:, order]`` and unpermuting the gather with ``inverse``, the
``argsort(order)`` (docs/design.md, "Glossary").

A *pattern* names a family of orders; layer ``i`` uses ``family[i % len(family)]`` (a layer
that reads k orders at once, a cross mixer's, reads ``family[(i * k + j) % len(family)]``):

==================  ===============================================================
``zigzag{1,2,4,8}``  ZigMa's snakes S0..S(k-1): 4 start corners x (row snake, column snake)
``sweep``            raster order in every layer
``sweep2``           raster, reversed raster
``sweep4``           row-major, row-major reversed, column-major, column-major reversed
``hilbert{1,2,4,8}`` a generalised Hilbert curve (any H x W, every step a 4-neighbour move),
                     then its transpose, for each of the 4 start corners (then walked
                     backwards, ... until k are distinct; see docs/orders.md)
``random{1,2,4,8}``  seeded random permutations, identical in every process
``video_<s|t...>``   for (T, H, W) grids: layer d reads along ``string[d % len]``; an ``s``
                     layer reads each frame as its own sequence in the next zigzag order, a ``t``
                     layer reads each pixel's time series, alternately forward and backward
==================  ===============================================================

Video orders are 2-D: ``(num_sequences, seq_len)``, ``(T, H*W)`` for ``s`` and ``(H*W, T)`` for
``t`` layers; flattened, they are permutations of the ``T*H*W`` tokens laid out ``(t, h, w)``.

The patterns and their orders live in :mod:`.patterns`; a layer's order on a grid, built once
and kept, with its inverse and its prefix tokens, in :mod:`.layout`; :class:`ZigzagScan`, one
layer's order as a module (for any grid, with optional prefix tokens), in :mod:`.zigzag`.
"""

from zigzag_mamba.orders.layout import (
    CACHE_SIZE,
    PREFIX_POSITIONS,
    Layout,
    check_num_orders,
    check_num_prefix_tokens,
    check_prefix_position,
    layer_layout,
    with_prefix,
)
from zigzag_mamba.orders.patterns import (
    _PATTERNS,
    NO_PATTERN,
    ExplicitOrders,
    Grid,
    Orders,
    PatternBuilder,
    as_grid,
    check_layer_idx,
    check_order,
    check_pattern,
    is_video_pattern,
    layer_orders,
    list_patterns,
    pattern_family,
    register_pattern,
    zigzag_orders,
)
from zigzag_mamba.orders.zigzag import ZigzagScan

__all__ = [
    "CACHE_SIZE",
    "NO_PATTERN",
    "PREFIX_POSITIONS",
    "_PATTERNS",
    "ExplicitOrders",
    "Grid",
    "Layout",
    "Orders",
    "PatternBuilder",
    "ZigzagScan",
    "as_grid",
    "check_layer_idx",
    "check_num_orders",
    "check_num_prefix_tokens",
    "check_order",
    "check_pattern",
    "check_prefix_position",
    "is_video_pattern",
    "layer_layout",
    "layer_orders",
    "list_patterns",
    "pattern_family",
    "register_pattern",
    "with_prefix",
    "zigzag_orders",
]
