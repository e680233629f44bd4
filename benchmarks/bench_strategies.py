"""What each scan strategy costs a block; what the cross mixer's k-way permute costs.

The k-way permute and merge are measured against k single permutes.

Blocks (same D, L, batch and conditioning; calls interleaved, see
:func:`zigzag_mamba.bench.timing.time_interleaved`): the alternating block (``zigzag8``, one
order per layer, ZigMa's), the bidirectional block (Vim's: one order read both ways) and the
cross block (``sweep4``, k = 4 orders per layer, VMamba's SS2D), each reported as a ratio to the
alternating block. Permutes: ``cross_permute`` + ``cross_merge`` of the mixer's (B, L, E)
activations (E = 2D) against k x (``permute_tokens`` + the unpermute), forward and backward.

Targets (not asserted): CPU, fwd+bwd, L = 4096, D = 384: the cross block <= 4.4x the alternating
block; the k-way permute and merge <= 1.10x of k single permutes.

Usage::

    python benchmarks/bench_strategies.py --out benchmarks/results/<machine>/strategies.md
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator

import torch

from zigzag_mamba.bench.cli import report_main
from zigzag_mamba.bench.contenders import block_workload, parameter_count
from zigzag_mamba.bench.timing import DTYPES, machine_info, paired_ratio, time_interleaved
from zigzag_mamba.ops.cross_permute import cross_merge, cross_permute
from zigzag_mamba.ops.permute import permute_tokens
from zigzag_mamba.orders import layer_layout

DEFAULTS = {  # device -> (lengths, dim, batch, dtype, repeats)
    "cpu": ("4096", 384, 1, "fp32", 15),
    "cuda": ("4096,16384", 768, 4, "bf16", 20),
}
BLOCKS = {"alternating": "zigma", "bidirectional": "vim", "cross": "cross"}
K = 4


def _permute_calls(
    length: int, channels: int, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """Forward and backward of the k-way permute + merge, and of k single permutes + unpermutes,
    on the same activations and orders."""
    grid = (length // 64, 64) if length % 64 == 0 else (1, length)
    stacked = layer_layout("sweep4", grid, num_orders=K, device=device).permutation
    singles = [layer_layout("sweep4", grid, j, device=device).permutation for j in range(K)]
    x = torch.randn(batch, length, channels, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, length, channels, device=device, dtype=dtype)

    def cross() -> None:
        cross_merge(cross_permute(x, stacked), stacked).backward(grad)

    def single() -> None:
        for p in singles:
            permute_tokens(permute_tokens(x, p), p.inverted()).backward(grad)

    return {"k-way": cross, f"{K} single": single}


def measure(args: argparse.Namespace, device: torch.device) -> Iterator[str]:
    dtype = DTYPES[args.dtype]
    info = machine_info(device, dtype)
    yield from (
        "# What each scan strategy costs a block",
        "",
        f"Device: **{info['gpu'] or info['cpu']}** ({info['torch_threads']} torch threads); "
        f"torch {info['torch']}; selective scan: "
        f"{info['backends']['selective_scan'][device.type]}; D = {args.dim}, batch "
        f"{args.batch}, {args.dtype}; {args.repeats} interleaved repeats per row. Ratio: median "
        "(and quartiles) of the per-repeat ratios to the alternating block.",
        "",
        "| L | mode | block | parameters | median (ms) | ratio | quartiles |",
        "|---:|---|---|---:|---:|---:|---|",
    )
    lengths = [int(v) for v in args.lengths.split(",")]
    for length in lengths:
        workloads = {
            label: block_workload(name, args.dim, length, args.batch, device, dtype)
            for label, name in BLOCKS.items()
        }
        for mode in ("fwd", "fwd+bwd"):
            calls = {label: functools.partial(w.run, mode) for label, w in workloads.items()}
            timings = time_interleaved(calls, device, repeats=args.repeats, warmup=2)
            for label, workload in workloads.items():
                ratio, low, high = paired_ratio(timings[label], timings["alternating"])
                yield (
                    f"| {length} | {mode} | {label} | {parameter_count(workload):,} | "
                    f"{1e3 * timings[label].median:.1f} | {ratio:.2f}x | {low:.2f}-{high:.2f} |"
                )
    yield from (
        "",
        f"## The k-way permute and merge against {K} single permutes",
        "",
        f"Forward and backward of the mixer's activations (B, L, E = {2 * args.dim}).",
        "",
        "| L | k-way (ms) | k single (ms) | ratio | quartiles |",
        "|---:|---:|---:|---:|---|",
    )
    for length in lengths:
        calls = _permute_calls(length, 2 * args.dim, args.batch, device, dtype)
        timings = time_interleaved(calls, device, repeats=args.repeats, warmup=2)
        ratio, low, high = paired_ratio(timings["k-way"], timings[f"{K} single"])
        cross, single = (1e3 * t.median for t in timings.values())
        yield f"| {length} | {cross:.2f} | {single:.2f} | {ratio:.3f}x | {low:.3f}-{high:.3f} |"


if __name__ == "__main__":
    report_main(
        __doc__.split("\n")[0], DEFAULTS, measure, repeats="interleaved calls of each block"
    )
