"""ONNX export of the plain student (FP32, FP16), simplified with onnxslim and checked with onnx.checker (the
ONNX Runtime backend that runs it lives in :mod:`kdctl.runtimes.onnxruntime`)."""

from __future__ import annotations

import warnings
from pathlib import Path

INPUT, OUTPUT = "images", "output0"


def export_onnx(model, path: Path, imgsz: int, *, opset: int = 17, batch: int = 1, dynamic: bool = False,
                half: bool = False) -> Path:
    """Trace the fused detector (decoded output, NMS outside) to ONNX.

    FP16 is traced from the half-precision model itself (not converted afterwards: graph converters mistype
    ``Resize``) inside casts, so inputs and outputs stay FP32 for every runtime.
    """
    import onnx
    import onnxslim
    import torch

    from kdctl.detectors import export_module

    m, x = export_module(model, imgsz, batch, dynamic=dynamic, fmt="onnx")
    if half:
        class HalfIO(torch.nn.Module):
            """FP32 in, FP16 inside, FP32 out."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x.half()).float()

        net = HalfIO(m.half())
    else:
        net = m
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        # the tracer's notes on Python values it records as constants, and torchvision's tensor-copy notes: noise
        # for the user (the parity and mAP checks that follow are what shows whether the graph is right)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(net, x, str(path), opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=axes, do_constant_folding=True, dynamo=False)
    proto = onnxslim.slim(onnx.load(str(path)))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path

