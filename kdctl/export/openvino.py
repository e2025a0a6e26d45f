"""OpenVINO IR export (FP32, FP16 weights, INT8 via NNCF) and an OpenVINO backend whose inference precision is
set explicitly and read back: on CPUs with BF16 OpenVINO otherwise runs "FP32" models in bf16."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

# What kdctl asks the CPU plugin for, per artifact precision. INT8 keeps its non-quantized parts in f32.
PRECISION_HINT = {"fp32": "f32", "fp16": "f16", "int8": "f32"}


def convert(source) -> object:
    """An ``ov.Model`` from an ONNX file, or traced from PyTorch (``(module, example_input, dynamic)``).

    The traced route is Ultralytics' own and measured faster for INT8 on this CPU (docs/benchmarks.md): OpenVINO
    reads SiLU as one Swish op instead of ONNX's Sigmoid·Mul, which NNCF then quantizes around as a unit.
    A quantization-aware trained student is converted from its Q/DQ ONNX (OpenVINO turns each Q/DQ pair into
    a FakeQuantize and runs it in INT8)."""
    import openvino as ov

    if isinstance(source, (str, Path)):
        return ov.convert_model(str(source))
    import torch

    module, x, dynamic = source
    with torch.no_grad():
        traced = torch.jit.trace(module, x, strict=False, check_trace=False)
    shape = ov.PartialShape([-1, *x.shape[1:]]) if dynamic else ov.PartialShape(list(x.shape))
    return ov.convert_model(traced, input=[shape], example_input=x)


def source_name(source) -> str:
    return "onnx" if isinstance(source, (str, Path)) else "pytorch (traced)"


def export_openvino(source, out_dir: Path, precision: str) -> Path:
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(convert(source), str(xml), compress_to_fp16=(precision == "fp16"))
    return xml


def quantize_openvino_int8(source, out_dir: Path, calibration: list[np.ndarray],
                           keep_float: Callable[[list[tuple[str, None]]], list[str]] | None = None,
                           *, validation: tuple[list, Callable[[object, list], float]] | None = None,
                           max_drop: float | None = None) -> dict:
    """NNCF post-training INT8 (mixed preset); with ``validation`` and ``max_drop``, NNCF's accuracy-control
    mode reverts the most harmful layers to floating point until the metric drop is within budget."""
    import nncf
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    model = convert(source)
    names = keep_float([(op.get_friendly_name(), None) for op in model.get_ops()]) if keep_float else []
    # one anchored pattern, not a list of names: NNCF refuses a name its graph does not hold (e.g. shape
    # arithmetic it folds away), while a pattern only ever matches the nodes that are there
    ignored = nncf.IgnoredScope(patterns=["^(?:" + "|".join(re.escape(n) for n in names) + ")$"] if names else [],
                                validate=False)
    calib = nncf.Dataset(calibration)
    settings = {"tool": "nncf", "nncf_version": nncf.__version__, "preset": "mixed",
                "converted_from": source_name(source),
                "calibration_images": int(sum(b.shape[0] for b in calibration)),
                "ignored_ops": len(names), "accuracy_control": False}
    if validation is not None and max_drop is not None:
        items, validate_fn = validation
        q = nncf.quantize_with_accuracy_control(
            model, calibration_dataset=calib, validation_dataset=nncf.Dataset(items), validation_fn=validate_fn,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(calibration), ignored_scope=ignored)
        settings.update(accuracy_control=True, max_drop=max_drop)
    else:
        q = nncf.quantize(model, calib, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration),
                          ignored_scope=ignored)
    ov.save_model(q, str(out_dir / "model.xml"), compress_to_fp16=False)
    return settings


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


def openvino_backend(xml: Path, precision: str = "fp32", threads: int | None = None, device: str = "CPU",
                     hint: str | None = None):
    """A backend over a compiled OpenVINO model; ``run.runtime`` reports the precision actually in use."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = ov.Core()
    config = {hints.performance_mode: hints.PerformanceMode.LATENCY}
    want = hint or PRECISION_HINT[precision]
    if device == "CPU":
        supported = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if (want == "f16" and "FP16" not in supported) or (want == "bf16" and "BF16" not in supported):
            want = "f32"  # recorded below: this CPU lacks that arithmetic, so the model runs in f32
        config[hints.inference_precision] = want
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(str(xml), device, config)
    run = compiled_backend(compiled)
    run.runtime = {"runtime": "openvino", "version": ov.__version__, "device": device,
                   "inference_precision": precision_name(compiled.get_property(hints.inference_precision)),
                   "requested_precision": hint or PRECISION_HINT[precision]}
    return run
