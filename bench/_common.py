"""Shared by the benchmarks: machine description and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    from kdctl.bundle.environment import cpu_model, package_versions

    v = package_versions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}, {cores} cores available, torch {v['torch']}, ultralytics {v['ultralytics']}, "
            f"onnxruntime {v['onnxruntime']}, openvino {v['openvino']}, nncf {v['nncf']}; "
            f"measured {dt.date.today().isoformat()}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench:name -->`` markers."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nRun with `make bench` (or one script in `bench/`).\n"
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def median(xs) -> float:
    return float(statistics.median(xs))


def table(head: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows])
