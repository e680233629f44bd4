"""Results on disk and on screen: CSV per suite, one JSON, a Markdown report and PNG plots
(the numbers themselves come from :mod:`~zigzag_mamba.bench.headline`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from zigzag_mamba.bench.headline import headline
from zigzag_mamba.bench.plots import plot_all

NOTE = (
    "Times: median of the repeats ± half their range. Memory: the peak during one call beyond "
    "what existed before it (module, inputs)."
)
COLUMNS = (
    "suite",
    "name",
    "backend",
    "label",
    "mode",
    "size",
    "tokens",
    "batch",
    "dim",
    "dtype",
    "params",
    "status",
    "median_ms",
    "min_ms",
    "max_ms",
    "spread_pct",
    "repeats",
    "inner",
    "peak_mib",
    "tokens_per_s",
    "gbps",
    "note",
)


def _crossover_words(cross: dict) -> str:
    tokens, bound = cross["tokens"], cross["bound"]
    if tokens is None:
        return "no sizes where both the ZigMa and the attention block ran"
    if bound == "interpolated":
        return f"the ZigMa block is faster than the attention block from L ≈ {tokens}"
    if bound == "at or below":
        return f"the ZigMa block is faster at every L measured (from L = {tokens})"
    return f"the ZigMa block is slower at every L measured (up to L = {tokens})"


def _headline_lines(summary: dict) -> list[str]:
    lines = []
    for mode, numbers in summary.items():
        lines.append(f"- {mode}: {_crossover_words(numbers['crossover'])}")
        if numbers["speedup"]:
            s = numbers["speedup"]
            lines.append(f"  - at L = {s['tokens']}: attention / ZigMa time = {s['ratio']:.2f}x")
        if numbers["memory_ratio"]:
            m = numbers["memory_ratio"]
            lines.append(
                f"  - at L = {m['tokens']}: attention / ZigMa peak memory = {m['ratio']:.2f}x"
            )
        if numbers["order_cost"]:
            c = numbers["order_cost"]
            lines.append(
                f"  - zigzag8 vs pattern=None at L = {c['tokens']}: {c['extra_ms']:+.1f} ms "
                f"({c['extra_pct']:+.1f}%)"
            )
        for tokens, ratio in numbers["backbone_speedup"].items():
            lines.append(f"  - backbones at L = {tokens}: DiT-B/2 / ZigMa-B/2 time = {ratio:.2f}x")
    return lines


# ----------------------------------------------------------------------------- tables


def _format_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.3g} ms" if ms < 10 else f"{ms:.1f} ms"


def _time_cell(row: dict) -> str:
    cell = f"{_format_ms(row['median_ms'])} ±{row['spread_pct'] / 2:.0f}%"
    return f"{cell} ({row['gbps']:.1f} GB/s)" if row.get("gbps") is not None else cell


def _memory_cell(row: dict) -> str:
    return "" if row.get("peak_mib") is None else f"{row['peak_mib']:.1f} MiB"


def _size_label(row: dict) -> str:
    if row["suite"] == "backbones":
        return f"{row['size']}² image, L = {row['tokens']}"
    return str(row["tokens"])


def _cell(row: dict | None, key: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return _time_cell(row) if key == "median_ms" else _memory_cell(row)


def pivot_table(rows: list[dict], key: str) -> list[str]:
    """A Markdown table of ``key`` ("median_ms" or "peak_mib"): one row per size, one column
    per contender, in the order they appear in ``rows``."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    index = {(r["label"], r["size"]): r for r in rows}
    first = {r["size"]: r for r in reversed(rows)}
    lines = [
        "| " + " | ".join(["L", *labels]) + " |",
        "|" + "---:|" * (len(labels) + 1),
    ]
    for size in sizes:
        cells = [_cell(index.get((label, size)), key) for label in labels]
        lines.append("| " + " | ".join([_size_label(first[size]), *cells]) + " |")
    return lines


def _machine_lines(meta: dict) -> list[str]:
    where = meta["gpu"] or f"{meta['cpu']}, {meta['cores']} cores"
    meta = {k: "none" if v is None else v for k, v in meta.items()}
    return [
        f"- machine: {where}; torch threads {meta['torch_threads']}, "
        f"numba threads {meta['numba_threads']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, numba {meta['numba']}, "
        f"mamba-ssm {meta['mamba_ssm']}, CUDA {meta['cuda']}, Python {meta['python']}",
        f"- dtype {meta['dtype']}; backends {json.dumps(meta['backends'])}",
        f"- peak memory: {meta['memory_method']}",
        f"- {meta['date']}",
    ]


def _suite_title(suite: str, settings: dict) -> str:
    if suite == "blocks":
        return f"Blocks (D = {settings['dim']}, batch {settings['batch']})"
    if suite == "backbones":
        return f"Backbones (D = {settings['backbone_dim']}, batch {settings['batch']})"
    return f"Ops (at the shapes of a block of width D = {settings['dim']})"


def markdown(meta: dict, settings: dict, rows: list[dict], summary: dict) -> str:
    """The whole report: machine, headline, then a time and a memory table per suite and mode."""
    lines = [f"# zigma bench: {meta['machine']}", "", *_machine_lines(meta), ""]
    lines += ["## Headline", "", *_headline_lines(summary), ""]
    lines += [NOTE, ""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        lines += [f"## {_suite_title(suite, settings)}", ""]
        for mode in dict.fromkeys(r["mode"] for r in rows if r["suite"] == suite):
            subset = [r for r in rows if r["suite"] == suite and r["mode"] == mode]
            lines += [f"### {mode}: time", "", *pivot_table(subset, "median_ms"), ""]
            if any(r.get("peak_mib") is not None for r in subset):
                lines += [f"### {mode}: peak memory", "", *pivot_table(subset, "peak_mib"), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_results(
    out_dir: Path, meta: dict, settings: dict, rows: list[dict], plots: bool = True
) -> list[Path]:
    """Write every output of a run into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = headline(rows)
    written = [
        write_csv([r for r in rows if r["suite"] == suite], out_dir / f"{suite}.csv")
        for suite in dict.fromkeys(r["suite"] for r in rows)
    ]
    payload = {"meta": meta, "settings": settings, "summary": summary, "rows": rows}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path = out_dir / "summary.md"
    md_path.write_text(markdown(meta, settings, rows, summary) + "\n")
    written += [json_path, md_path]
    if plots:
        written += plot_all(rows, meta, out_dir)
    return written


class LiveReport:
    """Markdown lines, printed and rewritten to ``path`` (if given) at every addition, so that a
    benchmark cut short by a time limit keeps every row it measured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lines: list[str] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, *lines: str) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")
