"""The ``zigma bench`` command (also ``python benchmarks/bench_blocks.py``).

Defaults are the standard sweep for the device (zigzag_mamba.bench.sweep.preset); every option
overrides one part of it. Results go to ``<out>/<machine>/`` (``<machine>-quick``
for ``--quick``, so that a quick run never overwrites a full one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from zigzag_mamba.cli import add_threads_argument

DEFAULT_OUT = Path("benchmarks") / "results"
DESCRIPTION = (
    "Time and memory of ZigMa blocks, backbones and ops against attention. Defaults are the "
    "standard sweep for the device; every option overrides one part of it. Results go to "
    "OUT/MACHINE/ (OUT/MACHINE-quick for --quick, so that a quick run never overwrites a full "
    "one)."
)
# What a block benchmark's DEFAULTS give per device, in this order.
_BLOCK_SETTINGS = ("lengths", "dim", "batch", "dtype", "repeats")
# torch.compile's modes (kept here so that --help needs no torch import).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="a few-minute subset of the sweep")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    add("--suites", nargs="+", metavar="SUITE", help="blocks, backbones and/or ops (default all)")
    add(
        "--blocks",
        nargs="+",
        metavar="NAME",
        help="zigma, zigma-none, vim, dit (default: these), zigma-mamba-ssm (needs mamba-ssm)",
    )
    add("--backbones", nargs="+", metavar="NAME", help="zigma, dit (default both)")
    add("--lengths", nargs="+", type=int, metavar="L", help="token counts of blocks and ops")
    add("--images", nargs="+", type=int, metavar="PX", help="image sides of the backbone sweep")
    add("--dim", type=int, help="width of blocks and ops (cpu 384, cuda 768)")
    add("--backbone-dim", type=int, help="width of the backbones (default 768, the B size)")
    add("--batch", type=int, help="batch size (default 1)")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="cpu float32, cuda bfloat16")
    add("--modes", nargs="+", choices=["fwd", "fwd+bwd"], help="modes of blocks and ops")
    add("--backbone-modes", nargs="+", choices=["fwd", "fwd+bwd"], help="cpu: fwd only")
    add("--min-time", type=float, help="seconds of repeats per point, at least")
    add("--min-repeats", type=int, help="repeats per point, at least")
    add("--max-call", type=float, help="skip sizes at which a call would take longer (s)")
    add("--op-max-call", type=float, help="the same for the op-level sweep")
    add_threads_argument(parser)
    add("--compile", action="store_true", help="also time torch.compile'd blocks, backbones")
    add(
        "--compile-mode",
        default="default",
        choices=list(COMPILE_MODES),
        help="torch.compile mode of --compile (reduce-overhead: CUDA graphs; default: default)",
    )
    add("--no-isolate", action="store_true", help="measure every point in this process")
    add("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    add("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default {DEFAULT_OUT})")
    add(
        "--profile",
        nargs="+",
        metavar="NAME",
        help="after the sweep, profile these blocks (forward+backward) at the largest L",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``zigma bench`` to the ``zigma`` command."""
    parser = subparsers.add_parser(
        "bench",
        help="time and memory of ZigMa blocks, backbones and ops against attention",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


_OVERRIDES = {
    "dim": "dim",
    "backbone_dim": "backbone_dim",
    "batch": "batch",
    "dtype": "dtype",
    "lengths": "lengths",
    "images": "images",
    "suites": "suites",
    "blocks": "blocks",
    "backbones": "backbones",
    "modes": "block_modes",
    "backbone_modes": "backbone_modes",
    "min_time": "min_time_s",
    "min_repeats": "min_repeats",
    "max_call": "max_call_s",
    "op_max_call": "op_max_call_s",
    "threads": "threads",
}


def settings_from(args: argparse.Namespace):
    """The preset for the device with every given option applied, checked."""
    import torch

    from zigzag_mamba.bench import contenders, sweep

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = sweep.preset(device, args.quick)
    for option, attribute in _OVERRIDES.items():
        if getattr(args, option) is not None:
            setattr(settings, attribute, getattr(args, option))
    if args.modes is not None:
        settings.op_modes = list(args.modes)
    settings.compile, settings.isolate = args.compile, settings.isolate and not args.no_isolate
    settings.compile_mode = args.compile_mode
    _check(settings.suites, sweep.SUITES, "suite")
    _check(settings.blocks, contenders.BLOCKS, "block")
    _check(settings.backbones, contenders.BACKBONES, "backbone")
    _check(args.profile or [], contenders.BLOCKS, "block")
    return settings


def _check(names: Sequence[str], known, what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"zigma bench: unknown {what} {unknown}; choose from {list(known)}")


def _logger(start: float):
    """Progress lines on stderr, each with the seconds since the run started."""

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {line}", file=sys.stderr, flush=True)

    return log


def run(args: argparse.Namespace) -> int:
    """Run the sweep, write CSV/JSON/Markdown/PNG, print the Markdown report."""
    import torch

    from zigzag_mamba.bench import report, sweep
    from zigzag_mamba.bench.timing import machine_info

    start = time.perf_counter()
    log = _logger(start)
    settings = settings_from(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    meta = machine_info(torch.device(settings.device), getattr(torch, settings.dtype))
    out_dir = args.out / (meta["machine"] + ("-quick" if args.quick else ""))
    log(f"zigma bench on {meta['machine']} ({meta['dtype']}); results to {out_dir}")
    rows = sweep.run_sweeps(settings, log)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    written = report.write_results(
        out_dir, meta, sweep.settings_dict(settings), rows, plots=not args.no_plots
    )
    written += _profiles(args.profile or [], settings, out_dir)
    print((out_dir / "summary.md").read_text())
    log("wrote " + ", ".join(str(p) for p in written))
    log("done")
    return 0


def _profiles(names: list[str], settings, out_dir: Path) -> list[Path]:
    from zigzag_mamba.bench import sweep

    if not names:
        return []
    length = max(settings.lengths)
    paths = []
    for name, table in sweep.profile_blocks(settings, names, length).items():
        path = out_dir / f"profile-{name}-L{length}.txt"
        path.write_text(table + "\n")
        paths.append(path)
    return paths


def add_block_arguments(parser: argparse.ArgumentParser, devices: list[str], repeats: str) -> None:
    """--device, --lengths, --dim, --batch, --dtype, --repeats (help ``repeats``) and --out;
    the ones left out take the device's defaults (:func:`parse_block_arguments`)."""
    from zigzag_mamba.bench.timing import DTYPES

    parser.add_argument("--device", default=devices[0], choices=devices)
    parser.add_argument("--lengths", help="comma-separated token counts")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, help=repeats)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")


def parse_block_arguments(
    parser: argparse.ArgumentParser, defaults: dict[str, tuple]
) -> argparse.Namespace:
    """The parsed arguments, each block setting not given taken from ``defaults[device]``
    (lengths, dim, batch, dtype, repeats)."""
    args = parser.parse_args()
    for key, value in zip(_BLOCK_SETTINGS, defaults[args.device], strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def report_main(description: str, defaults: dict[str, tuple], measure, repeats: str) -> None:
    """The entry point of a benchmark that prints a Markdown report line by line: the block
    arguments (:func:`add_block_arguments`), then ``measure(args, device)``'s lines, each
    printed (and written to ``--out``) as it comes."""
    import torch

    from zigzag_mamba.bench.report import LiveReport

    parser = argparse.ArgumentParser(description=description)
    add_block_arguments(parser, list(defaults), repeats=repeats)
    args = parse_block_arguments(parser, defaults)
    report = LiveReport(args.out)
    for line in measure(args, torch.device(args.device)):
        report.add(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/bench_blocks.py``: the same command without ``zigma``."""
    parser = argparse.ArgumentParser(prog="bench_blocks.py", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
