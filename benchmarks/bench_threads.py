"""CPU threads: seconds per training step of a small ZigMa, on an idle and on a loaded machine.

Usage::

    python benchmarks/bench_threads.py                    # about 10 minutes on 2 cores
    python benchmarks/bench_threads.py --quick            # a smoke test, not a result
    python benchmarks/bench_threads.py --loads 0 2 --threads 1 2 4 --out threads.md

The workload is one optimizer step of ``zigma demo``'s model as ``zigma train`` takes it
(the Trainer's step: interpolant loss, backward, gradient clipping, AdamW, EMA): a class-
conditional zigzag8 ZigMa of width 64 and depth 8 on a 4x4 token grid (scikit-learn's 8x8
digits, 2x2 patches), batch 64, float32.

Each variant runs in a fresh process, because OpenMP reads its environment once, when the
runtime loads, and a thread pool lives as long as its process:

- ``1 thread``, ``N threads``: ``torch.set_num_threads(N)``, as ``--threads N`` does; the numba
  kernels follow torch's count;
- ``default``: torch's own choice (one thread per core), as without ``--threads``;
- ``default, OMP_WAIT_POLICY=passive``: the same, but OpenMP's idle threads sleep at once instead
  of spinning for a while after each parallel region;
- ``default, numba in its own pool``: ``NUMBA_THREADING_LAYER=workqueue``, so that the numba
  kernels run on threads of their own beside torch's OpenMP pool (as with numba's TBB layer),
  instead of in torch's pool, which the library arranges otherwise.

The load is a number of busy processes (``while True: pass``) that the script starts before the
variants run and stops after them: ``--loads 0 1 2`` measures an idle machine, one core taken
and both cores of a 2-core machine taken. Variants run in turns, ``--rounds`` times (a rotated
order each round, the load restarted each round), so that the drift of a machine falls on every
variant alike. Each cell is the median over rounds of the median seconds per step of a round
(``--steps`` steps after ``--warmup``), with the range of the round medians; the factor is the
cell's time over the ``1 thread`` time in the same column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zigzag_mamba.bench.report import LiveReport

# Settings that would change what a variant measures, removed from the workers' environment.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "NUMBA_THREADING_LAYER_PRIORITY",
)
_BUSY = "while True: pass"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def variants(thread_counts: list[int]) -> list[dict]:
    """(label, threads or None for torch's default, extra environment) of each variant."""
    found = [
        {"label": f"{n} thread{'s' if n > 1 else ''}", "threads": n, "env": {}}
        for n in sorted(set(thread_counts))
        if n == 1 or n != cores()  # the default is one thread per core
    ]
    found += [
        {"label": "default", "threads": None, "env": {}},
        {
            "label": "default, OMP_WAIT_POLICY=passive",
            "threads": None,
            "env": {"OMP_WAIT_POLICY": "passive"},
        },
        {
            "label": "default, numba in its own pool",
            "threads": None,
            "env": {"NUMBA_THREADING_LAYER": "workqueue"},
        },
    ]
    return found


# -- one variant, in a worker process -------------------------------------------------------


def worker(spec: dict) -> dict:
    """Time ``spec["steps"]`` training steps after ``spec["warmup"]``; runs in its own process."""
    import numba
    import torch

    from zigzag_mamba.train.build import build_model, model_spec
    from zigzag_mamba.train.config import TrainConfig
    from zigzag_mamba.train.data import DigitsDataset
    from zigzag_mamba.train.trainer import Trainer

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    model = model_spec(
        "ZigMa-T/1",
        data_shape=(1, 8, 8),
        num_classes=10,
        cfg_dropout=0.1,
        dim=spec["dim"],
        depth=spec["depth"],
        patch_size=2,
        pattern="zigzag8",
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        config = TrainConfig(
            out_dir=out_dir,
            steps=spec["warmup"] + spec["steps"],
            batch_size=spec["batch"],
            lr=2e-3,
            device="cpu",
            progress=False,
        )
        trainer = Trainer(build_model(model), DigitsDataset("train"), config, model_config=model)
        for _ in range(spec["warmup"]):
            trainer._optimizer_step()  # the step Trainer.fit takes; also compiles the kernels
        seconds = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            trainer._optimizer_step()
            seconds.append(time.perf_counter() - start)
    try:
        layer = numba.threading_layer()
    except ValueError:  # no numba kernel ran
        layer = "-"
    return {"seconds": seconds, "torch_threads": torch.get_num_threads(), "numba_layer": layer}


def run_variant(variant: dict, settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    env.update(variant["env"])
    spec = {**settings, "threads": variant["threads"]}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the worker for {variant['label']!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- load, rounds and the table -------------------------------------------------------------


class Load:
    """``count`` busy processes for the duration of a ``with`` block."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Load:
        self.processes = [
            subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(self.count)
        ]
        time.sleep(0.5 if self.count else 0.0)  # let them start spinning
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def load_label(count: int) -> str:
    if count == 0:
        return "idle"
    return f"{count} busy process{'es' if count > 1 else ''}"


def measure(args: argparse.Namespace, report: LiveReport) -> None:
    settings = {
        "dim": args.dim,
        "depth": args.depth,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    kinds = variants(args.threads)
    if args.quick:  # one variant that sets threads, one that sets the environment
        kinds = [kinds[0], *(k for k in kinds if "passive" in k["label"])]
    medians: dict[tuple[str, int], list[float]] = {}
    info: dict[str, dict] = {}
    for r in range(args.rounds):
        for load in args.loads:
            with Load(load):
                shift = r % len(kinds)
                for variant in kinds[shift:] + kinds[:shift]:
                    result = run_variant(variant, settings)
                    median = statistics.median(result["seconds"])
                    medians.setdefault((variant["label"], load), []).append(median)
                    info[variant["label"]] = {
                        key: result[key] for key in ("torch_threads", "numba_layer")
                    }
                    print(
                        f"round {r + 1}/{args.rounds}, {load_label(load)}: {variant['label']}: "
                        f"{median:.4f} s/step",
                        file=sys.stderr,
                        flush=True,
                    )
    report.add(*markdown_table(kinds, args.loads, medians, info))


def markdown_table(kinds, loads, medians, info) -> list[str]:
    columns = " | ".join(map(load_label, loads))
    lines = [f"| variant | torch threads | numba layer | {columns} |"]
    lines.append("|---|---:|---|" + "---:|" * len(loads))
    first = kinds[0]["label"]  # 1 thread
    base = {load: statistics.median(medians[(first, load)]) for load in loads}
    for variant in kinds:
        label = variant["label"]
        cells = []
        for load in loads:
            rounds = medians[(label, load)]
            median = statistics.median(rounds)
            spread = f" ({min(rounds):.3f}-{max(rounds):.3f})" if len(rounds) > 1 else ""
            cells.append(f"{median:.3f} s{spread}, {median / base[load]:.2f}x")
        threads, layer = info[label]["torch_threads"], info[label]["numba_layer"]
        lines.append(f"| {label} | {threads} | {layer} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: a tiny model, two variants, 2 steps"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="thread counts to measure besides torch's default (default: 1)",
    )
    parser.add_argument(
        "--loads",
        type=int,
        nargs="+",
        help="busy processes to run beside the training (default: 0, half the cores, all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns over every variant")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--dim", type=int, default=64, help="model width (the demo's)")
    parser.add_argument("--depth", type=int, default=8, help="blocks (the demo's)")
    parser.add_argument("--batch", type=int, default=64, help="batch (the demo's)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if 1 not in args.threads:
        args.threads.append(1)  # the column's reference
    if args.quick:
        args.dim, args.depth, args.batch = 16, 2, 8
        args.rounds, args.steps, args.warmup = 1, 2, 1
        args.loads = args.loads or [0, 1]
    n = cores()
    args.loads = args.loads or sorted({0, n // 2, n})
    import numba
    import torch

    from zigzag_mamba.bench.timing import machine_info

    machine = machine_info(torch.device("cpu"), torch.float32)["machine"]
    report = LiveReport(args.out)
    report.add(
        f"Seconds per training step on {machine} ({platform.machine()}, {n} cores); "
        f"torch {torch.__version__}, numba {numba.__version__}; ZigMa width {args.dim}, depth "
        f"{args.depth}, batch {args.batch}; {args.rounds} round(s) of {args.steps} steps "
        "(median, range of round medians, and x the time of the first row):",
        "",
    )
    measure(args, report)


if __name__ == "__main__":
    main()
