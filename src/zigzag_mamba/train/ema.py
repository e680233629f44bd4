"""An exponential moving average of a model's weights, kept as a model of its own."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow weights ``ema = decay * ema + (1 - decay) * weights``, updated after each step.

    Early on the decay is capped at ``(1 + step) / (10 + step)``, so that a short run's average
    is not dominated by its random initial weights (pass ``step=None`` to use ``decay`` as is).
    The average is a frozen copy of the model (``self.module``), so it samples like the model
    and its ``state_dict`` loads into one. Buffers are copied, not averaged. The copy is taken
    from the unwrapped model: pass ``ddp.module``, not the DistributedDataParallel wrapper.

    Example::

        >>> net = nn.Linear(4, 4)
        >>> ema = EMA(net, decay=0.999)
        >>> ema.update(net, step=0)  # after optimizer.step()
        >>> ema.module(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Move the average towards ``model``'s current weights; ``step`` counts from 0."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update got a model with different parameters")
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
