"""Swap the attention of existing vision transformers for ZigMa mixers.

Two kinds of model, recognised by their structure (neither package is imported here):

- Hugging Face transformers ViTs: a module with ``embeddings.patch_embeddings`` (whose
  ``projection`` is the patch Conv2d) and a stack of layers (``layers``, or ``encoder.layer``
  in transformers 4), each holding an ``attention`` called as ``attention(hidden_states,
  attention_mask_or_head_mask, **kwargs)`` and returning ``(output, attention_weights)``.
  Prefix tokens: the class token, and DeiT's distillation token or register tokens when the
  embeddings have them.
- timm ``VisionTransformer`` and models built like it: a module with ``patch_embed`` (whose
  ``proj`` is the patch Conv2d) and ``blocks``, each holding an ``attn`` with timm's
  ``Attention`` signature, ``attn(x, attn_mask=None, is_causal=False) -> x`` on (B, N, C)
  tokens. Prefix tokens: ``num_prefix_tokens`` (class and register tokens).

Each attention becomes a :class:`ViTMixer` around a :class:`~zigzag_mamba.modules.ZigMaMixer`
whose ``layer_idx`` is the block's position. The grid travels with the forward
(:class:`~zigzag_mamba.integrations.GridTracker`): the patch embedding's Conv2d records the
(h, w) of each image, and each block finds the grid of the forward its input came from, also
when gradient checkpointing recomputes it later or another thread runs another size. Models
whose blocks do not see the raster grid plus the counted prefix tokens are refused, naming the
reason (:func:`replace_attention`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zigzag_mamba.integrations.grids import GridTracker
from zigzag_mamba.modules.block import ZigMaMixer

_TIMM_ATTENTION_ARGS = ("attn_mask", "is_causal")


class ViTMixer(nn.Module):
    """A ZigMa mixer in an attention's place: ``mixer(x, grid=tracker.grid)``.

    The calling conventions of the attention it replaces are those of ``kind``:
    ``"transformers"`` (returns ``(output, None)``, or the output alone where that attention
    returned a tensor: ``tuple_output=False``) or ``"timm"`` (returns the output). Any
    attention mask is refused: a selective scan reads every token, in its order.
    """

    def __init__(
        self,
        mixer: ZigMaMixer,
        tracker: GridTracker,
        kind: str,
        model: str = "",
        tuple_output: bool | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("transformers", "timm"):
            raise ValueError(f"kind must be 'transformers' or 'timm', got {kind!r}")
        self.mixer = mixer
        self.tracker = tracker
        self.kind = kind
        self.model = model
        self.tuple_output = kind == "transformers" if tuple_output is None else tuple_output

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "timm":
            _refuse_masks(_timm_masks(*args, **kwargs), "attn_mask")
            return self._mix(x)
        if kwargs.get("output_attentions"):
            raise ValueError(
                "output_attentions: this model's attention was replaced by ZigMa mixers, which "
                "compute no attention weights; call it with output_attentions=False"
            )
        # transformers: the second argument is attention_mask (v5) or head_mask (v4).
        masks = {"attention_mask or head_mask": args[0] if args else None}
        masks |= {
            k: kwargs.get(k) for k in ("attention_mask", "head_mask", "encoder_hidden_states")
        }
        _refuse_masks(masks, "attention_mask")
        return (self._mix(x), None) if self.tuple_output else self._mix(x)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.tracker.grid
        k = self.mixer.zigzag.num_prefix_tokens if self.mixer.zigzag is not None else 0
        if grid is not None and x.dim() == 3 and x.shape[1] != k + grid[0] * grid[1]:
            raise ValueError(
                f"model {self.model or 'this model'}: a block got {x.shape[1]} tokens, not the {k} "
                f"prefix tokens + {grid[0]} x {grid[1]} patch tokens replace_attention counted: "
                "the model adds, drops or reorders tokens between its patch embedding and its "
                "blocks, which a fixed token order cannot follow; convert a plain ViT instead"
            )
        return self.mixer(x, grid=grid)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {self.tracker!r}"


def _timm_masks(
    attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> dict[str, object]:
    return {"attn_mask": attn_mask, "is_causal": is_causal or None}


def _refuse_masks(masks: dict[str, object], name: str) -> None:
    given = [key for key, value in masks.items() if value is not None]
    if given:
        raise ValueError(
            f"{name}: this block's attention was replaced by a ZigMa mixer, which cannot honour "
            f"{' or '.join(given)}: a selective scan reads every token in its order. Call the "
            "model without masks (drop padded or masked tokens before the blocks instead)"
        )


@dataclass
class _Host:
    """What replacing a model's attention needs to know about it."""

    kind: str
    slots: list[tuple[nn.Module, str, str]]  # (parent, attribute, name for messages)
    conv: nn.Module | None
    grid: tuple[int, int] | None
    dim: int
    num_prefix_tokens: int


def replace_attention(
    model: nn.Module,
    pattern: str | torch.Tensor | Sequence | None = "zigzag8",
    *,
    mixer: str = "mamba",
    prefix_position: str = "end",
    **mamba_kwargs: Any,
) -> nn.Module:
    """Replace every attention of ``model`` with a ZigMa mixer, in place; returns ``model``.

    Args:
        model: a transformers ViT (``ViTModel``, ``ViTForImageClassification``, ...) or a timm
            ``VisionTransformer`` (or a model whose blocks hold an ``attn`` with timm's
            ``Attention`` signature); see :mod:`zigzag_mamba.integrations.vit`.
        pattern: the token-order pattern; layer i (the block's position) reads order i % k.
        mixer: ``"mamba"``, ``"bidirectional"`` or ``"cross"`` (k orders per layer; ``k`` is
            one of ``mamba_kwargs``, 4 by default).
        prefix_position: where the class and register tokens sit in each scanned sequence;
            ``"end"`` lets a causal scan give them the whole image.
        mamba_kwargs: :class:`~zigzag_mamba.Mamba` arguments (``d_state``, ``expand``, ...).

    The new mixers are built on the device and in the dtype of the attention they replace, and
    initialised as :class:`~zigzag_mamba.Mamba` is. The model's state dict changes (each
    ``attention``/``attn`` now holds ``mixer.mixer.*`` and no q/k/v weights): to reload
    weights, build the model, call this, then ``load_state_dict`` (or timm's
    ``load_checkpoint``); a transformers model records the conversion in its config, so
    :func:`~zigzag_mamba.integrations.from_pretrained` reloads its ``save_pretrained`` folder.

    Refused, naming the model and the reason: blocks that see other tokens than the raster
    grid plus the counted prefix (CaiT's late class token is handled; MAE's shuffled subset,
    YOLOS's detection tokens are not), relative position biases, video (Conv3d) patches,
    attention with another signature (rotary positions) or width, causal attention, a model
    converted before. At run time: masks, ``output_attentions=True`` and
    ``set_attn_implementation``.

    Example (needs transformers; docs/integrations.md runs it)::

        >>> from transformers import ViTConfig, ViTForImageClassification  # doctest: +SKIP
        >>> vit = ViTForImageClassification(ViTConfig(image_size=32))  # doctest: +SKIP
        >>> vit = replace_attention(vit, pattern="zigzag8")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    host = _transformers_host(model) or _timm_host(model)
    if host is None:
        raise TypeError(
            f"model: found no attention of the expected shape in {type(model).__name__}. "
            "replace_attention takes a transformers ViT (embeddings.patch_embeddings and layers "
            "whose .attention it replaces) or a timm VisionTransformer (patch_embed and blocks "
            "whose .attn has timm's Attention signature, attn(x, attn_mask=None))"
        )
    tracker = GridTracker(host.grid)
    mixers = [
        ZigMaMixer(
            host.dim,
            host.grid,
            pattern,
            layer_idx,
            mixer=mixer,
            ssm_cfg=mamba_kwargs,
            num_prefix_tokens=host.num_prefix_tokens,
            prefix_position=prefix_position,
            **_factory(getattr(parent, attribute)),
        )
        for layer_idx, (parent, attribute, _) in enumerate(host.slots)
    ]  # all built before the model changes, so that a bad argument leaves it as it was
    for (parent, attribute, _), zigma in zip(host.slots, mixers, strict=True):
        replaced = getattr(parent, attribute)
        tuple_output = host.kind == "transformers" and not _returns_tensor(replaced)
        converted = ViTMixer(zigma, tracker, host.kind, type(model).__name__, tuple_output)
        setattr(parent, attribute, converted)
        # Every part of the block: the one that reads the block's input (its first norm) finds
        # the grid that input was seen with, also when checkpointing recomputes the block.
        for part in parent.children():
            part.register_forward_pre_hook(tracker.enter, with_kwargs=True)
    if host.conv is not None:
        host.conv.register_forward_hook(tracker)
    options = {"pattern": pattern, "mixer": mixer, "prefix_position": prefix_position}
    if host.kind == "transformers":
        _mark_transformers_model(model, {**options, **mamba_kwargs})
    else:
        _register_timm_leaf()
    return model


def _mark_transformers_model(model: nn.Module, options: dict[str, Any]) -> None:
    """Record the conversion in the model's config (so save_pretrained writes it and
    :func:`~zigzag_mamba.integrations.from_pretrained` can redo it), and refuse to set an
    attention implementation there is no attention for."""

    def no_attention(*args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "set_attn_implementation: this model's attention was replaced by ZigMa mixers, so "
            "there is no attention implementation to choose"
        )

    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(module, "set_attn_implementation"):
            if isinstance(options["pattern"], str | None):
                config.zigma = options
            module.set_attn_implementation = no_attention


def _register_timm_leaf() -> None:
    """timm's fx feature extraction traces into modules; a ZigMa mixer's grid is Python state
    it cannot trace, so the mixer is kept whole, as a leaf."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # a model built like timm's, without timm
        return
    register_notrace_module(ViTMixer)


def _factory(module: nn.Module) -> dict[str, Any]:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        return {}
    return {"device": tensor.device, "dtype": tensor.dtype}


def _returns_tensor(attention: nn.Module) -> bool:
    """Whether a transformers attention returns its output alone (DPT's and YOLOS's do), as its
    forward's return annotation says; most return ``(output, weights)``."""
    annotation = inspect.signature(attention.forward).return_annotation
    return annotation is torch.Tensor or annotation in ("torch.Tensor", "Tensor")


def _first(model: nn.Module, test) -> nn.Module | None:
    return next((m for m in model.modules() if test(m)), None)


def _patch_grid(image_size: object, patch_size: object) -> tuple | None:
    """The configured grid, image size // patch size, or None when unknown."""
    pair = lambda v: tuple(v) if isinstance(v, Iterable) else (v, v)
    try:
        (h, w), (ph, pw) = pair(image_size), pair(patch_size)
        return (int(h) // int(ph), int(w) // int(pw))
    except (TypeError, ValueError):
        return None


def _check_not_replaced(slots: list[tuple[nn.Module, str, str]]) -> None:
    done = [
        name
        for parent, attribute, name in slots
        if isinstance(getattr(parent, attribute), ViTMixer)
    ]
    if done:
        raise ValueError(
            f"model: {done[0]} is already a ZigMa mixer (replace_attention ran before)"
        )


def _check_no_causal_mask(slots: list[tuple[nn.Module, str, str]]) -> None:
    """An attention built causal masks its scores in raster order: a ZigMa mixer cannot."""
    for parent, attribute, name in slots:
        for module in getattr(parent, attribute).modules():
            if getattr(module, "is_causal", False) is True:
                raise ValueError(
                    f"model: {name} is a causal attention (is_causal=True), a mask a ZigMa "
                    "mixer cannot honour: it reads the tokens in zigzag order, not in raster order"
                )


# --------------------------------------------------------------------------- transformers


def _transformers_host(model: nn.Module) -> _Host | None:
    core = _first(
        model,
        lambda m: (
            hasattr(getattr(m, "embeddings", None), "patch_embeddings")
            and _transformers_layers(m) is not None
        ),
    )
    if core is None:
        return None
    path, layers = _transformers_layers(core)
    slots = [(layer, "attention", f"{path}[{i}].attention") for i, layer in enumerate(layers)]
    _check_not_replaced(slots)
    _check_no_causal_mask(slots)
    embeddings = core.embeddings
    _refuse_unsupported(model, core)
    patches = embeddings.patch_embeddings
    conv = getattr(patches, "projection", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"model: {type(model).__name__}'s {type(patches).__name__}.projection is a "
            f"{type(conv).__name__}, not a patch Conv2d: replace_attention converts image ViTs "
            "(for video, build a ZigMaBackbone with num_frames)"
        )
    prefix = sum(
        getattr(embeddings, name, None) is not None for name in ("cls_token", "distillation_token")
    )
    registers = getattr(embeddings, "register_tokens", None)
    prefix += 0 if registers is None else registers.shape[1]
    grid = _patch_grid(getattr(patches, "image_size", None), getattr(patches, "patch_size", None))
    return _Host("transformers", slots, conv, grid, conv.out_channels, prefix)


def _transformers_layers(core: nn.Module) -> tuple[str, list[nn.Module]] | None:
    encoder = getattr(core, "encoder", None)
    for path, layers in [
        ("layers", getattr(core, "layers", None)),
        ("encoder.layer", getattr(encoder, "layer", None)),
        ("encoder.layers", getattr(encoder, "layers", None)),
    ]:
        is_stack = isinstance(layers, nn.ModuleList | nn.Sequential) and len(layers) > 0
        if is_stack and all(isinstance(getattr(x, "attention", None), nn.Module) for x in layers):
            return path, list(layers)
    return None


# --------------------------------------------------------------------------- timm


def _timm_host(model: nn.Module) -> _Host | None:
    core = _first(
        model,
        lambda m: (
            isinstance(getattr(m, "blocks", None), nn.Sequential | nn.ModuleList)
            and hasattr(m, "patch_embed")
        ),
    )
    if core is None or not all(hasattr(block, "attn") for block in core.blocks):
        return None
    slots = [(block, "attn", f"blocks[{i}].attn") for i, block in enumerate(core.blocks)]
    if not slots:
        return None
    _check_not_replaced(slots)
    patch_embed = core.patch_embed
    conv = getattr(patch_embed, "proj", None)
    conv = conv if isinstance(conv, nn.Conv2d) else None
    grid = getattr(patch_embed, "grid_size", None)
    grid = tuple(int(s) for s in grid) if isinstance(grid, Sequence) and len(grid) == 2 else None
    if conv is None and grid is None:
        raise TypeError(
            "model: patch_embed has neither a Conv2d .proj nor a .grid_size, so the token grid "
            "cannot be known"
        )
    dim = getattr(core, "embed_dim", None) or (conv.out_channels if conv is not None else None)
    if not isinstance(dim, int):
        raise TypeError("model: cannot tell the token width: give it an embed_dim")
    for parent, attribute, name in slots:
        _check_timm_attention(getattr(parent, attribute), name, dim)
    _check_no_causal_mask(slots)
    return _Host("timm", slots, conv, grid, dim, _timm_prefix(core))


def _refuse_unsupported(model: nn.Module, core: nn.Module) -> None:
    """transformers models whose blocks do not see the raster grid plus the counted prefix
    tokens, or whose attention adds what a selective scan has no place for."""
    name = type(model).__name__
    if getattr(core.embeddings, "detection_tokens", None) is not None:
        raise ValueError(
            f"model: {name} (YOLOS) appends detection tokens after the patches, which a ZigMa "
            "mixer has no place for (its prefix tokens come first); convert a plain ViT instead"
        )
    if hasattr(core.embeddings, "random_masking"):
        raise ValueError(
            f"model: {name} (MAE) feeds its blocks a random, shuffled subset of the patches, "
            "which no fixed token order can read in grid order; convert the plain ViT its "
            "encoder is (ViTModel) and mask outside it"
        )
    biased = [
        n for n, m in core.named_modules() if type(m).__name__.endswith("RelativePositionBias")
    ]
    if biased:
        raise ValueError(
            f"model: {name} adds a relative position bias ({biased[0]}) to its attention "
            "scores, which a ZigMa mixer has none of; build it with "
            "use_relative_position_bias=False and use_shared_relative_position_bias=False"
        )


def _timm_prefix(core: nn.Module) -> int:
    if hasattr(core, "blocks_token_only"):
        return 0  # CaiT: the class token joins after `blocks`, for its class-attention blocks
    count = getattr(core, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    registers = getattr(core, "reg_token", None)
    cls = getattr(core, "cls_token", None) is not None
    return int(cls) + (0 if registers is None else registers.shape[1])


def _check_timm_attention(attn: object, name: str, dim: int) -> None:
    """timm's Attention: a module called as attn(x, attn_mask=None[, is_causal=False]) that
    maps (B, N, dim) tokens to (B, N, dim)."""
    if not isinstance(attn, nn.Module):
        raise TypeError(f"model: {name} is not a module ({type(attn).__name__})")
    parameters = list(inspect.signature(attn.forward).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = [p.name for p in positional[1:] if p.name not in _TIMM_ATTENTION_ARGS]
    if not positional or extra:
        args = ", ".join(p.name for p in positional)
        raise TypeError(
            f"model: {name} is called as {type(attn).__name__}({args}), not with timm's "
            "Attention signature attn(x, attn_mask=None, is_causal=False); found no attention "
            "of the expected shape"
        )
    widths = {
        f"{layer}.{side}": getattr(getattr(attn, layer, None), side, dim)
        for layer, side in [
            ("qkv", "in_features"),
            ("q_proj", "in_features"),
            ("proj", "out_features"),
        ]
    }
    wrong = {key: value for key, value in widths.items() if value != dim}
    if wrong:
        raise TypeError(
            f"model: {name} maps tokens of width {dim} to another width ({wrong}); a ZigMa "
            "mixer keeps the width"
        )
