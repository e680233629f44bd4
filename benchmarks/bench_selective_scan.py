"""Selective scan on the CPU: forward + backward time of each implementation.

Usage: ``python benchmarks/bench_selective_scan.py [--quick] [--threads N]``

Compares, at batch 1, 768 channels, 16 states (Mamba's ZigMa-B shapes), with D, z, delta_bias and
softplus as the Mamba mixer calls it:

- ``numba``: the numba kernels (backend "numba");
- ``torch``: the chunked PyTorch scan (backend "torch");
- ``pscan``: a baseline written here, in the style of the mambapy package: the whole (B, D, L, N)
  decay and input tensors are materialised and scanned with a Blelloch parallel scan (work
  O(L), depth O(log L)), with a reverse scan as its backward;
- ``reference``: :func:`zigzag_mamba.ops.selective_scan_reference`, the sequential loop
  differentiated by autograd (each step computes its own decay from a slice of delta);
- ``materialised loop``: a sequential loop written the way mamba-ssm's ``selective_scan_ref``
  is: the decays exp(delta A) and the inputs delta B u are first materialised as (B, D, L, N)
  tensors, then stepped through one slice at a time under autograd. Each slice's backward
  writes a full (B, D, L, N) gradient, so its backward is O(L^2): this is the loop a user
  would otherwise differentiate.

Each time is the median of several repeats after one warm-up call; ``numba`` and ``torch`` are
called in turns, and their speed-up is the median of the per-turn ratios, so that the drift of a
shared machine falls on both alike. The loops are timed once.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable

import numba
import torch
import torch.nn.functional as F

import zigzag_mamba
from zigzag_mamba.bench.timing import median_call_seconds, paired_ratio, time_interleaved
from zigzag_mamba.ops import selective_scan, selective_scan_reference


class _BlellochScan(torch.autograd.Function):
    """h[t] = a[t] * h[t-1] + x[t] along dim 2 of (B, D, L, N) tensors, L a power of two."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = _blelloch_(a.clone(), x.clone())
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        # The adjoint runs the same recurrence backwards in time with the decays shifted by one.
        a_next = F.pad(a[:, :, 1:], (0, 0, 0, 1))
        grad_x = _blelloch_(a_next.flip(2), grad_h.flip(2).clone()).flip(2)
        h_before = F.pad(h[:, :, :-1], (0, 0, 1, 0))
        return grad_x * h_before, grad_x


def _blelloch_(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """In-place inclusive scan of x under (a, x) pairs; a is overwritten with block products."""
    length = x.shape[2]
    levels = length.bit_length() - 1
    assert 1 << levels == length, "the baseline scans power-of-two lengths only"
    for s in range(levels):  # up-sweep: each block end accumulates its block
        block = 2 << s
        av, xv = (t.unflatten(2, (length // block, block)) for t in (a, x))
        xv[:, :, :, -1] += av[:, :, :, -1] * xv[:, :, :, block // 2 - 1]
        av[:, :, :, -1] *= av[:, :, :, block // 2 - 1]
    for s in range(levels - 2, -1, -1):  # down-sweep: left-half ends take the prefix before them
        block = 2 << s
        span = slice(block - 1, length - 1)
        av, xv = (t[:, :, span].unflatten(2, (length // block - 1, block)) for t in (a, x))
        xv[:, :, :, block // 2] += av[:, :, :, block // 2] * xv[:, :, :, 0]
    return x


def pscan_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Selective scan over a materialised (B, D, L, N) state with the Blelloch scan above."""
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    decay = torch.exp(dt.unsqueeze(-1) * A[:, None, :])
    inputs = (dt * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    states = _BlellochScan.apply(decay, inputs)
    y = (states * C.transpose(1, 2).unsqueeze(1)).sum(-1) + u * D[:, None]
    return y * F.silu(z)


def materialised_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The sequential scan over materialised (B, D, L, N) decays and inputs (see above)."""
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    decay = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    inputs = torch.einsum("bdl,bnl,bdl->bdln", dt, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        state = decay[:, :, i] * state + inputs[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, i]))
    y = torch.stack(ys, 2) + u * D[:, None]
    return y * F.silu(z)


def make_inputs(channels: int, length: int, state: int = 16) -> dict[str, torch.Tensor]:
    """The scan's inputs as the Mamba mixer passes them, and a gradient for its output."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    return {
        "u": randn(1, channels, length),
        "delta": randn(1, channels, length) - 2,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": randn(1, state, length),
        "C": randn(1, state, length),
        "D": torch.ones(channels),
        "z": randn(1, channels, length),
        "delta_bias": randn(channels) * 0.1,
        "grad_out": randn(1, channels, length),
    }


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    """One forward and backward; the output's gradient (``inputs["grad_out"]``) is made
    beforehand, as a network's upstream layers would have made it."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if k != "grad_out"}
    fn(**leaves, delta_softplus=True).backward(inputs["grad_out"])


def with_backend(name: str) -> Callable[..., torch.Tensor]:
    def run(**kw):
        with zigzag_mamba.use_backend(selective_scan=name):
            return selective_scan(**kw)

    return run


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"numba {numba.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--threads", type=int, help="torch (and so numba) threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    channels, lengths, pscan_length, ref_length = (
        (64, (256, 1024), 1024, 256) if args.quick else (768, (1024, 4096, 16384), 4096, 1024)
    )
    contenders = {"numba": with_backend("numba"), "torch": with_backend("torch")}

    start = time.perf_counter()
    fwd_bwd(contenders["numba"], make_inputs(8, 32))
    first_call = time.perf_counter() - start
    print(f"machine: {machine()}")
    print(f"numba kernels' first call (compile, or load numba's on-disk cache): {first_call:.1f} s")
    print(
        f"shapes: B=1, D={channels}, N=16; forward + backward; median of repeats (s); "
        "numba vs torch: median (quartiles) of the per-turn ratios\n"
    )

    rows, times = [], {}
    for length in lengths:
        inputs = make_inputs(channels, length)
        calls = {name: functools.partial(fwd_bwd, fn, inputs) for name, fn in contenders.items()}
        repeats = 5 if length >= 16384 else 9
        timings = time_interleaved(calls, torch.device("cpu"), repeats=repeats)
        times |= {(name, length): t.median for name, t in timings.items()}
        ratio, low, high = paired_ratio(timings["torch"], timings["numba"])
        t_numba, t_torch = times["numba", length], times["torch", length]
        rows.append(f"| numba vs torch | {length} | {t_numba:.3f} | {t_torch:.3f} | "
                    f"{ratio:.1f}x ({low:.1f}-{high:.1f}) |")  # fmt: skip
    inputs = make_inputs(channels, pscan_length)
    times["pscan", pscan_length] = median_call_seconds(
        lambda: fwd_bwd(pscan_selective_scan, inputs), "cpu", repeats=3
    )
    t_torch, t_pscan = times["torch", pscan_length], times["pscan", pscan_length]
    rows.append(f"| torch vs pscan | {pscan_length} | {t_torch:.3f} | {t_pscan:.3f} | "
                f"{t_pscan / t_torch:.1f}x |")  # fmt: skip
    inputs = make_inputs(channels, ref_length)
    for loop_name, loop in (
        ("reference", selective_scan_reference),
        ("materialised loop", materialised_loop),
    ):
        t_loop = median_call_seconds(
            lambda loop=loop: fwd_bwd(loop, inputs), "cpu", repeats=1, warmup=0
        )
        for name in contenders:
            t = times[name, ref_length]
            rows.append(f"| {name} vs {loop_name} | {ref_length} | {t:.3f} | {t_loop:.3f} | "
                        f"{t_loop / t:.0f}x |")  # fmt: skip

    print("| comparison | L | time (s) | baseline (s) | speed-up |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
