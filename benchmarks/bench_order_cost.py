"""What the zigzag scan costs a ZigMa block: ``pattern="zigzag8"`` against the same block with
``pattern=None`` (no permutation op at all, a plain Mamba block).

The two blocks share their weights, inputs and conditioning, and their calls alternate
(:func:`zigzag_mamba.bench.timing.time_interleaved`), so that the few percent being measured are
not drowned by the drift of a shared machine between two separate measurements. Reported per
L and mode: each block's median time and the median (and quartiles) of the per-repeat ratios
zigzag8 / pattern=None. The zigzag block runs order 1 of zigzag8 (a column snake, the strided
gather) on an H x W grid with H a power of two.

Targets (not asserted): <= 1.05x forward+backward at L = 4096, D = 384 on a CPU (float32);
<= 1.02x at L = 4096 and 16384, D = 768, bf16 on a GPU.

Usage::

    python benchmarks/bench_order_cost.py                       # CPU: L = 4096, D = 384
    python benchmarks/bench_order_cost.py --device cuda         # GPU: L = 4096, 16384, D = 768
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator

import torch

from zigzag_mamba.bench.cli import report_main
from zigzag_mamba.bench.contenders import paired_order_blocks
from zigzag_mamba.bench.timing import DTYPES, machine_info, paired_ratio, time_interleaved

DEFAULTS = {  # device -> (lengths, dim, batch, dtype, repeats)
    "cpu": ("4096", 384, 1, "fp32", 30),
    "cuda": ("4096,16384", 768, 4, "bf16", 20),
}
MODES = ("fwd", "fwd+bwd")


def measure(args: argparse.Namespace, device: torch.device) -> Iterator[str]:
    """The report's Markdown lines: what ran, then one table row per L and mode."""
    info = machine_info(device, DTYPES[args.dtype])
    yield from (
        "# What the token order costs a ZigMa block",
        "",
        f"Device: **{info['gpu'] or info['cpu']}** ({info['torch_threads']} torch threads); "
        f"torch {info['torch']}; selective scan: "
        f"{info['backends']['selective_scan'][device.type]}; "
        f"D = {args.dim}, batch "
        f"{args.batch}, {args.dtype}; {args.repeats} interleaved repeats per row. Ratio: median "
        "(and quartiles) of the per-repeat ratios zigzag8 / pattern=None.",
        "",
        "| L | mode | zigzag8 (ms) | pattern=None (ms) | ratio | quartiles |",
        "|---:|---|---:|---:|---:|---|",
    )
    for length in (int(v) for v in args.lengths.split(",")):
        blocks = paired_order_blocks(args.dim, length, args.batch, device, DTYPES[args.dtype])
        for mode in MODES:
            calls = {name: functools.partial(w.run, mode) for name, w in blocks.items()}
            timings = time_interleaved(calls, device, repeats=args.repeats, warmup=2)
            ratio, low, high = paired_ratio(timings["zigzag8"], timings["pattern=None"])
            ours, plain = (1e3 * timings[name].median for name in ("zigzag8", "pattern=None"))
            yield (
                f"| {length} | {mode} | {ours:.2f} | {plain:.2f} | {ratio:.3f}x "
                f"| {low:.3f}-{high:.3f} |"
            )


if __name__ == "__main__":
    report_main(
        __doc__.split("\n")[0], DEFAULTS, measure, repeats="interleaved calls of each block"
    )
