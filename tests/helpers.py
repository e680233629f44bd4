"""Helpers the tests of several folders share (tests/conftest.py puts this folder on the path)."""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Move every parameter off its init by ``scale`` times seeded noise (the adaLN layer starts
    at zero, which would hide the mixer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def checkpointed_gradients_match(model: torch.nn.Module, loss, switch_on) -> list:
    """Gradients of ``loss(model)`` with plain autograd, then with ``switch_on(model, recompute)``
    turning gradient checkpointing on through a recompute function that records its calls;
    asserts they are equal and returns the functions recomputed."""
    loss(model).backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    calls = []

    def recompute(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    switch_on(model, recompute)
    loss(model).backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    return calls
