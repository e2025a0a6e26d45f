"""OpenVINO: open an IR for inference with its inference precision set explicitly and read back (on CPUs with BF16
OpenVINO otherwise runs "FP32" models in bf16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME, PACKAGE, FORMAT = "openvino", "openvino", "openvino"

# What kdctl asks the CPU plugin for, per artifact precision. INT8 keeps its non-quantized parts in f32. bf16: the
# FP32 IR run in bfloat16 arithmetic (AMX or AVX-512 BF16; OpenVINO's own default on such CPUs), f32 elsewhere.
PRECISION_HINT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def compiled_backend(compiled):
    """A backend over an already compiled model; ``fixed_batch`` is set when the input batch is static."""
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[out].copy()

    run.compiled = compiled
    dim0 = compiled.input(0).get_partial_shape()[0]
    run.fixed_batch = dim0.get_length() if dim0.is_static else None
    return run


def precision_name(t) -> str:
    """OpenVINO element type -> short name ('f32', 'bf16', 'f16')."""
    s = str(t)
    for long, short in (("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32")):
        if long in s:
            return short
    return s


def _config(core, precision: str, threads: int | None, device: str, hint: str | None, mode: str) -> dict:
    """Compile settings: the performance ``mode`` ('LATENCY' or 'THROUGHPUT'), the inference precision the export
    chose (f32 where this CPU lacks that arithmetic) and the thread count."""
    import openvino.properties.hint as hints

    config = {hints.performance_mode: getattr(hints.PerformanceMode, mode)}
    want = hint or PRECISION_HINT[precision]
    if device == "CPU":
        supported = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if (want == "f16" and "FP16" not in supported) or (want == "bf16" and "BF16" not in supported):
            want = "f32"  # recorded by the caller: this CPU lacks that arithmetic, so the model runs in f32
        config[hints.inference_precision] = want
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def openvino_backend(xml: Path, precision: str = "fp32", threads: int | None = None, device: str = "CPU",
                     hint: str | None = None):
    """A backend over a compiled OpenVINO model; ``run.runtime`` reports the precision actually in use."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = ov.Core()
    compiled = core.compile_model(str(xml), device, _config(core, precision, threads, device, hint, "LATENCY"))
    run = compiled_backend(compiled)
    run.runtime = {"runtime": "openvino", "version": ov.__version__, "device": device,
                   "inference_precision": precision_name(compiled.get_property(hints.inference_precision)),
                   "requested_precision": hint or PRECISION_HINT[precision]}

    def throughput_async(x: np.ndarray, requests: int, warmup: int = 1, duration_s: float | None = None) -> dict:
        """Images per second as benchmark_app measures it by default (``-hint throughput``): the model compiled
        again under OpenVINO's THROUGHPUT hint, which picks its streams and the number of inference requests to keep
        in flight; ``requests`` asynchronous ones timed (at least 4 per request in flight; more until
        ``duration_s`` has passed, as ``-t``), after ``warmup`` rounds of them, on the same input, the same
        precision and threads as the latency measurement."""
        import time

        from kdctl.runtimes import in_flight_record, requests_to_time

        tp = core.compile_model(str(xml), device, _config(core, precision, threads, device, hint, "THROUGHPUT"))
        n = int(tp.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(tp, n)
        for _ in range(max(warmup, 1) * n):
            queue.start_async({0: x})
        queue.wait_all()
        count, started = requests_to_time(requests, n), 0
        t0 = time.perf_counter()
        t_end = t0 + duration_s if duration_s else None
        while started < count or (t_end is not None and time.perf_counter() < t_end):
            queue.start_async({0: x})  # waits while every request is busy
            started += 1
        queue.wait_all()
        seconds = time.perf_counter() - t0
        return in_flight_record("async", x.shape[0], n, tp.get_property("NUM_STREAMS"), started, seconds)

    run.throughput_async = throughput_async
    return run


def openvino_runner(xml: Path, precision: str, threads: int | None, device: str = "CPU", hint: str | None = None):
    """``hint``: the inference precision the export chose and checked (recorded in its bundle)."""
    run = openvino_backend(xml, precision, threads=threads, device=device, hint=hint)
    run.info = {**run.runtime, "threads": threads or int(run.compiled.get_property("INFERENCE_NUM_THREADS"))}
    return run
