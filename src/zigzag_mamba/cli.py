"""The ``zigma`` command: ``zigma orders | train | sample | demo | bench``.

Each command lives beside the code it drives and adds itself through a ``register(subparsers)``
function; handlers import their heavy dependencies only when they run, so ``zigma --help`` is
fast and works without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# Modules that add commands, in the order ``zigma --help`` lists them.
COMMAND_MODULES = ("zigzag_mamba.viz", "zigzag_mamba.train.cli", "zigzag_mamba.bench.cli")


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
