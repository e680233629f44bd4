"""Reloading a converted transformers model from its ``save_pretrained`` folder.

:func:`~zigzag_mamba.integrations.replace_attention` records the conversion (pattern, mixer,
prefix position, Mamba arguments) in the model's config, which ``save_pretrained`` writes into
``config.json`` under ``"zigma"``; the file's keys are the ones transformers writes (its own
renaming of module paths included). :func:`from_pretrained` builds the model class as it was
converted and lets transformers' own ``from_pretrained`` load it, so that the same renaming
applies on the way back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from zigzag_mamba.orders import ZigzagScan


def from_pretrained(model_class: type, folder: str | Path, **kwargs: Any) -> nn.Module:
    """A converted transformers model saved with ``save_pretrained``, converted again and with
    its weights: ``model_class`` is the class that was converted (``ViTForImageClassification``,
    ...), ``kwargs`` go to its ``from_pretrained``.

    Example (needs transformers; docs/integrations.md runs it)::

        >>> vit = replace_attention(ViTForImageClassification(config))  # doctest: +SKIP
        >>> vit.save_pretrained("zigma-vit")  # doctest: +SKIP
        >>> same = from_pretrained(ViTForImageClassification, "zigma-vit")  # doctest: +SKIP
    """
    from zigzag_mamba.integrations.vit import replace_attention

    config = model_class.config_class.from_pretrained(folder)
    options = getattr(config, "zigma", None)
    if not isinstance(options, dict):
        raise ValueError(
            f"{folder}: its config.json records no ZigMa conversion (no 'zigma' entry); it holds "
            f"a plain {model_class.__name__}: load it with {model_class.__name__}.from_pretrained"
        )

    def __init__(self, config, *args: Any, **init_kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **init_kwargs)
        replace_attention(self, **config.zigma)

    # Named as the class it stands for: transformers finds its key renaming by that name.
    converted = type(model_class.__name__, (model_class,), {"__init__": __init__})
    model = converted.from_pretrained(folder, **kwargs)
    # transformers materialises a model built on the meta device itself, buffers included, so
    # the token orders (a function of the config, never saved) are filled in here.
    for module in model.modules():
        if isinstance(module, ZigzagScan):
            module.init_non_persistent_buffers()
    return model
