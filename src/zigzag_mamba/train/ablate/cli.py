"""``zigma ablate``: flags over a preset over the defaults of :class:`AblationConfig`."""

from __future__ import annotations

import argparse
import sys

from zigzag_mamba.train.ablate.config import PRESETS, AblationConfig
from zigzag_mamba.train.config import OptionError, add_flags, given
from zigzag_mamba.train.lock import RunFolderBusy


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="train one small ZigMa per scan pattern and seed, and compare them with error bars",
        description=(
            "Train the same small ZigMa once per scan pattern and seed (same initial weights, "
            "data order and noise for every pattern of a seed), score each run by its held-out "
            "loss and the Frechet distance of its samples in a fixed random feature space, and "
            "write runs.csv, runs.json, summary.md and ablation.png. Finished runs are kept: "
            "run the same command again to continue. See docs/ablation.md."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a preset: 'quick' (a smoke test, under a minute), 'photos-study' "
        "(the committed pattern study, about 90 minutes on one CPU thread) or "
        "'strategies-study' (the committed strategy study); flags override it",
    )
    parser.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="--preset quick"
    )
    add_flags(parser, AblationConfig)
    parser.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from zigzag_mamba.train.ablate.config import AblationError, config_with_preset
    from zigzag_mamba.train.ablate.run import run_ablation

    try:
        config = config_with_preset(getattr(args, "preset", None), **given(args, AblationConfig))
    except OptionError as exc:
        print(f"zigma ablate: error: {exc.for_flags()}", file=sys.stderr)
        return 2
    try:
        report = run_ablation(config)
    except (AblationError, FileNotFoundError, RunFolderBusy) as exc:
        print(f"zigma ablate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(report['runs'])} runs in {config.out_dir}:")
    for name in ("summary.md", "runs.csv", "runs.json", "ablation.png"):
        print(f"  {config.out_dir}/{name}")
    return 0
