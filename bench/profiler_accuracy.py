"""Profiler accuracy: kdctl profile's p50 vs OpenVINO's benchmark_app on the same model and settings, measured
in one run (interleaved), and repeat-to-repeat coefficient of variation of kdctl's p50."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, table, write_section  # noqa: E402


def benchmark_app_median(xml: Path, threads: int, niter: int) -> float:
    exe = Path(sys.executable).parent / "benchmark_app"
    out = subprocess.run([str(exe), "-m", str(xml), "-d", "CPU", "-hint", "none", "-api", "sync",
                          "-niter", str(niter), "-nthreads", str(threads), "-infer_precision", "f32",
                          "-nstreams", "1"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Median:\s+([\d.]+) ms", out)
    if not m:
        raise RuntimeError("benchmark_app printed no median:\n" + out[-2000:])
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default="runs/distill/quickstart")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=300)
    a = ap.parse_args()
    import os

    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.profile.stage import profile_bundle

    threads = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="kdctl-prof-"))
    exp = export_bundle(ROOT / a.bundle, ExportOptions(target="intel", artifacts=["openvino-fp32"], imgsz=a.imgsz,
                                                       eval_images=10), out=work / "exp")
    xml = exp.path / "openvino-fp32" / "model.xml"
    ours, theirs = [], []
    for i in range(a.repeats):  # interleaved: both tools see the same machine state
        p = profile_bundle(exp.path, warmup=20, runs=a.runs, threads=threads, e2e_runs=2, out=work / f"p{i}")
        ours.append(p.metrics["results"][0]["latency_ms"]["p50"])
        theirs.append(benchmark_app_median(xml, threads, a.runs))
    mo, mt = statistics.median(ours), statistics.median(theirs)
    cv = statistics.stdev(ours) / statistics.mean(ours)
    rows = [[f"repeat {i + 1}", round(o, 3), round(t, 3), f"{o / t:.3f}"] for i, (o, t) in enumerate(zip(ours, theirs))]
    rows.append(["median", round(mo, 3), round(mt, 3), f"{mo / mt:.3f}"])
    body = (f"## Profiler vs benchmark_app\n\n{machine()}. OpenVINO FP32 IR of `{a.bundle}` at {a.imgsz} px, CPU, "
            f"sync API, 1 stream (kdctl: latency hint; benchmark_app: -hint none -nstreams 1), {threads} threads, f32 inference precision, {a.runs} timed runs each; "
            f"kdctl profile and benchmark_app alternate, {a.repeats} repeats, one run.\n\n"
            + table(["", "kdctl p50 ms", "benchmark_app median ms", "ratio"], rows)
            + f"\n\nkdctl / benchmark_app p50: **{mo / mt:.3f}** (target within 10 %); repeat-to-repeat CV of kdctl's "
              f"p50: **{100 * cv:.2f} %** (target ≤ 3 %).\n")
    write_section("profiler", body)
    print(body)


if __name__ == "__main__":
    main()
