"""Profiler accuracy: kdctl profile's p50 vs OpenVINO's benchmark_app on the same model and settings, measured
in one run (interleaved), and repeat-to-repeat coefficient of variation of kdctl's p50.

``--hint throughput``: throughput instead, as benchmark_app reports it by default (THROUGHPUT hint, asynchronous
requests in flight): `kdctl profile --hint throughput` vs benchmark_app's FPS, beside kdctl's synchronous img/s
(one request at a time, batch 1 and the profile's default batch 8); then the same in ONNX Runtime (a request in
flight per thread vs one at a time)."""

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


def benchmark_app_fps(xml: Path, niter: int) -> float:
    """benchmark_app's default measurement (its UI takes no -nthreads with a hint: all of this process's cores,
    as kdctl's default)."""
    exe = Path(sys.executable).parent / "benchmark_app"
    out = subprocess.run([str(exe), "-m", str(xml), "-d", "CPU", "-hint", "throughput", "-api", "async",
                          "-niter", str(niter), "-infer_precision", "f32"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Throughput:\s+([\d.]+) FPS", out)
    if not m:
        raise RuntimeError("benchmark_app printed no throughput:\n" + out[-2000:])
    return float(m.group(1))


def throughput_main(a, exp, xml: Path, threads: int, work: Path) -> None:
    from kdctl.profile.stage import profile_bundle

    rows, ratios, gains = [], [], []
    for i in range(a.repeats):  # interleaved: both tools see the same machine state
        def img_s(hint, batch, name):
            p = profile_bundle(exp.path, warmup=20, runs=a.runs, threads=threads, e2e_runs=2, hint=hint,
                               throughput_batch=batch, out=work / f"{name}{i}")
            return p.metrics["results"][0]["throughput"]
        ours = img_s("throughput", 1, "t")
        theirs = benchmark_app_fps(xml, a.runs)
        one, eight = img_s("latency", 1, "s")["images_per_s"], img_s("latency", 8, "b")["images_per_s"]
        ratios.append(ours["images_per_s"] / theirs)
        gains.append(ours["images_per_s"] / one)
        rows.append([f"repeat {i + 1}", f"{ours['requests_in_flight']} / {ours['streams']}",
                     round(ours["images_per_s"], 1), round(theirs, 1), f"{ratios[-1]:.3f}", round(one, 1),
                     round(eight, 1), f"{gains[-1]:.2f}"])
    rows.append(["median", "", "", "", f"{statistics.median(ratios):.3f}", "", "", f"{statistics.median(gains):.2f}"])
    body = (f"## Profiler throughput vs benchmark_app\n\n{machine()}. OpenVINO FP32 IR of `{a.bundle}` at {a.imgsz} "
            f"px, CPU, {threads} threads, f32 inference precision. kdctl: `profile --hint throughput` (OpenVINO's "
            f"THROUGHPUT hint, its requests in flight, {a.runs} requests timed, or 4 per request in flight if more); "
            f"benchmark_app: `-hint throughput -api async -niter {a.runs}` (its default mode, on all {threads} cores: "
            f"its UI takes no thread count with a hint), its reported FPS; "
            f"kdctl synchronous: `--hint latency` img/s at batch 1 (1 / mean latency) and at batch 8. Interleaved, "
            f"{a.repeats} repeats, one run; ratios per repeat, then their median.\n\n"
            + table(["", "requests / streams", "kdctl async img/s", "benchmark_app FPS", "kdctl / benchmark_app",
                     "kdctl sync batch 1", "kdctl sync batch 8", "async / sync batch 1"], rows)
            + f"\n\nkdctl / benchmark_app throughput: **{statistics.median(ratios):.3f}**; the throughput hint's "
              f"img/s over one synchronous request at a time: **{statistics.median(gains):.2f}×**.\n")
    write_section("profiler-throughput", body)
    print(body)
    onnx_runtime_throughput(a, threads, work)


def onnx_runtime_throughput(a, threads: int, work: Path) -> None:
    """The same bundle's ONNX FP32 and INT8 exports in ONNX Runtime: `--hint throughput` (a one-thread request in
    flight per thread, onnxruntime_perf_test's -c N -x 1; that tool is not in the pip wheel, so no third column)
    against one synchronous request at a time on all the threads, interleaved."""
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.profile.stage import profile_bundle

    exp = export_bundle(ROOT / a.bundle, ExportOptions(target="cpu", artifacts=["onnx-fp32", "onnx-int8"],
                                                       imgsz=a.imgsz, eval_images=10), out=work / "onnx")
    rows, gains = [], {}
    for i in range(a.repeats):
        got = {}
        for hint in ("throughput", "latency"):
            p = profile_bundle(exp.path, warmup=20, runs=a.runs, threads=threads, e2e_runs=2, hint=hint,
                               throughput_batch=1, out=work / f"onnx-{hint}{i}")
            got[hint] = {r["artifact"]: r["throughput"] for r in p.metrics["results"]}
        for art in ("onnx-fp32", "onnx-int8"):
            tp, one = got["throughput"][art], got["latency"][art]["images_per_s"]
            gains.setdefault(art, []).append(tp["images_per_s"] / one)
            rows.append([f"repeat {i + 1}", art, tp["requests_in_flight"], round(tp["images_per_s"], 1),
                         round(one, 1), f"{gains[art][-1]:.2f}"])
    for art, g in gains.items():
        rows.append(["median", art, "", "", "", f"{statistics.median(g):.2f}"])
    body = (f"## Profiler throughput in ONNX Runtime\n\n{machine()}. ONNX FP32 and INT8 (QDQ) exports of `{a.bundle}` "
            f"at {a.imgsz} px, CPU execution provider, {threads} threads. kdctl `profile --hint throughput`: one "
            f"session of one intra-op thread, called from {threads} threads at once ({a.runs} calls in all); "
            f"`--hint latency --throughput-batch 1`: one call at a time on a session of {threads} intra-op threads "
            f"(1 / mean latency). Interleaved, {a.repeats} repeats, one run.\n\n"
            + table(["", "artifact", "requests in flight", "concurrent img/s", "one at a time img/s",
                     "concurrent / one at a time"], rows)
            + "\n\nMedian gain of requests in flight: " + ", ".join(
                f"{art} **{statistics.median(g):.2f}×**" for art, g in gains.items()) + ".\n")
    write_section("profiler-throughput-ort", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default="runs/distill/quickstart")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--hint", choices=("latency", "throughput"), default="latency",
                    help="latency: p50 vs benchmark_app's median; throughput: img/s vs its FPS")
    a = ap.parse_args()
    import os

    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.profile.stage import profile_bundle

    threads = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="kdctl-prof-"))
    exp = export_bundle(ROOT / a.bundle, ExportOptions(target="intel", artifacts=["openvino-fp32"], imgsz=a.imgsz,
                                                       eval_images=10), out=work / "exp")
    xml = exp.path / "openvino-fp32" / "model.xml"
    if a.hint == "throughput":
        return throughput_main(a, exp, xml, threads, work)
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
