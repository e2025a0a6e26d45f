"""``kdctl profile``: measure an export bundle's artifacts on this machine with the runtimes it has.

Method as trtexec / benchmark_app: load, warm up, then a fixed count (or duration) of timed batch-1 inferences
on a real preprocessed image; end-to-end time (decode + letterbox, model, NMS) is measured separately from
model-only time; throughput at the largest batch the artifact accepts.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from kdctl.bundle import (Bundle, BundleWriter, artifact_given, claim_output, load_bundle, next_run_dir,
                          reference_metrics, sha256_file, trained_source)
from kdctl.errors import BackendUnavailable, KdctlError, given_by
from kdctl.limits import available_memory_bytes, memory_size, usable_cores
from kdctl.runtimes import (DEVICE_RUNTIMES, RUNTIMES, artifact_mb, available as runtime_available,
                            check_export_metrics, open_runner)
from kdctl.profile.stats import LatencyStats
from kdctl.progress import Step

HINTS = ("latency", "throughput")  # how throughput is measured (benchmark_app's -hint)


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is a dependency
        return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, x, warmup: int, runs: int, duration_s: float | None) -> tuple[list[float], dict]:
    """Latency samples in ms: host wall time per call, or, for a runner that times itself on the device with
    CUDA events (``last_ms``), the GPU compute time, with H2D, D2H and host wall time kept beside it."""
    for _ in range(warmup):
        fn(x)
    samples, parts = [], {}
    device_timed = hasattr(fn, "last_ms")
    t_end = time.perf_counter() + duration_s if duration_s else None
    while len(samples) < runs or (t_end is not None and time.perf_counter() < t_end):
        t0 = time.perf_counter_ns()
        fn(x)
        wall = (time.perf_counter_ns() - t0) / 1e6
        if device_timed:
            for k, v in {**fn.last_ms, "host_wall": wall}.items():
                parts.setdefault(k, []).append(v)
            samples.append(fn.last_ms["compute"])
        else:
            samples.append(wall)
    return samples, parts


def _inputs(src: Bundle, imgsz: int, n: int) -> tuple[list[Path], str]:
    """The first ``n`` validation images that decode, when the dataset is on this machine; else a synthetic frame
    (recorded). The dataset is listed, not checked whole: on an edge device checking every image of a COCO-sized
    set took minutes before the first timed run, for the few images end-to-end timing reads."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.data.validate import check_image

    try:
        ds = load_yolo_yaml(src.manifest["inputs"]["data"]["yaml"], splits=())
    except Exception:
        return [], "synthetic frame (dataset not on this machine)"
    images = []
    for p in ds.val_images:
        if len(images) == n:
            break
        if check_image(p) is None:
            images.append(p)
    return (images, "validation images") if images else ([], "synthetic frame (no validation image decodes here)")


def profile_bundle(bundle: str | Path, *, artifacts: list[str] | None = None, runtime: str | None = None,
                   warmup: int | None = None, runs: int | None = None, duration_s: float | None = None,
                   threads: int | None = None, throughput_batch: int | None = None, device: str = "cpu",
                   e2e_runs: int = 30, pytorch: bool = False, out: str | Path | None = None,
                   runs_dir: str | Path = "runs", overwrite: bool = False, progress=None,
                   hint: str | None = None) -> Bundle:
    """Profile ``bundle``'s artifacts. ``warmup``, ``runs``, ``threads``, ``throughput_batch`` and ``hint`` left at
    None come from the recipe's ``profile:`` section (the one the export bundle carries), else its defaults.
    ``hint`` 'throughput': throughput with requests in flight at once, OpenVINO artifacts under OpenVINO's
    THROUGHPUT hint (benchmark_app's default), ONNX Runtime's on the CPU one request per thread (its perf_test's
    ``-c N -x 1``); 'latency': one synchronous request at a time, batched."""
    if hint is not None and hint not in HINTS:
        raise KdctlError(f"--hint: '{hint}'; valid: {', '.join(HINTS)}")
    bundle, artifacts = artifact_given(bundle, artifacts)
    src = load_bundle(bundle, stages=("export",), verify=True)
    check_export_metrics(src)
    spec = _recipe_settings(src)
    warmup = spec.warmup if warmup is None else warmup
    runs = spec.runs if runs is None else runs
    hint = spec.hint if hint is None else hint
    names = {"threads": given_by("--threads", threads is not None, src.path, "profile.threads"),
             "throughput_batch": given_by("--throughput-batch", throughput_batch is not None, src.path,
                                          "profile.throughput_batch")}
    threads = spec.threads if threads is None else threads
    throughput_batch = spec.throughput_batch if throughput_batch is None else throughput_batch
    _check_resources(threads, throughput_batch, int(src.metrics.get("imgsz") or 0), names)
    out = Path(out) if out else next_run_dir(runs_dir, "profile", src.path.resolve().name, reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        return _profile(src, artifacts, runtime, warmup, runs, duration_s, threads, throughput_batch, device,
                        e2e_runs, pytorch, out, overwrite, progress, hint)


def _recipe_settings(src: Bundle):
    """The recipe's ``profile:`` section, checked again (the bundle may come from an older kdctl)."""
    from kdctl.recipe.schema import ProfileSpec
    from kdctl.recipe.validation import bundle_section

    return bundle_section(src.recipe, "profile", ProfileSpec, src.path / "manifest.json")


def _check_resources(threads: int | None, throughput_batch: int, imgsz: int, names: dict) -> None:
    """Refuse what this machine cannot give before any work: more threads than the cores this process may use
    (the runtimes would start them all: 100000 threads took 17 GB and ignored SIGTERM), or a throughput batch
    whose input alone would take a quarter of the available memory."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        raise KdctlError(f"{names['threads']} {threads}: this process may use {cores} CPU core{'s' * (cores != 1)} "
                         f"here; give at most {cores} (the default is all of them)")
    need = throughput_batch * 3 * imgsz * imgsz * 4
    avail = available_memory_bytes()
    if avail and need > avail / 4:
        raise KdctlError(f"{names['throughput_batch']} {throughput_batch}: its input alone ({throughput_batch} × 3 "
                         f"× {imgsz} × {imgsz} float32) is {memory_size(need)}, more than a quarter of this "
                         f"machine's available memory ({memory_size(avail)}); give a smaller batch")


def _source_weights(src: Bundle) -> Path:
    """The train/distill bundle's weights the export came from, verified and matching the recorded lineage; or the
    checkpoint file it was exported from (``kdctl export best.pt``), the same bytes as then."""
    status, parent, why = trained_source(src)
    inputs = src.manifest.get("inputs") or {}
    if status == "none" and isinstance(inputs.get("weights_sha256"), str) and isinstance(inputs.get("weights"), str):
        path = Path(inputs["weights"])
        if not path.is_file():
            raise KdctlError(f"--pytorch: {path}, the checkpoint {src.path} was exported from, is not on this machine")
        if sha256_file(path) != inputs["weights_sha256"]:
            raise KdctlError(f"--pytorch: {path} was replaced after {src.path} was exported from it", exit_code=1)
        return path
    if status in ("none", "missing"):
        raise KdctlError(f"--pytorch: the source bundle of {src.path} is not on this machine")
    if status == "replaced":
        raise KdctlError(f"--pytorch: {parent.path} was replaced after {src.path} was exported from it ({why})",
                         exit_code=1)
    if status == "unreadable":
        raise KdctlError(f"--pytorch: the source bundle of {src.path}: {why}")
    return load_bundle(parent.path, stages=("train", "distill"), verify=True).file("weights")


def _profile(src: Bundle, artifacts, runtime, warmup, runs, duration_s, threads, throughput_batch, device,
             e2e_runs, pytorch, out: Path, overwrite: bool, progress, hint: str = "latency") -> Bundle:
    """Options were checked by the caller; here: which artifacts run here -> time each -> write the bundle."""
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input

    usable, skipped = _runnable(src, artifacts, runtime, pytorch, device)
    imgsz = int(src.metrics["imgsz"])
    threads = threads or usable_cores()
    images, input_kind = _inputs(src, imgsz, e2e_runs)
    if images:
        x = to_input([letterbox(load_rgb(images[0]), imgsz)[0]])
    else:
        x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    bar = Step(progress, "profile", total=len(usable))
    results, raw = [], {}
    for a in usable:
        bar.describe(f"profile {a['name']}")
        result, raw[a["name"]] = _profile_one(src, a, x, images, imgsz, threads, device, warmup, runs, duration_s,
                                              e2e_runs, throughput_batch, hint)
        results.append(result)
        bar.advance()

    batches = sorted({r["batch"] for r in results})  # 1, or the batch of the export's static graphs
    settings = {"warmup": warmup, "runs": runs, "duration_s": duration_s, "threads": threads,
                "batch": batches[0] if len(batches) == 1 else batches,
                "throughput_batch": throughput_batch, "hint": hint, "device": device, "input": input_kind,
                "e2e_runs": e2e_runs}
    with BundleWriter(out, stage="profile", recipe=src.recipe, parents=[src], overwrite=overwrite,
                      inputs={"export": str(src.path), "settings": settings}) as w:
        w.metrics.update({"target": src.metrics.get("target"), "imgsz": imgsz, "settings": settings,
                          "results": results, "skipped": skipped,
                          "model": {k: src.metrics.get(k) for k in ("params", "gflops")},
                          **{k: src.metrics.get(k) for k in ("eval_images", "eval_sha256")},  # the mAPs' images
                          "pytorch_fp32_map50_95": reference_metrics(src.metrics).get("map50_95")})
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2, default=str))
        (w.path / "latencies.json").write_text(json.dumps(raw))
        w.add_output("metrics", "metrics.json")
        w.add_output("latencies", "latencies.json")
    return w.bundle


def _runs_on_cuda(fmt: str) -> tuple[bool, str]:
    """(runs, why not) for ``--device cuda``, asked before any artifact is loaded: a machine without the GPU path
    was told so only by the first load's error, after the progress bar had started."""
    if fmt == "openvino":
        return False, "OpenVINO runs on Intel devices; --device cuda does not apply (profiled with --device cpu)"
    if fmt == "onnx":
        from kdctl.runtimes.onnxruntime import gpu_providers

        providers, why = gpu_providers()  # what the runner itself would refuse at load
        if not providers:
            return False, f"--device cuda: {why}"
    if fmt == "pytorch":
        import torch

        if not torch.cuda.is_available():
            return False, f"--device cuda: torch {torch.__version__} sees no CUDA GPU here"
    return True, ""


def _runnable(src: Bundle, artifacts, runtime, pytorch: bool, device: str) -> tuple[list[dict], dict]:
    """The export's artifacts to profile (device-built engines included, filtered by ``--artifact``/``--runtime``,
    the PyTorch reference first when asked) that can run here, and why the others cannot."""
    from kdctl.runtimes import bundle_artifacts

    arts = bundle_artifacts(src)  # device-built engines included, with their hashes
    if artifacts is not None:
        unknown = sorted(set(artifacts) - {a["name"] for a in arts})
        if unknown:
            raise KdctlError(f"--artifact: '{unknown[0]}' is not in {src.path}; it has: "
                             f"{', '.join(a['name'] for a in arts)}")
        arts = [a for a in arts if a["name"] in artifacts]
    if runtime is not None:
        if runtime not in DEVICE_RUNTIMES:
            raise KdctlError(f"--runtime: '{runtime}'; valid: {', '.join(DEVICE_RUNTIMES)}")
        fmt = RUNTIMES[runtime].format
        ok, why = runtime_available(runtime)
        if not ok:
            raise BackendUnavailable(f"--runtime {runtime}: {why}")
        kept = [a for a in arts if a["format"] == fmt]
        if arts and not kept:  # every artifact asked for is another runtime's: not "none exported"
            from kdctl.runtimes import for_format

            have = ", ".join(f"{a['name']} ({for_format(a['format']).name})" for a in arts)
            raise KdctlError(f"--runtime {runtime}: no artifact of {src.path}{' asked for' if artifacts else ''} runs "
                             f"in {runtime}: {have}")
        arts = kept
    if pytorch:  # the FP32 PyTorch model the artifacts were exported from, as a reference row
        weights = _source_weights(src)
        arts.insert(0, {"name": "pytorch-fp32", "format": "pytorch", "precision": "fp32", "files": [str(weights)],
                        "metrics": reference_metrics(src.metrics)})
    from kdctl.runtimes import for_format

    skipped = {}
    usable = []
    for a in arts:
        ok, why = runtime_available(for_format(a["format"]).name)
        if ok and device == "cuda":
            ok, why = _runs_on_cuda(a["format"])
        (usable.append(a) if ok else skipped.__setitem__(a["name"], why))
    if not usable:
        by_why: dict[str, list[str]] = {}  # one reason once, with every artifact it stops
        for name, why in skipped.items():
            by_why.setdefault(why, []).append(name)
        reasons = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_why.items())
        raise BackendUnavailable(f"{src.path}: no artifact can run here ({reasons or 'none exported'})")
    return usable, skipped


def _profile_one(src: Bundle, a: dict, x: np.ndarray, images: list, imgsz: int, threads: int, device: str,
                 warmup: int, runs: int, duration_s, e2e_runs: int, throughput_batch: int,
                 hint: str = "latency") -> tuple[dict, list]:
    """Latency (model only), end to end on real images, throughput, memory, size and power of one artifact."""
    from kdctl.profile.power import PowerSampler

    run = open_runner(src.path, a, threads, device)
    rss_loaded = _rss_mb()
    fixed = getattr(run, "fixed_batch", None) or 1  # a static graph of batch N takes N images per call
    x = np.repeat(x[:1], fixed, axis=0)
    with PowerSampler() as power:
        t0 = time.perf_counter()
        samples, parts = _timed(run, x, warmup, runs, duration_s)
        wall = time.perf_counter() - t0
    stats = LatencyStats.from_ms(samples)
    e2e = _end_to_end(run, x, images, imgsz, e2e_runs, fixed)
    tp = _throughput(run, x, throughput_batch, stats, hint, runs, duration_s)
    info = dict(getattr(run, "info", {}))
    energy = power.mean_mw * stats.mean / 1000 if power.mean_mw is not None else None  # mW × s = mJ
    result = {
        "artifact": a["name"], "format": a["format"], "precision": a["precision"], "runtime": info,
        "latency_ms": stats.to_dict(), "latency_is": "gpu_compute" if parts else "host_wall", "batch": fixed,
        "latency_parts_ms": {k: LatencyStats.from_ms(v).to_dict() for k, v in parts.items()},
        "end_to_end_ms": e2e, "throughput": tp,
        "memory": {"rss_after_load_mb": round(rss_loaded, 1), "rss_mb": round(_rss_mb(), 1),
                   "process_peak_rss_mb": round(_peak_rss_mb(), 1), "gpu_mb": _gpu_mb(run, device)},
        "size_mb": artifact_mb(src.path, a["files"]), "map50_95": (a.get("metrics") or {}).get("map50_95"),
        "map50": (a.get("metrics") or {}).get("map50"),
        "power_mw": power.mean_mw, "power_rail": power.rail, "energy_mj_per_image": energy,
        "timed_runs": stats.n, "timed_wall_s": round(wall, 3),
    }
    del run
    return result, samples


def _end_to_end(run, x: np.ndarray, images: list, imgsz: int, n: int, batch: int = 1) -> dict:
    """Decode + letterbox, model, NMS on real images, each timed (``batch`` of them per call for a static graph of
    that batch: the time of one call)."""
    from kdctl.evaluate.predict import letterbox, load_rgb, postprocess, to_input

    pre, model_ms, post = [], [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        xi = to_input([letterbox(load_rgb(images[(i * batch + j) % len(images)]), imgsz)[0]
                       for j in range(batch)]) if images else x
        t1 = time.perf_counter_ns()
        y = run(xi)
        t2 = time.perf_counter_ns()
        postprocess(np.asarray(y))
        t3 = time.perf_counter_ns()
        pre.append((t1 - t0) / 1e6), model_ms.append((t2 - t1) / 1e6), post.append((t3 - t2) / 1e6)
    return {"preprocess": LatencyStats.from_ms(pre).to_dict(), "model": LatencyStats.from_ms(model_ms).to_dict(),
            "postprocess_nms": LatencyStats.from_ms(post).to_dict(),
            "total": LatencyStats.from_ms([p + m + q for p, m, q in zip(pre, model_ms, post)]).to_dict()}


def _throughput(run, x: np.ndarray, batch: int, single: LatencyStats, hint: str = "latency",
                requests: int = 100, duration_s: float | None = None) -> dict:
    """Images per second. ``hint`` 'throughput', on a runner that has it (OpenVINO; ONNX Runtime on the CPU):
    ``requests`` requests with several in flight at once (more until ``duration_s`` has passed), each of ``x``
    (batch 1, or a static graph's batch). Else synchronous calls: at ``batch`` where the graph takes it, 1 / mean
    latency at batch 1."""
    if hint == "throughput" and hasattr(run, "throughput_async"):
        return run.throughput_async(x, requests, duration_s=duration_s)
    tp = _sync_throughput(run, x, batch, single)
    if hint == "throughput":  # TensorRT, PyTorch, ONNX Runtime on a GPU: one request at a time, as with 'latency'
        tp["note"] = "; ".join(filter(None, [tp.get("note"), "one request at a time here (the throughput hint runs "
                                                             "OpenVINO and ONNX Runtime on the CPU concurrently)"]))
    return tp


def _sync_throughput(run, x: np.ndarray, batch: int, single: LatencyStats) -> dict:
    fixed = getattr(run, "fixed_batch", None)
    if fixed == 1 or (not fixed and batch <= 1):  # a static graph of N > 1 is run at N whatever was asked
        return {"batch": 1, "images_per_s": 1000.0 / single.mean,
                "note": f"{'static ' if fixed else ''}batch 1: 1 / mean latency"}
    b, top, note = fixed or batch, getattr(run, "max_shape", None), {}
    if not fixed and top and b > top[0]:  # a dynamic engine's optimisation profile ends there
        b, note = int(top[0]), {"note": f"batch {batch} asked; the engine's batch profile ends at {top[0]}"}
    xb = np.repeat(x[:1], b, axis=0)
    for _ in range(3):
        run(xb)
    n, t0 = 10, time.perf_counter()
    for _ in range(n):
        run(xb)
    return {"batch": b, "images_per_s": n * b / (time.perf_counter() - t0), **note}


def _gpu_mb(run, device: str) -> float | None:
    """GPU memory the artifact holds: the runner's own ``cudaMemGetInfo`` delta (TensorRT), else NVML's view of
    this process (any runtime), else unknown. Never PyTorch's allocator, which sees none of these."""
    if device != "cuda":
        return None
    mb = getattr(run, "info", {}).get("gpu_memory_mb")
    if mb is not None:
        return mb
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = sum(p.usedGpuMemory or 0 for p in procs if p.pid == os.getpid())
        return round(used / 2**20, 1) if used else None
    except Exception:  # no NVML (e.g. Jetson): unknown rather than a wrong number
        return None
