"""Sweeps over token counts: blocks, backbones and ops, measured one point at a time.

A *point* is one contender at one size, run in each requested mode (``"fwd"``: forward without
autograd; ``"fwd+bwd"``: forward and backward). On the CPU each block and backbone point runs in
a fresh Python process (``python -m zigzag_mamba.bench.worker``), so that the peak-RSS method of
:func:`~zigzag_mamba.bench.timing.peak_memory` sees only that point, and allocator state left by
one point cannot slow the next. There, kernels are first loaded at a tiny size, then the first
full-size call measures the peak memory and doubles as a warm-up, then the repeats are timed.

A contender whose time, extrapolated from its last two sizes, would exceed ``max_call_s`` at the
next size (and already takes a quarter of it) is skipped from there on (the row says
``skipped``), as is one that ran out of memory.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from zigzag_mamba.bench import contenders, ops
from zigzag_mamba.bench.timing import MIB, peak_memory, profile_table, time_call

MODES = ("fwd", "fwd+bwd")
SUITES = ("blocks", "backbones", "ops")
LONG_CALL_S = 5.0  # a measured call this long is warm-up enough: no extra warm-up call
WARM_TOKENS = 64  # tiny size at which each point's kernels are loaded before measuring

Log = Callable[[str], None]


@dataclass
class Settings:
    """Everything a sweep needs; :func:`preset` gives the standard ones."""

    device: str = "cpu"
    dtype: str = "float32"
    dim: int = 384
    backbone_dim: int = 768
    batch: int = 1
    lengths: list[int] = field(default_factory=lambda: [2**k for k in range(8, 15)])
    images: list[int] = field(default_factory=lambda: [256, 1024])
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    blocks: list[str] = field(default_factory=lambda: contenders.default_names(contenders.BLOCKS))
    backbones: list[str] = field(
        default_factory=lambda: contenders.default_names(contenders.BACKBONES)
    )
    block_modes: list[str] = field(default_factory=lambda: list(MODES))
    backbone_modes: list[str] = field(default_factory=lambda: ["fwd"])
    op_modes: list[str] = field(default_factory=lambda: list(MODES))
    warmup: int = 1
    min_repeats: int = 3
    backbone_repeats: int = 2
    max_repeats: int = 30
    min_time_s: float = 2.0
    max_call_s: float = 60.0
    op_max_call_s: float = 10.0  # ops compare kernels: no need to wait on the slow ones
    reference_max_length: int = 1024  # the sequential reference scan only up to this L
    isolate: bool = True
    compile: bool = False  # add torch.compile'd blocks and backbones next to the eager ones
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" adds CUDA graphs
    threads: int | None = None


def preset(device: str, quick: bool = False) -> Settings:
    """The standard sweep for ``device`` ("cpu" or "cuda"); ``quick`` is a few-minute subset."""
    if device == "cuda":
        settings = Settings(
            device="cuda",
            dtype="bfloat16",
            dim=768,
            lengths=[2**k for k in range(8, 17)],
            images=[256, 512, 1024],
            backbone_modes=list(MODES),
            backbone_repeats=3,
            min_time_s=0.5,
            max_call_s=20.0,
            isolate=False,  # CUDA's allocator statistics need no fresh process
        )
        if quick:
            settings.lengths, settings.images = [1024, 4096, 16384, 65536], [256, 1024]
            settings.min_time_s = 0.2
        return settings
    if quick:
        # No extra warm-up: the first full-size call (the memory one) already is one.
        return Settings(
            lengths=[256, 1024, 4096],
            images=[256],
            warmup=0,
            min_time_s=0.3,
            op_max_call_s=2.0,
            reference_max_length=256,
        )
    return Settings()


# ----------------------------------------------------------------------------- one point


def _label(spec: dict) -> str:
    if spec["suite"] == "ops":
        return f"{spec['name']} [{spec['backend']}]"
    table = contenders.BLOCKS if spec["suite"] == "blocks" else contenders.BACKBONES
    label = table[spec["name"]].label
    if not spec["compile"]:
        return label
    mode = "" if spec["compile"] == contenders.DEFAULT_COMPILE else f", {spec['compile']}"
    return f"{label} (compiled{mode})"


def _compiled_suffix(spec: dict) -> str:
    """The row name's suffix: none when eager, "-compiled" in the default mode, else
    "-compiled-<mode>"."""
    if not spec["compile"]:
        return ""
    mode = "" if spec["compile"] == contenders.DEFAULT_COMPILE else f"-{spec['compile']}"
    return f"-compiled{mode}"


def _tokens(spec: dict) -> int:
    if spec["suite"] == "backbones":
        return contenders.backbone_tokens(spec["size"])
    return spec["size"]


def _workload(spec: dict, size: int, device: torch.device, dtype: torch.dtype):
    common = {"batch": spec["batch"], "device": device, "dtype": dtype}
    if spec["suite"] == "ops":
        return ops.op_workload(spec["name"], spec["backend"], spec["dim"], size, **common)
    build = {"blocks": contenders.block_workload, "backbones": contenders.backbone_workload}
    return build[spec["suite"]](spec["name"], spec["dim"], size, compile=spec["compile"], **common)


def _load_kernels(spec: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Run the point's code paths once at a tiny size, so that loading them (numba's cache,
    oneDNN's primitives, lazy imports) is not counted in the measured call."""
    tiny = dict(spec)
    if spec["suite"] == "backbones":
        tiny.update(suite="blocks", name=contenders.BACKBONES[spec["name"]].stand_in)
    tiny["compile"] = ""
    workload = _workload(tiny, WARM_TOKENS, device, dtype)
    for mode in spec["modes"]:
        workload.run(mode)


def _base_row(spec: dict, mode: str, params: int) -> dict:
    return {
        "suite": spec["suite"],
        "name": spec["name"] + _compiled_suffix(spec),
        "backend": spec["backend"],
        "label": _label(spec),
        "mode": mode,
        "size": spec["size"],
        "tokens": _tokens(spec),
        "batch": spec["batch"],
        "dim": spec["dim"],
        "dtype": spec["dtype"],
        "params": params,
        "status": "ok",
    }


def _time_and_peak(fn: Callable[[], None], spec: dict, device: torch.device):
    """(timing, peak bytes or None): the first call measures memory and doubles as warm-up.

    With CUDA graphs (compile mode "reduce-overhead") the graphs are recorded in warm-up calls
    and replayed from a memory pool of their own, which a replay's peak would not show: no peak
    is reported then."""
    cudagraphs = device.type == "cuda" and contenders.uses_cudagraphs(spec["compile"])
    for _ in range(3 if cudagraphs else 1 if spec["compile"] else 0):
        fn()  # compiling (and recording) at this shape is neither memory nor time of the call
    estimate = peak = None
    if spec["memory"] and not cudagraphs:
        start = time.perf_counter()
        peak = peak_memory(fn, device)
        estimate = time.perf_counter() - start
    # On CUDA the measured call may have compiled kernels: warm up whatever its length.
    long_call = device.type == "cpu" and estimate is not None and estimate > LONG_CALL_S
    timing = time_call(
        fn,
        device,
        warmup=0 if long_call else spec["warmup"],
        min_repeats=spec["min_repeats"],
        max_repeats=spec["max_repeats"],
        min_time_s=spec["min_time_s"],
        estimate_s=estimate,
    )
    return timing, peak


def _measure(workload, spec: dict, mode: str, device: torch.device) -> dict:
    row = _base_row(spec, mode, contenders.parameter_count(workload))
    try:
        timing, peak = _time_and_peak(partial(workload.run, mode), spec, device)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "oom"}
    row.update(
        median_ms=timing.median * 1e3,
        min_ms=timing.low * 1e3,
        max_ms=timing.high * 1e3,
        spread_pct=timing.spread * 100,
        repeats=len(timing.samples),
        inner=timing.inner,
        peak_mib=None if peak is None else peak / MIB,
        tokens_per_s=row["batch"] * row["tokens"] / timing.median,
    )
    moved = ops.bytes_moved(spec["name"], spec["dim"], spec["size"], spec["batch"], _dtype(spec))
    if spec["suite"] == "ops" and moved is not None:
        row["gbps"] = moved / timing.median / 1e9
    return row


def _dtype(spec: dict) -> torch.dtype:
    return getattr(torch, spec["dtype"])


def run_point(spec: dict) -> list[dict]:
    """Measure one point in this process: one result row per mode in ``spec["modes"]``."""
    device, dtype = torch.device(spec["device"]), _dtype(spec)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["memory"] and device.type == "cpu":
        _load_kernels(spec, device, dtype)
    workload = _workload(spec, spec["size"], device, dtype)
    rows = [_measure(workload, spec, mode, device) for mode in spec["modes"]]
    del workload
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _failed(spec: dict, status: str, note: str) -> list[dict]:
    return [{**_base_row(spec, mode, 0), "status": status, "note": note} for mode in spec["modes"]]


def run_isolated(spec: dict, timeout_s: float | None = None) -> list[dict]:
    """:func:`run_point` in a fresh Python process."""
    command = [sys.executable, "-m", "zigzag_mamba.bench.worker"]
    try:
        done = subprocess.run(
            command, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return _failed(spec, "timeout", f"no result within {timeout_s:.0f} s")
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return _failed(spec, "error", lines[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sweeps


def _spec(
    settings: Settings,
    suite: str,
    name: str,
    size: int,
    modes: list[str],
    backend: str = "",
    compile: str = "",
) -> dict:
    """What a worker needs to measure one point; ``backend`` is the op backend (ops only);
    ``compile`` is "" (eager) or the torch.compile mode."""
    repeats = settings.backbone_repeats if suite == "backbones" else settings.min_repeats
    return {
        "suite": suite,
        "name": name,
        "backend": backend,
        "size": size,
        "modes": modes,
        "dim": settings.backbone_dim if suite == "backbones" else settings.dim,
        "batch": settings.batch,
        "device": settings.device,
        "dtype": settings.dtype,
        "compile": compile,
        "threads": settings.threads,
        "warmup": settings.warmup,
        "min_repeats": repeats,
        "max_repeats": settings.max_repeats,
        "min_time_s": settings.min_time_s,
        "memory": suite != "ops",
    }


def _predicted_s(history: list[tuple[int, float]], tokens: int) -> float:
    """A call's time at ``tokens``, extrapolated from the last two sizes (growth exponent
    clamped to [1, 2]; 2, attention's, until two sizes are known)."""
    if not history:
        return 0.0
    last_tokens, last_s = history[-1]
    exponent = 2.0
    if len(history) > 1:
        prev_tokens, prev_s = history[-2]
        if prev_s > 0 and last_s > 0 and last_tokens > prev_tokens:
            exponent = math.log(last_s / prev_s) / math.log(last_tokens / prev_tokens)
            exponent = min(max(exponent, 1.0), 2.0)
    return last_s * (tokens / last_tokens) ** exponent


def _too_slow(history: list[tuple[int, float]], tokens: int, limit_s: float) -> bool:
    """Whether a call at ``tokens`` is expected to exceed ``limit_s``. Only once calls already
    take a quarter of the limit: one slow point on a busy machine must not end a sweep early."""
    if not history or history[-1][1] <= limit_s / 4:
        return False
    return _predicted_s(history, tokens) > limit_s


def _log_row(log: Log, row: dict) -> None:
    head = f"[{row['suite']}] {row['label']:<34} {row['size']:>6} {row['mode']:<8}"
    if row["status"] != "ok":
        log(f"{head} {row['status']} {row.get('note', '')}")
        return
    memory = "" if row.get("peak_mib") is None else f"  peak {row['peak_mib']:9.1f} MiB"
    rate = f"  {row['gbps']:.1f} GB/s" if "gbps" in row else ""
    log(f"{head} {row['median_ms']:11.2f} ms ±{row['spread_pct'] / 2:4.1f}%{memory}{rate}")


def _sweep_contender(
    settings: Settings,
    suite: str,
    name: str,
    sizes: list[int],
    modes: list[str],
    log: Log,
    measure: Callable[[dict], list[dict]],
    backend: str = "",
    compile: str = "",
) -> list[dict]:
    """One contender over ``sizes``, dropping a mode once it is too slow or out of memory."""
    limit_s = settings.op_max_call_s if suite == "ops" else settings.max_call_s
    history: dict[str, list[tuple[int, float]]] = {mode: [] for mode in modes}
    active, rows = list(modes), []
    for size in sizes:
        tokens = contenders.backbone_tokens(size) if suite == "backbones" else size
        run = [m for m in active if not _too_slow(history[m], tokens, limit_s)]
        spec = _spec(settings, suite, name, size, run, backend, compile)
        note = f"expected over {limit_s:.0f} s a call, or failed at a smaller size"
        for row in _failed({**spec, "modes": [m for m in modes if m not in run]}, "skipped", note):
            _log_row(log, row)
            rows.append(row)
        for row in measure(spec) if run else []:
            _log_row(log, row)
            rows.append(row)
            if row["status"] == "ok":
                history[row["mode"]].append((row["tokens"], row["median_ms"] / 1e3))
            else:
                active.remove(row["mode"])
        active = [m for m in active if m in run]
    return rows


def _measurer(settings: Settings) -> Callable[[dict], list[dict]]:
    if settings.isolate:
        return partial(run_isolated, timeout_s=max(600.0, 30 * settings.max_call_s))
    return run_point


def _sweep_modules(
    settings: Settings, suite: str, names: list[str], sizes: list[int], modes: list[str], log: Log
) -> list[dict]:
    """Blocks or backbones: each eager, and compiled too with ``settings.compile``."""
    measure, rows = _measurer(settings), []
    for compile in ["", settings.compile_mode] if settings.compile else [""]:
        for name in names:
            rows += _sweep_contender(
                settings, suite, name, sizes, modes, log, measure, compile=compile
            )
    return rows


def sweep_blocks(settings: Settings, log: Log) -> list[dict]:
    return _sweep_modules(
        settings, "blocks", settings.blocks, settings.lengths, settings.block_modes, log
    )


def sweep_backbones(settings: Settings, log: Log) -> list[dict]:
    return _sweep_modules(
        settings, "backbones", settings.backbones, settings.images, settings.backbone_modes, log
    )


def sweep_ops(settings: Settings, log: Log) -> list[dict]:
    """Every op backend, in this process (ops are compared on speed; no memory measured)."""
    device, rows = torch.device(settings.device), []
    if settings.threads:
        torch.set_num_threads(settings.threads)
    for op in ops.OPS:
        modes = ["fwd"] if op == "permute_tokens" else settings.op_modes
        for backend in ops.op_backends(op, device):
            sizes = settings.lengths
            if backend == "reference":
                sizes = [n for n in sizes if n <= settings.reference_max_length]
            rows += _sweep_contender(settings, "ops", op, sizes, modes, log, run_point, backend)
    return rows


SWEEPS: dict[str, Callable[[Settings, Log], list[dict]]] = {
    "blocks": sweep_blocks,
    "backbones": sweep_backbones,
    "ops": sweep_ops,
}


def run_sweeps(settings: Settings, log: Log) -> list[dict]:
    """Every suite in ``settings.suites``; returns all result rows."""
    rows = []
    for suite in settings.suites:
        rows += SWEEPS[suite](settings, log)
    return rows


def profile_blocks(settings: Settings, names: list[str], length: int) -> dict[str, str]:
    """torch.profiler tables of one forward+backward call of each named block at ``length``."""
    device, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    tables = {}
    for name in names:
        workload = contenders.block_workload(
            name, settings.dim, length, settings.batch, device, dtype
        )
        workload.forward_backward()  # warm-up
        tables[name] = profile_table(workload.forward_backward, device)
    return tables


def settings_dict(settings: Settings) -> dict:
    return dataclasses.asdict(settings)
