"""Token orders: which token the selective scan reads at each step, for every layer.

Convention: ``order[i]`` is the raster index ``r * W + c`` of the token visited at step ``i``;
permuting is the gather ``x[:, order]`` and unpermuting the gather with ``inverse``, the
``argsort(order)`` (docs/design.md, "Glossary").

A *pattern* names a family of orders; layer ``i`` uses ``family[i % len(family)]``:

==================  ===============================================================
``zigzag{1,2,4,8}``  ZigMa's snakes S0..S(k-1): 4 start corners x (row snake, column snake)
``sweep``            raster order in every layer
``sweep2``           raster, reversed raster
``sweep4``           row-major, row-major reversed, column-major, column-major reversed
``hilbert{1,2,4,8}`` a generalised Hilbert curve (any H x W, every step a 4-neighbour move),
                     then its transpose, for each of the 4 start corners
``random{1,2,4,8}``  seeded random permutations, identical in every process
``video_<s|t...>``   for (T, H, W) grids: layer d scans along ``string[d % len]``; an ``s``
                     layer reads each frame as its own sequence in the next zigzag order, a ``t``
                     layer reads each pixel's time series, alternately forward and backward
==================  ===============================================================

Video orders are 2-D: ``(num_sequences, seq_len)``, ``(T, H*W)`` for ``s`` and ``(H*W, T)`` for
``t`` layers; flattened, they are permutations of the ``T*H*W`` tokens laid out ``(t, h, w)``.
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
from torch import nn

from zigzag_mamba.ops.permute import inverse_order, permute_tokens
from zigzag_mamba.ops.utils import tensor_version

Grid = tuple[int, ...]
Orders = list[torch.Tensor]
PatternBuilder = Callable[[Grid], "torch.Tensor | Sequence[torch.Tensor]"]

_VIDEO = re.compile(r"video_([st]+)")


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


@functools.cache
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
    return _zigzag_orders(H, W).clone()


def _sweep_orders(H: int, W: int) -> torch.Tensor:
    rows = torch.arange(H * W, device="cpu")
    cols = _raster(H, W).t().reshape(-1)
    return torch.stack([rows, rows.flip(0), cols, cols.flip(0)])


def _gilbert(
    x: int, y: int, ax: int, ay: int, bx: int, by: int, out: list[tuple[int, int]]
) -> None:
    """Generalised Hilbert curve over the rectangle spanned by (ax, ay) and (bx, by).

    Visits every cell once, starting at (x, y) and walking the major axis (ax, ay); splits the
    rectangle in two along a long major axis, otherwise in three like a Hilbert cell, rounding
    split points to even lengths so that the sub-curves join with 4-neighbour steps.
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
            ax2, ay2 = ax2 + dax, ay2 + day
        _gilbert(x, y, ax2, ay2, bx, by, out)
        _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out)
        return
    if abs(bx2 + by2) % 2 and h > 2:
        bx2, by2 = bx2 + dbx, by2 + dby
    _gilbert(x, y, bx2, by2, ax2, ay2, out)
    _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out)
    _gilbert(
        x + (ax - dax) + (bx2 - dbx),
        y + (ay - day) + (by2 - dby),
        -bx2,
        -by2,
        -(ax - ax2),
        -(ay - ay2),
        out,
    )


@functools.cache
def _hilbert_base(H: int, W: int) -> torch.Tensor:
    """A continuous generalised Hilbert curve from the top-left corner of an H x W grid.

    A 4-neighbour path from (0, 0) to the far end of the top row exists iff W is even or H is
    odd (colour the grid like a chessboard); otherwise we run along the first column, which is
    then possible. The recursion keeps every step a 4-neighbour move in both cases.
    """
    cells: list[tuple[int, int]] = []
    if W % 2 == 0 or H % 2 == 1:
        _gilbert(0, 0, W, 0, 0, H, cells)
    else:
        _gilbert(0, 0, 0, H, W, 0, cells)
    return torch.tensor([y * W + x for x, y in cells], dtype=torch.long, device="cpu")


def _hilbert_orders(H: int, W: int) -> torch.Tensor:
    base = _hilbert_base(H, W)
    # The transposed curve: a curve on the W x H grid, read back into H x W raster indices.
    transposed = _raster(H, W).t().reshape(-1)[_hilbert_base(W, H)]
    orders = []
    for corner in range(4):
        for order in (base, transposed):
            r, c = order // W, order % W
            if corner in (1, 3):
                c = W - 1 - c
            if corner in (2, 3):
                r = H - 1 - r
            orders.append(r * W + c)
    return torch.stack(orders)


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
    _PATTERNS[f"hilbert{_k}"] = _fixed(_hilbert_orders, _k)
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
    flat = order.reshape(-1).long()
    in_range = (flat >= 0) & (flat < L)
    if not bool(in_range.all()):
        bad = flat[~in_range][:5].tolist()
        raise ValueError(f"order is not a permutation of range({L}): out-of-range values {bad}")
    counts = torch.bincount(flat, minlength=L)
    if not bool((counts == 1).all()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        repeated = (counts > 1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"order is not a permutation of range({L}): repeats {repeated}, misses {missing}"
        )
    return order.long()


def pattern_family(pattern: str | torch.Tensor | Sequence, grid: int | Sequence[int]) -> Orders:
    """The family of orders of ``pattern`` on ``grid``, checked.

    ``pattern`` is a registered name, a single order (L,), a (k, L) tensor of k orders, or a
    sequence of orders (each (L,) or, for sequences split per frame/pixel, (n, seq_len)).
    """
    grid = as_grid(grid)
    if isinstance(pattern, str):
        family = _named_family(pattern, grid)
    elif isinstance(pattern, torch.Tensor):
        family = [pattern] if pattern.dim() == 1 else list(pattern)
    elif isinstance(pattern, Sequence) and len(pattern) > 0:
        first = pattern[0]
        nested = isinstance(first, torch.Tensor | Sequence) and not isinstance(first, str)
        family = list(pattern) if nested else [pattern]
    else:
        raise TypeError(
            f"pattern must be a name, an order or a sequence of orders, got {pattern!r}"
        )
    if not family:
        raise ValueError(f"pattern {pattern!r} gave no orders for grid {grid}")
    return [check_order(order, grid) for order in family]


def _named_family(name: str, grid: Grid) -> list:
    video = _VIDEO.fullmatch(name)
    if video:
        if len(grid) != 3:
            raise ValueError(f"pattern {name!r} needs a video grid (T, H, W), got {grid}")
        return _video_family(video.group(1), *grid)
    if name not in _PATTERNS:
        raise ValueError(
            f"unknown scan pattern {name!r}; choose one of {list_patterns()} "
            "(any video_ + s/t string works for (T, H, W) grids)"
        )
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


def scan_orders(
    pattern: str | torch.Tensor | Sequence, grid: int | Sequence[int], depth: int
) -> Orders:
    """The order each of ``depth`` layers uses: layer ``i`` gets ``family[i % k]``.

    Example::

        >>> [o[:4].tolist() for o in scan_orders("zigzag2", (4, 4), depth=3)]
        [[0, 1, 2, 3], [0, 4, 8, 12], [0, 1, 2, 3]]
    """
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    family = pattern_family(pattern, grid)
    return [family[i % len(family)] for i in range(depth)]


# --------------------------------------------------------------------------- module


class ZigzagScan(nn.Module):
    """One layer's token order (the paper's "zigzag scan"): :meth:`permute` puts raster tokens
    in the order the selective scan reads them, :meth:`unpermute` puts its outputs back, exactly.

    Args:
        grid: ``N``, ``(H, W)`` or, for ``video_*`` patterns, ``(T, H, W)``.
        pattern: a name from :func:`list_patterns`, or explicit orders (see :func:`pattern_family`).
        layer_idx: which layer this is; it uses order ``layer_idx % k`` of the k-order family.

    The buffers ``order`` and ``inverse`` (L,) are non-persistent: they follow ``.to()`` but are
    not saved in checkpoints; :meth:`init_non_persistent_buffers` refills them (after
    ``to_empty()`` of a model built on the meta device).

    Example::

        >>> zigzag = ZigzagScan((16, 24), pattern="zigzag8", layer_idx=3)
        >>> x = torch.randn(2, 16 * 24, 64)          # (B, L, C), raster order
        >>> y = zigzag.permute(x)                     # (B, L, C) in S3 order
        >>> torch.equal(zigzag.unpermute(y), x)
        True

    For video patterns ``permute`` returns ``(B*T, H*W, C)`` ('s' layers) or ``(B*H*W, T, C)``
    ('t' layers), and ``unpermute`` takes that shape back to ``(B, T*H*W, C)``.
    """

    order: torch.Tensor
    inverse: torch.Tensor

    def __init__(
        self,
        grid: int | Sequence[int],
        pattern: str | torch.Tensor | Sequence = "zigzag8",
        layer_idx: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.grid = as_grid(grid)
        self.pattern_name = pattern if isinstance(pattern, str) else "custom"
        self.layer_idx = check_layer_idx(layer_idx)
        family = pattern_family(pattern, self.grid)
        self.family_size = len(family)
        self._cpu_order = family[layer_idx % len(family)]
        self.num_tokens = self._cpu_order.numel()
        self.seq_len = self._cpu_order.shape[-1]
        empty = torch.empty(self.num_tokens, dtype=torch.long, device=device)
        self.register_buffer("order", empty, persistent=False)
        self.register_buffer("inverse", empty.clone(), persistent=False)
        # (order, inverse, their versions) when last found to hold this layer's order.
        self._checked_buffers: tuple | None = None
        self.init_non_persistent_buffers()

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fill ``order`` and ``inverse`` with this layer's order (after ``to_empty()``)."""
        if self.order.is_meta:
            return  # a module on the meta device has no memory to fill
        flat = self._cpu_order.reshape(-1)
        self.order.copy_(flat)
        self.inverse.copy_(inverse_order(flat))

    def orders_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``order`` and ``inverse`` buffers, checked for permuting ``x``.

        Raises a ValueError when they are not on ``x``'s device, and, on first use (and after
        they change), when they do not hold this layer's order: after ``to_empty()`` they hold
        uninitialised memory until :meth:`init_non_persistent_buffers` refills them.
        """
        order, inverse = self.order, self.inverse
        if order.device != x.device:
            raise ValueError(self._device_advice(x))
        if torch.compiler.is_compiling() or order.is_meta:
            return order, inverse
        if not self._buffers_checked(order, inverse):
            if not self._buffers_hold_order(order, inverse):
                raise ValueError(
                    f"this ZigzagScan's order buffers (grid {self.grid}, layer {self.layer_idx}) "
                    "do not hold its order: after to_empty() they are uninitialised memory; call "
                    "init_non_persistent_buffers() (ZigMaBackbone.init_non_persistent_buffers() "
                    "for a whole model)"
                )
            self._checked_buffers = (order, inverse, tensor_version(order), tensor_version(inverse))
        return order, inverse

    def _buffers_checked(self, order: torch.Tensor, inverse: torch.Tensor) -> bool:
        checked = getattr(self, "_checked_buffers", None)  # absent in modules pickled before
        if checked is None or checked[0] is not order or checked[1] is not inverse:
            return False
        return None not in checked[2:] and checked[2:] == (
            tensor_version(order),
            tensor_version(inverse),
        )

    def _buffers_hold_order(self, order: torch.Tensor, inverse: torch.Tensor) -> bool:
        expected = self._cpu_order.reshape(-1)
        return torch.equal(order.cpu(), expected) and torch.equal(
            inverse.cpu(), inverse_order(expected)
        )

    def _device_advice(self, x: torch.Tensor) -> str:
        where = f"this ZigzagScan's orders are on {self.order.device} but the tokens on {x.device}"
        if self.order.is_meta:
            return (
                f"{where}: a module built on the meta device needs to_empty(device=...) and then "
                "init_non_persistent_buffers()"
            )
        return f"{where}: move the module with .to({str(x.device)!r})"

    def check_tokens(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless ``x`` is (B, L, C) raster tokens of this grid."""
        if x.dim() < 2 or x.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected tokens of shape (B, {self.num_tokens}, C) for grid {self.grid}, "
                f"got {tuple(x.shape)}"
            )

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) raster tokens -> (B * L // seq_len, seq_len, C) in this layer's order."""
        self.check_tokens(x)
        y = permute_tokens(x, *self.orders_for(x))
        return y.reshape(-1, self.seq_len, *x.shape[2:])

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`permute`: (B * L // seq_len, seq_len, C) -> (B, L, C) raster."""
        per_sample = self.num_tokens // self.seq_len
        if y.dim() < 2 or y.shape[1] != self.seq_len or y.shape[0] % per_sample:
            raise ValueError(
                f"expected permuted tokens of shape (B*{per_sample}, {self.seq_len}, C) for grid "
                f"{self.grid}, got {tuple(y.shape)}"
            )
        y = y.reshape(y.shape[0] // per_sample, self.num_tokens, *y.shape[2:])
        order, inverse = self.orders_for(y)
        return permute_tokens(y, inverse, order)

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """Deprecated name of :meth:`permute`."""
        warnings.warn("ZigzagScan.scan is now permute", DeprecationWarning, stacklevel=2)
        return self.permute(x)

    def unscan(self, y: torch.Tensor) -> torch.Tensor:
        """Deprecated name of :meth:`unpermute`."""
        warnings.warn("ZigzagScan.unscan is now unpermute", DeprecationWarning, stacklevel=2)
        return self.unpermute(y)

    def extra_repr(self) -> str:
        text = (
            f"grid={self.grid}, pattern={self.pattern_name!r}, layer_idx={self.layer_idx} "
            f"(order {self.layer_idx % self.family_size} of {self.family_size})"
        )
        if self.seq_len != self.num_tokens:
            text += f", sequences={self.num_tokens // self.seq_len}x{self.seq_len}"
        return text
