"""``kdctl profile``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from kdctl.cli._common import (JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RunsOpt, console, emit, non_negative,
                               progress_bar)
from kdctl.runtimes import DEVICE_RUNTIMES


def profile(
    bundle: Annotated[Path, typer.Argument(help="An export bundle, or one artifact's file in it (its "
                                                "model-int8.onnx, openvino-int8/model.xml): that artifact alone.",
                                           show_default=False)],
    artifact: Annotated[Optional[list[str]], typer.Option("--artifact", "-a", help="Only these artifacts (repeatable).")] = None,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help=f"Only artifacts of this runtime: {', '.join(DEVICE_RUNTIMES)}.")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help="Untimed inferences first (default: the recipe's profile.warmup, else 10).")] = None,
    runs: Annotated[Optional[int], typer.Option("--runs", "-n", min=1, help="Timed inferences (batch 1, or a static export's batch), at least (default: the recipe's profile.runs, else 100).")] = None,
    duration: Annotated[Optional[float], typer.Option("--duration", callback=non_negative, help="Also keep timing for this many seconds.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Inference threads, at most the cores this process may use (default: the recipe's profile.threads, else all of them).")] = None,
    throughput_batch: Annotated[Optional[int], typer.Option("--throughput-batch", min=1, help="Batch for throughput, where the model accepts it (default: the recipe's profile.throughput_batch, else 8).")] = None,
    hint: Annotated[Optional[str], typer.Option("--hint", help="How throughput is measured: latency (one synchronous request at a time, batched at --throughput-batch) or throughput (requests in flight at once: OpenVINO under its THROUGHPUT hint, as benchmark_app's default; ONNX Runtime on the CPU one request per thread, as onnxruntime_perf_test -c N -x 1); latency percentiles are one request at a time either way (default: the recipe's profile.hint, else latency).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (the first GPU: also 0 or cuda:0).")] = "cpu",
    pytorch: Annotated[bool, typer.Option("--pytorch", help="Also profile the FP32 PyTorch model the artifacts came from.")] = False,
    out: OutOpt = None, runs_dir: RunsOpt = Path("runs"), overwrite: OverwriteOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure latency percentiles, throughput, memory and size of an export bundle's models on this machine.

    Example: [bold]kdctl profile runs/export/quickstart-cpu --runs 200 --json[/bold]

    Throughput with requests in flight, as benchmark_app's default measures OpenVINO's:
    [bold]kdctl profile runs/export/quickstart-intel --hint throughput[/bold]
    """
    from kdctl.evaluate import runtime_device
    from kdctl.profile.stage import profile_bundle
    from kdctl.profile.stats import call_images

    device = runtime_device(device)  # 0 and cuda:0 are the first GPU, as eval and Ultralytics take them
    with progress_bar(not (json_ or quiet)) as p:
        b = profile_bundle(bundle, artifacts=artifact, runtime=runtime, warmup=warmup, runs=runs, duration_s=duration,
                           threads=threads, throughput_batch=throughput_batch, device=device, pytorch=pytorch, out=out,
                           runs_dir=runs_dir, overwrite=overwrite, progress=p, hint=hint)
    m = b.metrics

    def human():
        asynchronous = any((r.get("throughput") or {}).get("requests_in_flight") for r in m["results"])
        t = Table(title=f"profile: {b.path}  ({m['settings']['threads']} threads, {m['settings']['runs']} runs, "
                        f"batch {_batch(m['settings'].get('batch', 1))}, {m['imgsz']} px"
                        f"{'; img/s with requests in flight (--hint throughput)' if asynchronous else ''})")
        mixed = isinstance(m["settings"].get("batch"), list)  # the PyTorch row at 1 beside a static batch's
        for c in ("artifact", *(("images / call",) if mixed else ()), "p50 ms", "p90", "p99", "e2e p50", "img/s", "MB",
                  "mAP50-95"):
            t.add_column(c, justify="left" if c == "artifact" else "right", no_wrap=True)
        for r in m["results"]:
            lat = r["latency_ms"]
            t.add_row(r["artifact"], *((str(call_images(r)),) if mixed else ()), f"{lat['p50']:.2f}",
                      f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['end_to_end_ms']['total']['p50']:.2f}",
                      f"{r['throughput']['images_per_s']:.0f}", f"{r['size_mb']:.2f}",
                      "—" if r["map50_95"] is None else f"{r['map50_95']:.4f}")
        console.print(t)
        for r in m["results"]:
            parts = r.get("latency_parts_ms") or {}
            if parts:
                console.print(f"{r['artifact']}: p50 above is GPU compute (CUDA events); "
                              + ", ".join(f"{k} p50 {v['p50']:.3f} ms" for k, v in parts.items() if k != "compute"))
        for k, v in m["skipped"].items():
            console.print(Text.assemble(("skipped", "yellow"), f" {k}: {v}"))

    emit({"bundle": str(b.path), **m}, as_json=json_, quiet=quiet, human=human)


def _batch(b) -> str:
    """The latency batch: 1, a static export's batch, or the batches of its artifacts."""
    return " / ".join(map(str, b)) if isinstance(b, list) else str(b)
