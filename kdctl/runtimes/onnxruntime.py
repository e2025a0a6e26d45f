"""ONNX Runtime: open an ONNX artifact for inference (CPU, or CUDA/TensorRT execution providers when asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdctl.errors import BackendUnavailable

NAME, PACKAGE, FORMAT = "onnxruntime", "onnxruntime", "onnx"


def onnxruntime_backend(path: Path, threads: int | None = None, providers: list[str] | None = None):
    """A :data:`~kdctl.evaluate.predict.Backend` over an ONNX Runtime session (CPU unless told otherwise)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    run.session = sess
    dim0 = sess.get_inputs()[0].shape[0]
    run.fixed_batch = dim0 if isinstance(dim0, int) else None
    return run


def gpu_providers() -> tuple[list[str], str]:
    """ONNX Runtime's GPU execution providers here (TensorRT first), and why none where the list is empty."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    why = f"ONNX Runtime here has no CUDA/TensorRT provider (has: {', '.join(available)})"
    return providers, "" if providers else why


def onnxruntime_runner(path: Path, threads: int | None, device: str = "cpu"):
    import onnxruntime as ort

    if device == "cuda":
        providers, why = gpu_providers()
        if not providers:
            raise BackendUnavailable(why)
        providers.append("CPUExecutionProvider")
    else:
        providers = ["CPUExecutionProvider"]
    run = onnxruntime_backend(path, threads=threads, providers=providers)
    used = run.session.get_providers()[0]
    run.info = {"runtime": "onnxruntime", "version": ort.__version__, "provider": used, "threads": threads}
    if used == "CPUExecutionProvider":
        run.throughput_async = lambda x, requests, warmup=1, duration_s=None: concurrent_throughput(
            path, x, threads, requests, warmup, duration_s)
    return run


def concurrent_throughput(path: Path, x: np.ndarray, threads: int | None, requests: int, warmup: int = 1,
                          duration_s: float | None = None) -> dict:
    """Images per second with a request in flight per thread, as ``onnxruntime_perf_test -c N -x 1`` measures it
    (ONNX Runtime has no throughput hint; this is its form of OpenVINO's streams): one CPU session of one intra-op
    thread, run from ``threads`` threads at once (ONNX Runtime releases the GIL while it runs), ``requests`` calls
    timed in all (at least 4 per thread; more until ``duration_s`` has passed) after ``warmup`` each, all on ``x``."""
    import os
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kdctl.runtimes import in_flight_record, requests_to_time

    n = max(1, int(threads or os.cpu_count() or 1))
    one_thread = onnxruntime_backend(path, threads=1)  # a session is safe to run from several threads at once

    def calls(k: int, until: float | None = None) -> int:
        done = 0
        while done < k or (until is not None and time.perf_counter() < until):
            one_thread(x)
            done += 1
        return done

    count = requests_to_time(requests, n)
    share = [count // n + (i < count % n) for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(calls, [max(warmup, 1)] * n))
        t0 = time.perf_counter()
        until = t0 + duration_s if duration_s else None
        done = sum(pool.map(lambda k: calls(k, until), share))
        seconds = time.perf_counter() - t0
    return in_flight_record("concurrent", x.shape[0], n, n, done, seconds, threads_per_request=1)
