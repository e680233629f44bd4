"""ZigMaConfig, everything that defines a ZigMaBackbone, and the official size presets."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from zigzag_mamba.modules.validation import check_positive, check_positive_int

PosEmbed = Literal["none", "sincos", "learned"]


@dataclass(frozen=True)
class ZigMaConfig:
    """The arguments of :class:`~zigzag_mamba.ZigMaBackbone` (``model.config``).

    Args:
        input_size: the latent's (H, W), or one int for square inputs.
        patch_size, in_channels, dim, depth: as in DiT (the output has ``in_channels``
            channels; no learned sigma).
        pattern: the token-order pattern (see :class:`~zigzag_mamba.ZigMaBlock`); for videos a
            ``video_<s|t...>`` pattern such as ``"video_sst"``. Layer i uses order i % k.
        pos_embed: ``"learned"`` (zero-init table), ``"sincos"`` (MAE's fixed 2-D table,
            stored as the frozen parameter ``pos_embed``) or ``"none"``. For videos,
            ``"learned"`` is one table over all T*h*w tokens (the official choice) and
            ``"sincos"`` the 2-D table in every frame plus a learned, zero-init
            ``temporal_pos_embedding`` (1, T, D).
        num_frames: T for video inputs; 0 for images.
        num_classes: > 0 for class conditioning (labels in ``y``).
        class_dropout_prob: label dropout in training; > 0 adds the null class
            ``num_classes`` used for classifier-free guidance.
        context_dim: width of text-encoder tokens for text conditioning (``context``): the
            tokens are projected to D, their mean is added to c and every block cross-attends
            to them.
        mixer: the scan strategy: ``"mamba"``, ``"bidirectional"`` or ``"cross"`` (see
            :class:`~zigzag_mamba.ZigMaBlock`).
        ssm_cfg: extra :class:`~zigzag_mamba.Mamba` arguments.
        norm_eps: RMSNorm epsilon.

    Example::

        >>> config = ZigMaConfig(input_size=(32, 48), **CONFIGS["ZigMa-S/2"])
        >>> config.grid
        (16, 24)
    """

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 768
    depth: int = 24
    pattern: str | torch.Tensor | Sequence | None = "zigzag8"
    pos_embed: PosEmbed = "learned"
    num_frames: int = 0
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    context_dim: int | None = None
    mixer: str = "mamba"
    ssm_cfg: dict | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self._check_sizes()
        size = self.input_size
        size = (size, size) if _is_int(size) else tuple(size) if isinstance(size, Sequence) else ()
        fits = lambda s: _is_int(s) and s >= self.patch_size and s % self.patch_size == 0
        if len(size) != 2 or not all(map(fits, size)):
            raise ValueError(
                f"input_size must be H or (H, W), each a positive multiple of patch_size "
                f"{self.patch_size}; got {self.input_size!r}"
            )
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        if self.pos_embed not in ("none", "sincos", "learned"):
            raise ValueError(
                f"pos_embed must be 'none', 'sincos' or 'learned', got {self.pos_embed!r}"
            )
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"pos_embed='sincos' needs dim divisible by 4, got {self.dim}")
        if self.num_classes > 0 and self.context_dim is not None:
            raise ValueError(
                "condition on classes (num_classes) or on text (context_dim), not both"
            )

    def _check_sizes(self) -> None:
        for name in ("patch_size", "in_channels", "dim", "depth"):
            check_positive_int(name, getattr(self, name))
        for name in ("num_frames", "num_classes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.context_dim is not None:
            check_positive_int("context_dim", self.context_dim)
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        check_positive("norm_eps", self.norm_eps)

    @property
    def grid(self) -> tuple[int, ...]:
        """The token grid: (h, w), or (T, h, w) for videos."""
        h, w = (s // self.patch_size for s in self.input_size)
        return (self.num_frames, h, w) if self.num_frames else (h, w)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (what ``config.json`` holds)."""
        if not isinstance(self.pattern, str | None):
            raise ValueError(
                "a config records its pattern by name; this one holds explicit orders: "
                "register them with zigzag_mamba.register_pattern and use its name"
            )
        values = dataclasses.asdict(self)
        values["input_size"] = list(self.input_size)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ZigMaConfig:
        """Build from a mapping (e.g. ``config.json``)."""
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _preset(dim: int, depth: int, patch_size: int) -> Mapping[str, int]:
    return MappingProxyType({"dim": dim, "depth": depth, "patch_size": patch_size})


_SIZES = {"S": (368, 24), "B": (768, 24), "M": (768, 48), "L": (1024, 48), "H": (1536, 48)}

#: Official ZigMa size presets (width x depth, patch 1, 2 or 4) and tiny ones for tests, read-only.
#: Use as ``ZigMaBackbone(input_size=32, in_channels=4, **CONFIGS["ZigMa-B/2"])``.
CONFIGS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        **{
            f"ZigMa-{size}/{p}": _preset(dim, depth, p)
            for size, (dim, depth) in _SIZES.items()
            for p in (1, 2, 4)
        },
        "ZigMa-T/1": _preset(64, 4, 1),
        "ZigMa-T/2": _preset(64, 4, 2),
    }
)
