"""Which token grid each call of a converted model's mixers reads: the grid travels with the
forward (:class:`GridTracker`)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn


class GridTracker:
    """The token grid of the forward being run (or recomputed), shared by every
    :class:`~zigzag_mamba.integrations.ViTMixer` of one model.

    Hooks keep it: the patch embedding's Conv2d records the (h, w) of its output, the grid of
    this forward; every part of every host block (its norms, its mixer, its MLP), as it
    starts, reads the grid its input tensor was first seen with, or records the current one
    for it. A block recomputed in the backward pass (gradient checkpointing, by timm,
    transformers or ``torch.utils.checkpoint``, reentrant or not) is fed the input it saved,
    so its first norm finds the grid of the forward it belongs to, not that of a later forward
    at another image size. Each thread reads the grid of its own forward. The mixers read
    :attr:`grid`.

    Starts at the model's configured grid (``None`` when unknown). Copies of the model
    (``copy.deepcopy``, pickling) get their own.
    """

    def __init__(self, grid: tuple[int, int] | None = None) -> None:
        self.default = grid
        self._local = threading.local()
        # (data_ptr, shape, device) of a block input -> [(weak reference to it, its grid)].
        self._seen: dict[tuple, list[tuple[weakref.ref, tuple[int, int]]]] = {}
        self._lock = threading.Lock()

    @property
    def grid(self) -> tuple[int, int] | None:
        """The grid of the forward this thread is running."""
        return getattr(self._local, "grid", self.default)

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        """The patch convolution's forward hook: a new forward starts at this grid."""
        self._local.grid = (output.shape[-2], output.shape[-1])

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook (``with_kwargs=True``) of a part of a host block: the grid its
        input was seen with becomes the current one; an input not seen before is recorded
        with the current grid."""
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling() or x.is_meta:
            return  # traced code sees one grid per graph; nothing is recomputed outside it
        key = (x.data_ptr(), tuple(x.shape), x.device)
        with self._lock:
            for ref, grid in self._seen.get(key, ()):
                alive = ref()
                # A reentrant recompute passes a detached copy: the same memory, alive.
                if alive is not None and alive.data_ptr() == key[0]:
                    self._local.grid = grid
                    return
            self._prune()
            self._seen.setdefault(key, []).append((weakref.ref(x), self.grid))

    def _prune(self) -> None:
        for key in [k for k, refs in self._seen.items() if all(r() is None for r, _ in refs)]:
            del self._seen[key]

    def __getstate__(self) -> dict:
        return {"default": self.default}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["default"])

    def __deepcopy__(self, memo: dict) -> GridTracker:
        return GridTracker(self.default)

    def __repr__(self) -> str:
        return f"GridTracker(grid={self.grid})"
