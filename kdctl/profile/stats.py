"""Latency statistics as trtexec and benchmark_app report them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds over ``n`` timed runs; percentiles by linear interpolation between order statistics
    (NumPy's default, the same rule as ``statistics.quantiles(method='inclusive')``)."""

    n: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def from_ms(cls, samples_ms) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        p = np.percentile(a, PERCENTILES)
        return cls(int(a.size), float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, float(a.min()),
                   float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(a.max()))

    @property
    def cv(self) -> float:
        """Coefficient of variation (std / mean)."""
        return self.std / self.mean if self.mean else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cv": self.cv}


def call_images(result: dict | None) -> int:
    """The images one timed call of a profile result takes: 1, or a static export's batch (a result of a profile
    before kdctl recorded it: 1)."""
    n = result.get("batch") if isinstance(result, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def per_call(result: dict | None) -> str:
    """'' for one image a call, else what a latency of this result is: " (one call on N images)"."""
    n = call_images(result)
    return f" (one call on {n} images)" if n > 1 else ""
