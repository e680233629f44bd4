"""ZigzagScan: one layer's token order as a module, for a grid fixed at construction or given
per call, with optional prefix tokens (class and register tokens) kept out of the grid.

Prefix tokens: the tokens are ``[k prefix tokens, the grid's tokens in raster order]``. The
grid's order is shifted by k and the prefix tokens are placed at one slot of the scanned
sequence, together and in their own order: at its end by default, where a causal scan has read
every grid token before it reaches them (docs/block.md, "Prefix tokens").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from zigzag_mamba.ops.permute import inverse_order, permute_tokens
from zigzag_mamba.ops.utils import tensor_version
from zigzag_mamba.orders.patterns import (
    _PATTERNS,
    Grid,
    _is_int,
    as_grid,
    check_layer_idx,
    check_pattern,
    is_video_pattern,
    pattern_family,
)

#: How many grids (per device) a ZigzagScan keeps the orders of, besides its own grid.
GRID_CACHE_SIZE = 8
#: Where the prefix tokens sit in each scanned sequence.
PREFIX_POSITIONS = ("end", "middle", "start")


class Layout(NamedTuple):
    """What permuting the tokens of one grid needs: the flat order and its inverse (L,), and
    the length of each scanned sequence (L, or a frame's or a pixel's length for video)."""

    order: torch.Tensor
    inverse: torch.Tensor
    seq_len: int


def check_num_prefix_tokens(value: object) -> int:
    """``num_prefix_tokens`` as an int, if it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {value!r}")
    return int(value)


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


class ZigzagScan(nn.Module):
    """One layer's token order (the paper's "zigzag scan"): :meth:`permute` puts raster tokens
    in the order the selective scan reads them, :meth:`unpermute` puts its outputs back, exactly.

    Args:
        grid: ``N``, ``(H, W)`` or, for ``video_*`` patterns, ``(T, H, W)``: the default grid.
            None builds a module that takes the grid at every call (``grid=`` of
            :meth:`permute`); a call may also pass another grid than the default.
        pattern: a name from :func:`list_patterns`, or explicit orders (see :func:`pattern_family`).
        layer_idx: which layer this is; it uses order ``layer_idx % k`` of the k-order family.
        num_prefix_tokens: tokens in front of the grid's (a class token, register tokens) that
            are not part of the grid: L = num_prefix_tokens + the grid's product.
        prefix_position: where the prefix tokens sit in the scanned sequence: ``"end"`` (after
            every grid token, so that a causal scan has read the whole grid when it reaches
            them), ``"middle"`` or ``"start"``. Not for video patterns, which split the tokens
            into many sequences.

    The buffers ``order`` and ``inverse`` (L,) hold the default grid's order; they are
    non-persistent: they follow ``.to()`` but are not saved in checkpoints;
    :meth:`init_non_persistent_buffers` refills them (after ``to_empty()`` of a model built on
    the meta device). The orders of other grids are built on their first use and kept, per
    grid and device, for the last :data:`GRID_CACHE_SIZE` grids.

    Example::

        >>> zigzag = ZigzagScan((16, 24), pattern="zigzag8", layer_idx=3)
        >>> x = torch.randn(2, 16 * 24, 64)          # (B, L, C), raster order
        >>> y = zigzag.permute(x)                     # (B, L, C) in S3 order
        >>> torch.equal(zigzag.unpermute(y), x)
        True
        >>> x = torch.randn(2, 8 * 12, 64)            # another grid, given with the call
        >>> torch.equal(zigzag.unpermute(zigzag.permute(x, grid=(8, 12)), grid=(8, 12)), x)
        True

    For video patterns ``permute`` returns ``(B*T, H*W, C)`` ('s' layers) or ``(B*H*W, T, C)``
    ('t' layers), and ``unpermute`` takes that shape back to ``(B, T*H*W, C)``.
    """

    order: torch.Tensor | None
    inverse: torch.Tensor | None

    def __init__(
        self,
        grid: int | Sequence[int] | None = None,
        pattern: str | torch.Tensor | Sequence = "zigzag8",
        layer_idx: int = 0,
        *,
        num_prefix_tokens: int = 0,
        prefix_position: str = "end",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.pattern = check_pattern(pattern)
        self.pattern_name = pattern if isinstance(pattern, str) else "custom"
        self.layer_idx = check_layer_idx(layer_idx)
        self.num_prefix_tokens = check_num_prefix_tokens(num_prefix_tokens)
        if prefix_position not in PREFIX_POSITIONS:
            raise ValueError(
                f"prefix_position must be one of {PREFIX_POSITIONS}, got {prefix_position!r}"
            )
        self.prefix_position = prefix_position
        if self.num_prefix_tokens and is_video_pattern(pattern):
            raise ValueError(
                f"num_prefix_tokens needs a pattern that reads all tokens as one sequence; "
                f"{pattern!r} splits them per frame and per pixel"
            )
        # (grid, device) -> Layout, for grids other than the default one.
        self._grid_cache: dict[tuple, Layout] = {}
        # (order, inverse, their versions) when last found to hold this layer's order.
        self._checked_buffers: tuple | None = None
        self.grid = None if grid is None else as_grid(grid)
        if self.grid is None:
            self._cpu_order, self.family_size = None, None
            self.num_tokens = self.seq_len = None
            self.register_buffer("order", None, persistent=False)
            self.register_buffer("inverse", None, persistent=False)
            return
        self._cpu_order, self.family_size = self._cpu_layout(self.grid)
        self.num_tokens = self._cpu_order.numel()
        self.seq_len = self._cpu_order.shape[-1]
        empty = torch.empty(self.num_tokens, dtype=torch.long, device=device)
        self.register_buffer("order", empty, persistent=False)
        self.register_buffer("inverse", empty.clone(), persistent=False)
        self.init_non_persistent_buffers()

    def _cpu_layout(self, grid: Grid) -> tuple[torch.Tensor, int]:
        """This layer's order on ``grid`` with the prefix tokens in place, and the family size."""
        family = pattern_family(self.pattern, grid)
        order = family[self.layer_idx % len(family)]
        if self.num_prefix_tokens:
            if order.dim() == 2 and order.shape[0] > 1:
                raise ValueError(
                    "num_prefix_tokens needs orders that read all tokens as one sequence; this "
                    f"layer's order on grid {grid} has {order.shape[0]} sequences"
                )
            order = with_prefix(order.reshape(-1), self.num_prefix_tokens, self.prefix_position)
        return order, len(family)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fill ``order`` and ``inverse`` with this layer's order (after ``to_empty()``)."""
        if self.order is None or self.order.is_meta:
            return  # no default grid, or a module on the meta device: no memory to fill
        flat = self._cpu_order.reshape(-1)
        self.order.copy_(flat)
        self.inverse.copy_(inverse_order(flat))

    # ------------------------------------------------------------------ orders per call

    def layout(self, x: torch.Tensor, grid: int | Sequence[int] | None = None) -> Layout:
        """The order, inverse and sequence length for permuting the tokens ``x`` of ``grid``
        (the default grid when None), after checking that ``x`` has that grid's tokens."""
        if grid is None or grid == self.grid:
            self.check_tokens(x)
            return Layout(*self.orders_for(x), self.seq_len)
        key = (grid if type(grid) is tuple else as_grid(grid), x.device)
        layout = self._grid_cache.get(key)
        if layout is None:
            layout = self._add_layout(key)
        if x.dim() < 2 or x.shape[1] != layout.order.shape[0]:
            raise ValueError(self._token_error(x, key[0], layout.order.shape[0]))
        return layout

    def _add_layout(self, key: tuple) -> Layout:
        if torch.compiler.is_compiling() and isinstance(self.pattern, str):
            return self._traced_layout(key)
        # Explicit orders (one grid only) are built here even inside torch.compile.
        grid, device = as_grid(key[0]), key[1]
        order, _ = self._cpu_layout(grid)
        flat = order.reshape(-1)
        layout = Layout(flat.to(device), inverse_order(flat).to(device), order.shape[-1])
        if len(self._grid_cache) >= GRID_CACHE_SIZE:
            del self._grid_cache[next(iter(self._grid_cache))]
        self._grid_cache[(grid, device)] = layout
        return layout

    def _traced_layout(self, key: tuple) -> Layout:
        """A grid met first inside torch.compile: its orders come from a custom op, so the graph
        stays whole (a new grid recompiles, since the grid is a constant of the graph)."""
        grid, device = as_grid(key[0]), key[1]
        k, name = self.num_prefix_tokens, self.pattern
        like = torch.empty(0, device=device)
        order, inverse = _grid_orders(
            like, name, self.layer_idx, list(grid), k, self.prefix_position
        )
        if is_video_pattern(name):
            axes = name.removeprefix("video_")
            seq_len = grid[0] if axes[self.layer_idx % len(axes)] == "t" else grid[1] * grid[2]
        else:
            seq_len = k + math.prod(grid)
        return Layout(order, inverse, seq_len)

    def orders_for(
        self, x: torch.Tensor, grid: int | Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``order`` and ``inverse`` for permuting ``x``: the buffers, checked, for the
        default grid; the cached orders of ``grid`` otherwise.

        Raises a ValueError when the buffers are not on ``x``'s device, and, on first use (and
        after they change), when they do not hold this layer's order: after ``to_empty()`` they
        hold uninitialised memory until :meth:`init_non_persistent_buffers` refills them.
        """
        if grid is not None and grid != self.grid:
            return self.layout(x, grid)[:2]
        if self.order is None:
            raise ValueError(
                "this ZigzagScan was built without a grid: pass the tokens' grid=(H, W) (or "
                "(T, H, W)) with the call"
            )
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
        checked = self._checked_buffers
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

    def check_tokens(self, x: torch.Tensor, grid: int | Sequence[int] | None = None) -> None:
        """Raise a ValueError unless ``x`` is (B, L, C) tokens of ``grid`` (the default grid
        when None) after the prefix tokens."""
        if grid is not None and grid != self.grid:
            self.layout(x, grid)
            return
        if self.grid is None:
            raise ValueError(
                "this module was built without a grid: pass the tokens' grid=(H, W) (or "
                "(T, H, W)) with the call"
            )
        if x.dim() < 2 or x.shape[1] != self.num_tokens:
            raise ValueError(self._token_error(x, self.grid, self.num_tokens))

    def _token_error(self, x: torch.Tensor, grid: Grid, num_tokens: int) -> str:
        k, shape = self.num_prefix_tokens, tuple(x.shape)
        if k and x.dim() >= 2 and x.shape[1] <= k:
            return (
                f"num_prefix_tokens={k} must be less than the token count L={x.shape[1]} of x "
                f"{shape}: the grid's tokens follow the prefix tokens"
            )
        count = f"{k} prefix tokens + {num_tokens - k} of grid {grid}" if k else f"grid {grid}"
        return (
            f"expected tokens of shape (B, {num_tokens}, C) for {count}, got {shape}: the "
            "grid's product must equal the token count (pass grid=(H, W) of these tokens)"
        )

    # ------------------------------------------------------------------ permuting

    def permute(self, x: torch.Tensor, grid: int | Sequence[int] | None = None) -> torch.Tensor:
        """(B, L, C) raster tokens -> (B * L // seq_len, seq_len, C) in this layer's order."""
        order, inverse, seq_len = self.layout(x, grid)
        y = permute_tokens(x, order, inverse)
        return y.reshape(-1, seq_len, *x.shape[2:])

    def unpermute(self, y: torch.Tensor, grid: int | Sequence[int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`permute`: (B * L // seq_len, seq_len, C) -> (B, L, C) raster."""
        if grid is None or grid == self.grid:
            if self.grid is None:
                self.check_tokens(y)  # raises: no grid
            num_tokens, seq_len = self.num_tokens, self.seq_len
        else:
            key = (grid if type(grid) is tuple else as_grid(grid), y.device)
            layout = self._grid_cache.get(key) or self._add_layout(key)
            num_tokens, seq_len = layout.order.shape[0], layout.seq_len
        per_sample = num_tokens // seq_len
        if y.dim() < 2 or y.shape[1] != seq_len or y.shape[0] % per_sample:
            raise ValueError(
                f"expected permuted tokens of shape (B*{per_sample}, {seq_len}, C) for grid "
                f"{self.grid if grid is None else grid}, got {tuple(y.shape)}"
            )
        y = y.reshape(y.shape[0] // per_sample, num_tokens, *y.shape[2:])
        order, inverse = self.orders_for(y, grid)
        return permute_tokens(y, inverse, order)

    def extra_repr(self) -> str:
        grid = "given per call" if self.grid is None else self.grid
        text = f"grid={grid}, pattern={self.pattern_name!r}, layer_idx={self.layer_idx}"
        if self.family_size is not None:
            text += f" (order {self.layer_idx % self.family_size} of {self.family_size})"
        if self.seq_len is not None and self.seq_len != self.num_tokens:
            text += f", sequences={self.num_tokens // self.seq_len}x{self.seq_len}"
        if self.num_prefix_tokens:
            text += f", num_prefix_tokens={self.num_prefix_tokens} ({self.prefix_position})"
        return text


# (pattern, its builder, layer_idx, grid, prefix, device) -> (order, inverse), for the op below.
_TRACED_LIMIT = 64
_traced: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.library.custom_op("zigzag_mamba::grid_orders", mutates_args=())
def _grid_orders(
    like: torch.Tensor,
    pattern: str,
    layer_idx: int,
    grid: list[int],
    num_prefix_tokens: int,
    prefix_position: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat order and inverse of a named pattern's layer on ``grid``, on ``like``'s device."""
    builder = _PATTERNS.get(pattern)
    key = (pattern, id(builder), layer_idx, tuple(grid), num_prefix_tokens, prefix_position)
    key += (like.device,)
    pair = _traced.get(key)
    if pair is None:
        scan = ZigzagScan(
            None,
            pattern,
            layer_idx,
            num_prefix_tokens=num_prefix_tokens,
            prefix_position=prefix_position,
        )
        order, _ = scan._cpu_layout(tuple(grid))
        if order.dim() == 2 and order.shape[0] > 1 and not is_video_pattern(pattern):
            raise ValueError(
                f"pattern {pattern!r} splits the tokens of grid {tuple(grid)} into sequences: "
                "call the model once outside torch.compile with this grid first"
            )
        flat = order.reshape(-1)
        pair = (flat.to(like.device), inverse_order(flat).to(like.device))
        if len(_traced) >= _TRACED_LIMIT:
            _traced.clear()
        _traced[key] = pair
    return pair[0].clone(), pair[1].clone()


@_grid_orders.register_fake
def _(like, pattern, layer_idx, grid, num_prefix_tokens, prefix_position):
    n = num_prefix_tokens + math.prod(grid)
    return like.new_empty(n, dtype=torch.long), like.new_empty(n, dtype=torch.long)
