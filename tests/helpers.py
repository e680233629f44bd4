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


def capture_mixer_calls(mixers) -> list:
    """Record (mixer, input, output) of every call of each ViTMixer's ZigMa mixer."""
    seen = []
    for mixer in mixers:
        mixer.mixer.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    return seen


def check_mixer_calls(seen: list, grid: tuple[int, int], prefix: int, pattern="zigzag8") -> None:
    """Each recorded call of a converted model's mixer is what a stand-alone ZigMaMixer with the
    same weights gives for its tokens at ``grid`` with ``prefix`` class/register tokens."""
    from zigzag_mamba.modules import ZigMaMixer
    from zigzag_mamba.orders import layer_orders

    assert seen
    for zigma, x, out in seen:
        assert x.shape[1] == prefix + grid[0] * grid[1]
        order = layer_orders(pattern, grid, zigma.layer_idx + 1)[zigma.layer_idx]
        ssm_cfg = {"d_state": zigma.mixer.d_state}
        width = x.shape[-1]
        stand_alone = ZigMaMixer(width, grid, order, num_prefix_tokens=prefix, ssm_cfg=ssm_cfg)
        stand_alone.to(x.dtype)
        stand_alone.mixer.load_state_dict(zigma.mixer.state_dict())
        torch.testing.assert_close(out, stand_alone(x), rtol=0, atol=0)


def gradients(model: torch.nn.Module, forward, inputs: list) -> dict:
    """Parameter gradients of one backward through ``forward(x)`` for each of ``inputs`` (a loss
    that weighs each forward differently, so that a mix-up shows)."""
    model.zero_grad()
    sum((k + 1) * forward(x).square().sum() for k, x in enumerate(inputs)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
