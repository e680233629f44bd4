"""ZigMaBackbone: a DiT-style diffusion backbone whose layers are zigzag-scan Mamba blocks.

    x (B, C, H, W) or (B, T, C, H, W), t (B,) in [0, 1], y (B,) labels or context (B, S, d_ctx)
      -> patch embed + positional embedding            tokens (B, L, D), raster (t, h, w) order
      -> c = TimestepEmbed(1000 t) [+ LabelEmbed(y) | + mean(ContextEmbed(context))]
      -> depth x ZigMaBlock (layer i scans with order i % k of the pattern)
      -> RMSNorm_f(residual + h) -> LayerNorm (no affine) -> Linear(D, p*p*C) -> unpatchify

The parameter names are those of the official ZigMa checkpoints (see
:mod:`zigzag_mamba.models.official`). ``CONFIGS`` holds the official size presets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zigzag_mamba.models.official import convert_official_state_dict
from zigzag_mamba.modules.block import ZigMaBlock
from zigzag_mamba.modules.embed import (
    ContextEmbedder,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
)

PosEmbed = Literal["none", "sincos", "learned"]
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

    Args:
        input_size: the latent's (H, W), or one int for square inputs.
        patch_size, in_channels, dim, depth: as in DiT (the output has ``in_channels`` channels;
            no learned sigma).
        scan: the scan pattern (see :class:`~zigzag_mamba.ZigMaBlock`); for videos a
            ``video_<s|t...>`` pattern such as ``"video_sst"``. Layer i uses order i % k.
        pos_embed: ``"learned"`` (zero-init table), ``"sincos"`` (MAE's fixed 2-D table, stored
            as the frozen parameter ``pos_embed``) or ``"none"``. For videos, ``"learned"`` is one
            table over all T*h*w tokens (the official choice) and ``"sincos"`` the 2-D table in
            every frame plus a learned, zero-init ``temporal_pos_embedding`` (1, T, D).
        num_frames: T for video inputs; 0 for images.
        num_classes: > 0 for class conditioning (labels in ``y``).
        class_dropout_prob: label dropout in training; > 0 adds the null class ``num_classes``
            used for classifier-free guidance.
        d_context: width of text-encoder tokens for text conditioning (``context``): the tokens
            are projected to D, their mean is added to c and every block cross-attends to them.
        mixer: ``"mamba"`` or ``"bidirectional"``.
        ssm_cfg: extra :class:`~zigzag_mamba.Mamba` arguments.

    ``model.config`` holds these arguments (less device and dtype), as :meth:`save_pretrained`
    writes them.

    Example::

        >>> model = ZigMaBackbone(input_size=8, in_channels=4, **CONFIGS["ZigMa-T/2"])
        >>> model(torch.randn(2, 4, 8, 8), torch.rand(2)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 768,
        depth: int = 24,
        scan: str | torch.Tensor | Sequence | None = "zigzag8",
        pos_embed: PosEmbed = "learned",
        num_frames: int = 0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        d_context: int | None = None,
        mixer: str = "mamba",
        ssm_cfg: dict | None = None,
        norm_eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.image_size = self._check_config(input_size, patch_size, pos_embed, dim)
        # The arguments, as save_pretrained writes them to config.json.
        self.config = {
            "input_size": list(self.image_size),
            "patch_size": patch_size,
            "in_channels": in_channels,
            "dim": dim,
            "depth": depth,
            "scan": scan,
            "pos_embed": pos_embed,
            "num_frames": num_frames,
            "num_classes": num_classes,
            "class_dropout_prob": class_dropout_prob,
            "d_context": d_context,
            "mixer": mixer,
            "ssm_cfg": ssm_cfg,
            "norm_eps": norm_eps,
        }
        if num_classes > 0 and d_context is not None:
            raise ValueError("condition on classes (num_classes) or on text (d_context), not both")
        self.patch_size, self.in_channels, self.num_frames = patch_size, in_channels, num_frames
        self.dim, self.depth = dim, depth
        frame_grid = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.grid = (num_frames, *frame_grid) if num_frames else frame_grid
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim, **factory)
        self.t_embedder = TimestepEmbedder(dim, **factory)
        self.y_embedder: nn.Module | None = None
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob, **factory)
        elif d_context is not None:
            self.y_embedder = ContextEmbedder(d_context, dim, **factory)
        self._build_pos_embed(factory)

        self.blocks = nn.ModuleList(
            ZigMaBlock(
                dim,
                self.grid,
                scan,
                layer_idx=i,
                mixer=mixer,
                context_dim=dim if d_context is not None else None,
                norm_eps=norm_eps,
                ssm_cfg=ssm_cfg,
                **factory,
            )
            for i in range(depth)
        )
        self.norm_f = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels, **factory)
        self.initialize_weights()

    @staticmethod
    def _check_config(
        input_size: int | Sequence[int], patch_size: int, pos_embed: str, dim: int
    ) -> tuple[int, int]:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or any(s % patch_size or s < patch_size for s in size):
            raise ValueError(
                f"input_size must be H or (H, W), each a positive multiple of patch_size "
                f"{patch_size}; got {input_size!r}"
            )
        if pos_embed not in ("none", "sincos", "learned"):
            raise ValueError(f"pos_embed must be 'none', 'sincos' or 'learned', got {pos_embed!r}")
        if pos_embed == "sincos" and dim % 4:
            raise ValueError(f"pos_embed='sincos' needs dim divisible by 4, got {dim}")
        return size

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
        """Recompute what is a pure function of the config: the scan orders and the fixed
        sin-cos table (a frozen parameter, kept in checkpoints as the official ``pos_embed``).

        Call it after ``to_empty()`` when the model was built on the meta device.
        """
        for block in self.blocks:
            if block.scan is not None:
                block.scan.init_non_persistent_buffers()
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

    @classmethod
    def from_official(cls, state_dict: dict[str, torch.Tensor], **config) -> ZigMaBackbone:
        """Build a backbone from a state dict saved by the official ZigMa code (strict load).

        ``config`` are this class's arguments;
        :func:`zigzag_mamba.models.official.official_config` translates the official ones.
        ``class_dropout_prob`` defaults to 0 here: official class tables have no null row.

        Example::

            >>> sd = torch.load("0300000.pt", map_location="cpu")["ema"]
            >>> params = dict(img_dim=32, in_channels=4, patch_size=1, embed_dim=768, depth=24,
            ...               scan_type="zigzagN8", use_pe=2)
            >>> config = zigzag_mamba.models.official.official_config(**params)
            >>> model = ZigMaBackbone.from_official(sd, **config)
        """
        config.setdefault("class_dropout_prob", 0.0)
        model = cls(**config)
        model.load_state_dict(convert_official_state_dict(state_dict), strict=True)
        return model

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` (the constructor's arguments) and ``model.safetensors``.

        The folder has the layout of huggingface_hub's ``PyTorchModelHubMixin``; load it with
        :meth:`from_pretrained`. Needs ``safetensors`` (``pip install zigzag-mamba[hub]``).

        Example::

            >>> model.save_pretrained("zigma-b2-run7")
            >>> same = ZigMaBackbone.from_pretrained("zigma-b2-run7")
        """
        save_file = _safetensors().save_file
        if not isinstance(self.config["scan"], str | None):
            raise ValueError(
                "save_pretrained records the scan by name; this model was built with explicit "
                "orders: register them with zigzag_mamba.register_pattern and build with its name"
            )
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")

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
        shape, e.g. another ``scan`` pattern. For a model on the Hub, download
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
        config = {**json.loads((directory / CONFIG_NAME).read_text()), **overrides}
        model = cls(**config, device="meta", dtype=dtype).to_empty(device=device or "cpu")
        model.init_non_persistent_buffers()
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
        if not self.num_frames:
            return self.x_embedder(x)
        tokens = self.x_embedder(x.flatten(0, 1))  # (B*T, h*w, D)
        return tokens.reshape(x.shape[0], -1, self.dim)

    def _add_positions(self, h: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            h = h + self.pos_embed
        if self.temporal_pos_embedding is not None:
            B, L, D = h.shape
            h = h.view(B, self.num_frames, -1, D) + self.temporal_pos_embedding.unsqueeze(2)
            h = h.view(B, L, D)
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

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W) or (B, T, C, H, W); each patch laid out (p, q, C)."""
        p, C = self.patch_size, self.in_channels
        h, w = self.grid[-2:]
        frames = (self.num_frames,) if self.num_frames else ()
        x = x.reshape(x.shape[0], *frames, h, w, p, p, C)
        x = x.movedim(-1, -5).transpose(-3, -2)  # (..., C, h, p, w, q)
        return x.reshape(x.shape[0], *frames, C, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output (e.g. velocity) for ``x`` at time ``t``; same shape as x.

        x: (B, C, H, W) or (B, T, C, H, W); t: (B,) in [0, 1] (or a scalar); y: (B,) class
        labels; context: (B, S, d_context) text tokens.
        """
        h = self._add_positions(self._patchify(x))
        c, tokens = self._condition(t, y, context, x.shape[0])
        residual = None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h, residual = checkpoint(
                    block.forward_residual, h, residual, c, tokens, use_reentrant=False
                )
            else:
                h, residual = block.forward_residual(h, residual, c, tokens)
        h = self.norm_f((residual + h).to(self.norm_f.weight.dtype)).to(h.dtype)
        return self._unpatchify(self.final_layer(h))

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
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y, context)
        channel_dim = 2 if self.num_frames else 1
        k = self.in_channels if channels == "all" else channels
        guided, rest = out.split([k, self.in_channels - k], dim=channel_dim)
        cond, uncond = guided.chunk(2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=channel_dim)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "saving and loading pretrained folders needs safetensors: "
            "pip install 'zigzag-mamba[hub]'"
        ) from exc
    return safetensors.torch


def _preset(dim: int, depth: int, patch_size: int) -> dict:
    return {"dim": dim, "depth": depth, "patch_size": patch_size}


_SIZES = {"S": (368, 24), "B": (768, 24), "M": (768, 48), "L": (1024, 48), "H": (1536, 48)}

#: Official ZigMa size presets (width x depth, patch 1, 2 or 4) and tiny ones for tests.
#: Use as ``ZigMaBackbone(input_size=32, in_channels=4, **CONFIGS["ZigMa-B/2"])``.
CONFIGS: dict[str, dict] = {
    f"ZigMa-{size}/{p}": _preset(dim, depth, p)
    for size, (dim, depth) in _SIZES.items()
    for p in (1, 2, 4)
}
CONFIGS["ZigMa-T/1"] = _preset(64, 4, 1)
CONFIGS["ZigMa-T/2"] = _preset(64, 4, 2)
