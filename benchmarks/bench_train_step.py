"""A training step at the paper's scale: ZigMa-B/2 against DiT-B/2 on the latents of 1024^2
images (a VAE's factor 8 and patch 2: L = 4096 tokens), one full optimizer step each.

A step is: a flow-matching loss on random latents (x_t = (1 - t) x0 + t noise, target
noise - x0, t uniform), forward and backward under autocast (bf16 on a GPU), and an AdamW step on
fp32 weights. Both models are built as the benchmark sweep builds them
(:mod:`zigzag_mamba.bench.contenders`; the adaLN layers moved off zero). Reported per model: the
median time of a step after warm-up steps, the peak memory during the timed steps (everything:
weights, gradients, AdamW's state and activations) and the peak beyond what is allocated between
steps (the activations and the step's temporaries). ``--batch`` is tried first; if a model runs
out of memory, every model is measured again at half the batch, down to 1, so that the two are
always compared at the same batch.

The target (not asserted), the paper's claim: ZigMa-B/2's peak below DiT-B/2's at the same
batch.

Usage::

    python benchmarks/bench_train_step.py --device cuda          # 1024^2, batch 8, bf16
    python benchmarks/bench_train_step.py --device cpu --tiny    # a smoke test, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zigzag_mamba.bench.contenders import (
    LATENT_CHANNELS,
    LATENT_DOWNSAMPLE,
    DiTBackbone,
    randomize_modulation,
)
from zigzag_mamba.bench.report import LiveReport
from zigzag_mamba.bench.timing import MIB, call_seconds, machine_info, peak_memory, synchronize
from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (label, depth of the B/2 size)
MODELS = {"zigma": ("ZigMa-B/2", CONFIGS["ZigMa-B/2"]["depth"]), "dit": ("DiT-B/2", 12)}
TINY = {"image": 64, "dim": 32, "depth": 2, "batch": 2, "steps": 2, "warmup": 1}


def build(name: str, latent: int, dim: int, depth: int | None, device: torch.device) -> nn.Module:
    """The model on ``latent``-sided latents, fp32 weights, ``depth`` blocks (None: B/2's)."""
    depth = depth or MODELS[name][1]
    if name == "zigma":
        config = {**CONFIGS["ZigMa-B/2"], "dim": dim, "depth": depth}
        model = ZigMaBackbone(
            input_size=latent, in_channels=LATENT_CHANNELS, device=device, **config
        )
    else:
        model = DiTBackbone(latent, dim=dim, depth=depth, heads=max(dim // 64, 1), device=device)
    return randomize_modulation(model)


class Step:
    """One optimizer step of ``model`` on a fixed batch of random latents."""

    def __init__(self, model: nn.Module, batch: int, latent: int, args, device: torch.device):
        self.model, self.device = model, device
        self.fn = torch.compile(model) if args.compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.autocast = args.dtype != "fp32"
        self.dtype = DTYPES[args.dtype]
        gen = torch.Generator().manual_seed(0)
        shape = (batch, LATENT_CHANNELS, latent, latent)
        self.x0 = torch.randn(shape, generator=gen).to(device)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.t = torch.rand(batch, generator=gen).to(device)

    def __call__(self) -> None:
        t = self.t[:, None, None, None]
        x_t = (1 - t) * self.x0 + t * self.noise
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            prediction = self.fn(x_t, self.t)
        loss = F.mse_loss(prediction.float(), self.noise - self.x0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure_model(name: str, batch: int, args, device: torch.device) -> dict:
    """Time and memory of ``args.steps`` steps after ``args.warmup`` (which also create AdamW's
    state); raises torch.cuda.OutOfMemoryError when the batch does not fit."""
    latent = args.image // LATENT_DOWNSAMPLE
    model = build(name, latent, args.dim, args.depth, device)
    step = Step(model, batch, latent, args, device)
    try:
        for _ in range(args.warmup):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            between = torch.cuda.memory_allocated(device)
            times = [call_seconds(step, device) for _ in range(args.steps)]
            peak = torch.cuda.max_memory_allocated(device)
        else:  # the CPU keeps no allocator statistics: the rise of the resident set in a step
            between = 0
            peak = peak_memory(step, device)
            times = [call_seconds(step, device) for _ in range(args.steps)]
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "step_ms": 1e3 * statistics.median(times),
            "peak_mib": peak / MIB if device.type == "cuda" else None,
            "beyond_mib": (peak - between) / MIB,
        }
    finally:
        del step, model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure(args: argparse.Namespace, device: torch.device) -> Iterator[str]:
    """The report's Markdown lines."""
    info = machine_info(device, DTYPES[args.dtype])
    latent = args.image // LATENT_DOWNSAMPLE
    tokens = (latent // CONFIGS["ZigMa-B/2"]["patch_size"]) ** 2
    what = "peak beyond the state kept between steps" if device.type == "cuda" else "peak RSS rise"
    yield from (
        "# A training step: ZigMa-B/2 against DiT-B/2",
        "",
        f"Device: **{info['gpu'] or info['cpu']}**; torch {info['torch']}; "
        f"{args.image}^2 images ({latent}^2 latents, L = {tokens}), width {args.dim}, "
        f"{'autocast ' + args.dtype if args.dtype != 'fp32' else 'fp32'}, AdamW, "
        f"{'torch.compile, ' if args.compile else ''}median of {args.steps} steps after "
        f"{args.warmup}; backends {zigzag_mamba_backends(info, device)}.",
        "",
    )
    batch, results = args.batch, None
    while results is None:
        # Out of memory is handled outside the except block: its traceback holds the tensors.
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            results = {name: measure_model(name, batch, args, device) for name in args.models}
        if results is None:
            if batch == 1:
                yield "Out of memory at batch 1."
                return
            yield f"Out of memory at batch {batch}; trying {batch // 2}."
            batch //= 2
    yield from (
        f"| model | depth | params (M) | batch | step (ms) | peak (MiB) | {what} (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    )
    for name, r in results.items():
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        yield (
            f"| {MODELS[name][0]} | {args.depth or MODELS[name][1]} | {r['params'] / 1e6:.1f} "
            f"| {batch} | {r['step_ms']:.1f} | {peak} | {r['beyond_mib']:.0f} |"
        )
    if set(results) == set(MODELS):
        z, d = results["zigma"], results["dit"]
        key = "peak_mib" if z["peak_mib"] is not None else "beyond_mib"
        yield ""
        yield (
            f"ZigMa-B/2 / DiT-B/2: step time {z['step_ms'] / d['step_ms']:.2f}x, "
            f"peak memory {z[key] / d[key]:.2f}x."
        )


def zigzag_mamba_backends(info: dict, device: torch.device) -> dict[str, str]:
    return {op: choice[device.type] for op, choice in info["backends"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--image", type=int, default=1024, help="image side (latent: side / 8)")
    add("--batch", type=int, default=8, help="tried first; halved while it does not fit")
    add("--dim", type=int, default=768, help="width (768: the B size)")
    add("--depth", type=int, help="blocks of every model (default: B/2's, 24 and 12)")
    add("--dtype", choices=list(DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    add("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    add("--steps", type=int, default=10, help="timed steps")
    add("--warmup", type=int, default=3, help="steps before timing")
    add("--compile", action="store_true", help="torch.compile the models")
    add("--tiny", action="store_true", help=f"a smoke test: {TINY}")
    add("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    report = LiveReport(args.out)
    for line in measure(args, torch.device(device)):
        report.add(line)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
