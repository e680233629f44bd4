"""The pattern registry and the orders of every built-in pattern (see :mod:`zigzag_mamba.orders`).

Convention: ``order[i]`` is the raster index ``r * W + c`` of the token visited at step ``i``;
video orders are 2-D, ``(num_sequences, seq_len)``. Nothing here is cached: a layer's order is
built once per grid by :mod:`zigzag_mamba.orders.layout`, which keeps it.
"""

from __future__ import annotations

import functools
import math
import numbers
import random
import re
import warnings
from collections.abc import Callable, Sequence

import torch

from zigzag_mamba.ops.permute import check_permutation
from zigzag_mamba.ops.utils import check_fits_in_memory

Grid = tuple[int, ...]
Orders = list[torch.Tensor]
PatternBuilder = Callable[[Grid], "torch.Tensor | Sequence[torch.Tensor]"]

_VIDEO = re.compile(r"video_([st]+)")
#: The name of ``pattern=None`` where a name must be written (tables, flags, file names): no
#: permutation, the tokens read in raster order.
NO_PATTERN = "none"


# --------------------------------------------------------------------------- grids


def as_grid(grid: int | Sequence[int]) -> Grid:
    """``8 -> (8, 8)``; ``(H, W)`` and ``(T, H, W)`` pass through, checked."""
    if _is_int(grid):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) not in (2, 3) or not all(map(_is_int, grid)):
        raise ValueError(f"grid must be an int, (H, W) or (T, H, W) of ints, got {grid!r}")
    grid = tuple(int(s) for s in grid)
    if any(s < 1 for s in grid):
        raise ValueError(f"every side of the grid must be >= 1, got {grid}")
    return grid


def _is_int(value: object) -> bool:
    """An integer (NumPy's too), not a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _raster(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W, device="cpu").view(H, W)


# --------------------------------------------------------------------------- 2-D orders


def _snake(H: int, W: int, corner: int, by_columns: bool) -> torch.Tensor:
    """Boustrophedon from ``corner`` (0 TL, 1 TR, 2 BL, 3 BR), rows (or columns) first."""
    idx = _raster(H, W)
    if corner in (1, 3):
        idx = idx.flip(1)
    if corner in (2, 3):
        idx = idx.flip(0)
    if by_columns:
        idx = idx.t()
    idx = idx.clone()
    # Every other line walks back, so each step is a 4-neighbour move.
    idx[1::2] = idx[1::2].flip(1)
    return idx.reshape(-1)


def _zigzag_orders(H: int, W: int) -> torch.Tensor:
    return torch.stack(
        [_snake(H, W, corner, cols) for corner in range(4) for cols in (False, True)]
    )


def zigzag_orders(H: int, W: int) -> torch.Tensor:
    """The 8 ZigMa zigzag orders S0..S7 of an H x W grid, shape (8, H*W).

    S(2j) is the row snake and S(2j+1) the column snake from corner j (top-left, top-right,
    bottom-left, bottom-right). For square grids these are exactly the official orders.

    Example::

        >>> zigzag_orders(2, 3)[0].tolist()
        [0, 1, 2, 5, 4, 3]
    """
    H, W = as_grid((H, W))
    return _zigzag_orders(H, W)


def _sweep_orders(H: int, W: int) -> torch.Tensor:
    rows = torch.arange(H * W, device="cpu")
    cols = _raster(H, W).t().reshape(-1)
    return torch.stack([rows, rows.flip(0), cols, cols.flip(0)])


def _gilbert(
    x: int,
    y: int,
    ax: int,
    ay: int,
    bx: int,
    by: int,
    out: list[tuple[int, int]],
    rounding: int = 1,
) -> None:
    """Generalised Hilbert curve over the rectangle spanned by (ax, ay) and (bx, by).

    Visits every cell once, starting at (x, y) and walking the major axis (ax, ay); splits the
    rectangle in two along a long major axis, otherwise in three like a Hilbert cell, moving
    odd split points by one cell (up for ``rounding=1``, down for -1) to even lengths so that
    the sub-curves join with 4-neighbour steps. The two roundings give two different curves
    wherever a split point is odd.
    """
    w, h = abs(ax + ay), abs(bx + by)
    dax, day = (ax > 0) - (ax < 0), (ay > 0) - (ay < 0)
    dbx, dby = (bx > 0) - (bx < 0), (by > 0) - (by < 0)
    if h == 1 or w == 1:
        step_x, step_y, n = (dax, day, w) if h == 1 else (dbx, dby, h)
        out.extend((x + i * step_x, y + i * step_y) for i in range(n))
        return
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    if 2 * w > 3 * h:
        if abs(ax2 + ay2) % 2 and w > 2:
            shift = rounding if abs(ax2 + ay2) > 1 else 1  # never an empty half
            ax2, ay2 = ax2 + shift * dax, ay2 + shift * day
        _gilbert(x, y, ax2, ay2, bx, by, out, rounding)
        _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out, rounding)
        return
    if abs(bx2 + by2) % 2 and h > 2:
        shift = rounding if abs(bx2 + by2) > 1 else 1
        bx2, by2 = bx2 + shift * dbx, by2 + shift * dby
    _gilbert(x, y, bx2, by2, ax2, ay2, out, rounding)
    _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out, rounding)
    _gilbert(
        x + (ax - dax) + (bx2 - dbx),
        y + (ay - day) + (by2 - dby),
        -bx2,
        -by2,
        -(ax - ax2),
        -(ay - ay2),
        out,
        rounding,
    )


def _hilbert_base(H: int, W: int, rounding: int = 1) -> torch.Tensor:
    """A continuous generalised Hilbert curve from the top-left corner of an H x W grid.

    A 4-neighbour path from (0, 0) to the far end of the top row exists iff W is even or H is
    odd (colour the grid like a chessboard); otherwise we run along the first column, which is
    then possible. The recursion keeps every step a 4-neighbour move in both cases.
    """
    cells: list[tuple[int, int]] = []
    if W % 2 == 0 or H % 2 == 1:
        _gilbert(0, 0, W, 0, 0, H, cells, rounding)
    else:
        _gilbert(0, 0, 0, H, W, 0, cells, rounding)
    return torch.tensor([y * W + x for x, y in cells], dtype=torch.long, device="cpu")


def _hilbert_candidates(H: int, W: int):
    """Continuous curves on H x W, in order of preference: the curve and the curve of the
    transposed grid from each corner, then the same walked backwards, then all of it again with
    the other rounding of the split points."""
    for rounding in (1, -1):
        # The transposed curve: a curve on the W x H grid, read back into H x W raster indices.
        transposed = _raster(H, W).t().reshape(-1)[_hilbert_base(W, H, rounding)]
        pair = (_hilbert_base(H, W, rounding), transposed)
        for backwards in (False, True):
            for corner in range(4):
                for order in pair:
                    r, c = order // W, order % W
                    if corner in (1, 3):
                        c = W - 1 - c
                    if corner in (2, 3):
                        r = H - 1 - r
                    yield (r * W + c).flip(0) if backwards else r * W + c


def _hilbert_orders(H: int, W: int, k: int) -> torch.Tensor:
    """The first k distinct curves of :func:`_hilbert_candidates`. A grid with fewer (a side of
    1 or 2, or a curve that is its own mirror image) repeats them, with a warning."""
    distinct: dict[tuple[int, ...], torch.Tensor] = {}
    for order in _hilbert_candidates(H, W):
        distinct.setdefault(tuple(order.tolist()), order)
        if len(distinct) == k:
            break
    orders = list(distinct.values())
    if len(orders) < k:
        warnings.warn(
            f"pattern 'hilbert{k}' has {len(orders)} distinct orders on grid {(H, W)}, not {k}: "
            f"layers repeat them (docs/orders.md, 'hilbert8')",
            stacklevel=2,
        )
    return torch.stack([orders[i % len(orders)] for i in range(k)])


def _random_orders(H: int, W: int, k: int, seed: int = 0) -> torch.Tensor:
    # Python's Random is seeded identically in every process (PYTHONHASHSEED does not matter).
    orders = []
    for j in range(k):
        perm = list(range(H * W))
        random.Random(seed * 1_000_003 + j).shuffle(perm)
        orders.append(perm)
    return torch.tensor(orders, dtype=torch.long, device="cpu")


# --------------------------------------------------------------------------- video orders


def _video_family(axes: str, T: int, H: int, W: int) -> Orders:
    """One period of a factorised video pattern: the orders of layers 0..k-1."""
    n_s, n_t = axes.count("s"), axes.count("t")
    # The schedule repeats once the 's' layers cycle through 8 orders and 't' through 2.
    q = next(
        q for q in range(1, 9) if (n_s == 0 or q * n_s % 8 == 0) and (n_t == 0 or q * n_t % 2 == 0)
    )
    spatial = zigzag_orders(H, W)
    frames = torch.arange(T, device="cpu").view(T, 1) * (H * W)
    sites = torch.arange(H * W, device="cpu").view(H * W, 1)
    times = torch.arange(T, device="cpu").view(1, T) * (H * W)
    orders: Orders = []
    s_seen = t_seen = 0
    for d in range(q * len(axes)):
        if axes[d % len(axes)] == "s":
            orders.append(frames + spatial[s_seen % 8].view(1, H * W))  # (T, H*W)
            s_seen += 1
        else:
            order = sites + times  # (H*W, T)
            orders.append(order if t_seen % 2 == 0 else order.flip(1))
            t_seen += 1
    return orders


# --------------------------------------------------------------------------- registry


def _fixed(builder: Callable[[int, int], torch.Tensor], k: int) -> PatternBuilder:
    def build(grid: Grid) -> torch.Tensor:
        return builder(*grid)[:k]

    return build


_PATTERNS: dict[str, PatternBuilder] = {}
for _k in (1, 2, 4, 8):
    _PATTERNS[f"zigzag{_k}"] = _fixed(_zigzag_orders, _k)
    _PATTERNS[f"hilbert{_k}"] = _fixed(functools.partial(_hilbert_orders, k=_k), _k)
    _PATTERNS[f"random{_k}"] = _fixed(functools.partial(_random_orders, k=_k), _k)
_PATTERNS["sweep"] = _fixed(_sweep_orders, 1)
_PATTERNS["sweep2"] = _fixed(_sweep_orders, 2)
_PATTERNS["sweep4"] = _fixed(_sweep_orders, 4)
_BUILTIN = frozenset(_PATTERNS)
_VIDEO_EXAMPLES = ("video_s", "video_t", "video_st", "video_sst")


def list_patterns() -> list[str]:
    """Names accepted by ``pattern=`` (any ``video_`` + string of s and t works for videos)."""
    return sorted(_PATTERNS) + list(_VIDEO_EXAMPLES)


def register_pattern(name: str, builder: PatternBuilder, *, overwrite: bool = False) -> None:
    """Make ``pattern=name`` available everywhere.

    ``builder(grid)`` gets ``(H, W)`` and returns the family: a (k, H*W) integer tensor or a
    sequence of k orders. Each order is checked to be a permutation when it is used.

    Example::

        >>> register_pattern("diagonal_sweep", lambda g: my_diagonal_orders(*g))
    """
    if not isinstance(name, str) or not name or _VIDEO.fullmatch(name):
        raise ValueError(
            f"pattern name must be a non-empty string not of the video_* form: {name!r}"
        )
    if name in _BUILTIN or (name in _PATTERNS and not overwrite):
        raise ValueError(f"pattern {name!r} already exists; pass overwrite=True to replace it")
    if not callable(builder):
        raise TypeError(f"builder must be callable as builder(grid), got {type(builder).__name__}")
    _PATTERNS[name] = builder


def check_order(order: object, grid: Grid) -> torch.Tensor:
    """Validate a user order for ``grid`` and return it as an int64 CPU tensor."""
    if not isinstance(order, torch.Tensor):
        try:
            order = torch.as_tensor(order, device="cpu")
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"an order must be an integer tensor, got {type(order).__name__}"
            ) from exc
    if order.dtype == torch.bool or order.dtype.is_floating_point or order.dtype.is_complex:
        raise TypeError(f"an order must have an integer dtype, got {order.dtype}")
    if order.device.type != "cpu":
        raise ValueError(
            f"orders are given on the CPU (modules move them with .to()), got device {order.device}"
        )
    L = math.prod(grid)
    if order.dim() not in (1, 2) or order.numel() != L:
        raise ValueError(
            f"an order for grid {grid} must have L = {L} entries, shape (L,) or "
            f"(num_sequences, seq_len); got shape {tuple(order.shape)}"
        )
    order = order.long()
    check_permutation(order)
    return order


class ExplicitOrders(tuple):
    """A user's own family of orders, as given: each (L,), or (n, seq_len) for sequences split
    per frame or pixel, checked against a grid when it is used. Compared and hashed by identity,
    so that what is built from it can be cached."""

    __slots__ = ()
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__


def pattern_family(pattern: str | torch.Tensor | Sequence, grid: int | Sequence[int]) -> Orders:
    """The family of orders of ``pattern`` on ``grid``, checked.

    ``pattern`` is a registered name, a single order (L,), a (k, L) tensor of k orders, or a
    sequence of orders (each (L,) or, for sequences split per frame/pixel, (n, seq_len)).
    """
    grid = as_grid(grid)
    pattern = check_pattern(pattern)
    if isinstance(pattern, str):
        # Building a family holds about a dozen int64 orders of L at once.
        check_fits_in_memory(
            12 * 8 * math.prod(grid), f"the orders of pattern {pattern!r} on grid {grid}"
        )
    family = _named_family(pattern, grid) if isinstance(pattern, str) else list(pattern)
    if not family:
        raise ValueError(f"pattern {pattern!r} gave no orders for grid {grid}")
    return [check_order(order, grid) for order in family]


def is_video_pattern(pattern: object) -> bool:
    """Whether ``pattern`` is a ``video_<s|t...>`` name."""
    return isinstance(pattern, str) and _VIDEO.fullmatch(pattern) is not None


def check_pattern(pattern: object) -> str | ExplicitOrders:
    """``pattern`` as a known name, or explicit orders as :class:`ExplicitOrders` (copied, and
    checked against a grid when they are used)."""
    if isinstance(pattern, str):
        if not (is_video_pattern(pattern) or pattern in _PATTERNS):
            raise ValueError(_unknown_pattern(pattern))
        return pattern
    if isinstance(pattern, ExplicitOrders):
        return pattern
    if isinstance(pattern, torch.Tensor):
        family = [pattern] if pattern.dim() <= 1 else list(pattern)
    elif isinstance(pattern, Sequence) and len(pattern) > 0:
        first = pattern[0]
        nested = isinstance(first, torch.Tensor | Sequence) and not isinstance(first, str)
        family = list(pattern) if nested else [pattern]
    else:
        raise TypeError(
            f"pattern must be a name, an order or a sequence of orders, got {pattern!r}"
        )
    return ExplicitOrders(o.clone() if isinstance(o, torch.Tensor) else o for o in family)


def _unknown_pattern(name: str) -> str:
    return (
        f"unknown scan pattern {name!r}; choose one of {list_patterns()} "
        "(any video_ + s/t string works for (T, H, W) grids)"
    )


def _named_family(name: str, grid: Grid) -> list:
    video = _VIDEO.fullmatch(name)
    if video:
        if len(grid) != 3:
            raise ValueError(f"pattern {name!r} needs a video grid (T, H, W), got {grid}")
        return _video_family(video.group(1), *grid)
    if name not in _PATTERNS:
        raise ValueError(_unknown_pattern(name))
    if len(grid) != 2:
        raise ValueError(
            f"pattern {name!r} is for (H, W) grids, got {grid}; for video use video_<s|t...>"
        )
    family = _PATTERNS[name](grid)
    if isinstance(family, torch.Tensor):  # one (L,) order, or a (k, L) tensor of k orders
        return [family] if family.dim() == 1 else list(family)
    return family


def check_layer_idx(layer_idx: object) -> int:
    """``layer_idx`` as an int, if it is a non-negative integer (it picks the layer's order)."""
    if not _is_int(layer_idx) or layer_idx < 0:
        raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
    return int(layer_idx)


def layer_orders(
    pattern: str | torch.Tensor | Sequence, grid: int | Sequence[int], depth: int
) -> Orders:
    """The order each of ``depth`` layers uses: layer ``i`` gets ``family[i % k]``.

    Example::

        >>> [o[:4].tolist() for o in layer_orders("zigzag2", (4, 4), depth=3)]
        [[0, 1, 2, 3], [0, 4, 8, 12], [0, 1, 2, 3]]
    """
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    family = pattern_family(pattern, grid)
    return [family[i % len(family)] for i in range(depth)]
