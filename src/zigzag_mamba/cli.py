"""The ``zigma`` command: ``zigma orders | train | sample | demo | ablate | bench``, and the
argument types its commands share.

Each command lives beside the code it drives and adds itself through a ``register(subparsers)``
function; this module imports those modules by name only when it builds the parser, and they
import nothing from here but the helpers below. Handlers import their heavy dependencies only
when they run, so ``zigma --help`` is fast and works without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# Modules that add commands, in the order ``zigma --help`` lists them.
COMMAND_MODULES = (
    "zigzag_mamba.viz",
    "zigzag_mamba.train.apps.cli",
    "zigzag_mamba.train.apps.demo_command",
    "zigzag_mamba.train.apps.encode",
    "zigzag_mamba.train.ablate.cli",
    "zigzag_mamba.bench.cli",
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the CPU threads of PyTorch and of the numba kernels, which follow it."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for PyTorch and the numba kernels (default: PyTorch's choice, one "
        "per core; on a busy machine 1 can be several times faster, see docs/training.md)",
    )


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (of :func:`add_threads_argument`), if given."""
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zigma", description="ZigMa: zigzag-scan Mamba layers for vision."
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:
    from zigzag_mamba import __version__

    return f"zigzag-mamba {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
