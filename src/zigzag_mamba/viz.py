"""Pictures of scan orders, and the ``zigma scans`` command."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from zigzag_mamba.scans import as_grid, list_patterns, pattern_family


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "drawing scans needs matplotlib: pip install 'zigzag-mamba[viz]'"
        ) from exc
    return Figure


def draw_scans(
    pattern: str | torch.Tensor | Sequence,
    grid: int | Sequence[int],
    path: str | Path,
    *,
    columns: int = 4,
) -> Path:
    """Draw every order of ``pattern``'s family on an (H, W) ``grid`` and save a PNG to ``path``.

    Each panel shows the path through the cell centres, coloured from start (dark) to end
    (light), with the start marked by a circle and the end by a square.

    Example::

        >>> draw_scans("zigzag8", (8, 8), "scans.png")
        PosixPath('scans.png')
    """
    grid = as_grid(grid)
    if len(grid) != 2:
        raise ValueError(f"draw_scans draws (H, W) grids, got {grid}")
    H, W = grid
    family = pattern_family(pattern, grid)
    name = pattern if isinstance(pattern, str) else "custom"
    columns = min(columns, len(family))
    rows = math.ceil(len(family) / columns)
    cell = 2.4 * max(1.0, min(W / H, 2.0)), 2.4 * max(1.0, min(H / W, 2.0))
    fig = _figure_class()(figsize=(cell[0] * columns, cell[1] * rows + 0.4), layout="constrained")
    fig.suptitle(f"{name} on a {H}x{W} grid (layer i uses order i % {len(family)})")
    for k, order in enumerate(family):
        ax = fig.add_subplot(rows, columns, k + 1)
        _draw_order(ax, order.reshape(-1), H, W)
        ax.set_title(f"order {k}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _draw_order(ax, order: torch.Tensor, H: int, W: int) -> None:
    from matplotlib.collections import LineCollection

    rows, cols = (order // W).numpy(), (order % W).numpy()
    points = list(zip(cols, rows, strict=True))
    segments = [points[i : i + 2] for i in range(len(points) - 1)]
    lines = LineCollection(segments, cmap="viridis", linewidths=1.6)
    lines.set_array(range(len(segments)))
    ax.add_collection(lines)
    ax.plot(cols[0], rows[0], "o", color="tab:green", markersize=6, label="start")
    ax.plot(cols[-1], rows[-1], "s", color="tab:red", markersize=6, label="end")
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)  # row 0 at the top, as in the image
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scans",
        help="draw a scan pattern's orders to a PNG",
        description="Draw every order of a scan pattern's family over an H x W grid.",
    )
    parser.add_argument("--pattern", default="zigzag8", help="pattern name (see --list)")
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    parser.add_argument("--out", default="scans.png", help="PNG file to write")
    parser.add_argument("--list", action="store_true", help="print the pattern names and exit")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_patterns()))
        return 0
    path = draw_scans(args.pattern, tuple(args.grid), args.out)
    print(f"wrote {path}")
    return 0
