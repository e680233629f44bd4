"""The ``zigma demo`` command: the digits demo (:mod:`.demo`) or, with ``--video``, the moving
digits demo (:mod:`.video_demo`). Heavy imports happen inside the handler."""

from __future__ import annotations

import argparse

from zigzag_mamba.train.config import OptionError, add_flags, given


def register(subparsers) -> None:
    from zigzag_mamba.train.apps.demo import DemoConfig

    parser = subparsers.add_parser(
        "demo",
        help="train a small class-conditional ZigMa on real handwritten digits (CPU, minutes)",
        description=(
            "Train a zigzag8 ZigMa on scikit-learn's 8x8 digits, sample a 10x10 grid with "
            "classifier-free guidance, and score it with a digit classifier trained on the "
            "spot. Writes samples.png, orders.png, loss.csv and metrics.json. With --video, "
            "the same for clips of moving digits, scored frame by frame and on their motion, "
            "plus samples.gif."
        ),
    )
    add_flags(parser, DemoConfig)
    parser.add_argument(
        "--video",
        action="store_true",
        help="moving digits instead: 8-frame 16x16 clips, a video_sst model with 4x4 patches, "
        "written to outputs/demo-video (see zigzag_mamba.train.apps.video_demo)",
    )
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from zigzag_mamba.train.apps.demo import DemoConfig, run_demo
    from zigzag_mamba.train.apps.video_demo import VIDEO_DEFAULTS, run_video_demo

    values = given(args, DemoConfig)
    if args.video:
        values = {**VIDEO_DEFAULTS, **values}
    try:
        config = DemoConfig(**values)
    except OptionError as exc:
        raise SystemExit(f"zigma demo: {exc.for_flags()}") from None
    (run_video_demo if args.video else run_demo)(config)
    return 0
