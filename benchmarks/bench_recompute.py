"""What recomputing in the mixer's backward costs and saves: a ZigMa block with
``Mamba.recompute = True`` (the SSM branch as one op that keeps only the in_proj output and the
scan's checkpoints, and recomputes the conv and the projections in the backward) against the same
block with ``recompute = False`` (plain autograd, which keeps every intermediate).

It is one block with one set of weights and inputs; only the mixer's ``recompute`` flag changes
between calls, and the calls alternate (:func:`zigzag_mamba.bench.timing.time_interleaved`), so
that a difference of a few percent is not drowned by the drift of a shared machine. Reported per
L and mode: each path's median time, the median (and quartiles) of the per-repeat ratios
recompute / autograd, and each path's peak memory during one call beyond the block and its
inputs (see ``_peak``: on the CPU measured in a fresh process, reproducible to a fraction of a
MiB even on a busy machine; the times are not).

With ``--images``, a second table gives the peak memory of one forward+backward of ZigMa-B/2
(both ways) and of DiT-B/2 at those image sides (a stack is where recomputing pays).

Targets (not asserted): lower peak memory everywhere; on a CPU, forward+backward within 5% of the
block's time with plain autograd (the path the block had before, and the closest stand-in for it
that runs in the same process).

Usage::

    python benchmarks/bench_recompute.py                     # CPU: L = 4096, D = 384, fp32
    python benchmarks/bench_recompute.py --images 512        # and the backbones' peaks at 512²
    python benchmarks/bench_recompute.py --device cuda       # GPU: L = 4096, 16384, D = 768, bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import torch

from zigzag_mamba.bench.cli import add_block_arguments, parse_block_arguments
from zigzag_mamba.bench.contenders import backbone_tokens, backbone_workload, block_workload
from zigzag_mamba.bench.report import LiveReport
from zigzag_mamba.bench.timing import (
    DTYPES,
    MIB,
    machine_info,
    paired_ratio,
    peak_memory,
    time_interleaved,
)
from zigzag_mamba.modules import Mamba

DEFAULTS = {  # device -> (lengths, dim, batch, dtype, repeats)
    "cpu": ("4096", 384, 1, "fp32", 20),
    "cuda": ("4096,16384", 768, 1, "bf16", 20),
}
MODES = ("fwd", "fwd+bwd")
PATHS = {"recompute": True, "autograd": False}


def _call(workload, mode: str, recompute: bool) -> None:
    workload.module.mixer.recompute = recompute
    workload.run(mode)


def _peak(call, device: torch.device) -> float:
    """Peak MiB of ``call`` after a warm-up call (the smaller of two)."""
    call()
    return min(peak_memory(call, device) for _ in range(2)) / MIB


def _peaks_here(args: argparse.Namespace, point: str) -> dict[str, float]:
    """The peaks of one point in this process: "block:L" gives one per "mode,path";
    "backbone:IMAGE" gives forward+backward of ZigMa-B/2 per path and of DiT-B/2."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    kind, size = point.split(":")
    if kind == "block":
        workload = block_workload("zigma", args.dim, int(size), args.batch, device, dtype)
        return {
            f"{mode},{name}": _peak(functools.partial(_call, workload, mode, recompute), device)
            for mode in MODES
            for name, recompute in PATHS.items()
        }
    zigma = backbone_workload("zigma", args.backbone_dim, int(size), args.batch, device, dtype)
    peaks = {}
    for name, recompute in PATHS.items():
        for mixer in (m for m in zigma.module.modules() if isinstance(m, Mamba)):
            mixer.recompute = recompute
        peaks[name] = _peak(functools.partial(zigma.run, "fwd+bwd"), device)
    del zigma
    dit = backbone_workload("dit", args.backbone_dim, int(size), args.batch, device, dtype)
    peaks["dit"] = _peak(functools.partial(dit.run, "fwd+bwd"), device)
    return peaks


def _peaks(args: argparse.Namespace, point: str) -> dict[str, float]:
    """Peak MiB of one call per "mode,path". On a GPU from the allocator's statistics, here. On
    the CPU in a fresh process whose C allocator serves every block above 128 KiB with its own
    mapping (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the resident set at once
    and the peak resident size is that of the live tensors, reproducible to a fraction of a MiB
    (with the allocator's default, moving threshold it varies by tens of MiB from run to run;
    the timed calls run with the default)."""
    if args.device != "cpu":
        return _peaks_here(args, point)
    command = [sys.executable, __file__, "--peaks", point]
    for key in ("device", "dim", "backbone_dim", "batch", "dtype", "threads"):
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, device: torch.device) -> Iterator[str]:
    """The report's Markdown lines: what ran, then one table row per L and mode."""
    info = machine_info(device, DTYPES[args.dtype])
    if args.threads:  # after machine_info: numba's OpenMP start-up resets the thread count
        torch.set_num_threads(args.threads)
        info["torch_threads"] = args.threads
    method = info["memory_method"]
    if device.type == "cpu":
        method += ", MALLOC_MMAP_THRESHOLD_=131072"
    backends = {op: choice[device.type] for op, choice in info["backends"].items()}
    yield from (
        "# Recomputing in the mixer's backward",
        "",
        f"Device: **{info['gpu'] or info['cpu']}** ({info['torch_threads']} torch threads); "
        f"torch {info['torch']}; backends {backends}; ZigMa block (zigzag8), D = {args.dim}, "
        f"batch {args.batch}, {args.dtype}; {args.repeats} interleaved repeats per row. Ratio: "
        "median (and quartiles) of the per-repeat ratios recompute / autograd. Peak: memory "
        f"during one call beyond the block and its inputs ({method}).",
        "",
        "| L | mode | recompute (ms) | autograd (ms) | ratio | quartiles "
        "| peak recompute (MiB) | peak autograd (MiB) |",
        "|---:|---|---:|---:|---:|---|---:|---:|",
    )
    for length in (int(v) for v in args.lengths.split(",")):
        peaks = _peaks(args, f"block:{length}")
        workload = block_workload("zigma", args.dim, length, args.batch, device,
                                  DTYPES[args.dtype])  # fmt: skip
        for mode in MODES:
            calls = {
                name: functools.partial(_call, workload, mode, recompute)
                for name, recompute in PATHS.items()
            }
            timings = time_interleaved(calls, device, repeats=args.repeats, warmup=2)
            ratio, low, high = paired_ratio(timings["recompute"], timings["autograd"])
            ours, plain = (1e3 * timings[name].median for name in PATHS)
            yield (
                f"| {length} | {mode} | {ours:.2f} | {plain:.2f} | {ratio:.3f}x "
                f"| {low:.3f}-{high:.3f} | {peaks[mode + ',recompute']:.1f} "
                f"| {peaks[mode + ',autograd']:.1f} |"
            )
        del workload
    if args.images:
        yield from _backbone_rows(args)


def _backbone_rows(args: argparse.Namespace) -> Iterator[str]:
    yield from (
        "",
        f"Backbones, forward+backward, width {args.backbone_dim}, batch {args.batch}: peak MiB.",
        "",
        "| image | L | ZigMa-B/2 recompute | ZigMa-B/2 autograd | DiT-B/2 |",
        "|---:|---:|---:|---:|---:|",
    )
    for image in (int(v) for v in args.images.split(",")):
        peaks = _peaks(args, f"backbone:{image}")
        yield (
            f"| {image} | {backbone_tokens(image)} | {peaks['recompute']:.1f} "
            f"| {peaks['autograd']:.1f} | {peaks['dit']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_block_arguments(parser, list(DEFAULTS), repeats="interleaved calls of each path")
    parser.add_argument("--images", help="comma-separated image sides: backbone peaks too")
    parser.add_argument("--backbone-dim", type=int, default=768, help="the backbones' width")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--peaks", help=argparse.SUPPRESS)  # block:L or backbone:IMAGE
    args = parse_block_arguments(parser, DEFAULTS)
    if args.peaks:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(_peaks_here(args, args.peaks)))
        return
    report = LiveReport(args.out)
    for line in measure(args, torch.device(args.device)):
        report.add(line)


if __name__ == "__main__":
    main()
