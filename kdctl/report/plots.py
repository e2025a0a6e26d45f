"""PNG plots for reports (matplotlib, Agg backend, bundled fonts: nothing is downloaded)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def _figure(path: Path, figsize: tuple[float, float]) -> Iterator:
    """The axes of a figure saved to ``path`` on leaving, its text drawn as written: titles and labels hold bundle
    and artifact names, and Matplotlib read a pair of '$' in one as mathtext (a ValueError for a bundle '$\\x{$')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):
        fig, ax = plt.subplots(figsize=figsize, dpi=110)
        try:
            yield ax
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)


def latency_histogram(samples_ms: list[float], stats: dict, title: str, path: Path, batch: int = 1) -> Path:
    with _figure(path, (6, 3.2)) as ax:
        ax.hist(samples_ms, bins=min(60, max(10, len(samples_ms) // 5)), color="#4C72B0", alpha=0.85)
        for k, c in (("p50", "#2ca02c"), ("p90", "#ff7f0e"), ("p99", "#d62728")):
            ax.axvline(stats[k], color=c, linestyle="--", linewidth=1.2, label=f"{k} {stats[k]:.2f} ms")
        ax.set_xlabel(f"latency (ms, batch {batch})")
        ax.set_ylabel("runs")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return path


def pareto(points: list[tuple[str, float, float]], path: Path) -> Path:
    """``points``: (label, p50 ms, mAP50-95); the Pareto front (faster and more accurate) is joined."""
    with _figure(path, (6, 3.8)) as ax:
        pts = sorted(points, key=lambda p: p[1])
        front, best = [], -1.0
        for p in pts:
            if p[2] > best:
                front.append(p)
                best = p[2]
        for label, x, y in pts:
            ax.scatter(x, y, s=36, color="#d62728" if (label, x, y) in front else "#7f7f7f", zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(front) > 1:
            ax.plot([p[1] for p in front], [p[2] for p in front], color="#d62728", linewidth=1, zorder=2)
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel("mAP50-95")
        ax.set_title("accuracy vs latency (red: Pareto front)", fontsize=10)
        ax.grid(alpha=0.3)
    return path


def losses(epochs: list[dict], path: Path, title: str, kd_stop_epoch: int | None = None) -> Path:
    """Per-epoch task loss (box + cls + dfl) and each KD term; ``kd_stop_epoch``: a line where KD stopped."""
    with _figure(path, (6, 3.4)) as ax:
        x = [e["epoch"] for e in epochs]
        task_keys = [k for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss") if k in epochs[0]]
        ax.plot(x, [sum(e.get(k) or 0 for k in task_keys) for e in epochs], label="task (box+cls+dfl)", linewidth=2)
        for k in sorted({k for e in epochs for k in e if k.startswith("train/kd_")}):
            ax.plot(x, [e.get(k) or np.nan for e in epochs], label=k.split("/", 1)[1], linestyle="--")
        if kd_stop_epoch is not None:
            ax.axvline(kd_stop_epoch + 0.5, color="grey", linewidth=1, label=f"KD stopped after epoch {kd_stop_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (per image)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return path
