"""Building a ZigMaBackbone from the plain mapping that configs and checkpoints store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

#: The pattern of models built for clips: two spatial zigzag layers, then one through time.
VIDEO_PATTERN = "video_sst"


def model_spec(
    name: str, *, data_shape: tuple[int, ...], num_classes: int, cfg_dropout: float, **overrides
) -> dict[str, Any]:
    """The mapping :func:`build_model` takes: a ``CONFIGS`` preset plus the data's shape,
    (C, H, W) for images or (T, C, H, W) for clips. Clips get ``num_frames`` T and, unless
    ``overrides`` name one, the paper's video pattern :data:`VIDEO_PATTERN`.

    Example::

        >>> spec = model_spec("ZigMa-T/1", data_shape=(1, 8, 8), num_classes=10, cfg_dropout=0.1)
        >>> spec["input_size"], spec["in_channels"]
        ([8, 8], 1)
        >>> clips = model_spec("ZigMa-T/1", data_shape=(8, 1, 16, 16), num_classes=0, cfg_dropout=0)
        >>> clips["num_frames"], clips["pattern"]
        (8, 'video_sst')
    """
    *frames, channels, height, width = data_shape
    spec: dict[str, Any] = {
        "name": name,
        "input_size": [height, width],
        "in_channels": channels,
        "num_classes": num_classes,
        "class_dropout_prob": cfg_dropout if num_classes else 0.0,
    }
    if frames:
        spec.update(num_frames=frames[0], pattern=VIDEO_PATTERN)
    spec.update(overrides)
    return spec


def build_model(spec: dict[str, Any]) -> nn.Module:
    """``ZigMaBackbone(**CONFIGS[spec["name"]], **rest_of_spec)``, ready for the Trainer.

    The Trainer drops labels for classifier-free guidance itself, from its seeded generator,
    so that the choice is the same however many processes share a batch and after a resume;
    the backbone keeps its null class but its own (global-RNG) label dropout is switched off.

    Example::

        >>> spec = model_spec("ZigMa-T/1", data_shape=(1, 8, 8), num_classes=10, cfg_dropout=0.1)
        >>> type(build_model(spec)).__name__
        'ZigMaBackbone'
    """
    from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone

    spec = dict(spec)
    name = spec.pop("name")
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(CONFIGS)}")
    model = ZigMaBackbone(**{**CONFIGS[name], **spec})
    if hasattr(model.y_embedder, "dropout_prob"):
        model.y_embedder.dropout_prob = 0.0
    return model


def load_model(state: dict[str, Any], weights: str, path: str | Path) -> nn.Module:
    """The model a training checkpoint's ``state`` describes, with its ``weights`` (``"ema"`` or
    ``"model"``); a spec that does not build, or weights that do not fit it, is a
    :class:`~zigzag_mamba.train.checkpoint.CheckpointError` naming ``path``."""
    from zigzag_mamba.train.checkpoint import CheckpointError

    spec = state["config"].get("model") if isinstance(state["config"], dict) else None
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"checkpoint {path} records no model spec (config.model)")
    try:
        model = build_model(spec)
        model.load_state_dict(state[weights])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path}: its {weights!r} weights do not fit the model its config "
            f"describes ({first}); the file was changed, or written by another version"
        ) from exc
    return model
