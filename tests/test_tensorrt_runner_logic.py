"""The TensorRT runner's own logic (buffers, shapes, dynamic batch, checked return values, per-part timing) against
stand-ins for ``tensorrt`` and cuda-python that keep real host memory; the real libraries run in the GPU tests."""

from __future__ import annotations

import ctypes
import sys
import time
import types

import numpy as np
import pytest


class _Engine:
    def __init__(self, in_shape, out_shape, profile=None):
        self.in_shape, self.out_shape, self.profile = in_shape, out_shape, profile
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return ("images", "output0")[i]

    def get_tensor_mode(self, name):
        return "in" if name == "images" else "out"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return self.in_shape if name == "images" else self.out_shape

    def get_tensor_profile_shape(self, name, i):
        return self.profile

    def create_execution_context(self):
        return _Context(self)


class _Context:
    fail_enqueue = False

    def __init__(self, engine):
        self.engine, self.shape, self.addr = engine, engine.in_shape, {}

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name == "images":
            return self.shape
        return (self.shape[0],) + tuple(self.engine.out_shape[1:])

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        if _Context.fail_enqueue:
            return False
        x = _DEVICE[self.addr["images"]]
        n = int(np.prod(self.get_tensor_shape("output0")))
        vals = np.frombuffer(bytes(x[:n * 4]), dtype=np.float32) * 2  # the "network": doubles its first inputs
        _DEVICE[self.addr["output0"]][:n * 4] = vals.tobytes()
        return True


_DEVICE: dict[int, bytearray] = {}
_HOST: dict[int, ctypes.Array] = {}


def _fake_cudart():
    cu = types.SimpleNamespace()
    ok = 0
    cu.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cu.cudaGetDeviceCount = lambda: (ok, 1)
    cu.cudaMemGetInfo = lambda: (ok, 8 << 30, 16 << 30)
    cu.cudaStreamCreate = lambda: (ok, 7)
    cu.cudaEventCreate = lambda: (ok, types.SimpleNamespace(t=0.0))

    def malloc(n):
        ptr = 1000 + len(_DEVICE)
        _DEVICE[ptr] = bytearray(n)
        return ok, ptr

    def malloc_host(n):
        buf = ctypes.create_string_buffer(n)
        _HOST[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    def memcpy(dst, src, n, kind, stream):
        if kind == 1:
            _DEVICE[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(_DEVICE[src][:n]), n)
        return (ok,)

    def record(event, stream):
        event.t = time.perf_counter()
        return (ok,)

    cu.cudaMalloc, cu.cudaMallocHost, cu.cudaMemcpyAsync, cu.cudaEventRecord = malloc, malloc_host, memcpy, record
    cu.cudaEventElapsedTime = lambda a, b: (ok, (b.t - a.t) * 1000 + 1e-3)
    cu.cudaStreamSynchronize = lambda s: (ok,)
    cu.cudaGetDevice = lambda: (ok, 0)
    cu.cudaGetDeviceProperties = lambda d: (ok, types.SimpleNamespace(name=b"Fake GPU\x00\x00"))
    for f in ("cudaFree", "cudaFreeHost", "cudaEventDestroy", "cudaStreamDestroy", "cudaGraphExecDestroy"):
        setattr(cu, f, lambda *a: (ok,))
    return cu


@pytest.fixture
def fake_tensorrt(monkeypatch, tmp_path):
    engines = {}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 1, "__init__": lambda self, *a: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, *a: None,
                                       "deserialize_cuda_engine": lambda self, b: engines.get(bytes(b))})
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _fake_cudart()
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", bindings.runtime)
    import kdctl.runtimes.tensorrt as trt_runtime

    monkeypatch.setattr(trt_runtime, "tensorrt_status", lambda: (True, ""))

    def engine(name, *args):
        engines[name.encode()] = _Engine(*args)
        p = tmp_path / f"{name}.engine"
        p.write_bytes(name.encode())
        return p

    _Context.fail_enqueue = False
    return engine


def test_static_engine_runs_checks_shapes_and_times_each_part(fake_tensorrt):
    from kdctl.runtimes.tensorrt import TensorRTRunner

    run = TensorRTRunner(fake_tensorrt("static", (1, 3, 4, 4), (1, 7, 2)))
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    y = run(x)
    assert y.shape == (1, 7, 2) and np.array_equal(y.ravel(), x.ravel()[:14] * 2)
    assert run.fixed_batch == 1 and set(run.last_ms) == {"h2d", "compute", "d2h"} and run.info["device"] == "Fake GPU"
    with pytest.raises(ValueError, match="batch 2 is outside the engine's 1..1"):
        run(np.concatenate([x, x]))
    with pytest.raises(ValueError, match="does not fit the engine"):
        run(np.zeros((1, 3, 8, 8), np.float32))
    _Context.fail_enqueue = True
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        run(x)
    run.close()


def test_dynamic_batch_uses_the_profile(fake_tensorrt):
    from kdctl.runtimes.tensorrt import TensorRTRunner

    run = TensorRTRunner(fake_tensorrt("dyn", (-1, 3, 2, 2), (-1, 5, 1), ((1, 3, 2, 2), (1, 3, 2, 2), (4, 3, 2, 2))))
    assert run.dynamic and run.fixed_batch is None
    x = np.random.default_rng(0).random((3, 3, 2, 2), dtype=np.float32)
    y = run(x)
    assert y.shape == (3, 5, 1) and np.allclose(y.ravel(), x.ravel()[:15] * 2)
    with pytest.raises(ValueError, match="batch 5 is outside the engine's 1..4"):
        run(np.zeros((5, 3, 2, 2), np.float32))


def test_an_engine_from_another_tensorrt_is_one_line(fake_tensorrt, tmp_path):
    from kdctl.errors import CheckFailed
    from kdctl.runtimes.tensorrt import TensorRTRunner

    other = tmp_path / "other.engine"
    other.write_bytes(b"built elsewhere")
    with pytest.raises(CheckFailed, match="cannot load this engine .* rebuild it on this device"):
        TensorRTRunner(other)
