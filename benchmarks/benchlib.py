"""Helpers the benchmark scripts share: timers for short and interleaved calls, a report that
is written row by row, the paired blocks of the scan-cost benchmark, and the command-line
arguments of the interleaved block benchmarks.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zigzag_mamba.bench.contenders import Workload, block_workload
from zigzag_mamba.bench.timing import Timing, timed_seconds

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a block benchmark's DEFAULTS give per device, in this order.
_BLOCK_SETTINGS = ("lengths", "dim", "batch", "dtype", "repeats")


def add_block_arguments(parser: argparse.ArgumentParser, devices: list[str], repeats: str) -> None:
    """--device, --lengths, --dim, --batch, --dtype, --repeats (help ``repeats``) and --out;
    the ones left out take the device's defaults (:func:`parse_block_arguments`)."""
    parser.add_argument("--device", default=devices[0], choices=devices)
    parser.add_argument("--lengths", help="comma-separated token counts")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, help=repeats)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")


def parse_block_arguments(
    parser: argparse.ArgumentParser, defaults: dict[str, tuple]
) -> argparse.Namespace:
    """The parsed arguments, each block setting not given taken from ``defaults[device]``
    (lengths, dim, batch, dtype, repeats)."""
    args = parser.parse_args()
    for key, value in zip(_BLOCK_SETTINGS, defaults[args.device], strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def call_seconds(fn: Callable[[], object], device: torch.device | str) -> float:
    """Duration of one call of ``fn``: CUDA events around it on a GPU (the device's own clock,
    without the host's launch latency), the host clock elsewhere."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def median_call_seconds(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    repeats: int,
    warmup: int = 1,
    calls_per_sample: int = 1,
    budget_s: float = math.inf,
) -> float:
    """Median seconds per call of ``fn``: ``warmup`` calls, then up to ``repeats`` samples of
    ``calls_per_sample`` back-to-back calls, each timed by :func:`call_seconds`; sampling stops
    early once ``budget_s`` seconds are spent and 3 samples are in.

    Back-to-back calls let the host prepare the next launch while the device runs the previous
    one, as in a model, so that a short kernel's launch latency is not counted.
    """
    for _ in range(warmup):
        fn()

    def sample() -> None:
        for _ in range(calls_per_sample):
            fn()

    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats and (len(samples) < 3 or time.perf_counter() - start < budget_s):
        samples.append(call_seconds(sample, device) / calls_per_sample)
    return statistics.median(samples)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time several callables in turns: repeat r calls each of them once, in a rotated order.

    For comparing contenders whose difference is smaller than the drift of a shared machine:
    consecutive calls see the same machine state, so the ratio of the r-th samples of two
    contenders (see :func:`paired_ratio`) is far steadier than the ratio of two medians taken
    one after the other. Rotating the order keeps any cost of running first or second (a
    cold cache, a clock ramping up) from falling on one contender.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            timed_seconds(fns[name], device, 1)
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timings[name].samples.append(timed_seconds(fns[name], device, 1))
    return timings


def paired_ratio(numerator: Timing, denominator: Timing) -> tuple[float, float, float]:
    """(median, lower quartile, upper quartile) of the per-repeat ratios of two interleaved
    timings."""
    ratios = sorted(a / b for a, b in zip(numerator.samples, denominator.samples, strict=True))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), low, high


class LiveReport:
    """Markdown lines, printed and rewritten to ``path`` (if given) at every addition, so that a
    benchmark cut short by a time limit keeps every row it measured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lines: list[str] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, *lines: str) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")


def paired_scan_blocks(
    dim: int, length: int, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Workload]:
    """The zigzag8 block and the ``pattern=None`` block with the same weights and the same inputs:
    the two sides of the scan's own cost."""
    zigzag = block_workload("zigma", dim, length, batch, device, dtype)
    plain = block_workload("zigma-none", dim, length, batch, device, dtype)
    plain.module.load_state_dict(zigzag.module.state_dict())
    return {"zigzag8": zigzag, "pattern=None": Workload(plain.module, zigzag.inputs, plain.module)}
