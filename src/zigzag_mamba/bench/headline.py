"""The headline numbers of a run, computed from its rows.

They compare the ZigMa block (``zigma``) with the attention block (``dit``): the token count at
which ZigMa becomes faster (interpolated log-log between the measured sizes), the time and
peak-memory ratios at the largest size both ran, and what the zigzag permutation itself costs
(``zigma`` against ``zigma-none``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from zigzag_mamba.bench.contenders import BASELINE, OURS, UNPERMUTED

ORDER_COST_TOKENS = 4096  # where the permutation's share of a block's time is reported


def _ok(rows: Iterable[dict], **match) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def _series(rows: list[dict], suite: str, name: str, mode: str, key: str) -> dict[int, float]:
    """tokens -> value of ``key`` for one contender and mode. Missing values are left out, and
    so are zeros: a peak below the resolution of the memory method has no meaningful ratio."""
    return {
        r["tokens"]: r[key]
        for r in _ok(rows, suite=suite, name=name, mode=mode)
        if r.get(key) is not None and r[key] > 0
    }


def crossover(ours: dict[int, float], theirs: dict[int, float]) -> dict:
    """Smallest token count from which ``ours`` stays below ``theirs``, interpolated log-log.

    Returns ``{"tokens": L or None, "bound": "interpolated" | "at or below" | "above"}``:
    "at or below" when ours is already lower at the smallest common size, "above" (with the
    largest common size) when it never gets lower. Only positive values count (logarithms).
    """
    common = sorted(n for n in set(ours) & set(theirs) if ours[n] > 0 and theirs[n] > 0)
    if not common:
        return {"tokens": None, "bound": "no common sizes"}
    ratios = [ours[n] / theirs[n] for n in common]
    first_below = len(common)
    while first_below > 0 and ratios[first_below - 1] < 1:
        first_below -= 1
    if first_below == len(common):
        return {"tokens": common[-1], "bound": "above"}
    if first_below == 0:
        return {"tokens": common[0], "bound": "at or below"}
    n0, n1 = common[first_below - 1], common[first_below]
    r0, r1 = ratios[first_below - 1], ratios[first_below]
    fraction = math.log(r0) / (math.log(r0) - math.log(r1))
    tokens = math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0)))
    return {"tokens": round(tokens), "bound": "interpolated"}


def _ratio_at_largest(theirs: dict[int, float], ours: dict[int, float]) -> dict | None:
    ratios = _ratios(theirs, ours)
    return {"tokens": ratios[-1][0], "ratio": ratios[-1][1]} if ratios else None


def _order_cost(rows: list[dict], mode: str) -> dict | None:
    ordered = _series(rows, "blocks", OURS, mode, "median_ms")
    without = _series(rows, "blocks", UNPERMUTED, mode, "median_ms")
    common = sorted(set(ordered) & set(without))
    if not common:
        return None
    tokens = min(common, key=lambda n: abs(math.log(n / ORDER_COST_TOKENS)))
    extra = ordered[tokens] - without[tokens]
    return {"tokens": tokens, "extra_ms": extra, "extra_pct": 100 * extra / without[tokens]}


def headline(rows: list[dict]) -> dict:
    """The closing numbers of a run, per mode (see the module docstring)."""
    summary: dict[str, dict] = {}
    for mode in ("fwd", "fwd+bwd"):
        time_ours = _series(rows, "blocks", OURS, mode, "median_ms")
        time_theirs = _series(rows, "blocks", BASELINE, mode, "median_ms")
        summary[mode] = {
            "crossover": crossover(time_ours, time_theirs),
            "speedup": _ratio_at_largest(time_theirs, time_ours),
            "memory_ratio": _ratio_at_largest(
                _series(rows, "blocks", BASELINE, mode, "peak_mib"),
                _series(rows, "blocks", OURS, mode, "peak_mib"),
            ),
            "order_cost": _order_cost(rows, mode),
            "backbone_speedup": {
                str(tokens): ratio
                for tokens, ratio in _ratios(
                    _series(rows, "backbones", BASELINE, mode, "median_ms"),
                    _series(rows, "backbones", OURS, mode, "median_ms"),
                )
            },
        }
    return summary


def _ratios(theirs: dict[int, float], ours: dict[int, float]) -> list[tuple[int, float]]:
    return [(n, theirs[n] / ours[n]) for n in sorted(set(ours) & set(theirs))]
