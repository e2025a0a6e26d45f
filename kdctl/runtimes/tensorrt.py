"""TensorRT: run a serialized engine with cuda-python (no PyTorch on the device), timed with CUDA events."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from kdctl.errors import BackendUnavailable

NAME, PACKAGE, FORMAT = "tensorrt", "tensorrt", "tensorrt"


def cuda_runtime():
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    return cudart


def cuda_call(result, what: str):
    """Unpack a cuda-python ``(error, value...)`` tuple; raise on any error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def tensorrt_status() -> tuple[bool, str]:
    """(available, why not): the ``tensorrt`` package, cuda-python and a visible CUDA device; no PyTorch."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    cudart = cuda_runtime()
    if cudart is None:
        return False, "cuda-python is not installed (pip install 'kdctl[tensorrt]')"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return False, "no CUDA GPU is visible"
    return True, ""


class TensorRTRunner:
    """A serialized TensorRT engine run as trtexec runs it, with cuda-python (no PyTorch on the device).

    Device buffers and pinned host buffers are allocated once, at the largest shape the engine accepts; each call
    copies in (H2D), enqueues (compute), copies out (D2H) on one stream, and CUDA events time the three parts
    separately (:attr:`last_ms`); compute is the headline latency. ``cuda_graph=True`` replays the enqueue as a
    CUDA graph (trtexec's ``--useCudaGraph``). Every CUDA and TensorRT return value is checked.
    """

    def __init__(self, engine: Path, cuda_graph: bool = False):
        ok, why = tensorrt_status()
        if not ok:
            raise BackendUnavailable(f"TensorRT engine {engine.name}: {why}")
        import tensorrt as trt

        from kdctl.errors import CheckFailed

        self.trt, self.cudart, self.call = trt, cuda_runtime(), cuda_call
        free0, total = self.call(self.cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise CheckFailed(f"{engine}: TensorRT {trt.__version__} cannot load this engine (built with another "
                              "TensorRT version or GPU?); rebuild it on this device with build_engine.sh")
        self.ctx = self.engine.create_execution_context()
        if self.ctx is None:
            raise CheckFailed(f"{engine}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise CheckFailed(f"{engine}: expected one input and one output, found {ins} and {outs}")
        self.inp, self.out = ins[0], outs[0]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.inp)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out)))
        shape = tuple(self.engine.get_tensor_shape(self.inp))
        self.dynamic = any(d < 0 for d in shape)
        if self.dynamic:
            lo, _, hi = (tuple(x) for x in self.engine.get_tensor_profile_shape(self.inp, 0))
            self.min_shape, self.max_shape = lo, hi
            self.call_bool(self.ctx.set_input_shape(self.inp, hi), "set_input_shape")
        else:
            self.min_shape = self.max_shape = shape
        out_max = tuple(self.ctx.get_tensor_shape(self.out))
        self.fixed_batch = None if self.dynamic else shape[0]
        self.stream = self.call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.bufs = {}
        for name, shp, dt in ((self.inp, self.max_shape, self.in_dtype), (self.out, out_max, self.out_dtype)):
            nbytes = int(np.prod(shp)) * dt.itemsize
            dev = self.call(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
            host_ptr = self.call(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            host = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(int(host_ptr))).view(dt)
            self.bufs[name] = (dev, host_ptr, host, nbytes)
            self.call_bool(self.ctx.set_tensor_address(name, int(dev)), "set_tensor_address")
        self.events = [self.call(self.cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        self.graph = None
        if cuda_graph:
            self._capture_graph()
        free1, _ = self.call(self.cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        self.last_ms = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
        self.info = {"runtime": "tensorrt", "version": trt.__version__, "device": self._device_name(),
                     "cuda_graph": cuda_graph, "dynamic_batch": self.dynamic,
                     "gpu_memory_mb": round((free0 - free1) / 2**20, 1), "gpu_total_mb": round(total / 2**20, 1)}

    def call_bool(self, ok, what: str) -> None:
        if not ok:
            raise RuntimeError(f"TensorRT {what} failed")

    def _device_name(self) -> str:
        dev = self.call(self.cudart.cudaGetDevice(), "cudaGetDevice")
        props = self.call(self.cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")

    def _capture_graph(self) -> None:
        cu = self.cudart
        self.call_bool(self.ctx.execute_async_v3(int(self.stream)), "execute_async_v3")  # settle shapes first
        self.call(cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.call(cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                  "cudaStreamBeginCapture")
        self.call_bool(self.ctx.execute_async_v3(int(self.stream)), "execute_async_v3 (capture)")
        graph = self.call(cu.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        self.graph = self.call(cu.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cu = self.cudart
        x = np.asarray(x)
        if x.ndim != len(self.max_shape) or x.shape[1:] != tuple(self.max_shape[1:]):
            raise ValueError(f"input shape {x.shape} does not fit the engine's {self.max_shape}")
        if not self.min_shape[0] <= x.shape[0] <= self.max_shape[0]:
            raise ValueError(f"batch {x.shape[0]} is outside the engine's {self.min_shape[0]}..{self.max_shape[0]}")
        if self.dynamic:
            self.call_bool(self.ctx.set_input_shape(self.inp, x.shape), "set_input_shape")
        dev_in, host_ptr_in, host_in, _ = self.bufs[self.inp]
        dev_out, host_ptr_out, host_out, _ = self.bufs[self.out]
        n_in = x.size * self.in_dtype.itemsize
        host_in[:x.size] = x.astype(self.in_dtype, copy=False).ravel()
        out_shape = tuple(self.ctx.get_tensor_shape(self.out))
        n_out = int(np.prod(out_shape)) * self.out_dtype.itemsize
        e0, e1, e2, e3 = self.events
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(cu.cudaEventRecord(e0, self.stream), "cudaEventRecord")
        self.call(cu.cudaMemcpyAsync(dev_in, host_ptr_in, n_in, h2d, self.stream), "cudaMemcpyAsync H2D")
        self.call(cu.cudaEventRecord(e1, self.stream), "cudaEventRecord")
        if self.graph is not None and not self.dynamic:
            self.call(cu.cudaGraphLaunch(self.graph, self.stream), "cudaGraphLaunch")
        else:
            self.call_bool(self.ctx.execute_async_v3(int(self.stream)), "execute_async_v3")
        self.call(cu.cudaEventRecord(e2, self.stream), "cudaEventRecord")
        self.call(cu.cudaMemcpyAsync(host_ptr_out, dev_out, n_out, d2h, self.stream), "cudaMemcpyAsync D2H")
        self.call(cu.cudaEventRecord(e3, self.stream), "cudaEventRecord")
        self.call(cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.last_ms = {k: float(self.call(cu.cudaEventElapsedTime(a, b), "cudaEventElapsedTime"))
                        for k, a, b in (("h2d", e0, e1), ("compute", e1, e2), ("d2h", e2, e3))}
        return host_out[:int(np.prod(out_shape))].reshape(out_shape).astype(np.float32)

    def close(self) -> None:
        cu = self.cudart
        for dev, host_ptr, _, _ in self.bufs.values():
            cu.cudaFree(dev)
            cu.cudaFreeHost(host_ptr)
        for e in self.events:
            cu.cudaEventDestroy(e)
        if self.graph is not None:
            cu.cudaGraphExecDestroy(self.graph)
        cu.cudaStreamDestroy(self.stream)
        self.bufs, self.events, self.graph = {}, [], None

    def __del__(self):
        try:
            if self.bufs:
                self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def tensorrt_backend(engine: Path, cuda_graph: bool = False) -> TensorRTRunner:
    return TensorRTRunner(engine, cuda_graph=cuda_graph)
