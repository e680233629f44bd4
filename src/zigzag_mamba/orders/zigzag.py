"""ZigzagScan: one layer's token order as a module, for a grid fixed at construction or given
per call, with optional prefix tokens (class and register tokens) kept out of the grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from zigzag_mamba.ops.cross_permute import cross_merge, cross_permute
from zigzag_mamba.ops.permute import Permutation, permute_tokens
from zigzag_mamba.orders.layout import (
    Layout,
    _layout,
    check_num_orders,
    check_num_prefix_tokens,
    check_prefix_position,
    traced_layout,
)
from zigzag_mamba.orders.patterns import (
    _PATTERNS,
    Grid,
    as_grid,
    check_layer_idx,
    check_pattern,
    is_video_pattern,
    pattern_family,
)


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
        num_orders: how many orders the layer reads at once (k, for a cross mixer): orders
            ``(layer_idx * k + j) % K`` of the pattern's K, j < k. The buffers are then (k, L),
            :meth:`permute` returns the k sequences side by side, (B, L, k, C), and
            :meth:`unpermute` puts each back in raster order and sums them (its adjoint).

    The buffers ``order`` and ``inverse`` (L,) hold the default grid's order. They are
    non-persistent: they follow ``.to()`` but are not saved in checkpoints, and the module
    refills them whenever its tensors are replaced (``to_empty()`` of a model built on the meta
    device included). The orders of other grids come from
    :func:`~zigzag_mamba.orders.layer_layout`, which builds each once and keeps it.

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
        num_orders: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.pattern = check_pattern(pattern)
        self.num_orders = check_num_orders(num_orders)
        self.pattern_name = pattern if isinstance(pattern, str) else "custom"
        self.layer_idx = check_layer_idx(layer_idx)
        self.num_prefix_tokens = check_num_prefix_tokens(num_prefix_tokens)
        self.prefix_position = check_prefix_position(prefix_position)
        if (self.num_prefix_tokens or self.num_orders > 1) and is_video_pattern(pattern):
            what = "num_prefix_tokens" if self.num_prefix_tokens else "num_orders > 1"
            raise ValueError(
                f"{what} needs a pattern that reads all tokens as one sequence; "
                f"{pattern!r} splits them per frame and per pixel"
            )
        self.grid = None if grid is None else as_grid(grid)
        self.num_tokens = self.seq_len = None
        if self.grid is None:
            self.register_buffer("order", None, persistent=False)
            self.register_buffer("inverse", None, persistent=False)
            return
        layout = self._layout(self.grid, torch.device("cpu"))
        self.num_tokens, self.seq_len = layout.permutation.order.shape[-1], layout.seq_len
        empty = torch.empty(layout.permutation.order.shape, dtype=torch.long, device=device)
        self.register_buffer("order", empty, persistent=False)
        self.register_buffer("inverse", empty.clone(), persistent=False)
        self.init_non_persistent_buffers()

    def _layout(self, grid: Grid, device: torch.device) -> Layout:
        if torch.compiler.is_compiling() and isinstance(self.pattern, str):
            like = torch.empty(0, device=device)
            options = (self.layer_idx, self.num_prefix_tokens, self.prefix_position)
            return traced_layout(like, self.pattern, grid, *options, self.num_orders)
        builder = _PATTERNS.get(self.pattern) if isinstance(self.pattern, str) else None
        options = (self.layer_idx, self.num_prefix_tokens, self.prefix_position)
        return _layout(self.pattern, builder, grid, *options, device, self.num_orders)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fill ``order`` and ``inverse`` with this layer's order on the default grid."""
        if self.order is None or self.order.is_meta:
            return  # no default grid, or a module on the meta device: no memory to fill
        permutation = self._layout(self.grid, torch.device("cpu")).permutation
        self.order.copy_(permutation.order)
        self.inverse.copy_(permutation.inverse)

    def _apply(self, fn, recurse: bool = True):
        # Every move, cast and to_empty() goes through here: refill the orders, so that no
        # call ever reads the uninitialised memory to_empty() leaves.
        module = super()._apply(fn, recurse)
        self.init_non_persistent_buffers()
        return module

    # ------------------------------------------------------------------ orders per call

    def layout(self, x: torch.Tensor, grid: int | Sequence[int] | None = None) -> Layout:
        """The order, inverse and sequence length for permuting the tokens ``x`` (B, L, C) of
        ``grid`` (the default grid when None), after checking that ``x`` has that grid's
        tokens."""
        if grid is None or grid == self.grid:
            self._check_default(x)
            if x.dim() < 2 or x.shape[1] != self.num_tokens:
                raise ValueError(self._token_error(x, self.grid, self.num_tokens))
            return Layout(Permutation(self.order, self.inverse), self.seq_len)
        grid = as_grid(grid)
        # The token count is known before any order is built (a wrong grid may be huge).
        num_tokens = self.num_prefix_tokens + math.prod(grid)
        if x.dim() < 2 or x.shape[1] != num_tokens:
            raise ValueError(self._token_error(x, grid, num_tokens))
        return self._layout(grid, x.device)

    def _check_default(self, x: torch.Tensor) -> None:
        """The default grid's buffers can serve ``x``: there is a default grid, on x's device."""
        if self.order is None:
            raise ValueError(
                "this ZigzagScan was built without a grid: pass the tokens' grid=(H, W) (or "
                "(T, H, W)) with the call"
            )
        if self.order.device != x.device:
            raise ValueError(self._device_advice(x))

    def _device_advice(self, x: torch.Tensor) -> str:
        where = f"this ZigzagScan's orders are on {self.order.device} but the tokens on {x.device}"
        if self.order.is_meta:
            return f"{where}: a module built on the meta device needs to_empty(device=...)"
        return f"{where}: move the module with .to({str(x.device)!r})"

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
        """(B, L, C) raster tokens -> (B * L // seq_len, seq_len, C) in this layer's order;
        (B, L, k, C) for k orders at once."""
        permutation, seq_len = self.layout(x, grid)
        if self.num_orders > 1:
            return cross_permute(x, permutation)
        y = permute_tokens(x, permutation)
        return y.reshape(-1, seq_len, *x.shape[2:])

    def unpermute(self, y: torch.Tensor, grid: int | Sequence[int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`permute`: (B * L // seq_len, seq_len, C) -> (B, L, C) raster; for
        k orders, its adjoint: (B, L, k, C) -> (B, L, C), each order's sequence put back and
        the k summed."""
        if grid is None or grid == self.grid:
            self._check_default(y)
            permutation, seq_len = Permutation(self.order, self.inverse), self.seq_len
        else:
            grid = as_grid(grid)
            permutation, seq_len = self._layout(grid, y.device)
        if self.num_orders > 1:
            return cross_merge(y, permutation)
        num_tokens = permutation.order.shape[0]
        per_sample = num_tokens // seq_len
        if y.dim() < 2 or y.shape[1] != seq_len or y.shape[0] % per_sample:
            raise ValueError(
                f"expected permuted tokens of shape (B*{per_sample}, {seq_len}, C) for grid "
                f"{self.grid if grid is None else grid}, got {tuple(y.shape)}"
            )
        y = y.reshape(y.shape[0] // per_sample, num_tokens, *y.shape[2:])
        return permute_tokens(y, permutation.inverted())

    def extra_repr(self) -> str:
        grid = "given per call" if self.grid is None else self.grid
        text = f"grid={grid}, pattern={self.pattern_name!r}, layer_idx={self.layer_idx}"
        if self.grid is None and self.num_orders > 1:
            text += f", num_orders={self.num_orders}"
        if self.grid is not None:
            k, n = len(pattern_family(self.pattern, self.grid)), self.num_orders
            first = self.layer_idx * n % k
            text += f" (order {first} of {k})" if n == 1 else f" ({n} orders from {first} of {k})"
        if self.seq_len is not None and self.seq_len != self.num_tokens:
            text += f", sequences={self.num_tokens // self.seq_len}x{self.seq_len}"
        if self.num_prefix_tokens:
            text += f", num_prefix_tokens={self.num_prefix_tokens} ({self.prefix_position})"
        return text
