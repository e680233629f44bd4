"""Bandwidth of ``permute_tokens`` against a device-to-device copy of the same tensor.

A permutation reads and writes every byte once, exactly like a copy, so the copy measured in the
same run is its ceiling. For each size the report gives achieved GB/s ((bytes read + bytes
written) / median time) of:

- ``copy``: ``out.copy_(x)``, the ceiling;
- ``triton``: the Triton row gather (``gather_tokens``, the launcher behind the CUDA op);
- ``op``: ``permute_tokens`` through its custom op (adds dispatch; CUDA only; the backend it
  resolved to is named in the table);
- ``index_select``: the PyTorch fallback.

plus a short sweep of launch shapes (rows per program x warps) at the first size, to guide the
defaults. Every kernel result is checked bit for bit against ``x[:, order]`` before timing.
Target (not asserted): ``triton`` >= 80% of ``copy`` at (8, 16384, 768) bf16.

Usage on a CUDA machine::

    python benchmarks/bench_permute.py --out gpu_results/permute.md

``TRITON_INTERPRET=1 python benchmarks/bench_permute.py --device cpu --sizes 2x64x24:bf16
--repeats 2`` checks the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from zigzag_mamba.bench.report import LiveReport
from zigzag_mamba.bench.timing import DTYPES, median_call_seconds
from zigzag_mamba.ops.backends import resolve
from zigzag_mamba.ops.permute import Permutation, permute_tokens
from zigzag_mamba.ops.permute.triton import default_block_l, gather_tokens
from zigzag_mamba.orders import zigzag_orders

DEFAULT_SIZES = (
    "8x16384x768:bf16,8x16384x768:fp32,8x4096x768:bf16,32x1024x1152:bf16,"
    "4x16384x600:fp16,64x4096x3:fp32"
)
SWEEP = [(block_l, warps) for block_l in (4, 8, 16, 32, 64) for warps in (2, 4, 8)]


def parse_sizes(text: str) -> list[tuple[tuple[int, int, int], str]]:
    """``"8x16384x768:bf16,..."`` -> [((8, 16384, 768), "bf16"), ...]."""
    sizes = []
    for item in text.split(","):
        dims, _, dtype = item.partition(":")
        b, length, c = (int(v) for v in dims.split("x"))
        sizes.append(((b, length, c), dtype or "bf16"))
    return sizes


def scan_order(length: int, device: str) -> tuple[torch.Tensor, str]:
    """A zigzag column snake when L is a square grid (what a ZigMa layer does), else random."""
    side = math.isqrt(length)
    if side * side == length:
        return zigzag_orders(side, side)[1].to(device), "zigzag S1"
    return torch.randperm(length, generator=torch.Generator().manual_seed(0)).to(device), "random"


# Calls per timed sample: back to back, so that a sample measures the device's work, not the
# launch latency.
CALLS_PER_SAMPLE = 10


def seconds_per_call(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    return median_call_seconds(
        fn, device, repeats=repeats, warmup=warmup, calls_per_sample=CALLS_PER_SAMPLE
    )


def gbps(x: torch.Tensor, seconds: float) -> float:
    return 2 * x.numel() * x.element_size() / seconds / 1e9


def check(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not torch.equal(out, expected):
        raise SystemExit(f"{what}: result differs from x[:, order]")


def measure(shape, dtype_name: str, device: str, args) -> dict[str, object]:
    """GB/s of every contender at one size."""
    x = torch.randn(shape, device=device).to(DTYPES[dtype_name])
    order, order_kind = scan_order(shape[1], device)
    permutation = Permutation.of(order)
    expected = x[:, order]
    out = torch.empty_like(x)
    contenders: dict[str, Callable[[], object]] = {
        "copy": lambda: out.copy_(x),
        "triton": lambda: gather_tokens(x, order),
        "index_select": lambda: x.index_select(1, order),
    }
    check(gather_tokens(x, order), expected, "triton")
    row: dict[str, object] = {"size": "x".join(map(str, shape)), "dtype": dtype_name}
    row["order"] = order_kind
    if device == "cuda":
        check(permute_tokens(x, permutation), expected, "op")
        contenders["op"] = lambda: permute_tokens(x, permutation)
        row["op backend"] = resolve("permute_tokens", "cuda")
    for name, fn in contenders.items():
        row[name] = gbps(x, seconds_per_call(fn, device, args.warmup, args.repeats))
    return row


def sweep(shape, dtype_name: str, device: str, args) -> list[tuple[int, int, float]]:
    """GB/s of the gather for each (rows per program, warps) launch shape."""
    x = torch.randn(shape, device=device).to(DTYPES[dtype_name])
    order, _ = scan_order(shape[1], device)
    expected = x[:, order]
    results = []
    for block_l, warps in SWEEP:
        fn = lambda: gather_tokens(x, order, block_l=block_l, num_warps=warps)  # noqa: B023
        check(fn(), expected, f"triton block_l={block_l} warps={warps}")
        results.append((block_l, warps, gbps(x, seconds_per_call(fn, device, 2, args.repeats))))
    return results


def header(device: str) -> list[str]:
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    return [
        "# permute_tokens bandwidth",
        "",
        f"Card: **{card}**; torch {torch.__version__}, triton {triton.__version__}. GB/s = (bytes "
        "read + bytes written) / median time per call, calls timed 10 back to back; % of the "
        "copy measured in the same run.",
        "",
        "| size (B x L x C) | dtype | order | copy GB/s | triton GB/s | % copy | op GB/s "
        "| index_select GB/s | % copy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]


def table_row(r: dict[str, object]) -> str:
    op = f"{r['op']:.0f} ({r['op backend']})" if "op" in r else "-"
    return (
        f"| {r['size']} | {r['dtype']} | {r['order']} | {r['copy']:.0f} | {r['triton']:.0f} "
        f"| {100 * r['triton'] / r['copy']:.0f}% | {op} | {r['index_select']:.0f} "
        f"| {100 * r['index_select'] / r['copy']:.0f}% |"
    )


def _sweep_table(sweep_rows: list[tuple[int, int, float]], shape) -> list[str]:
    default = (default_block_l(shape[0][1], shape[0][2]), 4)
    lines = [
        "",
        f"Launch shapes of the gather at {'x'.join(map(str, shape[0]))} {shape[1]}, fastest first:",
        "",
        "| rows per program | warps | GB/s |",
        "|---:|---:|---:|",
    ]
    for block_l, warps, rate in sorted(sweep_rows, key=lambda t: -t[2]):
        mark = " (default)" if (block_l, warps) == default else ""
        lines.append(f"| {block_l}{mark} | {warps} | {rate:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_results/permute.md"))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="BxLxC:dtype,... (fp32|fp16|bf16)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes)
    report = LiveReport(args.out)
    report.add(*header(args.device))
    for shape, dtype_name in sizes:
        report.add(table_row(measure(shape, dtype_name, args.device, args)))
    if not args.no_sweep:
        report.add(*_sweep_table(sweep(*sizes[0], args.device, args), sizes[0]))


if __name__ == "__main__":
    main()
