"""The Mamba-1 mixer, and the bidirectional (Vim-style) variant used as a baseline.

The parameters, their names, shapes and initialisation are those of ``mamba_ssm.Mamba``, so state
dicts move between the two unchanged::

    in_proj.weight   (2*d_inner, d_model)     x_proj.weight  (dt_rank + 2*d_state, d_inner)
    conv1d.weight    (d_inner, 1, d_conv)     dt_proj.weight (d_inner, dt_rank)
    conv1d.bias      (d_inner,)               dt_proj.bias   (d_inner,)
    A_log            (d_inner, d_state)       D              (d_inner,)
    out_proj.weight  (d_model, d_inner)

The SSM branch (conv + SiLU -> x_proj -> dt_proj -> selective scan gated by z) is one op,
:func:`zigzag_mamba.ops.ssm_branch.ssm_branch`, whose backward recomputes the conv and the
projections instead of keeping them (``Mamba.recompute``); the scan and the convolution inside it
pick their kernel per device.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from zigzag_mamba.modules.validation import check_positive, check_positive_int, dtype_mismatch
from zigzag_mamba.ops.backends import requested, resolve
from zigzag_mamba.ops.ssm_branch import ssm_branch, ssm_branch_reference
from zigzag_mamba.orders import check_layer_idx


class Mamba(nn.Module):
    """The Mamba-1 selective-state-space mixer: (B, L, D) -> (B, L, D).

    Arguments are those of ``mamba_ssm.Mamba``. ``use_fast_path`` is kept so that mamba_ssm
    configs pass unchanged; it has no effect here (the kernel is chosen per device, see
    :func:`zigzag_mamba.use_backend`). ``A_log`` and ``D`` stay in fp32 whatever ``dtype`` is.

    ``recompute`` (a class attribute; set it on an instance or on the class): True runs the SSM
    branch as :func:`~zigzag_mamba.ops.ssm_branch.ssm_branch`, which keeps only the in_proj
    output and the scan's checkpoints for the backward and recomputes the conv and the
    projections there; False differentiates the branch with plain autograd, which keeps every
    intermediate (more memory, no recomputation). Outputs and gradients are the same. None, the
    default, recomputes on accelerators, where memory bounds the batch, and not on the CPU, where
    the recomputation costs more time than the memory it saves is worth (docs/benchmarks.md).

    Example::

        >>> mixer = Mamba(d_model=64)
        >>> mixer(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    recompute: bool | None = None

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model = check_positive_int("d_model (the block's dim)", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.expand = check_positive("expand", expand)
        self.d_inner = int(expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand * d_model must be >= 1, got {expand} * {d_model}")
        self.dt_rank = (
            math.ceil(d_model / 16) if dt_rank == "auto" else check_positive_int("dt_rank", dt_rank)
        )
        if layer_idx is not None:
            check_layer_idx(layer_idx)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_init, self.dt_scale = dt_init, dt_scale
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        factory = {"device": device, "dtype": dtype}

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self._build_branch(conv_bias, factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        # Not the virtual call: a subclass initialises the parameters it adds itself.
        Mamba.reset_parameters(self)

    def _build_branch(self, conv_bias: bool, factory: dict) -> None:
        """The SSM branch's layers: conv1d, x_proj, dt_proj, A_log and D."""
        self.conv1d, self.x_proj, self.dt_proj = self._branch_layers(conv_bias, factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, device=factory["device"]))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=factory["device"]))

    def _branch_layers(
        self, conv_bias: bool, factory: dict
    ) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,  # unused by the causal op; kept for mamba_ssm's module repr
            bias=conv_bias,
            **factory,
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        return conv1d, x_proj, dt_proj

    @torch.no_grad()
    def _reset_branch(
        self,
        conv1d: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> None:
        conv1d.reset_parameters()
        self._reset_ssm(x_proj.weight, dt_proj.weight, dt_proj.bias, A_log, D)
        # Backbone initialisers zero Linear biases; this flag (mamba_ssm's) exempts this one.
        dt_proj.bias._no_reinit = True
        A_log._no_weight_decay = True
        D._no_weight_decay = True

    @torch.no_grad()
    def _reset_ssm(
        self,
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_proj_bias: torch.Tensor,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> None:
        """One direction's projections and SSM parameters, initialised as mamba_ssm does."""
        nn.init.kaiming_uniform_(x_proj_weight, a=math.sqrt(5))  # nn.Linear's own init
        # dt_proj's weight keeps the variance of dt at init; its bias is the inverse softplus of
        # a dt drawn log-uniformly in [dt_min, dt_max], so that softplus(bias) starts there.
        std = self.dt_rank**-0.5 * self.dt_scale
        if self.dt_init == "constant":
            nn.init.constant_(dt_proj_weight, std)
        else:
            nn.init.uniform_(dt_proj_weight, -std, std)
        log_min, log_max = math.log(self.dt_min), math.log(self.dt_max)
        u = torch.rand(self.d_inner, device=dt_proj_bias.device)
        dt = torch.exp(u * (log_max - log_min) + log_min).clamp(min=self.dt_init_floor)
        dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., d_state) in every channel.
        A_log.copy_(torch.arange(1, self.d_state + 1, dtype=torch.float32).log().expand_as(A_log))
        D.fill_(1.0)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as ``mamba_ssm.Mamba`` does (e.g. after ``to_empty``)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self._reset_own_branch()

    def _reset_own_branch(self) -> None:
        self._reset_branch(*self._forward_branch())

    def _forward_branch(self) -> tuple:
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def _branch(self, xz: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """The SSM branch on the in_proj output xz (B, L, 2*d_inner): y (B, d_inner, L)."""
        layers = self._reverse_branch() if reverse else self._forward_branch()
        conv1d, x_proj, dt_proj, A_log, D = layers
        # Cast like mamba_ssm's fused path: under autocast xz is already in the autocast dtype.
        bias = None if conv1d.bias is None else conv1d.bias.to(xz.dtype)
        args = (
            xz,
            conv1d.weight.squeeze(1).to(xz.dtype),
            bias,
            x_proj.weight.to(xz.dtype),
            dt_proj.weight.to(xz.dtype),
            -torch.exp(A_log.float()),
            D.float(),
            dt_proj.bias.float(),  # added by the scan (in fp32) before the softplus
        )
        # Forced to "reference", the scan runs its loop under autograd (outside torch.compile).
        reference = not torch.compiler.is_compiling() and requested("selective_scan") == "reference"
        recompute = xz.device.type != "cpu" if self.recompute is None else self.recompute
        branch = ssm_branch if recompute and not reference else ssm_branch_reference
        return branch(*args, reverse=reverse)

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.dim() != 3 or hidden_states.shape[2] != self.d_model:
            raise ValueError(
                f"expected tokens (B, L, d_model={self.d_model}), got {tuple(hidden_states.shape)}"
            )

    def _project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj, checked: (B, L, d_model) -> xz (B, L, 2 * d_inner)."""
        self._check_input(hidden_states)
        try:
            return self.in_proj(hidden_states)
        except RuntimeError as exc:
            if hidden_states.dtype == self.in_proj.weight.dtype:
                raise
            raise dtype_mismatch(hidden_states, self.in_proj.weight, type(self).__name__) from exc

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = self._branch(self._project(hidden_states))
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def extra_repr(self) -> str:
        try:
            backend = resolve("selective_scan", self.A_log.device.type)
        except (RuntimeError, ValueError) as exc:  # a meta module; a misspelt env var
            backend = f"none ({exc})"
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, layer_idx={self.layer_idx}, "
            f"selective_scan={backend!r}"
        )


class BiMamba(Mamba):
    """Vim-style bidirectional mixer: a forward and a time-reversed scan, summed.

    The reversed branch has its own conv, x_proj, dt_proj, A and D (named ``conv1d_b``,
    ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b`` as in the official ZigMa "v2" model) and
    shares ``in_proj`` / ``out_proj``; z gates both branches. Both branches are initialised like
    :class:`Mamba`'s.

    Example::

        >>> BiMamba(d_model=64)(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, d_model: int, **kwargs) -> None:
        super().__init__(d_model, **kwargs)
        weight = self.out_proj.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        conv_bias = self.conv1d.bias is not None
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._branch_layers(conv_bias, factory)
        self.A_b_log = nn.Parameter(torch.empty_like(self.A_log))
        self.D_b = nn.Parameter(torch.empty_like(self.D))
        self._reset_branch(*self._reverse_branch())

    def _reverse_branch(self) -> tuple:
        return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_branch(*self._reverse_branch())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self._project(hidden_states)
        y = self._branch(xz) + self._branch(xz, reverse=True)
        return self.out_proj(rearrange(y, "b d l -> b l d"))
