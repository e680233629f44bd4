"""Small-sample statistics for comparing runs over seeds: t-intervals and paired differences.

With a handful of seeds the normal approximation is too optimistic; the intervals here use
Student's t with ``n - 1`` degrees of freedom (scipy, imported only when an interval is asked
for). A paired comparison takes, seed by seed, the difference between two settings trained
with the same seed, which removes the variation the seed causes in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


class TooFewSeedsError(ValueError):
    """A confidence interval was asked for with fewer than 2 values."""


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values, their sample standard deviation and a t-interval for the mean.

    ``std``, ``low`` and ``high`` are NaN when they were not computed (one value, or no
    interval asked for).
    """

    mean: float
    std: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value, e.g. 4.303 for 95% and 2 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def estimate(
    values: Sequence[float], *, confidence: float = 0.95, interval: bool = True
) -> Estimate:
    """Mean, sample standard deviation and a ``confidence`` t-interval of the mean.

    Raises :class:`TooFewSeedsError` if an interval is asked for with fewer than 2 values.

    Example::

        >>> e = estimate([1.0, 2.0, 3.0])
        >>> round(e.mean, 3), round(e.std, 3), round(e.half_width, 3)
        (2.0, 1.0, 2.484)
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    if interval and n < 2:
        raise TooFewSeedsError(
            f"a confidence interval needs at least 2 seeds, got {n}; run more seeds or ask for "
            "no intervals"
        )
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, math.nan, n)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if not interval:
        return Estimate(mean, std, math.nan, math.nan, n)
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, mean - half, mean + half, n)


def paired_differences(
    values: Mapping[int, float], baseline: Mapping[int, float]
) -> dict[int, float]:
    """``values[seed] - baseline[seed]`` for every seed both have, in seed order.

    Example::

        >>> paired_differences({0: 1.0, 1: 3.0, 2: 5.0}, {0: 0.5, 1: 2.0})
        {0: 0.5, 1: 1.0}
    """
    return {seed: values[seed] - baseline[seed] for seed in sorted(set(values) & set(baseline))}


def paired_estimate(
    values: Mapping[int, float],
    baseline: Mapping[int, float],
    *,
    confidence: float = 0.95,
    interval: bool = True,
) -> Estimate:
    """An :func:`estimate` of the paired differences ``values - baseline`` over shared seeds."""
    differences = paired_differences(values, baseline)
    if not differences:
        raise ValueError("the two settings share no seeds, so they cannot be paired")
    return estimate(list(differences.values()), confidence=confidence, interval=interval)
