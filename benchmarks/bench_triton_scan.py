"""Triton selective scan on a GPU: correctness at real sizes, then speed against two baselines.

The defaults are the shapes of a ZigMa block of width 768: batch 1, d_inner D = 1536 scan
channels, N = 16 states, with z, D, delta_bias and softplus.

1. Correctness (L=4096 by default; bf16 and fp32 inputs): the output, last state and every
   gradient against the sequential reference in float64 on the same inputs, held to at most
   twice the error of the same reference run in fp32 (the bound the tests use).
2. Speed, forward and forward+backward, at each --lengths: the Triton scan, the chunked PyTorch
   scan (``use_backend(selective_scan="torch")``) and flash attention (SDPA, bf16, heads of 64
   over the block's width, --attention-width), medians over repeats timed with CUDA events.
3. Memory: the peak the scan's backward allocates beyond what exists before it, against the
   bytes of the scan's inputs, at each --memory-lengths.
4. Launch shapes: forward and backward times at --sweep-length for several channels per
   program, warps and steps per program, against the defaults, to guide them.

Writes a Markdown report to --out, row by row (a run cut short keeps what it measured), and
prints it. Usage on a CUDA machine::

    python benchmarks/bench_triton_scan.py --out bench-triton-scan.md

``--device cpu`` with tiny sizes (under ``TRITON_INTERPRET=1``) checks the script itself.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from zigzag_mamba import use_backend
from zigzag_mamba.bench.report import LiveReport
from zigzag_mamba.bench.timing import median_call_seconds
from zigzag_mamba.ops.selective_scan import (
    CHUNK,
    ScanInputs,
    selective_scan,
    selective_scan_reference,
)
from zigzag_mamba.ops.selective_scan import triton as kernels

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
PARAMS = ("A", "D", "delta_bias")


def mamba_inputs(
    batch: int, width: int, n_state: int, length: int, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """Inputs as a Mamba mixer makes them: A = -(1..N), dt in [1e-3, 0.1] via the bias, D = 1."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    dt = torch.exp(torch.rand(width, generator=g) * math.log(100)) * 1e-3
    data = {
        "u": rand(batch, width, length),
        "delta": 0.1 * rand(batch, width, length),
        "A": -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(width, 1),
        "B": rand(batch, n_state, length),
        "C": rand(batch, n_state, length),
        "D": torch.ones(width),
        "z": rand(batch, width, length),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }
    return {k: v.to(device, torch.float32 if k in PARAMS else dtype) for k, v in data.items()}


def run_with_grads(fn: Callable, inputs: dict, grads: tuple) -> list[torch.Tensor]:
    """[out, last_state, *input grads] of fn on fresh leaves of ``inputs``."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
    got = torch.autograd.grad((out, last), [leaves[k] for k in NAMES], grads)
    return [out.detach(), last.detach(), *got]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def correctness(args: argparse.Namespace) -> Iterator[str]:
    yield "| inputs | tensor | Triton rel. error | PyTorch fp32 rel. error | ok |"
    yield "|---" * 5 + "|"
    for dtype in (torch.bfloat16, torch.float32):
        inputs = mamba_inputs(
            args.batch, args.width, args.state, args.check_length, dtype, args.device
        )
        g = torch.Generator(device="cpu").manual_seed(1)
        shape = inputs["u"].shape
        grads = (
            torch.randn(shape, generator=g).to(args.device, dtype),
            torch.randn(*shape[:2], args.state, generator=g).to(args.device),
        )
        exact = run_with_grads(
            selective_scan_reference,
            {k: v.double() for k, v in inputs.items()},
            tuple(x.double() for x in grads),
        )
        own = run_with_grads(selective_scan_reference, inputs, grads)
        ours = run_with_grads(triton_scan, inputs, grads)
        for name, got, want, base in zip(
            ("out", "last_state", *NAMES), ours, exact, own, strict=True
        ):
            err, base_err = rel_err(got, want), rel_err(base, want)
            ok = err <= max(2 * base_err, 1e-5) and bool(torch.isfinite(got).all())
            verdict = "yes" if ok else "**NO**"
            yield f"| {str(dtype)[6:]} | {name} | {err:.2e} | {base_err:.2e} | {verdict} |"
        del exact, own, ours


def median_ms(fn: Callable[[], object], args: argparse.Namespace) -> float:
    """Median time of ``fn`` after two warm-up calls, within ``args.budget`` seconds or so."""
    seconds = median_call_seconds(
        fn, args.device, repeats=args.repeats, warmup=2, budget_s=args.budget
    )
    return 1e3 * seconds


def scan_step(fn: Callable, inputs: dict, backward: bool) -> Callable[[], object]:
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    grad = torch.randn_like(inputs["u"])

    def step() -> object:
        with torch.set_grad_enabled(backward):
            out = fn(**leaves, delta_softplus=True)
            return torch.autograd.grad(out, list(leaves.values()), grad) if backward else out

    return step


def attention_step(
    batch: int, width: int, length: int, device: str, backward: bool
) -> Callable[[], object]:
    """Flash attention over ``width`` channels in heads of 64 (the DiT block's attention)."""
    q, k, v = (
        torch.randn(batch, max(1, width // 64), length, 64, device=device, dtype=torch.bfloat16,
                    requires_grad=backward)
        for _ in range(3)
    )  # fmt: skip
    grad = torch.randn_like(q)
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        flash = nullcontext

    def step() -> object:
        with flash(), torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v)
            return torch.autograd.grad(out, (q, k, v), grad) if backward else out

    return step


def forced(backend: str) -> Callable[..., torch.Tensor]:
    """The public op with ``backend`` forced (its backward runs the same backend)."""

    def run(**kwargs) -> torch.Tensor:
        with use_backend(selective_scan=backend):
            return selective_scan(**kwargs)

    return run


triton_scan = forced("triton")


def speed(args: argparse.Namespace) -> Iterator[str]:
    baseline = forced("torch")
    yield "| L | pass | Triton ms | PyTorch scan ms | SDPA flash ms | vs PyTorch scan | vs SDPA |"
    yield "|---" * 7 + "|"
    for length in args.lengths:
        inputs = mamba_inputs(
            args.batch, args.width, args.state, length, torch.bfloat16, args.device
        )
        for backward in (False, True):
            time_it = lambda step: median_ms(step, args)
            ours = time_it(scan_step(triton_scan, inputs, backward))
            attn = time_it(
                attention_step(args.batch, args.attention_width, length, args.device, backward)
            )
            ref = time_it(scan_step(baseline, inputs, backward))
            yield (
                f"| {length} | {'fwd+bwd' if backward else 'fwd'} | {ours:.3f} | {ref:.3f} | "
                f"{attn:.3f} | {ref / ours:.1f}x | {attn / ours:.2f}x |"
            )
            if args.device == "cuda":
                torch.cuda.empty_cache()


# (channels per program, warps, steps per program) of each pass; None: the launcher's default.
# The forward's steps per program are its chunk (the checkpoints' spacing), the backward's
# gradient kernel takes tiles of whole chunks (of CHUNK steps).
FWD_SHAPES = [(None, None, None), (8, 4, None), (32, 4, None), (16, 8, 128)]
BWD_SHAPES = [(None, None, None), (4, 4, 128), (8, 4, 128), (2, 2, 256), (8, 8, 256)]


def launch_shapes(args: argparse.Namespace) -> Iterator[str]:
    """Forward and backward times per (channels per program, warps, steps per program)."""
    inputs = mamba_inputs(
        args.batch, args.width, args.state, args.sweep_length, torch.bfloat16, args.device
    )
    x = ScanInputs(*(inputs[k].detach() for k in NAMES), True)
    grad = torch.randn_like(inputs["u"])
    ckpt = kernels.forward(x, CHUNK)[2]
    time_it = lambda fn: median_ms(fn, args)
    yield "| pass | channels per program | warps | steps per program | ms |"
    yield "|---|---:|---:|---:|---:|"
    for kernel, shapes in (("fwd", FWD_SHAPES), ("bwd", BWD_SHAPES)):
        for block_d, warps, steps in shapes:
            overrides = {"block_d": block_d, "num_warps": warps}
            if kernel == "fwd":
                fn = functools.partial(kernels.forward, x, steps or CHUNK, **overrides)
            else:
                fn = functools.partial(
                    kernels.backward, x, ckpt, grad, None, CHUNK, tile=steps, **overrides
                )
            shown = [("default" if v is None else v) for v in (block_d, warps, steps)]
            yield f"| {kernel} | {shown[0]} | {shown[1]} | {shown[2]} | {time_it(fn):.3f} |"


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def backward_memory(args: argparse.Namespace) -> Iterator[str]:
    """Peak memory the scan's backward allocates beyond what exists before it, against the
    bytes of the scan's inputs (the block's shapes: batch 1, bf16, with z, D, delta_bias)."""
    yield "| L | inputs MiB | backward peak extra MiB | ratio |"
    yield "|---:|---:|---:|---:|"
    if args.device != "cuda":
        yield "| - | - | (needs CUDA memory statistics) | - |"
        return
    for length in args.memory_lengths:
        inputs = mamba_inputs(1, args.width, args.state, length, torch.bfloat16, args.device)
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out = triton_scan(**leaves, delta_softplus=True)
        grad = torch.randn_like(out)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(out, list(leaves.values()), grad)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        size = input_bytes(inputs)
        yield f"| {length} | {size / 2**20:.1f} | {extra / 2**20:.1f} | {extra / size:.2f}x |"
        del leaves, out, grad, grads
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown report path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=1536, help="scan channels D")
    parser.add_argument("--attention-width", type=int, default=768, help="SDPA's channels")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--sweep-length", type=int, default=4096)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    import triton

    report = LiveReport(args.out)
    report.add(
        "# Triton selective scan",
        "",
        f"{card}; torch {torch.__version__}, triton {triton.__version__}; B={args.batch}, "
        f"D={args.width}, N={args.state}; scan inputs bf16 with A, D, delta_bias fp32; "
        f"SDPA: {max(1, args.attention_width // 64)} heads of 64, bf16, non-causal.",
        "",
        f"## Correctness at L={args.check_length} (vs float64 reference; bound: 2x PyTorch fp32)",
        "",
    )
    for line in correctness(args):
        report.add(line)
    report.add("", "## Speed (median ms; ratios > 1 mean Triton is faster)", "")
    for line in speed(args):
        report.add(line)
    report.add(
        "",
        "Targets (B=1, D=1536): fwd+bwd <= 0.6 ms at L=4096 and <= 2.3 ms at L=16384; faster "
        "than SDPA from L=4096 on.",
        "",
        "## Backward memory (B=1, bf16; target: peak extra <= 2x the inputs at L=16384)",
        "",
    )
    for line in backward_memory(args):
        report.add(line)
    report.add(
        "",
        f"## Launch shapes at L={args.sweep_length} (bf16, with z, D, delta_bias, softplus)",
        "",
    )
    for line in launch_shapes(args):
        report.add(line)


if __name__ == "__main__":
    main()
