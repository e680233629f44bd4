"""``zigma ablate``: flags over a preset over the defaults of :class:`AblationConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from zigzag_mamba.train.ablate.config import PRESETS, AblationConfig


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
        help="start from a preset: 'quick' (a smoke test, under a minute) or 'photos-study' "
        "(the committed study, about 90 minutes on one CPU thread); flags override it",
    )
    parser.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="--preset quick"
    )
    defaults = AblationConfig()
    for field in dataclasses.fields(AblationConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{field.metadata['help']} (default: {shown})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(default, list):
            metavar = field.name.removesuffix("s").upper()  # PATTERN, SEED
            parser.add_argument(
                flag, type=type(default[0]), nargs="+", metavar=metavar, help=help_text
            )
        else:
            parser.add_argument(flag, type=type(default), help=help_text)
    parser.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from zigzag_mamba.train.ablate.config import AblationError, config_with_preset
    from zigzag_mamba.train.ablate.run import run_ablation

    names = {f.name for f in dataclasses.fields(AblationConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = config_with_preset(getattr(args, "preset", None), **overrides)
        report = run_ablation(config)
    except (AblationError, FileNotFoundError) as exc:
        print(f"zigma ablate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(report['runs'])} runs in {config.out_dir}:")
    for name in ("summary.md", "runs.csv", "runs.json", "ablation.png"):
        print(f"  {config.out_dir}/{name}")
    return 0
