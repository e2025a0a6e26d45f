"""INT8 post-training quantization with calibration images: ONNX Runtime static QDQ (per-channel weights) and
OpenVINO via NNCF. The box-decoding tail of the head (DFL softmax, anchor arithmetic) stays in floating point:
quantizing it costs box accuracy and saves almost no time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def head_tail_nodes(model_proto, head_index: int) -> list[str]:
    """Nodes of the detection head after its convolutions: DFL, decode arithmetic, sigmoid, concat."""
    prefix = f"/model.{head_index}/"
    keep_int8 = ("/cv2.", "/cv3.")
    names = []
    for n in model_proto.graph.node:
        if not n.name.startswith(prefix):
            continue
        in_branch = any(k in n.name for k in keep_int8)
        if not in_branch or n.op_type not in ("Conv", "Relu", "Sigmoid", "Mul", "Add", "HardSwish"):
            names.append(n.name)
    return names


class _Reader:
    """ONNX Runtime's CalibrationDataReader over preprocessed batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches, self.i = input_name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_onnx_int8(fp32_path: Path, out_path: Path, calibration: list[np.ndarray], head_index: int,
                       method: str = "minmax", keep_head_fp: bool = True) -> dict:
    """Static QDQ quantization: per-channel INT8 weights, UINT8 activations; returns the settings used."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method '{method}'; valid: {', '.join(CALIBRATION_METHODS)}")
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    proto = onnx.load(str(pre))
    exclude = head_tail_nodes(proto, head_index) if keep_head_fp else []
    settings = {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8",
                "calibration_method": method, "calibration_images": int(sum(b.shape[0] for b in calibration)),
                "excluded_nodes": len(exclude)}
    quantize_static(str(pre), str(out_path), _Reader(proto.graph.input[0].name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[method],
                    nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    pre.unlink(missing_ok=True)
    onnx.checker.check_model(str(out_path))
    return settings
