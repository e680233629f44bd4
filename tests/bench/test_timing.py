"""The timing helpers zigma bench and the benchmark scripts share, at tiny sizes."""

import time

import torch

from zigzag_mamba.bench import contenders
from zigzag_mamba.bench import timing as benchlib
from zigzag_mamba.bench.timing import Timing

CPU = torch.device("cpu")


def test_call_seconds_times_one_call():
    assert 0.01 <= benchlib.call_seconds(lambda: time.sleep(0.01), CPU) < 1.0


def test_median_call_seconds_counts_warmup_samples_and_calls_per_sample():
    calls = []
    seconds = benchlib.median_call_seconds(
        lambda: calls.append(time.sleep(0.002)), CPU, repeats=4, warmup=2, calls_per_sample=3
    )
    assert len(calls) == 2 + 4 * 3
    assert 0.002 <= seconds < 0.5  # per call, not per sample of 3


def test_median_call_seconds_stops_at_its_budget_after_three_samples():
    calls = []
    benchlib.median_call_seconds(lambda: calls.append(0), CPU, repeats=100, warmup=0, budget_s=0.0)
    assert len(calls) == 3


def test_time_interleaved_takes_turns_in_a_rotated_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = benchlib.time_interleaved(fns, CPU, repeats=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up, then rotated turns
    assert all(len(t.samples) == 3 and t.inner == 1 for t in result.values())


def test_paired_ratio_pairs_the_repeats():
    slow = Timing([2.0, 4.0, 6.0, 8.0, 30.0])
    fast = Timing([1.0, 4.0, 2.0, 4.0, 10.0])
    # per-repeat ratios 2, 1, 3, 2, 3: a ratio of medians (6 / 4) would miss the pairing
    assert benchlib.paired_ratio(slow, fast) == (2.0, 2.0, 3.0)


def test_paired_blocks_share_weights_and_inputs():
    blocks = contenders.paired_order_blocks(16, 64, 2, CPU, torch.float32)
    zigzag, plain = blocks["zigzag8"], blocks["pattern=None"]
    assert plain.inputs is zigzag.inputs and plain.module.zigzag is None
    parameters = zip(zigzag.module.named_parameters(), plain.module.parameters(), strict=True)
    assert all(torch.equal(p, q) for (_, p), q in parameters)
    out_zigzag, out_plain = (w.fn(*w.inputs) for w in (zigzag, plain))
    assert out_zigzag.shape == out_plain.shape and not torch.equal(out_zigzag, out_plain)
