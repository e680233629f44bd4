"""PNG plots of a run: time and peak memory against token count, log-log, one line per
contender and one panel per mode, with the point where ZigMa overtakes attention marked."""

from __future__ import annotations

from pathlib import Path

from zigzag_mamba.bench.contenders import BASELINE, OURS
from zigzag_mamba.bench.headline import crossover

METRICS = {"median_ms": "time per call (ms)", "peak_mib": "peak memory (MiB)"}


def _figure(panels: int):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "benchmark plots need matplotlib: install the bench extra "
            "(pip install -e '.[bench]' in a clone)"
        ) from exc
    return Figure(figsize=(5.2 * panels, 4.8), layout="constrained")


def _points(rows: list[dict], key: str, **match) -> dict[int, float]:
    return {
        r["tokens"]: r[key]
        for r in rows
        if r["status"] == "ok"
        and (r.get(key) or 0) > 0  # a log axis cannot show a peak below the method's resolution
        and all(r[k] == v for k, v in match.items())
    }


def _mark_crossover(ax, ours: dict[int, float], theirs: dict[int, float]) -> None:
    """A vertical line where ZigMa's curve goes under attention's, or a note why there is none."""
    cross = crossover(ours, theirs)
    if cross["bound"] == "interpolated":
        ax.axvline(cross["tokens"], color="0.4", linestyle="--", linewidth=1)
        ax.annotate(
            f"ZigMa lower from\nL ≈ {cross['tokens']}",
            (cross["tokens"], 0.97),
            xycoords=("data", "axes fraction"),
            ha="right",
            va="top",
            fontsize=8,
            xytext=(-3, 0),
            textcoords="offset points",
        )
    elif cross["bound"] in ("at or below", "above"):
        note = (
            "ZigMa lower at every L"
            if cross["bound"] == "at or below"
            else ("attention lower at every L")
        )
        ax.text(0.03, 0.97, note, transform=ax.transAxes, va="top", fontsize=8)


def _panel(ax, rows: list[dict], key: str, mode: str, colors: dict[str, str]) -> dict:
    """Draw one mode's lines; returns the line of each label (for the figure's legend)."""
    subset = [r for r in rows if r["mode"] == mode]
    lines = {}
    for label in dict.fromkeys(r["label"] for r in subset):
        points = _points(subset, key, label=label)
        if points:
            xs = sorted(points)
            ys = [points[x] for x in xs]
            (lines[label],) = ax.plot(xs, ys, marker="o", markersize=3.5, color=colors[label])
            if key == "median_ms":  # the range of the repeats, so that noise is visible
                low, high = (_points(subset, k, label=label) for k in ("min_ms", "max_ms"))
                band = [x for x in xs if x in low and x in high]
                lows, highs = [low[x] for x in band], [high[x] for x in band]
                ax.fill_between(band, lows, highs, color=colors[label], alpha=0.15, linewidth=0)
    sizes = sorted({r["tokens"] for r in subset})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("tokens L")
    ax.set_ylabel(METRICS[key])
    ax.set_title(mode, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    return lines


def plot_suite(rows: list[dict], suite: str, key: str, meta: dict, path: Path) -> Path | None:
    """One PNG of ``key`` against L for ``suite``, a panel per mode; None if nothing to plot."""
    subset = [
        r for r in rows if r["suite"] == suite and r["status"] == "ok" and r.get(key) is not None
    ]
    modes = list(dict.fromkeys(r["mode"] for r in subset))
    if not modes:
        return None
    # One colour per contender across panels, whichever modes it ran in.
    labels = list(dict.fromkeys(r["label"] for r in subset))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig = _figure(len(modes))
    handles: dict = {}
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1)
        handles.update(_panel(ax, subset, key, mode, colors))
        if suite != "ops":
            by_name = lambda name, mode=mode: _points(subset, key, name=name, mode=mode)
            _mark_crossover(ax, by_name(OURS), by_name(BASELINE))
    ordered = [label for label in labels if label in handles]
    fig.legend(
        [handles[label] for label in ordered],
        ordered,
        loc="outside lower center",
        ncols=min(len(ordered), 3),
        fontsize=8,
    )
    what = METRICS[key].split(" (")[0]
    fig.suptitle(f"{suite}: {what} vs L ({meta['machine']}, {meta['dtype']})", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def plot_all(rows: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """Every plot of a run into ``out_dir``: ``<suite>_time.png`` and ``<suite>_memory.png``.

    The crossover is marked on the memory plots too, where ZigMa's memory goes under
    attention's."""
    written = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for key, stem in (("median_ms", "time"), ("peak_mib", "memory")):
            path = plot_suite(rows, suite, key, meta, out_dir / f"{suite}_{stem}.png")
            if path is not None:
                written.append(path)
    return written
