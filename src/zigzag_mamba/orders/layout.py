"""A layer's layout: the one place where the order of a (pattern, grid, layer, prefix) is built,
checked and kept.

:func:`layer_layout` builds the layer's order from its pattern's family (checked by
:func:`~zigzag_mamba.orders.patterns.pattern_family`), puts the prefix tokens at their slot,
and returns it with its inverse as a :class:`~zigzag_mamba.ops.permute.Permutation`, on the
device asked for. Results are kept in one cache of the last :data:`CACHE_SIZE` layouts, CPU and
device copies alike; everything else (:class:`~zigzag_mamba.ZigzagScan`, the custom op that
serves ``torch.compile``) asks it.

Prefix tokens: the tokens are ``[k prefix tokens, the grid's tokens in raster order]``. The
grid's order is shifted by k and the prefix tokens are placed at one slot of the scanned
sequence, together and in their own order: at its end by default, where a causal scan has read
every grid token before it reaches them (docs/block.md, "Prefix tokens").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from zigzag_mamba.ops.permute import Permutation, inverse_order
from zigzag_mamba.orders.patterns import (
    _PATTERNS,
    ExplicitOrders,
    Grid,
    PatternBuilder,
    _is_int,
    as_grid,
    check_layer_idx,
    check_pattern,
    is_video_pattern,
    pattern_family,
)

#: How many layouts (one layer, grid, prefix and device each) are kept.
CACHE_SIZE = 512
#: Where the prefix tokens sit in each scanned sequence.
PREFIX_POSITIONS = ("end", "middle", "start")
_CPU = torch.device("cpu")


class Layout(NamedTuple):
    """What permuting the tokens of one grid for one layer needs: the flat order and its
    inverse (L,), or (k, L) for a layer that reads k orders at once (a cross mixer's), and the
    length of each scanned sequence (L, or a frame's or a pixel's length for video)."""

    permutation: Permutation
    seq_len: int


def check_num_prefix_tokens(value: object) -> int:
    """``num_prefix_tokens`` as an int, if it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {value!r}")
    return int(value)


def check_prefix_position(value: object) -> str:
    """``prefix_position`` if it is one of :data:`PREFIX_POSITIONS`."""
    if value not in PREFIX_POSITIONS:
        raise ValueError(f"prefix_position must be one of {PREFIX_POSITIONS}, got {value!r}")
    return value


def prefix_slot(num_grid_tokens: int, position: str) -> int:
    """The step of the scanned sequence at which the prefix tokens are read."""
    return {"start": 0, "middle": num_grid_tokens // 2, "end": num_grid_tokens}[position]


def with_prefix(order: torch.Tensor, num_prefix_tokens: int, position: str = "end") -> torch.Tensor:
    """An order of ``num_prefix_tokens + L`` tokens laid out ``[prefix, grid tokens]``: the
    grid's (L,) order shifted past the prefix, with the prefix tokens inserted at its slot.

    Example::

        >>> with_prefix(torch.tensor([2, 0, 1]), 1).tolist()  # the class token read last
        [3, 1, 2, 0]
        >>> with_prefix(torch.tensor([2, 0, 1, 3]), 2, "middle").tolist()
        [4, 2, 0, 1, 3, 5]
    """
    k = num_prefix_tokens
    if k == 0:
        return order
    slot = prefix_slot(order.numel(), position)
    prefix = torch.arange(k, dtype=order.dtype, device=order.device)
    return torch.cat([order[:slot] + k, prefix, order[slot:] + k])


def check_num_orders(value: object) -> int:
    """``num_orders`` as an int, if it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"num_orders (orders read by one layer) must be an int >= 1, got {value!r}"
        )
    return int(value)


def layer_layout(
    pattern: str | torch.Tensor | Sequence,
    grid: int | Sequence[int],
    layer_idx: int = 0,
    *,
    num_prefix_tokens: int = 0,
    prefix_position: str = "end",
    num_orders: int = 1,
    device: torch.device | str | None = None,
) -> Layout:
    """The layout of layer ``layer_idx`` of ``pattern`` on ``grid``, on ``device`` (the CPU by
    default), built once and kept (the result is shared: do not change it in place).

    A layer reads order ``layer_idx % K`` of the pattern's K orders; with ``num_orders=k`` it
    reads k at once (a cross mixer), orders ``(layer_idx * k + j) % K`` for j < k, as (k, L)
    tensors: with k = K every layer reads them all.

    Example::

        >>> layout = layer_layout("zigzag8", (2, 3), layer_idx=1, num_prefix_tokens=1)
        >>> layout.permutation.order.tolist(), layout.seq_len
        ([1, 4, 5, 2, 3, 6, 0], 7)
        >>> layer_layout("sweep4", (2, 2), num_orders=4).permutation.order.tolist()
        [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3], [3, 1, 2, 0]]
    """
    pattern = check_pattern(pattern)
    return _layout(
        pattern,
        _PATTERNS.get(pattern) if isinstance(pattern, str) else None,
        as_grid(grid),
        check_layer_idx(layer_idx),
        check_num_prefix_tokens(num_prefix_tokens),
        check_prefix_position(prefix_position),
        _CPU if device is None else torch.device(device),
        check_num_orders(num_orders),
    )


@functools.lru_cache(maxsize=CACHE_SIZE)
def _layout(
    pattern: str | ExplicitOrders,
    builder: PatternBuilder | None,  # in the key, so that a replaced builder is not served
    grid: Grid,
    layer_idx: int,
    num_prefix_tokens: int,
    prefix_position: str,
    device: torch.device,
    num_orders: int = 1,
) -> Layout:
    options = (num_prefix_tokens, prefix_position)
    if device != _CPU:
        cpu = _layout(pattern, builder, grid, layer_idx, *options, _CPU, num_orders)
        return Layout(cpu.permutation.to(device), cpu.seq_len)
    if num_orders > 1:
        return _stacked(pattern, builder, grid, layer_idx, *options, num_orders)
    family = pattern_family(pattern, grid)
    order = family[layer_idx % len(family)]
    if num_prefix_tokens:
        if order.dim() == 2 and order.shape[0] > 1:
            raise ValueError(
                "num_prefix_tokens needs orders that read all tokens as one sequence; this "
                f"layer's order on grid {grid} has {order.shape[0]} sequences"
            )
        order = with_prefix(order.reshape(-1), num_prefix_tokens, prefix_position)
    flat = order.reshape(-1)
    return Layout(Permutation(flat, inverse_order(flat)), order.shape[-1])


def _stacked(
    pattern: str | ExplicitOrders,
    builder: PatternBuilder | None,
    grid: Grid,
    layer_idx: int,
    num_prefix_tokens: int,
    prefix_position: str,
    num_orders: int,
) -> Layout:
    """The CPU layout of a layer that reads ``num_orders`` orders at once, (k, L) tensors."""
    options = (num_prefix_tokens, prefix_position, _CPU)
    layouts = [
        _layout(pattern, builder, grid, layer_idx * num_orders + j, *options)
        for j in range(num_orders)
    ]
    if any(layout.seq_len != layout.permutation.order.numel() for layout in layouts):
        raise ValueError(
            f"a layer that reads {num_orders} orders at once needs orders that read all tokens "
            f"as one sequence; pattern {pattern!r} splits the tokens of grid {grid} into "
            "sequences (video patterns do)"
        )
    return Layout(Permutation.stack([layout.permutation for layout in layouts]), layouts[0].seq_len)


def sequence_length(name: str, grid: Grid, layer_idx: int, num_prefix_tokens: int) -> int:
    """The scanned sequence's length for a named pattern, from the names alone (no orders)."""
    if is_video_pattern(name):
        axes = name.removeprefix("video_")
        return grid[0] if axes[layer_idx % len(axes)] == "t" else grid[1] * grid[2]
    return num_prefix_tokens + math.prod(grid)


def traced_layout(
    like: torch.Tensor,
    name: str,
    grid: Grid,
    layer_idx: int,
    k: int,
    position: str,
    num_orders: int = 1,
) -> Layout:
    """:func:`layer_layout` of a named pattern inside ``torch.compile``: the orders come from a
    custom op, so the graph stays whole (a new grid recompiles, as the grid is a constant)."""
    order, inverse = _grid_orders(like, name, layer_idx, list(grid), k, position, num_orders)
    return Layout(Permutation(order, inverse), sequence_length(name, grid, layer_idx, k))


@torch.library.custom_op("zigzag_mamba::grid_orders", mutates_args=())
def _grid_orders(
    like: torch.Tensor,
    pattern: str,
    layer_idx: int,
    grid: list[int],
    num_prefix_tokens: int,
    prefix_position: str,
    num_orders: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat order and inverse of a named pattern's layer on ``grid`` ((k, L) for
    ``num_orders`` k > 1), on ``like``'s device."""
    options = {
        "num_prefix_tokens": num_prefix_tokens,
        "prefix_position": prefix_position,
        "num_orders": num_orders,
    }
    layout = layer_layout(pattern, tuple(grid), layer_idx, **options, device=like.device)
    if layout.seq_len != sequence_length(pattern, tuple(grid), layer_idx, num_prefix_tokens):
        raise ValueError(
            f"pattern {pattern!r} splits the tokens of grid {tuple(grid)} into sequences, "
            "which a grid given per call cannot do under torch.compile: build the module with "
            f"grid={tuple(grid)} as its own"
        )
    return layout.permutation.order.clone(), layout.permutation.inverse.clone()


@_grid_orders.register_fake
def _(like, pattern, layer_idx, grid, num_prefix_tokens, prefix_position, num_orders):
    n = num_prefix_tokens + math.prod(grid)
    shape = (n,) if num_orders == 1 else (num_orders, n)
    return like.new_empty(shape, dtype=torch.long), like.new_empty(shape, dtype=torch.long)
