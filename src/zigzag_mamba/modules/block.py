"""ZigMaBlock: RMSNorm -> adaLN modulate -> permute -> Mamba -> unpermute -> gate, the ZigMa layer.

The structure is the official one (kept exactly, for checkpoint parity)::

    residual = residual + h                      (block 0: residual = h; kept in fp32)
    n        = RMSNorm(residual)
    h        = n + gate * unpermute(Mamba(permute(n * (1 + scale) + shift)))
    h        = h + gate2 * CrossAttn(LN(h) * (1 + scale2) + shift2, context)     (text only)

with ``shift, scale, gate(, shift2, scale2, gate2) = adaLN(c)``. Note that ``h`` carries the
normalised stream ``n`` forward, so the next block adds it to the residual again.

The forward is two stages around the mixer, :meth:`ZigMaBlock.mixer_in` (residual add, norm,
modulate, permute) and :meth:`ZigMaBlock.mixer_out` (unpermute, gate, add), each one op of
:mod:`zigzag_mamba.ops.mixer_io`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from zigzag_mamba.modules.attention import CrossAttention
from zigzag_mamba.modules.cross_mamba import CrossMamba
from zigzag_mamba.modules.mamba import BiMamba, Mamba
from zigzag_mamba.modules.validation import check_positive_int
from zigzag_mamba.ops.mixer_io import mixer_in, mixer_out
from zigzag_mamba.ops.permute import permute_tokens
from zigzag_mamba.orders import (
    Layout,
    ZigzagScan,
    as_grid,
    check_layer_idx,
    check_num_prefix_tokens,
)

#: The token-mixing strategies: one order per layer, alternating over the pattern's orders
#: (Mamba, ZigMa's); one order read forward and backward in each layer (BiMamba, Vim's); k
#: orders in each layer, each with its own SSM, summed (CrossMamba, VMamba's SS2D).
MIXERS: dict[str, type[Mamba]] = {"mamba": Mamba, "bidirectional": BiMamba, "cross": CrossMamba}


def modulate(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor:
    """adaLN: x (B, L, D) * (1 + scale) + shift, with shift and scale (B, D) per sample."""
    return x if shift is None else x * (1 + scale[:, None]) + shift[:, None]


def _mixer_and_zigzag(
    mixer: str,
    dim: int,
    grid: int | Sequence[int] | None,
    pattern: str | torch.Tensor | Sequence | None,
    layer_idx: int,
    ssm_cfg: dict | None,
    num_prefix_tokens: int,
    prefix_position: str,
    factory: dict,
) -> tuple[Mamba, ZigzagScan | None]:
    """The layer's mixer and its ZigzagScan (None for no permutation). Prefix tokens are always
    moved to their slot, so with ``pattern=None`` the grid's tokens are read in raster order
    around them. A cross mixer's ZigzagScan holds its k orders."""
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
    module = MIXERS[mixer](dim, layer_idx=layer_idx, **(ssm_cfg or {}), **factory)
    num_orders = getattr(module, "k", 1)
    if check_num_prefix_tokens(num_prefix_tokens) == 0 and pattern is None:
        if mixer == "cross":
            raise ValueError("mixer='cross' reads k orders of a pattern; pattern=None has none")
        if grid is not None:
            as_grid(grid)  # checked, though unused
        return module, None
    zigzag = ZigzagScan(
        grid,
        "sweep" if pattern is None else pattern,
        layer_idx,
        num_prefix_tokens=num_prefix_tokens,
        prefix_position=prefix_position,
        num_orders=num_orders,
        device=factory["device"],
    )
    return module, zigzag


def _check_grid_without_order(x: torch.Tensor, grid: int | Sequence[int] | None) -> None:
    """A block without a permutation still checks a grid it is given against the tokens."""
    if grid is not None and x.shape[1] != math.prod(as_grid(grid)):
        raise ValueError(
            f"expected tokens of shape (B, {math.prod(as_grid(grid))}, C) for grid "
            f"{as_grid(grid)}, got {tuple(x.shape)}: the grid's product must equal the token "
            "count"
        )


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + gate[:, None] * y


class ZigMaBlock(nn.Module):
    """One ZigMa layer on raster tokens (B, L, D) of a ``grid`` (H, W) or (T, H, W).

    Args:
        dim: token width D.
        grid: the default token grid; L must equal its product (plus ``num_prefix_tokens``).
            None builds a block that takes the grid with every call (``block(x, grid=(H, W))``);
            a call may pass another grid than the default too. Orders are built once per grid
            and device, and kept (:class:`~zigzag_mamba.ZigzagScan`).
        pattern: a pattern name (``"zigzag8"``, ``"sweep2"``, ``"video_sst"``, ... see
            :mod:`zigzag_mamba.orders`), explicit orders (an (L,) order, a (k, L) tensor or a
            sequence of orders), or None for no permutation at all (a plain Mamba block).
        layer_idx: which order of the pattern's family this layer uses (``layer_idx % k``).
        mixer: the strategy (:data:`MIXERS`): ``"mamba"`` (one order per layer, alternating
            over the pattern's), ``"bidirectional"`` (Vim-style forward + reversed scan) or
            ``"cross"`` (k orders in every layer, each with its own SSM, summed, as VMamba's
            SS2D; k is ``ssm_cfg["k"]``, default 4, and layer i reads orders ``(i * k + j) %
            K`` of the pattern's K, so ``pattern="sweep4"`` gives SS2D's four directions).
        context_dim: width of the text tokens to cross-attend to; None for no cross-attention.
        adaln: build the adaLN modulation (SiLU -> Linear(D, 3D), or 6D with cross-attention),
            zero-initialised. False builds a block that takes no conditioning at all.
        norm_eps: RMSNorm epsilon.
        ssm_cfg: extra :class:`Mamba` arguments (d_state, d_conv, expand, ...).
        num_prefix_tokens: tokens in front of the grid's (a class token, register tokens),
            kept out of the grid: L = num_prefix_tokens + the grid's product. The output keeps
            the input's token order.
        prefix_position: where the prefix tokens sit in every scanned sequence: ``"end"``
            (default: a causal scan has read the whole grid when it reaches them), ``"middle"``
            (Vim's class-token position, for bidirectional mixers) or ``"start"``.

    Conditioning: ``c`` (B, D) drives the adaLN shift/scale/gate. With ``c=None`` there is no
    modulation: shift = scale = 0 and gate = 1 (the adaLN layer, if built, is unused).

    Calls: ``block(x, c, context)`` returns the residual stream after the block,
    ``(residual + h).to(x.dtype)`` of :meth:`forward_residual` started with ``residual=None``;
    a stack of blocks called this way computes what the backbone's stack computes. At init
    (zero adaLN) and with ``c`` given, every gate is 0, so the mixer and the cross-attention
    contribute exactly nothing: ``forward_residual`` returns ``(RMSNorm(residual + h),
    residual + h)`` and ``block(x, c) == x + RMSNorm(x)`` (the official structure, not an
    identity), and the mixer's parameters get zero gradients.

    Example::

        >>> block = ZigMaBlock(dim=64, grid=(4, 4), pattern="zigzag8", layer_idx=3)
        >>> block(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> block(torch.randn(2, 16, 64), c=torch.randn(2, 64)).shape
        torch.Size([2, 16, 64])
        >>> anywhere = ZigMaBlock(dim=64, pattern="zigzag8", layer_idx=3, num_prefix_tokens=1)
        >>> anywhere(torch.randn(2, 1 + 6 * 8, 64), grid=(6, 8)).shape  # class token + 6 x 8
        torch.Size([2, 49, 64])
    """

    def __init__(
        self,
        dim: int,
        grid: int | Sequence[int] | None = None,
        pattern: str | torch.Tensor | Sequence | None = "zigzag8",
        layer_idx: int = 0,
        *,
        mixer: str = "mamba",
        context_dim: int | None = None,
        adaln: bool = True,
        norm_eps: float = 1e-5,
        ssm_cfg: dict | None = None,
        num_prefix_tokens: int = 0,
        prefix_position: str = "end",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_layer_idx(layer_idx)
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.layer_idx = layer_idx
        self.norm = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.mixer, self.zigzag = _mixer_and_zigzag(
            mixer,
            dim,
            grid,
            pattern,
            layer_idx,
            ssm_cfg,
            num_prefix_tokens,
            prefix_position,
            factory,
        )
        self.msa = self.norm_msa = None
        if context_dim is not None:
            self.msa = CrossAttention(dim, context_dim, **factory)
            self.norm_msa = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = None
        if adaln:
            chunks = 3 if self.msa is None else 6
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(dim, chunks * dim, **factory)
            )
            self.zero_init_modulation()

    @torch.no_grad()
    def zero_init_modulation(self) -> None:
        """Zero the adaLN layer: every gate starts at 0, so the block adds no mixer output."""
        if self.adaLN_modulation is not None:
            nn.init.zeros_(self.adaLN_modulation[1].weight)
            nn.init.zeros_(self.adaLN_modulation[1].bias)

    def _modulation(self, c: torch.Tensor | None, batch: int) -> list:
        chunks = 3 if self.msa is None else 6
        if c is None:
            return [None] * chunks
        if self.adaLN_modulation is None:
            raise ValueError("this block was built with adaln=False and takes no conditioning c")
        if c.dim() != 2 or c.shape[1] != self.dim:
            raise ValueError(f"c must have shape (B, dim={self.dim}), got {tuple(c.shape)}")
        if c.shape[0] != batch:
            raise ValueError(f"c has {c.shape[0]} rows for a batch of {batch} (x's first size)")
        return list(self.adaLN_modulation(c).chunk(chunks, dim=-1))

    def mixer_in(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        shift: torch.Tensor | None,
        scale: torch.Tensor | None,
        grid: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1, one op: residual add -> RMSNorm -> modulate -> permute.

        ``shift``, ``scale`` (B, D) or None; ``grid`` the tokens' grid (None: the block's).
        Returns the new residual (B, L, D, in at least fp32), the normalised tokens ``h_norm``
        (B, L, D, in h's dtype) and the mixer's input, permuted (B', seq_len, D); B' = B * L /
        seq_len differs from B for video patterns.
        """
        permutation, seq_len = self._stage_layout(h, grid)
        residual, h_norm, x = mixer_in(
            h, residual, self.norm.weight, shift, scale, permutation, self.norm.eps
        )
        return residual, h_norm, rearrange(x, "b (n l) d -> (b n) l d", l=seq_len)

    def mixer_out(
        self,
        h_norm: torch.Tensor,
        gate: torch.Tensor | None,
        y: torch.Tensor,
        grid: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Stage 2, one op: unpermute the mixer's output ``y``, gate it ((B, D) or
        None) and add it to ``h_norm`` (B, L, D)."""
        permutation, seq_len = self._stage_layout(h_norm, grid)
        # Sequences per sample, rather than the batch size: einops cannot split 0 rows by 0.
        y = rearrange(y, "(b n) l d -> b (n l) d", n=h_norm.shape[1] // seq_len)
        return mixer_out(h_norm, gate, y, permutation)

    def _layout(self, h: torch.Tensor, grid: int | Sequence[int] | None) -> Layout:
        """The order, inverse and sequence length for the tokens ``h`` of ``grid``, checked."""
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[2] != self.dim:
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"x must be tokens (B, L, dim={self.dim}), got {shape}")
        if self.zigzag is None:
            _check_grid_without_order(h, grid)
            return Layout(None, h.shape[1])
        return self.zigzag.layout(h, grid)

    def _stage_layout(self, h: torch.Tensor, grid: int | Sequence[int] | None) -> Layout:
        """What the stages permute by: the layer's order, or none for a cross mixer, which
        reads its k orders itself (after its in_proj, so that it is not run k times)."""
        layout = self._layout(h, grid)
        return Layout(None, layout.seq_len) if self.num_orders > 1 else layout

    @property
    def num_orders(self) -> int:
        """How many orders the layer reads at once (k for a cross mixer, else 1)."""
        return 1 if self.zigzag is None else self.zigzag.num_orders

    def _mix(self, x: torch.Tensor, grid: int | Sequence[int] | None) -> torch.Tensor:
        if self.num_orders == 1:
            return self.mixer(x)
        return self.mixer(x, self._layout(x, grid).permutation)

    def _cross_attend(
        self, h: torch.Tensor, context: torch.Tensor | None, shift, scale, gate
    ) -> torch.Tensor:
        if context is None:
            raise ValueError("this block cross-attends to text: pass context (B, S, context_dim)")
        attended = self.msa(modulate(self.norm_msa(h), shift, scale), context)
        return _gated_add(h, attended, gate)

    def forward_residual(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None = None,
        c: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        grid: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's call: ``(h, residual) -> (h, residual)``, both (B, L, D).

        ``residual=None`` starts the stream (block 0). The residual stays in (at least) fp32.
        ``grid``: the tokens' grid, (H, W) or (T, H, W); None means the block's own.
        """
        if context is not None and self.msa is None:
            raise ValueError("this block has no cross-attention (context_dim=None); got context")
        modulation = self._modulation(c, h.shape[0])
        shift, scale, gate = modulation[:3]
        residual, h_norm, x = self.mixer_in(h, residual, shift, scale, grid)
        h = self.mixer_out(h_norm, gate, self._mix(x, grid), grid)
        if self.msa is not None:
            h = self._cross_attend(h, context, *modulation[3:])
        return h, residual

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        grid: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(B, L, D) tokens -> (B, L, D): the residual stream after this block.

        ``grid``: the tokens' grid, (H, W) or (T, H, W); None means the block's own.
        """
        h, residual = self.forward_residual(x, None, c, context, grid)
        return (residual + h).to(x.dtype)


class ZigMaMixer(nn.Module):
    """The ZigMa token mixer alone: permute -> Mamba -> unpermute, (B, L, D) -> (B, L, D).

    What :func:`zigzag_mamba.integrations.replace_attention` puts in place of a ViT's
    attention: no norm, residual or conditioning of its own (the host block has those), the
    output in the input's token order. Arguments as :class:`ZigMaBlock`'s; ``ssm_cfg`` are
    :class:`Mamba`'s own arguments.

    Example::

        >>> mixer = ZigMaMixer(64, pattern="zigzag8", layer_idx=2, num_prefix_tokens=1)
        >>> mixer(torch.randn(2, 1 + 4 * 6, 64), grid=(4, 6)).shape
        torch.Size([2, 25, 64])
    """

    def __init__(
        self,
        dim: int,
        grid: int | Sequence[int] | None = None,
        pattern: str | torch.Tensor | Sequence | None = "zigzag8",
        layer_idx: int = 0,
        *,
        mixer: str = "mamba",
        ssm_cfg: dict | None = None,
        num_prefix_tokens: int = 0,
        prefix_position: str = "end",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.layer_idx = check_layer_idx(layer_idx)
        factory = {"device": device, "dtype": dtype}
        self.mixer, self.zigzag = _mixer_and_zigzag(
            mixer,
            dim,
            grid,
            pattern,
            layer_idx,
            ssm_cfg,
            num_prefix_tokens,
            prefix_position,
            factory,
        )

    def forward(self, x: torch.Tensor, grid: int | Sequence[int] | None = None) -> torch.Tensor:
        """``x`` (B, L, D): the prefix tokens, then the grid's tokens in raster order."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be tokens (B, L, dim={self.dim}), got {shape}")
        if self.zigzag is None:
            _check_grid_without_order(x, grid)
            return self.mixer(x)
        permutation, seq_len = self.zigzag.layout(x, grid)
        if self.zigzag.num_orders > 1:
            return self.mixer(x, permutation)
        y = permute_tokens(x, permutation).reshape(-1, seq_len, self.dim)
        y = self.mixer(y).reshape(x.shape)
        return permute_tokens(y, permutation.inverted())
