"""The tables and the plot of an ablation: ``runs.csv``, ``runs.json``, ``summary.md``,
``ablation.png``. Rewritten after every finished run, so a study in progress can be read."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from zigzag_mamba.train.ablate.config import AblationConfig
from zigzag_mamba.train.ablate.stats import Estimate, estimate, paired_estimate
from zigzag_mamba.train.checkpoint import write_atomically

#: The two scores, lower is better for both.
METRICS = {"heldout_loss": "held-out loss", "fd": "Frechet distance"}
HEADINGS = {
    "heldout_loss": "Held-out loss (fixed times and noise)",
    "fd": "Frechet distance of samples (fixed random conv features; not FID)",
}
CSV_FIELDS = (
    "pattern",
    "seed",
    "steps",
    "heldout_loss",
    "fd",
    "final_train_loss",
    "train_seconds",
    "eval_seconds",
    "parameters",
    "depth",
    "train_flops",
    "threads",
)


def summarise(results: list[dict[str, Any]], config: AblationConfig) -> list[dict[str, Any]]:
    """Per pattern and metric: the estimate over seeds and the paired difference to the baseline.

    Intervals are given where asked for and at least 2 seeds are in; a pattern without the
    baseline's seeds has no paired difference (None).
    """
    by_pattern: dict[str, dict[int, dict[str, Any]]] = {}
    for result in results:
        by_pattern.setdefault(result["pattern"], {})[result["seed"]] = result
    baseline = by_pattern.get(config.baseline)
    rows = []
    for pattern, runs in by_pattern.items():
        row: dict[str, Any] = {"pattern": pattern, "seeds": sorted(runs)}
        # What an arm costs: strategies differ in parameters, FLOPs and time per step, orders
        # do not.
        first = next(iter(runs.values()))
        row.update({key: first[key] for key in ("parameters", "depth", "train_flops")})
        row["seconds_per_step"] = statistics.fmean(
            run["train_seconds"] / run["steps"] for run in runs.values()
        )
        for metric in METRICS:
            values = {seed: run[metric] for seed, run in runs.items()}
            row[metric] = _estimate(list(values.values()), config).to_dict()
            row[f"{metric}_vs_baseline"] = _paired(values, baseline, metric, config)
        rows.append(row)
    return rows


def _estimate(values: list[float], config: AblationConfig) -> Estimate:
    wanted = config.intervals and len(values) >= 2
    return estimate(values, confidence=config.confidence, interval=wanted)


def _paired(
    values: dict[int, float], baseline: dict[int, dict] | None, metric: str, config: AblationConfig
) -> dict[str, float] | None:
    if baseline is None:
        return None
    base = {seed: run[metric] for seed, run in baseline.items()}
    shared = len(set(values) & set(base))
    if shared == 0:
        return None
    wanted = config.intervals and shared >= 2
    return paired_estimate(values, base, confidence=config.confidence, interval=wanted).to_dict()


def write_reports(
    out: Path, results: list[dict[str, Any]], reference: dict[str, Any], config: AblationConfig
) -> dict[str, Any]:
    """Write every output of the results folder and return what ``runs.json`` holds."""
    summary = summarise(results, config)
    report = {
        "protocol": json.loads((out / "protocol.json").read_text()),
        "baseline": config.baseline,
        "confidence": config.confidence,
        "reference": reference,
        "summary": summary,
        "runs": results,
    }
    write_atomically(out / "runs.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "runs.csv", _csv(results))
    write_atomically(out / "summary.md", markdown(summary, reference, config))
    if results:
        plot(out / "ablation.png", results, summary, config)
    return report


def _csv(results: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    return text.getvalue()


def markdown(
    summary: list[dict[str, Any]], reference: dict[str, Any], config: AblationConfig
) -> str:
    """``summary.md``: one table per metric, patterns in the order they ran."""
    level = f"{config.confidence:.0%}"
    lines = [
        "# Scan ablation",
        "",
        f"Data `{config.data}`, {config.image_size}x{config.image_size} images; ZigMa width "
        f"{config.dim}, depth {config.depth}, patch {config.patch_size}; {config.steps} steps of "
        f"batch {config.batch_size}. Every number is of the EMA weights; lower is better. "
        f"Columns: the mean over seeds, the standard deviation over seeds, a {level} t-interval "
        f"of the mean, and the paired difference to `{config.baseline}` (this pattern minus "
        f"`{config.baseline}`, seed by seed) with its {level} t-interval; a negative difference "
        f"means better than `{config.baseline}`.",
        "",
    ]
    for metric, heading in HEADINGS.items():
        lines += [f"## {heading}", "", _table(summary, metric, config), ""]
    lines += [
        f"For scale: {reference['training_images']} real training images score a Frechet "
        f"distance of {reference['fd_training_images']:.4g} against the "
        f"{reference['reference_images']} reference images (what a perfect generator would "
        f"score with this many samples); the {reference['held_out_images']} held-out images "
        f"score {reference['fd_held_out_images']:.4g}. The held-out loss is the mean over "
        f"{len(reference['times'])} times on {reference['heldout_loss_images']} held-out images.",
        "",
    ]
    lines += [
        "## Cost",
        "",
        "| pattern | depth | parameters | GFLOPs per step | seconds per step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{row['pattern']}` | {row['depth']} | {row['parameters']:,} | "
        f"{row['train_flops'] / 1e9:.3g} | {row['seconds_per_step']:.3g} |"
        for row in summary
    ]
    lines += [
        "",
        "GFLOPs per step: the model FLOPs of one step's forward and backward "
        "(torch.utils.flop_counter with ops.FLOP_FORMULAS). Seconds per step: the mean over "
        "seeds of training time / steps.",
        "",
    ]
    return "\n".join(lines)


def _table(summary: list[dict[str, Any]], metric: str, config: AblationConfig) -> str:
    base = config.baseline
    rows = [
        f"| pattern | seeds | mean | std | interval | minus {base} | interval of the difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary:
        value, paired = row[metric], row[f"{metric}_vs_baseline"]
        difference = "" if paired is None else f"{paired['mean']:+.4g}"
        if row["pattern"] == base:
            difference, paired = "(baseline)", None
        rows.append(
            f"| `{row['pattern']}` | {len(row['seeds'])} | {value['mean']:.4g} | "
            f"{_number(value['std'])} | {_interval(value)} | {difference} | "
            f"{_interval(paired) if paired else ''} |"
        )
    return "\n".join(rows)


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2g}"


def _interval(value: dict[str, float]) -> str:
    if math.isnan(value["low"]):
        return ""
    return f"[{value['low']:.4g}, {value['high']:.4g}]"


def plot(
    path: Path, results: list[dict[str, Any]], summary: list[dict[str, Any]], config: AblationConfig
) -> None:
    """Four panels: loss curves per pattern (mean over seeds); each metric per pattern, one dot
    per run, the runs of a seed joined by a line, and the mean with its interval; and the paired
    differences to the baseline, in percent of the baseline's mean."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 9), layout="constrained")
    (curves, loss), (fd, paired) = figure.subplots(2, 2)
    _loss_curves(curves, results, [row["pattern"] for row in summary])
    for axis, metric in zip((loss, fd), METRICS, strict=True):
        _metric_panel(axis, results, summary, metric)
    _paired_panel(paired, summary, config)
    bars = f"mean and {config.confidence:.0%} t-interval" if config.intervals else "mean"
    figure.suptitle(
        f"Scan ablation: {config.data}, {config.image_size}px, {config.steps} steps, seeds "
        f"{sorted({r['seed'] for r in results})}; grey: the runs of one seed; red: {bars}"
    )
    picture = io.BytesIO()
    figure.savefig(picture, dpi=100, format="png")
    write_atomically(path, picture.getvalue())


def _loss_curves(axis, results: list[dict[str, Any]], patterns: list[str]) -> None:
    tails = []
    for pattern in patterns:
        curves = [r["loss_curve"] for r in results if r["pattern"] == pattern]
        length = min(len(c["loss"]) for c in curves)
        mean = [sum(c["loss"][i] for c in curves) / len(curves) for i in range(length)]
        smooth = _moving_average(mean, 5)
        axis.plot(curves[0]["step"][:length], smooth, label=pattern, linewidth=1.2)
        tails += smooth[length // 5 :]
    if tails:  # the first steps fall steeply; show the part where the patterns differ
        low, high = min(tails), max(tails)
        axis.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    axis.set(xlabel="step", ylabel="training loss (mean over seeds, smoothed)")
    axis.set_title("training loss")
    axis.legend(fontsize=8)


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def _metric_panel(axis, results, summary, metric: str) -> None:
    patterns = [row["pattern"] for row in summary]
    seeds = sorted({r["seed"] for r in results})
    for seed in seeds:
        points = [(patterns.index(r["pattern"]), r[metric]) for r in results if r["seed"] == seed]
        points.sort()
        axis.plot(*zip(*points, strict=True), color="0.75", linewidth=0.8, marker=".", zorder=1)
    for x, row in enumerate(summary):
        value = row[metric]
        error = (
            None
            if math.isnan(value["low"])
            else [[value["mean"] - value["low"]], [value["high"] - value["mean"]]]
        )
        axis.errorbar(x, value["mean"], yerr=error, fmt="o", color="C3", capsize=4, zorder=2)
    axis.set_xticks(range(len(patterns)), patterns, rotation=30)
    axis.set_xlim(-0.5, len(patterns) - 0.5)
    axis.ticklabel_format(axis="y", useOffset=False)
    axis.set_title(f"{METRICS[metric]} (lower is better)")


def _paired_panel(axis, summary: list[dict[str, Any]], config: AblationConfig) -> None:
    base = next((row for row in summary if row["pattern"] == config.baseline), None)
    others = [row for row in summary if row["pattern"] != config.baseline]
    for k, metric in enumerate(METRICS):
        for x, row in enumerate(others):
            paired = row[f"{metric}_vs_baseline"]
            if base is None or paired is None:
                continue
            scale = 100 / base[metric]["mean"]
            error = None
            if not math.isnan(paired["low"]):
                error = [
                    [(paired["mean"] - paired["low"]) * scale],
                    [(paired["high"] - paired["mean"]) * scale],
                ]
            label = METRICS[metric] if x == 0 else None
            axis.errorbar(
                x - 0.1 + 0.2 * k,
                paired["mean"] * scale,
                yerr=error,
                fmt="os"[k],
                color=f"C{k}",
                capsize=4,
                label=label,
            )
    axis.axhline(0, color="0.5", linewidth=0.8)
    axis.set_xticks(range(len(others)), [row["pattern"] for row in others], rotation=30)
    axis.set_xlim(-0.5, max(len(others), 1) - 0.5)
    axis.set_ylabel(f"% of {config.baseline}'s mean")
    axis.set_title(f"paired difference: pattern minus {config.baseline}, seed by seed")
    if base is not None and others:
        axis.legend(fontsize=8)
