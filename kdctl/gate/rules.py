"""Budgets a CI pipeline can trust: each rule reads one metric and fails closed when the metric is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kdctl.errors import distinct
from kdctl.profile.stats import per_call

BUDGETS = ("min_map50_95", "min_map50", "max_p50_ms", "max_p90_ms", "max_p99_ms", "min_fps", "max_size_mb",
           "max_memory_mb", "max_latency_regression", "max_map_regression")


@dataclass
class Check:
    name: str
    budget: float
    value: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict:
        return {"name": self.name, "budget": self.budget, "value": self.value, "passed": self.passed,
                "message": self.message}


def _get(d: dict | None, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def _rule(name: str, value, budget: float, ok: Callable[[float, float], bool], fmt: str, what: str) -> Check:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return Check(name, budget, None, False, f"{what} is missing: failing closed")
    passed = bool(ok(float(value), budget))
    if name.startswith("max"):
        rel = "within" if passed else "exceeds"
    else:
        rel = "meets" if passed else "below"
    shown, limit = distinct(fmt, value, budget)
    return Check(name, budget, float(value), passed, f"{what} {shown} {rel} budget {limit}")


def evaluate_budgets(result: dict | None, budgets: dict, baseline: dict | None = None) -> list[Check]:
    """``result``: one artifact's profile entry; ``baseline``: the same artifact from the baseline profile."""
    checks: list[Check] = []
    le, ge = (lambda v, b: v <= b), (lambda v, b: v >= b)
    b = {k: v for k, v in budgets.items() if v is not None}
    call = per_call(result)  # a static graph of batch N: its latency is that of one call on N images
    if "min_map50_95" in b:
        checks.append(_rule("min_map50_95", _get(result, "map50_95"), b["min_map50_95"], ge, "{:.4f}", "mAP50-95"))
    if "min_map50" in b:
        checks.append(_rule("min_map50", _get(result, "map50"), b["min_map50"], ge, "{:.4f}", "mAP50"))
    if "max_p50_ms" in b:
        checks.append(_rule("max_p50_ms", _get(result, "latency_ms", "p50"), b["max_p50_ms"], le, "{:.2f} ms",
                            "median (p50) latency" + call))
    if "max_p90_ms" in b:
        checks.append(_rule("max_p90_ms", _get(result, "latency_ms", "p90"), b["max_p90_ms"], le, "{:.2f} ms",
                            "p90 latency" + call))
    if "max_p99_ms" in b:
        checks.append(_rule("max_p99_ms", _get(result, "latency_ms", "p99"), b["max_p99_ms"], le, "{:.2f} ms",
                            "p99 latency" + call))
    if "min_fps" in b:  # the profile's throughput: at its throughput_batch where it measured one, else 1 / mean latency
        flight = _get(result, "throughput", "requests_in_flight")  # profile --hint throughput
        checks.append(_rule("min_fps", _get(result, "throughput", "images_per_s"), b["min_fps"], ge, "{:.1f} img/s",
                            "throughput" + (f" ({flight} requests in flight)" if flight else "")))
    if "max_size_mb" in b:
        checks.append(_rule("max_size_mb", _get(result, "size_mb"), b["max_size_mb"], le, "{:.2f} MB", "model size"))
    if "max_memory_mb" in b:
        checks.append(_rule("max_memory_mb", _get(result, "memory", "rss_mb"), b["max_memory_mb"], le, "{:.0f} MB",
                            "process memory (RSS)"))
    if "max_latency_regression" in b:
        cur, base = _get(result, "latency_ms", "p50"), _get(baseline, "latency_ms", "p50")
        reg = None if cur is None or base is None or base <= 0 else cur / base - 1
        c = _rule("max_latency_regression", reg, b["max_latency_regression"], le, "{:+.1%}",
                  "p50 latency change vs baseline")
        if base is None and baseline is None:
            c.message = "no baseline profile given (--baseline): failing closed"
        checks.append(c)
    if "max_map_regression" in b:
        cur, base = _get(result, "map50_95"), _get(baseline, "map50_95")
        reg = None if cur is None or base is None else base - cur
        c = _rule("max_map_regression", reg, b["max_map_regression"], le, "{:.4f}", "mAP50-95 loss vs baseline")
        if base is None and baseline is None:
            c.message = "no baseline profile given (--baseline): failing closed"
        checks.append(c)
    return checks
