"""Timing and peak memory of one callable, and a description of the machine that ran it: the
one timing module of ``zigma bench`` and of the studies in ``benchmarks/``.

Timing: warm-up calls, then repeats until both a minimum count and a minimum total time are
reached (capped); each sample is one call, or several back to back when a call is shorter than
:data:`MIN_SAMPLE_S`, so that timer resolution and launch jitter do not dominate. CUDA work is
synchronised before the clock is read.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` during the call minus what was
allocated before it. On the CPU, PyTorch keeps no allocator statistics, so the peak resident set
size is used instead: free heap pages are returned to the OS (``malloc_trim``), the kernel's
high-water mark is reset (``/proc/self/clear_refs``), and the peak is the high-water mark after
the call minus the resident size before it. Run in a fresh process per point (the sweep does),
this counts every byte the call touched (PyTorch tensors and numba's scratch alike); pages the
allocator reuses without returning them to the OS are not counted twice. Where the reset is not
possible, the rise of ``ru_maxrss`` over its previous maximum is reported and the method says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch

MIN_SAMPLE_S = 1e-3  # shorter calls are repeated back to back within one sample
MIB = 2**20
#: The dtypes of the benchmark scripts' --dtype, by their short names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Timing:
    """Per-call times of the repeats (seconds); ``inner`` calls were averaged per sample."""

    samples: list[float] = field(default_factory=list)
    inner: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repeats."""
        return (self.high - self.low) / self.median if self.median > 0 else 0.0


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / inner


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 50,
    min_time_s: float = 1.0,
    estimate_s: float | None = None,
) -> Timing:
    """Warm ``fn`` up, then time it; returns the per-call time of every repeat.

    ``estimate_s`` is the duration of a call already made (e.g. while measuring memory); without
    it at least one warm-up call runs, since the repeat count is planned from the fastest one.
    """
    first = math.inf if estimate_s is None else estimate_s
    for _ in range(warmup if estimate_s is not None else max(warmup, 1)):
        first = min(first, timed_seconds(fn, device, 1))
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(first, 1e-9)))
    per_sample = first * inner
    repeats = min(max_repeats, max(min_repeats, math.ceil(min_time_s / max(per_sample, 1e-9))))
    return Timing([timed_seconds(fn, device, inner) for _ in range(repeats)], inner)


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


# ----------------------------------------------------------------------------- peak memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _maxrss_bytes() -> int:
    # Linux reports KiB, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS, so that the resident size is what is in use."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets the peak RSS to the current RSS
        return True
    except OSError:
        return False


def cpu_memory_method() -> str:
    """How :func:`peak_memory` measures on the CPU of this machine, in words."""
    if os.path.exists("/proc/self/clear_refs"):
        return "peak RSS rise during the call (malloc_trim, reset VmHWM; fresh process per point)"
    return "rise of ru_maxrss over its previous maximum (fresh process per point)"


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn`` needs at its peak beyond what was allocated before the call."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    if _reset_high_water_mark():
        before = _status_kib("VmRSS") * 1024
        fn()
        return max(_status_kib("VmHWM") * 1024 - before, 0)
    before = _maxrss_bytes()
    fn()
    return max(_maxrss_bytes() - before, 0)


# ----------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _version(package: str) -> str | None:
    # Read from the installed metadata: importing triton or numba here would be slow or fail.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def slug(text: str, limit: int = 48) -> str:
    """``"Intel(R) Xeon(R) Processor"`` -> ``"intel-xeon-processor"``."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:limit].rstrip("-") or "unknown"


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    """Machine, library versions, dtype and resolved backends, recorded with every result."""
    import zigzag_mamba
    import zigzag_mamba.modules  # registers the backends of every op the blocks use

    info = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cores": _cores(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": _numba_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numba": _version("numba"),
        "mamba_ssm": _version("mamba-ssm"),
        "zigzag_mamba": zigzag_mamba.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "backends": zigzag_mamba.backends(),
        "memory_method": (
            "torch.cuda.max_memory_allocated minus allocated before the call"
            if device.type == "cuda"
            else cpu_memory_method()
        ),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    info["machine"] = machine_slug(info)
    return info


def _numba_threads() -> int | None:
    if _version("numba") is None:
        return None
    import numba

    return numba.get_num_threads()


def machine_slug(info: dict) -> str:
    """A short directory name for results: the GPU's name, or the CPU's core count and model."""
    if info.get("gpu"):
        return slug(info["gpu"])
    return f"cpu-{info['cores']}core-{slug(info['cpu'])}"


def profile_table(fn: Callable[[], object], device: torch.device, row_limit: int = 30) -> str:
    """Where one call of ``fn`` spends its time: torch.profiler's per-op table, by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=64)
