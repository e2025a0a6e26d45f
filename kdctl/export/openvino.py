"""OpenVINO IR export (FP32, FP16 weights, INT8 via NNCF); the backend that runs an IR, with its inference precision
set explicitly and read back, lives in :mod:`kdctl.runtimes.openvino`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def convert(source) -> object:
    """An ``ov.Model`` from an ONNX file, or traced from PyTorch (``(module, example_input, dynamic)``).

    The traced route is Ultralytics' own and measured faster for INT8 on this CPU (docs/benchmarks.md): OpenVINO
    reads SiLU as one Swish op instead of ONNX's Sigmoid·Mul, which NNCF then quantizes around as a unit.
    A quantization-aware trained student is converted from its Q/DQ ONNX (OpenVINO turns each Q/DQ pair into
    a FakeQuantize and runs it in INT8)."""
    import openvino as ov

    if isinstance(source, (str, Path)):
        return ov.convert_model(str(source))
    import warnings

    import torch

    module, x, dynamic = source
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks tracing deprecated; it is still what OpenVINO's PyTorch frontend reads (and Ultralytics)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, x, strict=False, check_trace=False)
        shape = ov.PartialShape([-1, *x.shape[1:]]) if dynamic else ov.PartialShape(list(x.shape))
        return ov.convert_model(traced, input=[shape], example_input=x)


def source_name(source) -> str:
    return "onnx" if isinstance(source, (str, Path)) else "pytorch (traced)"


def export_openvino(source, out_dir: Path, precision: str) -> Path:
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    _save(convert(source), xml, fp16=(precision == "fp16"))
    return xml


def _save(model, xml: Path, fp16: bool) -> None:
    """``ov.save_model``, whose failed write (a full disk, a file-size limit) is a C++ ``RuntimeError``
    ("basic_ios::clear: iostream error") that names no file: say which, as a write error."""
    import openvino as ov

    try:
        ov.save_model(model, str(xml), compress_to_fp16=fp16)
    except RuntimeError as e:
        if not re.search(r"iostream|[Cc]an(no|')t (open|write)|[Ff]ailed to (open|write)", str(e)):
            raise
        from kdctl.errors import KdctlError, first_line

        raise KdctlError(f"{xml}: OpenVINO could not write the model ({first_line(e)}): is the disk full, or a "
                         "file-size limit (ulimit -f) set? Nothing half-written was published") from None


def quantize_openvino_int8(source, out_dir: Path, calibration: Sequence[np.ndarray],
                           keep_float: Callable[[list[tuple[str, None]]], list[str]] | None = None,
                           *, validation: tuple[list, Callable[[object, list], float]] | None = None,
                           max_drop: float | None = None) -> dict:
    """NNCF post-training INT8 (mixed preset); with ``validation`` and ``max_drop``, NNCF's accuracy-control
    mode reverts the most harmful layers to floating point until the metric drop is within budget."""
    import logging

    import nncf
    import openvino as ov

    from kdctl.export.quantize import calibration_count

    nncf.set_log_level(logging.WARNING)  # its INFO lines list each layer left unquantized: the manifest counts them
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
                "calibration_images": calibration_count(calibration),
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
    _save(q, out_dir / "model.xml", fp16=False)
    return settings
