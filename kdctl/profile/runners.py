"""One runner per runtime, each a :data:`~kdctl.evaluate.predict.Backend` with metadata; optional runtimes are
imported only when asked for, and a missing one is a clear :class:`BackendUnavailable`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from kdctl.errors import BackendUnavailable

RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "pytorch")


def runtime_available(name: str) -> tuple[bool, str]:
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt", "pytorch": "torch"}[name]
    if importlib.util.find_spec(module) is None:
        return False, f"the '{module}' package is not installed"
    if name == "tensorrt":
        from kdctl.export.tensorrt import tensorrt_status

        return tensorrt_status()
    return True, ""


def onnxruntime_runner(path: Path, threads: int | None, device: str = "cpu"):
    import onnxruntime as ort

    from kdctl.export.onnx import onnxruntime_backend

    available = ort.get_available_providers()
    if device == "cuda":
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not providers:
            raise BackendUnavailable(f"ONNX Runtime here has no CUDA/TensorRT provider (has: {', '.join(available)})")
        providers.append("CPUExecutionProvider")
    else:
        providers = ["CPUExecutionProvider"]
    run = onnxruntime_backend(path, threads=threads, providers=providers)
    used = run.session.get_providers()[0]
    run.info = {"runtime": "onnxruntime", "version": ort.__version__, "provider": used, "threads": threads}
    return run


def openvino_runner(xml: Path, precision: str, threads: int | None, device: str = "CPU", hint: str | None = None):
    """``hint``: the inference precision the export chose and checked (recorded in its bundle)."""
    from kdctl.export.openvino import openvino_backend

    run = openvino_backend(xml, precision, threads=threads, device=device, hint=hint)
    run.info = {**run.runtime, "threads": threads or int(run.compiled.get_property("INFERENCE_NUM_THREADS"))}
    return run


def tensorrt_backend(engine: Path):
    """Run a serialized engine with the TensorRT Python API and torch CUDA buffers."""
    ok, why = runtime_available("tensorrt")
    if not ok:
        raise BackendUnavailable(f"TensorRT engine {engine.name}: {why}")
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine_obj = trt.Runtime(logger).deserialize_cuda_engine(engine.read_bytes())
    ctx = engine_obj.create_execution_context()
    names = [engine_obj.get_tensor_name(i) for i in range(engine_obj.num_io_tensors)]
    inp = next(n for n in names if engine_obj.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine_obj.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    out_shape = tuple(engine_obj.get_tensor_shape(out))
    stream = torch.cuda.Stream()
    y = torch.empty(out_shape, dtype=torch.float32, device="cuda")

    def run(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(x).cuda()
        ctx.set_tensor_address(inp, xt.data_ptr())
        ctx.set_tensor_address(out, y.data_ptr())
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return y.cpu().numpy()

    run.fixed_batch = out_shape[0]
    run.info = {"runtime": "tensorrt", "version": trt.__version__, "device": torch.cuda.get_device_name(0)}
    return run


def pytorch_runner(weights: Path, threads: int | None, device: str = "cpu"):
    import torch

    from kdctl.distill.ultralytics import load_detector
    from kdctl.evaluate import torch_backend

    if threads:
        torch.set_num_threads(threads)
    model = load_detector(weights).fuse()
    run = torch_backend(model, device=device)
    run.info = {"runtime": "pytorch", "version": torch.__version__, "device": device,
                "threads": torch.get_num_threads()}
    return run
