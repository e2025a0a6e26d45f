"""INT8 post-training quantization with calibration images: ONNX Runtime static QDQ (per-channel weights,
symmetric, the form TensorRT's explicit quantization takes) and OpenVINO via NNCF. Which nodes stay in floating
point (the box-decoding tail of the head) is the detector family's call (``keep_float``)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


CALIBRATION_MEMORY = 1 << 30  # bytes of intermediate tensors ONNX Runtime's calibrator may hold at once
# the calibrator's peak memory over the intermediate tensors of the batches it holds: 1.05-1.12 measured (min/max, one
# image at 1536 and 4096 px of the 0.9 M-parameter student; entropy 0.72)
CALIBRATION_PEAK = 1.15


class CalibrationMemoryError(MemoryError):
    """One calibration pass would need more memory than this machine has available (``need``, ``available``:
    bytes; ``tensors``: the intermediate tensors of one pass)."""

    def __init__(self, tensors: int, need: int, available: int):
        super().__init__(f"a calibration pass needs about {need} bytes, {available} are available")
        self.tensors, self.need, self.available = tensors, need, available


class _Reader:
    """ONNX Runtime's CalibrationDataReader over preprocessed batches, read in ranges (``set_range``) so that
    the calibrator keeps the activations of a few batches at a time, not of all of them."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches, self.i, self.end = input_name, batches, 0, len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i, self.end = 0, len(self.batches)


def activation_bytes(proto) -> int:
    """Bytes of the intermediate tensors of one calibration batch (float32; static shapes, a dynamic one counted 0)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(proto).graph
    total = 0
    for vi in (*graph.value_info, *graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += int(np.prod(dims, dtype=np.int64)) * 4
    return total


def calibration_count(calibration: Sequence[np.ndarray]) -> int:
    """Images in the calibration batches, which all take one batch size: the first batch is made, not every one
    (the export makes each from its pixels when it is read)."""
    return len(calibration) * int(calibration[0].shape[0]) if len(calibration) else 0


def calibration_stride(n: int, per_batch: int, budget: int | None = None) -> int:
    """Batches per calibration pass. ONNX Runtime's histogram calibrators (entropy, percentile) hold every
    intermediate tensor of every batch at once before they histogram them: 10 GB for 64 images at 640 px of a
    0.9 M-parameter YOLO (docs/benchmarks.md). All ``n`` in one pass where they fit
    ``budget`` (ONNX Runtime's ranges exactly as before); else the largest divisor of ``n`` that fits (its strided
    calibration takes equal ranges), the histograms merged pass by pass (min/max ranges come out the same; entropy
    and percentile ones close, docs/benchmarks.md)."""
    budget = CALIBRATION_MEMORY if budget is None else budget
    if n <= 0 or per_batch * n <= budget:
        return max(n, 1)
    return max(d for d in range(1, n + 1) if n % d == 0 and (d == 1 or d * per_batch <= budget))


def quantize_onnx_int8(fp32_path: Path, out_path: Path, calibration: Sequence[np.ndarray],
                       keep_float: Callable[[list[tuple[str, str]]], list[str]] | None = None,
                       method: str = "minmax", scheme: str = "onnxruntime",
                       overrides: dict[str, list[dict]] | None = None) -> dict:
    """Static QDQ quantization with per-channel symmetric INT8 weights; returns the settings used.

    ``scheme="tensorrt"``: symmetric INT8 activations (every zero point 0) and float biases, the only form
    TensorRT's explicit quantization (onnx-tensorrt's Q/DQ importer) accepts; ONNX Runtime runs it too.
    ``scheme="onnxruntime"``: UINT8 activations with zero points and int32 biases, which ONNX Runtime's CPU
    kernels run about 3x faster than the symmetric form (measured on the quickstart student, 160 px).
    ``overrides``: ONNX Runtime's TensorQuantOverrides, scales fixed beforehand (a QAT student's learned ranges).
    """
    if scheme not in ("tensorrt", "onnxruntime"):
        raise ValueError(f"INT8 scheme '{scheme}'; valid: tensorrt, onnxruntime")
    trt = scheme == "tensorrt"
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method '{method}'; valid: {', '.join(CALIBRATION_METHODS)}")
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    # ONNX Runtime's graph optimizations fold and rename initializers, and fixed scales are keyed by tensor name
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, skip_optimization=bool(overrides))
    proto = onnx.load(str(pre))
    exclude = keep_float([(n.name, n.op_type) for n in proto.graph.node]) if keep_float else []
    tensors = {t for n in proto.graph.node for t in (*n.input, *n.output)} | {i.name for i in proto.graph.input}
    lost = sorted(set(overrides or ()) - tensors)
    if lost:  # the pre-processing renamed a tensor whose scale was fixed: it would be calibrated instead
        raise ValueError(f"fixed quantization scales for tensors the graph no longer has: {', '.join(lost[:3])}")
    settings = {"format": "QDQ", "scheme": scheme, "per_channel": True, "weights": "int8 symmetric",
                "activations": "int8 symmetric" if trt else "uint8", "bias": "float" if trt else "int32",
                "calibration_method": method,
                "calibration_images": calibration_count(calibration), "excluded_nodes": len(exclude)}
    per_batch = activation_bytes(proto)
    stride = calibration_stride(len(calibration), per_batch)
    if stride < len(calibration):
        settings["calibration_passes"] = len(calibration) // stride
    from kdctl.limits import available_memory_bytes

    need, available = int(CALIBRATION_PEAK * stride * per_batch), available_memory_bytes()
    if available and need > available:  # refused now: the kernel would kill the process mid-calibration instead
        pre.unlink(missing_ok=True)
        raise CalibrationMemoryError(stride * per_batch, need, available)
    quiet = _OnePerChannelNotice()
    logging.getLogger().addFilter(quiet)
    # the histogram calibrators (entropy, percentile) print() their progress ("Number of quantized bins : 128"),
    # five lines on stdout between kdctl's progress bar and its table; the settings above record the method
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(pre), str(out_path), _Reader(proto.graph.input[0].name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[method],
                            nodes_to_exclude=exclude,
                            extra_options={"ActivationSymmetric": trt, "WeightSymmetric": True, "QuantizeBias": not trt,
                                           "CalibStridedMinMax": stride,
                                           **({"TensorQuantOverrides": overrides} if overrides else {})})
    finally:
        logging.getLogger().removeFilter(quiet)
        pre.unlink(missing_ok=True)
    onnx.checker.check_model(str(out_path))
    return settings


class _OnePerChannelNotice(logging.Filter):
    """ONNX Runtime's quantizer logs a warning on the root logger for every 1-D weight it cannot quantize per
    channel (a frozen BatchNorm's scale, left as Mul/Add when the graph is not optimized first) and quantizes it per
    tensor, as it should: 46 lines on stderr for a Faster R-CNN QAT export, also under --quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


# Operators onnx-tensorrt imports in TensorRT 8.6, 10.x and 11 (docs/operators.md of each), for the graphs kdctl
# exports; an export that needs anything else would fail on the device.
TENSORRT_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "DequantizeLinear", "Div", "Equal", "Exp", "Expand", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min",
    "Mul", "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMax", "ReduceMean", "Relu", "Reshape", "Resize",
    "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "TopK", "Transpose",
    "Unsqueeze", "Where",
    # RT-DETR's decoder and a two-stage detector's post-processing: layers TensorRT gained in 8.6 (IGridSampleLayer,
    # INormalizationLayer, INonZeroLayer, IOneHotLayer, INMSLayer, the ROIAlign plugin) and long-standing ones
    "And", "Floor", "GatherElements", "GridSample", "Greater", "GreaterOrEqual", "If", "LayerNormalization", "Less",
    "Log", "NonMaxSuppression", "NonZero", "Not", "OneHot", "ReduceProd", "ReduceSum", "RoiAlign", "ScatterElements",
    "Erf",
})


def _all_nodes(graph):
    """Every node of a graph, those inside ``If``/``Loop``/``Scan`` bodies included."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(g)


def tensorrt_qdq_problems(model_path: Path) -> list[str]:
    """What in a Q/DQ ONNX model breaks TensorRT's explicit-quantization rules (empty: none).

    Rules: Q/DQ zero points are int8 and all 0; scales are positive constants; per-channel (axis) only on
    weights; no int32 DequantizeLinear (quantized bias); every operator is one onnx-tensorrt imports; opset >= 13.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    weight_q = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in consts}
    problems = []
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        problems.append(f"opset {opset}: TensorRT needs >= 13 for per-channel Q/DQ")
    for n in _all_nodes(m.graph):
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{n.name}: operator {n.domain}.{n.op_type} is not standard ONNX")
        elif n.op_type not in TENSORRT_OPS:
            problems.append(f"{n.name}: operator {n.op_type} is not imported by onnx-tensorrt")
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = consts.get(n.input[1])
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            problems.append(f"{n.name}: scale is not a constant")
        elif not (scale > 0).all():
            problems.append(f"{n.name}: scale is not positive")
        if zp is None:
            problems.append(f"{n.name}: no int8 zero point (uint8 is the ONNX default)")
        elif zp.dtype != np.int8:
            problems.append(f"{n.name}: zero point is {zp.dtype}, TensorRT takes int8 only")
        elif zp.any():
            problems.append(f"{n.name}: zero point is not 0 (TensorRT quantization is symmetric)")
        is_weight = n.input[0] in consts or n.input[0] in weight_q  # DQ(int8 weight) or Q(float weight)
        if scale is not None and scale.size > 1 and not is_weight:
            problems.append(f"{n.name}: per-channel quantization of an activation")
        if n.input[0] in consts and consts[n.input[0]].dtype == np.int32:
            problems.append(f"{n.name}: int32 DequantizeLinear (a quantized bias)")
    return problems


# ---- a quantization-aware trained student's Q/DQ graph -------------------------------------------------------------

def _initializers(proto) -> dict:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def fold_weight_quantizers(proto) -> int:
    """Replace ``QuantizeLinear(float weight)`` by the int8 weight it computes (ONNX's round-half-to-even and
    saturation), so each convolution reads ``DequantizeLinear(int8 initializer)``: the form ONNX Runtime fuses
    into integer kernels and post-training quantizers write, a quarter of the size. Returns how many were folded."""
    from onnx import numpy_helper

    inits = _initializers(proto)
    folded = 0
    for n in list(proto.graph.node):
        if n.op_type != "QuantizeLinear" or n.input[0] not in inits or n.input[1] not in inits:
            continue
        w, scale = inits[n.input[0]], inits[n.input[1]]
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        if zp is None or zp.dtype not in (np.int8, np.uint8):
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.rint(w / scale.reshape(shape)) + zp.reshape(shape if zp.ndim else ()).astype(np.int32)
        q = np.clip(q, info.min, info.max).astype(zp.dtype)
        name = n.output[0]
        proto.graph.node.remove(n)
        proto.graph.initializer.append(numpy_helper.from_array(q, name))
        folded += 1
    _drop_unused_initializers(proto)
    return folded


def _drop_unused_initializers(proto) -> None:
    """Initializers no node reads any more (the float weights and zero points a rewrite replaced)."""
    used = {i for node in proto.graph.node for i in node.input} | {o.name for o in proto.graph.output}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


U8_ZERO_POINT = "kdctl_activation_zero_point_u8"


def to_uint8_activations(proto) -> int:
    """Symmetric int8 activations (zero point 0) -> uint8 with zero point 128, the form ONNX Runtime's x86 kernels
    run fastest (U8S8). Exact: ``clip(round(x/s), -128, 127) + 128 == clip(round(x/s) + 128, 0, 255)`` with the
    same scale. Weights stay int8. Returns how many activation quantizers were changed."""
    from onnx import TensorProto, numpy_helper

    inits = _initializers(proto)
    changed = set()
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.dtype != np.int8 or zp.ndim or int(zp) != 0:
            continue
        n.input[2] = U8_ZERO_POINT
        changed.add(n.output[0])
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in changed:
            n.input[2] = U8_ZERO_POINT
    if changed:
        proto.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), U8_ZERO_POINT))
        for vi in proto.graph.value_info:  # recorded element types of the changed tensors: now uint8
            if vi.name in changed:
                vi.type.tensor_type.elem_type = TensorProto.UINT8
        _drop_unused_initializers(proto)  # the int8 zero points nothing reads now
    return len(changed)


# ONNX Runtime's QDQ quantizer gives these ops' outputs their input's scale (onnxruntime/quantization/registry.py)
SAME_SCALE_AS_INPUT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize", "MaxPool",
                                 "AveragePool", "Slice", "Pad", "Split", "Gather", "GatherElements", "TopK"})


def strip_quantizers(proto) -> tuple[dict[str, list[dict]], list[str]]:
    """Take a quantization-aware student's Q/DQ pairs out of its graph (``proto``, changed in place: the float
    graph with the trained weights) and return what they held: ONNX Runtime TensorQuantOverrides fixing each
    quantized tensor's scale as trained (activations as uint8 with zero point 128, the same grid as int8 with zero
    point 0; weights int8 per channel), and the names of the convolutions it left in float (no input quantizer).

    ``quantize_onnx_int8`` on that float graph with these overrides writes ONNX Runtime's own form (every
    quantized convolution followed by a quantizer, SiLU's Sigmoid and Mul quantized), which its CPU kernels fuse
    into integer operators; the trained ranges stay, the tensors training left unquantized are calibrated. As
    exported, ModelOpt's graph quantizes only each convolution's input, and ONNX Runtime runs those convolutions in
    float between extra (de)quantizations: slower than FP32 (docs/benchmarks.md)."""
    g = proto.graph
    inits = _initializers(proto)
    quant = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    pairs = [(quant[n.input[0]], n) for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in quant]
    overrides: dict[str, list[dict]] = {}
    rename, dropped = {}, set()
    for q, d in pairs:
        x = q.input[0]
        scale = inits.get(q.input[1])
        zero = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
        if scale is None or zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            raise ValueError(f"quantizer {q.name or q.output[0]}: not a symmetric int8 quantizer with a constant "
                             "scale")
        if x in inits:
            axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
            channels = scale.reshape(-1) if scale.ndim else scale.reshape(1)
            overrides[x] = [{"axis": axis, "scale": np.array(c, np.float32), "zero_point": 0} for c in channels] \
                if scale.ndim else [{"scale": scale.astype(np.float32), "zero_point": 0}]
        else:  # two convolutions reading one tensor, each its own quantizer: the wider range, nothing clipped more
            prev = overrides.get(x, [{"scale": np.zeros((), np.float32)}])[0]["scale"]
            overrides[x] = [{"scale": np.array(max(prev, scale.max()), np.float32),
                             "zero_point": np.array(128, np.uint8)}]
        rename[d.output[0]] = x
        dropped |= {id(q), id(d)}
    float_convs = [n.name for n in g.node if n.op_type == "Conv" and n.input[0] not in rename]
    nodes = [n for n in g.node if id(n) not in dropped]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
    # ONNX Runtime quantizes the output of a data-movement op (C2f's Slice, a Reshape, MaxPool) with its input's
    # scale, whatever the output's own override says: a trained scale there is moved up to the tensor it comes from
    produced = {o: n for n in nodes for o in n.output}
    for t in [t for t in overrides if t not in inits]:
        node = produced.get(t)
        while node is not None and node.op_type in SAME_SCALE_AS_INPUT and node.input[0] not in inits:
            src = node.input[0]
            scale = max(overrides[t][0]["scale"], overrides.get(src, [{"scale": np.float32(0)}])[0]["scale"])
            overrides[src] = [{"scale": np.array(scale, np.float32), "zero_point": np.array(128, np.uint8)}]
            t, node = src, produced.get(src)
    for o in g.output:
        o.name = rename.get(o.name, o.name)
    del g.node[:]
    g.node.extend(nodes)
    kept = [v for v in g.value_info if v.name not in quant and v.name not in rename]  # the int8 tensors gone
    del g.value_info[:]
    g.value_info.extend(kept)
    _drop_unused_initializers(proto)
    return overrides, float_convs


def quantize_qat_onnxruntime(trained, out_path: Path, calibration: Sequence[np.ndarray],
                             keep_float: Callable[[list[tuple[str, str]]], list[str]] | None = None,
                             method: str = "minmax") -> dict:
    """ONNX Runtime's INT8 form of a quantization-aware student's Q/DQ graph ``trained`` (as exported, weight
    quantizers not folded; changed in place): ``strip_quantizers``, then ``quantize_onnx_int8`` of the float graph
    with the trained scales fixed, the convolutions training left in float and ``keep_float``'s nodes excluded.
    Returns its settings, with how many activations and weights kept their trained ranges."""
    import onnx

    inits = {i.name for i in trained.graph.initializer}
    quantized = {n.input[0] for n in trained.graph.node if n.op_type == "QuantizeLinear"}
    overrides, float_convs = strip_quantizers(trained)
    float_path = out_path.with_name(out_path.stem + ".float.onnx")
    onnx.save(trained, str(float_path))
    try:
        settings = quantize_onnx_int8(
            float_path, out_path, calibration,
            lambda nodes: sorted(set(float_convs) | set(keep_float(nodes) if keep_float else ())), method,
            "onnxruntime", overrides=overrides)
    finally:
        float_path.unlink(missing_ok=True)
    return {**settings, "trained_weights": len(quantized & inits), "trained_activations": len(quantized - inits)}


def qdq_counts(proto) -> dict:
    """Quantized convolutions and Q/DQ nodes of a Q/DQ graph (what the bundle records for a QAT export)."""
    inits = _initializers(proto)
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
            "dequantize_linear": len(dq_out),
            "int8_convs": sum(n.input[0] in dq_out and n.input[1] in dq_out for n in convs),
            "float_convs": sum(not (n.input[0] in dq_out and n.input[1] in dq_out) for n in convs),
            "int8_weights": sum(v.dtype == np.int8 and v.ndim == 4 for v in inits.values())}
