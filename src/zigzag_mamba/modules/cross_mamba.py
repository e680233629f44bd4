"""The cross mixer: k token orders scanned in one layer, each with its own SSM, and merged.

VMamba's SS2D reads an image in four directions in every layer; this is that strategy for any
pattern (k >= 2; with one order it is :class:`Mamba`). From the tokens h (B, L, D) in raster
order and k orders (a :class:`~zigzag_mamba.ops.permute.Permutation` with (k, L) tensors)::

    x, z  = split(in_proj(h))                                       (B, L, E) each, shared
    xs    = cross_permute(x)                                        (B, L, k, E): x in each order
    u     = silu(causal_conv1d(xs as (B, k * E, L)))                one conv of k * E channels
    dt, B, C = x_proj[j](u_j), per order j, batched                 (B, k, L, R + 2N)
    y     = selective_scan(u, dt_proj[j](dt), A, B, C, D)           one scan of k * E channels,
                                                                    B and C grouped per order
    out   = out_proj(cross_merge(y) * silu(z))                      each order put back, summed

The k scans are one call (k * E channels; B and C in k groups), with no loop over the orders.
The merge is the sum, as in SS2D: each order has its own SSM parameters (D and the output
scale of its scan among them) and out_proj follows, so a learned weight per order would add
nothing they cannot already express. The gate is applied after the merge: ``silu(z)`` is per
token and channel, so gating each order's output by its permuted z before putting it back gives
the same sum, for one multiplication instead of k. Direction j is exactly a :class:`Mamba` with the
shared ``in_proj`` / ``out_proj`` and the j-th slices of the stacked parameters::

    conv1d.weight   (k*E, 1, d_conv)   conv1d.bias   (k*E,)     rows j*E .. (j+1)*E - 1
    x_proj_weight   (k, R + 2N, E)     dt_proj_weight (k, E, R)  dt_proj_bias (k, E)
    A_log           (k*E, N)           D              (k*E,)

(:meth:`CrossMamba.forward_reference` is that loop over k Mamba branches, the definition the
batched forward is tested against). The branch is differentiated by autograd: the
``recompute`` of :class:`Mamba` does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zigzag_mamba.modules.mamba import Mamba
from zigzag_mamba.modules.validation import check_positive_int
from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.cross_permute import cross_merge, cross_permute
from zigzag_mamba.ops.permute import Permutation, permute_tokens_reference
from zigzag_mamba.ops.selective_scan import selective_scan
from zigzag_mamba.ops.ssm_branch import ssm_branch_reference


class CrossMamba(Mamba):
    """k orders scanned in one layer, each with its own SSM, merged by a sum: (B, L, D) ->
    (B, L, D). Arguments are :class:`Mamba`'s, and ``k``, the number of orders (4, as SS2D's
    four directions).

    Called with the tokens in raster order and the layer's k orders (what
    ``ZigzagScan(..., num_orders=k).layout(x)`` gives); :class:`~zigzag_mamba.ZigMaBlock`
    with ``mixer="cross"`` does that.

    Example::

        >>> from zigzag_mamba.orders import layer_layout
        >>> mixer = CrossMamba(d_model=64, k=4)
        >>> layout = layer_layout("sweep4", (4, 4), num_orders=4)
        >>> mixer(torch.randn(2, 16, 64), layout.permutation).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, d_model: int, k: int = 4, **kwargs) -> None:
        if check_positive_int("k (orders per layer)", k) < 2:
            raise ValueError("k (orders per layer) must be >= 2 for a cross mixer; k=1 is 'mamba'")
        self.k = k
        super().__init__(d_model, **kwargs)

    def _build_branch(self, conv_bias: bool, factory: dict) -> None:
        k, E, R, N = self.k, self.d_inner, self.dt_rank, self.d_state
        channels = k * E
        self.conv1d = nn.Conv1d(
            channels,
            channels,
            self.d_conv,
            groups=channels,
            padding=self.d_conv - 1,  # unused by the causal op; kept for the module repr
            bias=conv_bias,
            **factory,
        )
        self.x_proj_weight = nn.Parameter(torch.empty(k, R + 2 * N, E, **factory))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, E, R, **factory))
        self.dt_proj_bias = nn.Parameter(torch.empty(k, E, **factory))
        self.A_log = nn.Parameter(torch.empty(k * E, N, device=factory["device"]))
        self.D = nn.Parameter(torch.empty(k * E, device=factory["device"]))

    @torch.no_grad()
    def _reset_own_branch(self) -> None:
        self.conv1d.reset_parameters()
        E = self.d_inner
        for j in range(self.k):
            rows = slice(j * E, (j + 1) * E)
            weights = (self.x_proj_weight[j], self.dt_proj_weight[j], self.dt_proj_bias[j])
            self._reset_ssm(*weights, self.A_log[rows], self.D[rows])
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _weights(self, dtype: torch.dtype) -> tuple:
        """The stacked parameters, cast like :class:`Mamba`'s to the tokens' dtype (A, D and
        the dt bias stay fp32)."""
        bias = None if self.conv1d.bias is None else self.conv1d.bias.to(dtype)
        return (
            self.conv1d.weight.squeeze(1).to(dtype),
            bias,
            self.x_proj_weight.to(dtype),
            self.dt_proj_weight.to(dtype),
            -torch.exp(self.A_log.float()),
            self.D.float(),
            self.dt_proj_bias.float().reshape(-1),
        )

    def _check_orders(self, permutation: Permutation) -> None:
        if not isinstance(permutation, Permutation) or permutation.order.dim() != 2:
            raise TypeError(
                f"CrossMamba takes the tokens and a Permutation of its k={self.k} orders, (k, L) "
                "tensors (ZigzagScan(..., num_orders=k).layout(x))"
            )
        if permutation.order.shape[0] != self.k:
            raise ValueError(
                f"this CrossMamba reads k={self.k} orders; got {permutation.order.shape[0]}"
            )

    def forward(self, hidden_states: torch.Tensor, permutation: Permutation) -> torch.Tensor:
        """``hidden_states`` (B, L, D) in raster order; ``permutation`` the k orders (k, L)."""
        self._check_orders(permutation)
        xz = self._project(hidden_states)
        x, z = xz.chunk(2, dim=-1)
        conv_w, conv_b, x_proj_w, dt_proj_w, A, D, delta_bias = self._weights(xz.dtype)
        # (B, L, k, E) viewed as (B, k * E, L), channels last: the k sequences side by side.
        xs = rearrange(cross_permute(x, permutation), "b l k e -> b (k e) l")
        u = causal_conv1d(xs, conv_w, conv_b, activation="silu")
        u_k = rearrange(u, "b (k e) l -> b k e l", k=self.k)
        rank, n_state = self.dt_rank, self.d_state
        projected = torch.einsum("bkel,kre->bklr", u_k, x_proj_w)
        dt, B, C = projected.split([rank, n_state, n_state], dim=-1)
        delta = torch.einsum("bklr,ker->bkel", dt, dt_proj_w)
        y = selective_scan(
            u,
            rearrange(delta, "b k e l -> b (k e) l"),
            A,
            B.transpose(2, 3),
            C.transpose(2, 3),
            D,
            delta_bias=delta_bias,
            delta_softplus=True,
        )
        merged = cross_merge(rearrange(y, "b (k e) l -> b l k e", k=self.k), permutation)
        return self.out_proj(merged * F.silu(z))

    def forward_reference(
        self, hidden_states: torch.Tensor, permutation: Permutation
    ) -> torch.Tensor:
        """The definition: k :class:`Mamba` branches, one per order, in a loop, each gated by
        its permuted z, put back in raster order and summed."""
        self._check_orders(permutation)
        xz = self._project(hidden_states)
        conv_w, conv_b, x_proj_w, dt_proj_w, A, D, delta_bias = self._weights(xz.dtype)
        E, out = self.d_inner, 0
        for j in range(self.k):
            rows = slice(j * E, (j + 1) * E)
            xz_j = permute_tokens_reference(xz, permutation.order[j])
            bias_j = None if conv_b is None else conv_b[rows]
            weights = (x_proj_w[j], dt_proj_w[j], A[rows], D[rows], delta_bias[rows])
            y = ssm_branch_reference(xz_j, conv_w[rows], bias_j, *weights)  # (B, E, L)
            out = out + permute_tokens_reference(y.transpose(1, 2), permutation.inverse[j])
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"k={self.k}, " + super().extra_repr()
