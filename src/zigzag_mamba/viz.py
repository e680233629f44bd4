"""Pictures of token orders, and the ``zigma orders`` command."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from zigzag_mamba.orders import as_grid, list_patterns, pattern_family

#: The most tokens a panel draws (H * W).
MAX_DRAWN_TOKENS = 128 * 128


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "drawing orders needs matplotlib: pip install matplotlib (the viz extra: pip "
            "install -e '.[viz]' in a clone, or 'zigzag-mamba[viz]' from an index)"
        ) from exc
    return Figure


def draw_orders(
    pattern: str | torch.Tensor | Sequence,
    grid: int | Sequence[int],
    path: str | Path,
    *,
    columns: int = 4,
) -> Path:
    """Draw every order of ``pattern``'s family on an (H, W) or (T, H, W) ``grid`` and save a
    PNG to ``path``.

    Each panel shows the path through the cell centres, coloured from start (dark) to end
    (light), with the start marked by a circle and the end by a square. On a video grid each
    panel is one layer of the pattern's period: an ``s`` layer shows the order every frame is
    read in (H x W), a ``t`` layer the order in which every pixel's sequence reads the T frames
    (a 1 x T strip, forward or backward).

    Example::

        >>> draw_orders("zigzag8", (8, 8), "orders.png")
        PosixPath('orders.png')
        >>> draw_orders("video_sst", (4, 6, 6), "video.png")
        PosixPath('video.png')
    """
    grid = as_grid(grid)
    if math.prod(grid[-2:]) > MAX_DRAWN_TOKENS:
        raise ValueError(
            f"grid {grid}: a picture shows at most {MAX_DRAWN_TOKENS} tokens a panel (128 x 128), "
            "beyond which the path is a solid smear; draw a smaller grid, the pattern is the same"
        )
    family = pattern_family(pattern, grid)
    name = pattern if isinstance(pattern, str) else "custom"
    panels = [_panel(order, k, grid) for k, order in enumerate(family)]
    H, W = grid[-2:]
    columns = min(columns, len(family))
    rows = math.ceil(len(family) / columns)
    cell = 2.4 * max(1.0, min(W / H, 2.0)), 2.4 * max(1.0, min(H / W, 2.0))
    fig = _figure_class()(figsize=(cell[0] * columns, cell[1] * rows + 0.4), layout="constrained")
    where = f"{H}x{W} grid" if len(grid) == 2 else f"{grid[0]}x{H}x{W} video grid (T x H x W)"
    fig.suptitle(f"{name} on a {where} (layer i uses order i % {len(family)})")
    for k, (title, order, height, width) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        _draw_order(ax, order, height, width)
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


#: (row title, pattern, how the layer reads its orders) of :func:`draw_strategies`.
STRATEGIES = (
    ("alternating (mamba, zigzag8)", "zigzag8", "one"),
    ("bidirectional (Vim, sweep)", "sweep", "both ways"),
    ("cross, k = 4 (VMamba's SS2D, sweep4)", "sweep4", "four"),
)


def draw_strategies(grid: int | Sequence[int], path: str | Path, *, layers: int = 2) -> Path:
    """Draw what each scan strategy reads in each of its first ``layers`` layers on an (H, W)
    ``grid``: one order per layer (alternating), one order forward and backward
    (bidirectional), or four orders at once (cross). Saves a PNG to ``path``.

    Example::

        >>> draw_strategies((6, 6), "strategies.png")
        PosixPath('strategies.png')
    """
    H, W = as_grid(grid)
    rows = []
    for title, pattern, reads in STRATEGIES:
        family = pattern_family(pattern, (H, W))
        row = []
        for layer in range(layers):
            if reads == "one":
                row.append((f"layer {layer}", family[layer % len(family)]))
            elif reads == "both ways":
                row += [(f"layer {layer}, forward", family[0]), ("backward", family[0].flip(0))]
            else:
                row += [
                    (f"layer {layer}" if j == 0 else "", order) for j, order in enumerate(family)
                ]
        rows.append((title, row))
    columns = max(len(row) for _, row in rows)
    fig = _figure_class()(figsize=(1.9 * columns, 2.3 * len(rows)), layout="constrained")
    fig.suptitle(f"What each strategy's layers read on a {H}x{W} grid")
    for r, (title, row) in enumerate(rows):
        for c, (label, order) in enumerate(row):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            _draw_order(ax, order, H, W)
            ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _panel(
    order: torch.Tensor, k: int, grid: tuple[int, ...]
) -> tuple[str, torch.Tensor, int, int]:
    """(title, a 1-D order to draw, its grid's height and width) for layer ``k``'s order."""
    if len(grid) == 2:
        return f"order {k}", order.reshape(-1), *grid
    T, H, W = grid
    if order.dim() != 2 or order.shape not in ((T, H * W), (H * W, T)):
        raise ValueError(
            "draw_orders draws video orders split per frame (T, H*W) or per pixel (H*W, T), as "
            f"the video_* patterns make them; got one of shape {tuple(order.shape)}"
        )
    first = order[0]
    if order.shape == (T, H * W) and bool(first.max() < H * W):  # frame 0 reads only itself
        return f"layer {k}: s (every frame)", first, H, W
    frames = first // (H * W)  # the frames pixel 0 reads, in order
    return f"layer {k}: t, frames {int(frames[0])}..{int(frames[-1])}", frames, 1, T


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
        "orders",
        help="draw a scan pattern's orders to a PNG",
        description=(
            "Draw every order of a scan pattern's family over an H x W grid, or, for the "
            "video_* patterns, every layer's order over a T x H x W grid."
        ),
    )
    parser.add_argument(
        "--pattern", default="zigzag8", help="pattern name (see --list; default: zigzag8)"
    )
    parser.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=[8, 8],
        metavar="N",
        help="H W, or T H W for the video_* patterns (default: 8 8)",
    )
    parser.add_argument(
        "--out", default="orders.png", help="PNG file to write (default: orders.png)"
    )
    parser.add_argument("--list", action="store_true", help="print the pattern names and exit")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_patterns()))
        return 0
    if len(args.grid) not in (2, 3):
        raise SystemExit(f"zigma orders: --grid takes H W or T H W, got {len(args.grid)} numbers")
    try:
        path = draw_orders(args.pattern, tuple(args.grid), args.out)
    except ValueError as exc:
        hint = ""
        if args.pattern.startswith("video_") != (len(args.grid) == 3):
            hint = " (pass --grid T H W)" if len(args.grid) == 2 else " (pass --grid H W)"
        raise SystemExit(f"zigma orders: {exc}{hint}") from exc
    print(f"wrote {path}")
    return 0
