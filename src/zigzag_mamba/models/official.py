"""Checkpoints of the official ZigMa code (github.com/CompVis/zigma, ``model_zigma.ZigMa``).

Our parameter names are the official ones, so a converted state dict differs from the saved one
only by the prefixes that training wrappers add (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``). The keys, for reference::

    pos_embed                                   (use_pe 1 or 2)
    x_embedder.proj.{weight,bias}               t_embedder.mlp.{0,2}.{weight,bias}
    y_embedder.embedding_table.weight           (classes; num_classes rows, no null row)
    y_embedder.{weight,bias}                    (text)
    blocks.{i}.mixer.{A_log, D, in_proj.weight, conv1d.{weight,bias}, x_proj.weight,
                      dt_proj.{weight,bias}, out_proj.weight}
    blocks.{i}.mixer.{A_b_log, D_b, conv1d_b.*, x_proj_b.weight, dt_proj_b.*}   (scan_type v2)
    blocks.{i}.norm.weight                      blocks.{i}.adaLN_modulation.1.{weight,bias}
    blocks.{i}.msa.{to_q,to_k,to_v}.weight      blocks.{i}.msa.to_out.0.{weight,bias}   (text)
    norm_f.weight                               final_layer.linear.{weight,bias}

Scan orders are not stored; they follow from ``scan_type``.
"""

from __future__ import annotations

import re

import torch

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# scan_type "parallelN*" keeps per-path parameter lists that no ZigMa block here has.
_UNSUPPORTED_KEY = re.compile(r"_list\.")
_ZIGZAG = re.compile(r"zigzagN(\d+)")
_VIDEO = re.compile(r"(?:zz)?video_([st]+)")
_POS_EMBED = {0: "none", 1: "sincos", 2: "learned", 3: "none"}
#: Arguments of the official ``model_zigma.ZigMa`` that :func:`official_config` accepts and
#: ignores: they change how it trains or where it lives, not what its weights mean.
TRAINING_ONLY_KEYS = frozenset(
    {
        "drop_path_rate",
        "n_context_token",
        "fused_add_norm",
        "residual_in_fp32",
        "initializer_cfg",
        "device",
        "use_jit",
        "m_init",
        "use_checkpoint",
        "dtype",
    }
)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ZigMa state dict -> one that ``ZigMaBackbone`` loads with ``strict=True``.

    Strips the ``module.`` / ``_orig_mod.`` prefixes of training wrappers; every other key is
    kept as is. Pass the model's state dict (e.g. ``checkpoint["ema"]``), not the whole
    training checkpoint.

    Example::

        >>> official = {"module.norm_f.weight": torch.ones(4), "module.pos_embed": torch.zeros(1)}
        >>> sorted(convert_official_state_dict(official))
        ['norm_f.weight', 'pos_embed']
    """
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(
            "expected a state dict {name: tensor}; for a training checkpoint pass "
            "checkpoint['ema'] or checkpoint['model']"
        )
    if {"model", "ema"} & set(state_dict) and not any("." in k for k in state_dict):
        raise ValueError(
            "this looks like a training checkpoint: pass checkpoint['ema'] or checkpoint['model']"
        )
    converted = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if _UNSUPPORTED_KEY.search(name):
            raise ValueError(f"{key!r}: checkpoints of scan_type 'parallelN*' are not supported")
        converted[name] = value
    return converted


def _scan(scan_type: str) -> dict:
    zigzag = _ZIGZAG.fullmatch(scan_type)
    if zigzag:
        k = int(zigzag.group(1))
        if k not in (1, 2, 4, 8):
            raise ValueError(
                f"scan_type {scan_type!r}: only zigzagN1/2/4/8 have a named pattern;"
                " pass pattern=zigzag_orders(n, n)[:k] yourself"
            )
        return {"pattern": f"zigzag{k}"}
    video = _VIDEO.fullmatch(scan_type)
    if video:
        return {"pattern": f"video_{video.group(1)}"}
    if scan_type == "v1":
        return {"pattern": None}
    if scan_type == "v2":
        return {"pattern": None, "mixer": "bidirectional"}
    if scan_type.startswith(("hilbertN", "randomN")):
        raise ValueError(
            f"scan_type {scan_type!r} cannot be reproduced: the official hilbert arrays are "
            "used inverted (not a continuous path) and the random ones differ per process; if "
            "you have the exact orders, pass them as pattern=(k, L) tensor"
        )
    raise ValueError(f"unknown official scan_type {scan_type!r}")


def official_config(
    *,
    img_dim: int,
    in_channels: int,
    embed_dim: int,
    depth: int,
    patch_size: int = 1,
    scan_type: str = "v2",
    use_pe: int = 0,
    num_classes: int = -1,
    has_text: bool = False,
    d_context: int = 0,
    video_frames: int = 0,
    tpe: bool = False,
    ssm_cfg: dict | None = None,
    norm_epsilon: float = 1e-5,
    rms_norm: bool = True,
    **training_options,
) -> dict:
    """``ZigMaBackbone`` arguments for the official ``model_zigma.ZigMa(**params)``.

    Mapped: ``img_dim -> input_size``, ``embed_dim -> dim``, ``scan_type`` (``zigzagN{k}`` ->
    ``zigzag{k}``, ``video_<st>`` / ``zzvideo_<st>`` -> ``video_<st>``, ``v1`` -> no scan,
    ``v2`` -> no scan with the bidirectional mixer), ``use_pe`` (0 none, 1 sincos, 2 learned;
    3 -> none, since the official per-layer tables are never registered, hence stay zero),
    ``num_classes`` (class tables without null row), ``has_text``/``d_context`` ->
    ``context_dim``,
    ``video_frames -> num_frames``. The official training-only options
    (:data:`TRAINING_ONLY_KEYS`: drop_path_rate, fused_add_norm, residual_in_fp32, use_jit,
    use_checkpoint, m_init, device, dtype, ...) are accepted and ignored: they do not change the
    weights' meaning. Any other key is a TypeError, so that a typo (``scan_typ=``) cannot
    silently build another model. Official video models agree with ours on 's' layers; their
    't' layers that run backwards in time come back time-reversed (an official bug we do not
    reproduce), so those outputs differ.

    Example::

        >>> official_config(img_dim=32, in_channels=4, patch_size=1, embed_dim=768, depth=24,
        ...                 scan_type="zigzagN8", use_pe=2)["pattern"]
        'zigzag8'
    """
    unknown = sorted(set(training_options) - TRAINING_ONLY_KEYS)
    if unknown:
        raise TypeError(
            f"official_config() got unknown official arguments {unknown}; it takes the "
            "arguments of the official model_zigma.ZigMa"
        )
    if not rms_norm:
        raise ValueError("official models with rms_norm=False (LayerNorm) are not supported")
    if tpe:
        raise ValueError("official tpe=True (learned table plus temporal table) is not supported")
    if use_pe not in _POS_EMBED:
        raise ValueError(f"unknown official use_pe {use_pe!r}")
    config = {
        "input_size": img_dim,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "dim": embed_dim,
        "depth": depth,
        "pos_embed": _POS_EMBED[use_pe],
        "num_frames": video_frames,
        "norm_eps": norm_epsilon,
        "ssm_cfg": ssm_cfg,
        **_scan(scan_type),
    }
    if has_text:
        config["context_dim"] = d_context
    elif num_classes > 0:
        config.update(num_classes=num_classes, class_dropout_prob=0.0)
    return config
