"""What recomputing in the mixer's backward costs and saves: a ZigMa block with
``Mamba.recompute = True`` (the SSM branch as one op that keeps only the in_proj output and the
scan's checkpoints, and recomputes the conv and the projections in the backward) against the same
block with ``recompute = False`` (plain autograd, which keeps every intermediate).

It is one block with one set of weights and inputs; only the mixer's ``recompute`` flag changes
between calls, and the calls alternate (:func:`benchlib.time_interleaved`), so that a difference
of a few percent is not drowned by the drift of a shared machine. Reported per L and mode: each
path's median time, the median (and quartiles) of the per-repeat ratios recompute / autograd,
and each path's peak memory during one call (the smaller of two measurements, taken in turns).
On the CPU the peak is the rise of the resident set size (see
:func:`zigzag_mamba.bench.timing.peak_memory`), which is steady enough on a busy machine; the
times are not.

Targets (not asserted): forward+backward time within 5% of the autograd path on a CPU, lower
peak memory everywhere.

Usage::

    python benchmarks/bench_recompute.py                     # CPU: L = 4096, D = 384, fp32
    python benchmarks/bench_recompute.py --device cuda       # GPU: L = 4096, 16384, D = 768, bf16
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from benchlib import LiveReport, paired_ratio, time_interleaved

from zigzag_mamba.bench.contenders import block_workload
from zigzag_mamba.bench.timing import MIB, machine_info, peak_memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULTS = {  # device -> (lengths, dim, batch, dtype, repeats)
    "cpu": ("4096", 384, 1, "fp32", 20),
    "cuda": ("4096,16384", 768, 1, "bf16", 20),
}
MODES = ("fwd", "fwd+bwd")
PATHS = {"recompute": True, "autograd": False}


def _call(workload, mode: str, recompute: bool) -> None:
    workload.module.mixer.recompute = recompute
    workload.run(mode)


def _peaks(calls: dict, device: torch.device) -> dict[str, float]:
    """Peak MiB of one call of each, the smaller of two measurements taken in turns."""
    peaks = {name: float("inf") for name in calls}
    for _ in range(2):
        for name, call in calls.items():
            peaks[name] = min(peaks[name], peak_memory(call, device) / MIB)
    return peaks


def measure(args: argparse.Namespace, device: torch.device) -> Iterator[str]:
    """The report's Markdown lines: what ran, then one table row per L and mode."""
    info = machine_info(device, DTYPES[args.dtype])
    backends = {op: choice[device.type] for op, choice in info["backends"].items()}
    yield from (
        "# Recomputing in the mixer's backward",
        "",
        f"Device: **{info['gpu'] or info['cpu']}** ({info['torch_threads']} torch threads); "
        f"torch {info['torch']}; backends {backends}; ZigMa block (zigzag8), D = {args.dim}, "
        f"batch {args.batch}, {args.dtype}; {args.repeats} interleaved repeats per row. Ratio: "
        "median (and quartiles) of the per-repeat ratios recompute / autograd. Peak: memory "
        f"during one call beyond the block and its inputs ({info['memory_method']}).",
        "",
        "| L | mode | recompute (ms) | autograd (ms) | ratio | quartiles "
        "| peak recompute (MiB) | peak autograd (MiB) |",
        "|---:|---|---:|---:|---:|---|---:|---:|",
    )
    for length in (int(v) for v in args.lengths.split(",")):
        workload = block_workload("zigma", args.dim, length, args.batch, device,
                                  DTYPES[args.dtype])  # fmt: skip
        for mode in MODES:
            calls = {
                name: functools.partial(_call, workload, mode, recompute)
                for name, recompute in PATHS.items()
            }
            timings = time_interleaved(calls, device, repeats=args.repeats, warmup=2)
            peaks = _peaks(calls, device)
            ratio, low, high = paired_ratio(timings["recompute"], timings["autograd"])
            ours, plain = (1e3 * timings[name].median for name in PATHS)
            yield (
                f"| {length} | {mode} | {ours:.2f} | {plain:.2f} | {ratio:.3f}x "
                f"| {low:.3f}-{high:.3f} | {peaks['recompute']:.1f} | {peaks['autograd']:.1f} |"
            )
        del workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=list(DEFAULTS))
    parser.add_argument("--lengths", help="comma-separated token counts")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, help="interleaved calls of each path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    for key, value in zip(
        ("lengths", "dim", "batch", "dtype", "repeats"), DEFAULTS[args.device], strict=True
    ):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = LiveReport(args.out)
    for line in measure(args, torch.device(args.device)):
        report.add(line)


if __name__ == "__main__":
    main()
