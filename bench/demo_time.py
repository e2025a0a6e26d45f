"""Wall time of `make demo` as a fresh machine runs it after the install: in an empty working folder (nothing in
runs/ to reuse) with an empty kdctl cache (the built-in data is generated inside the timed run), on this machine's
cores; the stages' own times and mAP come from the bundles it wrote. Writes the section 'demo-time' of
docs/benchmarks.md. About 9 minutes a run on 2 CPU cores.

    python bench/demo_time.py --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, table, write_section  # noqa: E402

STAGES = {"teacher": "train/quickstart-teacher", "baseline": "train/quickstart-student",
          "distilled": "distill/quickstart"}


def _metrics(runs: Path, rel: str) -> dict:
    return json.loads((runs / rel / "metrics.json").read_text())


def one_run(venv: Path) -> dict:
    """``make demo`` in a temporary folder that links this checkout's Makefile inputs; returns its times and mAP."""
    with tempfile.TemporaryDirectory(prefix="kdctl-demo-") as tmp:
        work = Path(tmp)
        for name in ("recipes", "pyproject.toml"):  # a link keeps pyproject's mtime: the install stamp stays valid
            (work / name).symlink_to(ROOT / name)
        env = dict(os.environ, KDCTL_CACHE=str(work / "cache"))
        t0 = time.perf_counter()
        res = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "demo", f"VENV={venv}"], cwd=work, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"make demo failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        runs = work / "runs"
        out = {"wall_s": round(wall, 1)}
        for stage, rel in STAGES.items():
            m = _metrics(runs, rel)
            out[stage] = {"map50_95": round(m["map50_95"], 4), "train_s": round(m["train_seconds"], 1)}
        (art,) = [a for a in _metrics(runs, "export/quickstart-cpu")["artifacts"] if a["name"] == "onnx-int8"]
        out["int8_map50_95"] = round(art["metrics"]["map50_95"], 4)
        out["gate"] = "PASS" if _metrics(runs, "gate/quickstart-cpu")["passed"] else "FAIL"
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="fresh `make demo` runs, one after the other")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the installed environment (make install)")
    a = ap.parse_args()
    if not (a.venv / "bin" / "kdctl").exists():
        sys.exit(f"{a.venv}: no kdctl installed there; run `make install` first")
    results = []
    for i in range(a.runs):
        print(f"run {i + 1}/{a.runs} ...", flush=True)
        results.append(one_run(a.venv.resolve()))
        print(json.dumps(results[-1]), flush=True)
    rows = [[i + 1, f"{round(r['wall_s']) // 60} min {round(r['wall_s']) % 60:02d} s",
             *(f"{r[s]['train_s']:.0f} s" for s in STAGES),
             *(f"{r[s]['map50_95']:.4f}" for s in STAGES), f"{r['int8_map50_95']:.4f}", r["gate"]] for i, r in
            enumerate(results)]
    walls = [r["wall_s"] for r in results]
    body = (f"## The demo's wall time (`make demo`, fresh folder and data)\n\n{machine()}. `python bench/demo_time.py "
            f"--runs {a.runs}`: `make demo` in an empty folder with an empty kdctl cache, after `make install`, so "
            "the data is generated inside the timed run and nothing is reused. The baseline trains beside the "
            "teacher (Ultralytics trains on cpu_count − 1 threads, one on 2 cores); stage times are each "
            "bundle's training time, so the teacher's and the baseline's overlap. Median wall time "
            f"{statistics.median(walls) / 60:.1f} min over {len(walls)} run(s).\n\n" +
            table(["run", "wall", "teacher", "baseline", "distilled", "teacher mAP", "baseline mAP",
                   "distilled mAP", "INT8 ONNX mAP", "gate"], rows))
    write_section("demo-time", body)
    print(body)


if __name__ == "__main__":
    main()
