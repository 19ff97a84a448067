"""How sure can one be of a difference measured over a few seeds? Student-t intervals and a paired test.

With S seeds per model, the mean test loss has a standard error s / sqrt(S), and its 95% interval
uses Student's t with S - 1 degrees of freedom (not the normal's 1.96: with 3 seeds the factor is
4.30). Two models trained with the same seed see the same data in the same order, so their
difference is measured per seed and tested on those S differences (a paired t-test), which removes
the part of the variation the two runs share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t   # imported here: only the sweep's report needs it
    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its `level` confidence interval); the half-width is NaN for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


@dataclass
class PairedDifference:
    """b - a over paired runs: the mean difference, its interval, and the paired t-test."""
    n: int
    mean: float
    ci_low: float
    ci_high: float
    t: float         # mean / standard error; NaN below two pairs
    p: float         # two-sided p-value of "no difference"; NaN below two pairs

    @property
    def covers_zero(self) -> bool:
        return not (self.ci_low > 0 or self.ci_high < 0)    # NaN bounds count as covering zero


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """`b - a`, pair by pair (the same seed in both lists, at the same position)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two lists of the same non-zero length (got {len(a)} and {len(b)})")
    d = [y - x for x, y in zip(a, b)]
    mean, half = mean_ci(d, level)
    n = len(d)
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0:    # identical differences: the test is degenerate, the interval a point
        t_stat, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        from scipy.stats import t
        t_stat = mean / (sd / math.sqrt(n))
        p = float(2 * t.sf(abs(t_stat), n - 1))
    return PairedDifference(n, mean, mean - half, mean + half, t_stat, p)
