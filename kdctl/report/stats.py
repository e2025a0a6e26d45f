"""Statistics the report and the benchmarks share: the interval of a mean of paired per-seed differences."""

from __future__ import annotations

import statistics

# t quantiles for a two-sided 95 % interval, by degrees of freedom 1..30 (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(diffs: list[float]) -> tuple[float, float] | None:
    """95 % confidence interval of the mean of paired per-seed differences (KD run minus the baseline of the same
    seed), by Student's t with n − 1 degrees of freedom; None under 2 seeds."""
    n = len(diffs)
    if n < 2:
        return None
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(diffs) / n ** 0.5
    m = statistics.fmean(diffs)
    return m - half, m + half
