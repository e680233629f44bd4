"""FLOP_FORMULAS lets torch.utils.flop_counter count the library's ops: the scan and the conv by
their formulas, and the fused SSM branch as the sum of the ops it fuses."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.ops.test_ssm_branch import CASES, make_inputs
from zigzag_mamba.ops import FLOP_FORMULAS
from zigzag_mamba.ops.conv import causal_conv1d
from zigzag_mamba.ops.selective_scan import selective_scan
from zigzag_mamba.ops.ssm_branch import ssm_branch, ssm_branch_reference


def _flops(fn, *inputs) -> tuple[int, int]:
    """(forward FLOPs, forward and backward FLOPs) of fn on leaf copies of the inputs."""
    leaves = [
        None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs
    ]
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as forward:
        out = fn(*leaves)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as backward:
        out.sum().backward()
    return forward.get_total_flops(), forward.get_total_flops() + backward.get_total_flops()


def test_the_selective_scan_counts_nine_per_step_channel_and_state():
    batch, channels, length, state = 2, 6, 37, 5
    g = torch.Generator().manual_seed(1)
    u, delta = torch.randn(2, batch, channels, length, generator=g)
    A = -torch.rand(channels, state, generator=g)
    B, C = torch.randn(2, batch, state, length, generator=g)
    forward, total = _flops(lambda *x: selective_scan(*x, delta_softplus=True), u, delta, A, B, C)
    assert forward == 9 * batch * channels * length * state
    assert total == 3 * forward


def test_the_causal_conv_counts_a_multiply_add_per_tap():
    batch, channels, length, taps = 3, 8, 29, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, length, generator=g)
    weight, bias = torch.randn(channels, taps, generator=g), torch.randn(channels, generator=g)
    forward, total = _flops(lambda *a: causal_conv1d(*a, activation="silu"), x, weight, bias)
    assert forward == 2 * batch * channels * length * taps
    assert total == 3 * forward


def test_the_fused_branch_counts_what_its_reference_composes():
    for case in CASES.values():
        inputs = make_inputs(case, seed=3)
        assert _flops(ssm_branch, *inputs) == _flops(ssm_branch_reference, *inputs)
