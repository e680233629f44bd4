"""ZigMaBackbone: a DiT-style diffusion backbone whose layers are zigzag-scan Mamba blocks.

    x (B, C, H, W) or (B, T, C, H, W), t (B,) in [0, 1], y (B,) labels or context (B, S, d_ctx)
      -> patch embed + positional embedding            tokens (B, L, D), raster (t, h, w) order
      -> c = TimestepEmbed(1000 t) [+ LabelEmbed(y) | + mean(ContextEmbed(context))]
      -> depth x ZigMaBlock (layer i reads the tokens in order i % k of the pattern)
      -> RMSNorm_f(residual + h) -> LayerNorm (no affine) -> Linear(D, p*p*C) -> unpatchify

The parameter names are those of the official ZigMa checkpoints (see
:mod:`zigzag_mamba.models.official`). :class:`ZigMaConfig` holds the arguments and ``CONFIGS``
the official size presets (:mod:`zigzag_mamba.models.config`).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from zigzag_mamba.models.config import CONFIGS, ZigMaConfig
from zigzag_mamba.models.official import convert_official_state_dict
from zigzag_mamba.modules.block import ZigMaBlock
from zigzag_mamba.modules.embed import (
    ContextEmbedder,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    unpatchify,
)
from zigzag_mamba.modules.validation import dtype_mismatch

__all__ = ["CONFIGS", "ZigMaBackbone", "ZigMaConfig"]
# The file names of huggingface_hub's PyTorchModelHubMixin, so that a saved folder can be pushed
# to (or was downloaded from) the Hub as it is.
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class FinalLayer(nn.Module):
    """LayerNorm (no affine), then a linear map to patch pixels: (B, L, D) -> (B, L, p*p*C)."""

    def __init__(self, dim: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class ZigMaBackbone(nn.Module):
    """The ZigMa denoiser for images (B, C, H, W) or videos (B, T, C, H, W).

    Takes a :class:`ZigMaConfig`, or its fields as keyword arguments (which override the
    config's when both are given): ``input_size``, ``patch_size``, ``in_channels``, ``dim``,
    ``depth``, ``pattern``, ``pos_embed``, ``num_frames``, ``num_classes``,
    ``class_dropout_prob``, ``context_dim``, ``mixer``, ``ssm_cfg``, ``norm_eps``; see
    :class:`ZigMaConfig` for each. ``model.config`` is that config, as :meth:`save_pretrained`
    writes it.

    Example::

        >>> model = ZigMaBackbone(input_size=8, in_channels=4, **CONFIGS["ZigMa-T/2"])
        >>> model(torch.randn(2, 4, 8, 8), torch.rand(2)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        config: ZigMaConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, ZigMaConfig):
            raise TypeError(
                f"config must be a ZigMaConfig (or None, with its fields as keyword arguments), "
                f"got {type(config).__name__}"
            )
        config = ZigMaConfig(**options) if config is None else replace(config, **options)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.image_size = config.input_size
        self.patch_size, self.in_channels = config.patch_size, config.in_channels
        self.num_frames, self.dim, self.depth = config.num_frames, config.dim, config.depth
        self.grid = config.grid
        self.pos_embed_type = config.pos_embed
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.dim, **factory)
        self.t_embedder = TimestepEmbedder(config.dim, **factory)
        self.y_embedder: nn.Module | None = None
        if config.num_classes > 0:
            self.y_embedder = LabelEmbedder(
                config.num_classes, config.dim, config.class_dropout_prob, **factory
            )
        elif config.context_dim is not None:
            self.y_embedder = ContextEmbedder(config.context_dim, config.dim, **factory)
        self._build_pos_embed(factory)

        self.blocks = nn.ModuleList(
            ZigMaBlock(
                config.dim,
                self.grid,
                config.pattern,
                layer_idx=i,
                mixer=config.mixer,
                context_dim=config.dim if config.context_dim is not None else None,
                norm_eps=config.norm_eps,
                ssm_cfg=config.ssm_cfg,
                **factory,
            )
            for i in range(config.depth)
        )
        self.norm_f = nn.RMSNorm(config.dim, eps=config.norm_eps, **factory)
        out_features = config.patch_size * config.patch_size * config.in_channels
        self.final_layer = FinalLayer(config.dim, out_features, **factory)
        self.initialize_weights()

    def _build_pos_embed(self, factory: dict) -> None:
        tokens = math.prod(self.grid)
        self.pos_embed = self.temporal_pos_embedding = None
        if self.pos_embed_type != "none":
            table = torch.zeros(1, tokens, self.dim, **factory)
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed_type == "learned")
        if self.num_frames and self.pos_embed_type == "sincos":
            self.temporal_pos_embedding = nn.Parameter(
                torch.zeros(1, self.num_frames, self.dim, **factory)
            )

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Recompute what is a pure function of the config: the token orders and the fixed
        sin-cos table (a frozen parameter, kept in checkpoints as the official ``pos_embed``).

        ``to_empty()`` refills the orders itself; a loaded state dict brings the table.
        """
        for block in self.blocks:
            if block.zigzag is not None:
                block.zigzag.init_non_persistent_buffers()
        if self.pos_embed_type == "sincos":
            table = sincos_2d(self.dim, *self.grid[-2:])
            self.pos_embed.copy_(table.repeat(max(self.num_frames, 1), 1).unsqueeze(0))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re-)initialise every parameter as the official ZigMa does, and the buffers.

        Also brings a model built on the meta device to life after ``to_empty()``.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Embedding | nn.RMSNorm):
                module.reset_parameters()
        for block in self.blocks:
            block.mixer.reset_parameters()
            # GPT-2 style: shrink each residual branch's output projection by 1/sqrt(depth).
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight.div_(math.sqrt(self.depth))
        for module in self.modules():
            bias = getattr(module, "bias", None)
            if (
                isinstance(module, nn.Linear)
                and bias is not None
                and not getattr(bias, "_no_reinit", False)
            ):
                nn.init.zeros_(bias)
        self.x_embedder.reset_parameters()
        self.t_embedder.reset_parameters()
        if isinstance(self.y_embedder, LabelEmbedder):
            self.y_embedder.reset_parameters()
        # Zero adaLN: every block starts with gates at 0, i.e. adds no mixer output.
        for block in self.blocks:
            block.zero_init_modulation()
        for table in (self.pos_embed, self.temporal_pos_embedding):
            if table is not None:
                nn.init.zeros_(table)
        self.init_non_persistent_buffers()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @property
    def gradient_checkpointing(self) -> bool:
        """diffusers' name of :attr:`grad_checkpointing`: its ``enable_gradient_checkpointing()``
        sets this, and may set ``_gradient_checkpointing_func`` (called as ``fn(function,
        *args)``) to recompute with; the default is ``torch.utils.checkpoint.checkpoint``."""
        return self.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.grad_checkpointing = bool(enable)

    @classmethod
    def from_official(cls, state_dict: dict[str, torch.Tensor], **config) -> ZigMaBackbone:
        """Build a backbone from a state dict saved by the official ZigMa code (strict load).

        ``config`` are this class's arguments;
        :func:`zigzag_mamba.models.official.official_config` translates the official ones.
        ``class_dropout_prob`` defaults to 0 here: official class tables have no null row.

        The official training script writes its checkpoints as files named by their step
        (``0300000.pt`` after 300,000 steps) holding the weights under ``"model"`` and
        ``"ema"``; the model's arguments are its config file's ``params``.

        Example::

            >>> params = dict(img_dim=8, in_channels=4, patch_size=2, embed_dim=64, depth=2,
            ...               scan_type="zigzagN8", use_pe=2)  # ZigMa-B/1 is 32, 4, 1, 768, 24
            >>> config = zigzag_mamba.models.official.official_config(**params)
            >>> # Stand-in for an official checkpoint: one in the same layout, made here.
            >>> torch.save({"ema": ZigMaBackbone(**config).state_dict()}, "0300000.pt")
            >>> sd = torch.load("0300000.pt", map_location="cpu", weights_only=True)["ema"]
            >>> model = ZigMaBackbone.from_official(sd, **config)
            >>> model.config.pattern, model.config.dim
            ('zigzag8', 64)
        """
        config.setdefault("class_dropout_prob", 0.0)
        model = cls(**config)
        model.load_state_dict(convert_official_state_dict(state_dict), strict=True)
        return model

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` (the constructor's arguments) and ``model.safetensors``.

        The folder has the layout of huggingface_hub's ``PyTorchModelHubMixin``; load it with
        :meth:`from_pretrained`. Needs ``safetensors`` (the hub extra: ``pip install -e '.[hub]'``).

        Example::

            >>> model = ZigMaBackbone(input_size=8, in_channels=4, **CONFIGS["ZigMa-T/2"])
            >>> model.save_pretrained("zigma-t2-run7")
            >>> same = ZigMaBackbone.from_pretrained("zigma-t2-run7")
            >>> sorted(p.name for p in Path("zigma-t2-run7").iterdir())
            ['config.json', 'model.safetensors']
        """
        save_file = _safetensors().save_file
        config = self.config.to_dict()  # raises for explicit orders, before anything is written
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        # safetensors writes through a private temporary file (mode 0600); give the weights
        # the permissions open() gave config.json (0666 less the umask).
        os.chmod(directory / WEIGHTS_NAME, stat.S_IMODE((directory / CONFIG_NAME).stat().st_mode))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **overrides,
    ) -> ZigMaBackbone:
        """Load a folder written by :meth:`save_pretrained` (strict: every weight must match).

        ``overrides`` replace entries of the saved config that do not change any weight's
        shape, e.g. another ``pattern``. For a model on the Hub, download
        the folder first (``huggingface_hub.snapshot_download(repo_id)``) and pass its path.
        The model is built on the meta device, so that no weight is initialised only to be
        overwritten.
        """
        load_file = _safetensors().load_file
        directory = Path(directory)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a saved ZigMaBackbone: {' and '.join(missing)} missing"
            )
        config = _read_config(directory / CONFIG_NAME)
        model = cls(config, device="meta", dtype=dtype, **overrides)
        model = model.to_empty(device=device or "cpu")
        model.load_state_dict(load_file(directory / WEIGHTS_NAME), strict=True)
        return model

    # ------------------------------------------------------------------ forward

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        C, (H, W) = self.in_channels, self.image_size
        expected = (self.num_frames, C, H, W) if self.num_frames else (C, H, W)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            kind = "(B, T, C, H, W)" if self.num_frames else "(B, C, H, W)"
            raise ValueError(
                f"expected input {kind} = (B, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}"
            )
        if self.num_frames:
            x = rearrange(x, "b t c h w -> (b t) c h w")
        try:
            tokens = self.x_embedder(x)
        except RuntimeError as exc:
            weight = self.x_embedder.proj.weight
            if x.dtype == weight.dtype:
                raise
            raise dtype_mismatch(x, weight, "ZigMaBackbone") from exc
        if not self.num_frames:
            return tokens
        return rearrange(tokens, "(b t) l d -> b (t l) d", t=self.num_frames)

    def _add_positions(self, h: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            h = h + self.pos_embed
        if self.temporal_pos_embedding is not None:
            frames = rearrange(h, "b (t l) d -> b t l d", t=self.num_frames)
            frames = frames + rearrange(self.temporal_pos_embedding, "1 t d -> 1 t 1 d")
            h = rearrange(frames, "b t l d -> b (t l) d")
        return h

    def _condition(
        self, t: torch.Tensor, y: torch.Tensor | None, context: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """c (B, D) and the projected text tokens (B, S, D) or None."""
        t = torch.as_tensor(t, device=self.t_embedder.mlp[0].weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        c = self.t_embedder(t * 1000)
        if isinstance(self.y_embedder, LabelEmbedder):
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y (B,)")
            if not isinstance(y, torch.Tensor) or y.shape != (batch,):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"labels y must have shape ({batch},) for x's batch, got {shape}")
            if not torch.compiler.is_compiling():  # reading label values would break the graph
                self.y_embedder.check(y)
            return c + self.y_embedder(y), None
        if isinstance(self.y_embedder, ContextEmbedder):
            if context is None or context.shape[0] != batch:
                raise ValueError(
                    f"this model is text-conditional: pass context ({batch}, S, "
                    f"{self.y_embedder.in_features})"
                )
            tokens = self.y_embedder(context)
            return c + tokens.mean(dim=1), tokens
        if y is not None or context is not None:
            raise ValueError("this model is unconditional; got y or context")
        return c, None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output (e.g. velocity) for ``x`` at time ``t``; same shape as x.

        x: (B, C, H, W) or (B, T, C, H, W); t: (B,) in [0, 1] (or a scalar); y: (B,) class
        labels; context: (B, S, context_dim) text tokens.
        """
        h = self._add_positions(self._patchify(x))
        c, tokens = self._condition(t, y, context, x.shape[0])
        residual, grid = None, self.grid
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                recompute = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
                h, residual = recompute(block.forward_residual, h, residual, c, tokens, grid)
            else:
                h, residual = block.forward_residual(h, residual, c, tokens, grid)
        h = self.norm_f((residual + h).to(self.norm_f.weight.dtype)).to(h.dtype)
        return unpatchify(self.final_layer(h), self.grid, self.patch_size)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        cfg_scale: float,
        *,
        context: torch.Tensor | None = None,
        channels: Literal["all"] | int = "all",
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch, like DiT's.

        The batch holds the conditional half then the unconditional half: ``x`` repeats its
        first half (only that half is used), ``y`` (or ``context``) holds the conditions then the
        null ones (the null class ``num_classes``, or e.g. empty-prompt tokens). Both halves of
        the output are ``uncond + cfg_scale * (cond - uncond)``. ``channels="all"`` guides every
        channel; an int k guides channels 0..k-1 only and passes the rest through (``3`` is
        the DiT/SiT/ZigMa reference behaviour, for parity).
        """
        valid = channels == "all" or (
            isinstance(channels, int) and 0 < channels <= self.in_channels
        )
        if not valid:
            raise ValueError(
                f"channels must be 'all' or an int in [1, {self.in_channels}], got {channels!r}"
            )
        if x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg takes a batch of two halves, the conditional then the "
                f"unconditional one: an even batch, got {x.shape[0]}"
            )
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y, context)
        channel_dim = 2 if self.num_frames else 1
        k = self.in_channels if channels == "all" else channels
        guided, rest = out.split([k, self.in_channels - k], dim=channel_dim)
        cond, uncond = guided.chunk(2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=channel_dim)


def _read_config(path: Path) -> ZigMaConfig:
    """The ZigMaConfig a folder's config.json holds, or an error naming the file."""
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not JSON ({exc}); save_pretrained writes it") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of ZigMaConfig fields")
    try:
        return ZigMaConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} does not describe a ZigMaBackbone: {exc}") from None


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "saving and loading pretrained folders needs safetensors: "
            "install the hub extra (pip install -e '.[hub]' in a clone)"
        ) from exc
    return safetensors.torch
