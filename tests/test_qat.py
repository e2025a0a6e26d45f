"""Quantization-aware distillation (``distill.quantize: int8``) and the export of a QAT student's own Q/DQ graph.

The graph rewrites are checked against hand-computed int8 values and by running both graphs in ONNX Runtime; the
end-to-end test trains a tiny student with fake quantization and KD, exports it without calibration, and compares
ONNX Runtime with the fake-quantized PyTorch model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import kill_at, refused_in_one_line
from kdctl.cli.main import app

pytest.importorskip("modelopt.torch.quantization")


# ---- graph rewrites ------------------------------------------------------------------------------------------------

W = np.array([[[[1.3]], [[-0.6]]], [[[0.125]], [[100.0]]]], np.float32)  # (out 2, in 2, 1, 1)
W_SCALE = np.array([0.5, 0.25], np.float32)                               # per output channel
# rint(w / scale), ties to even, saturated to int8: 1.3/.5=2.6->3, -.6/.5=-1.2->-1, .125/.25=.5->0, 400->127
W_INT8 = np.array([3, -1, 0, 127], np.int8).reshape(2, 2, 1, 1)


def _qdq_conv_model() -> onnx.ModelProto:
    """x -> Q/DQ (scale 0.05, int8 zero point 0) -> Conv(DQ(Q(float W, per-channel))) -> y, as ModelOpt exports."""
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(W_SCALE, "w_scale"),
             numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="xdq"),
             helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="wq", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="wdq", axis=0),
             helper.make_node("Conv", ["xdq", "wdq"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], inits,
                          value_info=[helper.make_tensor_value_info("xq", TensorProto.INT8, [1, 2, 3, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fold_weight_quantizers_matches_hand_computed_int8():
    from kdctl.export.quantize import fold_weight_quantizers, qdq_counts, tensorrt_qdq_problems

    m = _qdq_conv_model()
    x = np.random.default_rng(0).uniform(-8, 8, (1, 2, 3, 3)).astype(np.float32)
    before = _run(m, x)
    assert fold_weight_quantizers(m) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert inits["wq"].dtype == np.int8 and np.array_equal(inits["wq"], W_INT8)
    assert "w" not in inits  # the float weight is gone, not kept beside the int8 one
    assert [n.op_type for n in m.graph.node].count("QuantizeLinear") == 1  # only the activation's
    np.testing.assert_array_equal(_run(m, x), before)
    assert qdq_counts(m)["int8_convs"] == 1 and qdq_counts(m)["float_convs"] == 0
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kdctl-fold-{os.getpid()}.onnx"
    onnx.save(m, str(path))
    try:
        assert tensorrt_qdq_problems(path) == []
    finally:
        path.unlink()


def _with_float_conv(m: onnx.ModelProto) -> onnx.ModelProto:
    """``_qdq_conv_model`` with a second convolution after it that training left in float (no quantizer), as a
    YOLO head's last convolutions are."""
    g = m.graph
    g.node[-1].output[0] = "y1"
    g.initializer.append(numpy_helper.from_array(np.array([[[[0.5]], [[-1.0]]]], np.float32), "w2"))
    g.node.append(helper.make_node("Conv", ["y1", "w2"], ["y"], name="float_conv"))
    g.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.checker.check_model(m)
    return m


def test_qat_graph_in_onnx_runtimes_form_keeps_the_trained_ranges_and_runs_integer_convolutions(tmp_path):
    """A QAT graph quantizes each convolution's input only, so ONNX Runtime ran its convolutions in float between
    (de)quantizations, slower than FP32. Its ONNX Runtime form: the trained quantizers as trained (the input at
    scale 0.05 on the uint8 grid, zero point 128; the weights' per-channel scales, so the same int8 weights), the
    convolution's output quantized as well (calibrated), the float convolution left float, and ONNX Runtime fuses
    the quantized one into an integer QLinearConv."""
    import onnxruntime as ort

    from kdctl.export.quantize import quantize_qat_onnxruntime, strip_quantizers

    stripped = _with_float_conv(_qdq_conv_model())
    overrides, float_convs = strip_quantizers(stripped)
    assert float_convs == ["float_conv"]
    assert [n.op_type for n in stripped.graph.node] == ["Conv", "Conv"]
    assert stripped.graph.node[0].input[:2] == ["x", "w"]  # the float graph: the trained weight, unquantized
    assert float(overrides["x"][0]["scale"]) == np.float32(0.05) and int(overrides["x"][0]["zero_point"]) == 128
    assert [(o["axis"], float(o["scale"])) for o in overrides["w"]] == [(0, 0.5), (0, 0.25)]

    trained = _with_float_conv(_qdq_conv_model())
    rng = np.random.default_rng(0)
    calib = [rng.uniform(-4, 4, (1, 2, 3, 3)).astype(np.float32) for _ in range(8)]
    out = tmp_path / "ort.onnx"
    settings = quantize_qat_onnxruntime(trained, out, calib)
    assert settings["trained_activations"] == 1 and settings["trained_weights"] == 1
    assert settings["calibration_images"] == 8 and not (tmp_path / "ort.float.onnx").exists()
    m = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    nodes = {n.output[0]: n for n in m.graph.node}
    q_x = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert np.float32(inits[q_x.input[1]]) == np.float32(0.05)
    assert inits[q_x.input[2]].dtype == np.uint8 and int(inits[q_x.input[2]]) == 128
    conv, float_conv = (n for n in m.graph.node if n.op_type == "Conv")
    w_int8 = inits[nodes[conv.input[1]].input[0]]
    assert w_int8.dtype == np.int8 and np.array_equal(w_int8, W_INT8)  # the weights QAT trained, as folded
    assert float_conv.input[1] == "w2"  # the float convolution's weight stays float
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0] for n in m.graph.node)
    # the same arithmetic as the trained graph but the output's rounding to its calibrated grid
    x = rng.uniform(-4, 4, (1, 2, 3, 3)).astype(np.float32)
    step = max(abs(float(inits[n.input[1]])) for n in m.graph.node
               if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
    np.testing.assert_allclose(_run(m, x), _run(_with_float_conv(_qdq_conv_model()), x), atol=1.5 * step)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("QLinearConv") == 1 and fused.count("Conv") == 1, fused
    folded = _with_float_conv(_qdq_conv_model())  # the trained graph as exported: its convolution stays float
    from kdctl.export.quantize import fold_weight_quantizers

    fold_weight_quantizers(folded)
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    opts.optimized_model_filepath = str(tmp_path / "opt2.onnx")
    ort.InferenceSession(str(tmp_path / "folded.onnx"), opts, providers=["CPUExecutionProvider"])
    assert "QLinearConv" not in [n.op_type for n in onnx.load(str(tmp_path / "opt2.onnx")).graph.node]


def test_uint8_activations_are_exact_and_only_touch_activations():
    from kdctl.export.quantize import U8_ZERO_POINT, fold_weight_quantizers, to_uint8_activations

    m = _qdq_conv_model()
    fold_weight_quantizers(m)
    # inputs on and beyond the int8 range (|x| / 0.05 > 127) and on rounding ties (0.025 = half a step)
    x = np.array([-9.0, -6.4, -6.35, -0.025, 0.0, 0.025, 0.075, 6.35, 9.0] * 2, np.float32).reshape(1, 2, 3, 3)
    before = _run(m, x)
    assert to_uint8_activations(m) == 1
    zp = {n.name: n.input[2] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert zp["xq"] == zp["xdq"] == U8_ZERO_POINT and zp["wdq"] == "w_zp"  # weights stay int8
    u8 = next(i for i in m.graph.initializer if i.name == U8_ZERO_POINT)
    assert numpy_helper.to_array(u8).dtype == np.uint8 and int(numpy_helper.to_array(u8)) == 128
    np.testing.assert_array_equal(_run(m, x), before)


def test_tensorrt_rules_accept_weight_quantizers_on_float_weights():
    """ModelOpt writes Q(float weight) -> DQ; TensorRT folds that itself: per-channel there is not an activation."""
    from kdctl.export.quantize import tensorrt_qdq_problems

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kdctl-qw-{os.getpid()}.onnx"
    onnx.save(_qdq_conv_model(), str(path))
    try:
        assert tensorrt_qdq_problems(path) == []
    finally:
        path.unlink()


# ---- the plain student of a QAT run ------------------------------------------------------------------------------

def _quantized_kd_model():
    import modelopt.torch.quantization as mtq

    from kdctl.detectors.yolo import KDDetectionModel

    from kdctl.models import ASSET_MODELS

    m = KDDetectionModel(str(ASSET_MODELS / "yolov8-tiny.yaml"), nc=3, verbose=False)
    m.kd = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1))  # stands in for a KD adapter
    m.eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m = mtq.quantize(m, mtq.INT8_DEFAULT_CFG, lambda mm: mm.predict(x))
    return m, x


def test_plain_student_keeps_quantizers_and_drops_adapters(tmp_path):
    from kdctl.detectors.yolo import is_qat, load_detector, plain_student, save_checkpoint

    m, x = _quantized_kd_model()
    with torch.no_grad():
        ref = m.predict(x)[0]
    student = plain_student(m)
    assert is_qat(student) and getattr(student, "kd", None) is None
    assert not any(k.startswith("kd.") for k in student.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(student.predict(x)[0], ref)
    save_checkpoint(student, tmp_path / "w.pt", {})
    loaded = load_detector(tmp_path / "w.pt")
    assert is_qat(loaded)
    with torch.no_grad():  # weights are stored in half precision, as Ultralytics does
        torch.testing.assert_close(loaded.predict(x)[0], ref, atol=0.5, rtol=0.02)


# ---- end to end ----------------------------------------------------------------------------------------------------

def _qad_recipe(tmp_path: Path, tiny_data: Path, bundle: Path, epochs: int = 1) -> Path:
    r = tmp_path / "qad.yaml"
    r.write_text(f"""
name: qad
teacher: {{model: {bundle}}}
student: {{model: {bundle}}}
data: {{yolo: {tiny_data}}}
train: {{epochs: {epochs}, imgsz: 128, batch: 8, lr0: 0.0003, optimizer: AdamW, warmup_epochs: 0}}
distill:
  quantize: int8
  auto_balance: 0.25
  losses: [{{name: kd_logit, level: head, params: {{temperature: 2.0}}}}]
""")
    return r


@pytest.fixture(scope="module")
def qat_base(tmp_path_factory, tiny_data) -> Path:
    """The float student QAD starts from: 3 epochs on the tiny data. From the session's 1-epoch student the first
    QAD step back-propagates NaN into the first layers (a finite loss): the run stops (test below); before that
    stop, the bundle it published held all-zero weights (NaN in training) and these tests passed on a model that
    output nothing."""
    d = tmp_path_factory.mktemp("qat-base")
    (d / "base.yaml").write_text(f"name: base\nstudent: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                                 "train: {epochs: 3, imgsz: 128, batch: 8, workers: 0}\n")
    assert CliRunner().invoke(app, ["train", str(d / "base.yaml"), "--out", str(d / "base"), "-q"]).exit_code == 0
    return d / "base"


@pytest.fixture(scope="module")
def qad_bundle(tmp_path_factory, tiny_data, qat_base) -> Path:
    d = tmp_path_factory.mktemp("qad")
    res = CliRunner().invoke(app, ["distill", str(_qad_recipe(d, tiny_data, qat_base)), "--out",
                                   str(d / "qad"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bundle"]  # stdout is JSON only (ModelOpt's chatter goes to stderr)
    return d / "qad"


@pytest.mark.slow
def test_qad_trains_a_fake_quantized_student_with_kd(qad_bundle):
    from kdctl.bundle import load_bundle
    from kdctl.detectors.yolo import is_qat, load_detector

    m = load_bundle(qad_bundle, verify=True).metrics
    assert m["qat"]["quantize"] == "int8" and m["qat"]["enabled"] > 0
    assert m["kd_terms"] and all(t["scale"] for t in m["kd_terms"])
    assert any(v > 0 for k, v in m["epochs"][-1].items() if k.startswith("train/kd_"))
    model = load_detector(qad_bundle / "weights.pt")
    assert is_qat(model) and getattr(model, "kd", None) is None
    weights = [p for n, p in model.named_parameters() if n.endswith("conv.weight")]
    assert weights and all(bool(p.isfinite().all()) and bool(p.any()) for p in weights)


@pytest.mark.slow
def test_qad_whose_weights_go_non_finite_is_stopped_and_publishes_nothing(tmp_path, tiny_data, trained_bundle):
    """From a 1-epoch student the first QAD step's loss is finite but its gradient is NaN in the first layers; the
    run went on and published a bundle of all-zero weights (NaN in training) as a success. It stops at the epoch's
    end, in one line."""
    r = _qad_recipe(tmp_path, tiny_data, trained_bundle)
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "q")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = " ".join(res.output.split())
    assert "training stopped: the student's weights are not finite after epoch 1 (model.0.conv.weight" in line
    assert "quantization-aware training wants a well-trained float student" in line
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_qat_export_is_the_trained_qdq_graph(qad_bundle, tmp_path):
    """ONNX Runtime on the exported INT8 graph matches the fake-quantized PyTorch student (cosine >= 0.99), the
    trained quantizers are not calibrated again (only what training left in float), ONNX Runtime runs every
    quantized convolution as an integer one, float artifacts are skipped, and the OpenVINO IR runs."""
    from kdctl.bundle import load_bundle
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors.yolo import load_detector
    from kdctl.evaluate import torch_backend
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.export.base import cosine
    from kdctl.runtimes.onnxruntime import onnxruntime_backend
    from kdctl.runtimes.openvino import openvino_backend

    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--out", str(tmp_path / "cpu"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["qat"] is True
    b = load_bundle(tmp_path / "cpu", verify=True)
    assert [a["name"] for a in b.metrics["artifacts"]] == ["onnx-int8"]
    assert b.metrics["qat"]["skipped_artifacts"] == ["onnx-fp32"]
    art = b.metrics["artifacts"][0]
    assert art["settings"]["calibration"].startswith("none") and art["parity"]["ok"] is True
    assert art["settings"]["int8_convs"] > 0 and art["settings"]["activations"].startswith("uint8")
    proto = onnx.load(str(b.path / "model-int8.onnx"))
    int8_weights = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4}
    dq = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in dq]
    assert sum(dq[n.input[1]] in int8_weights for n in convs) == len(convs) == art["settings"]["int8_convs"]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(b.path / "model-int8.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == art["settings"]["int8_convs"], fused
    assert art["settings"]["onnxruntime_form"]["used"] is True
    assert art["settings"]["onnxruntime_form"]["cosine_to_trained_graph"] >= 0.99

    ds = load_yolo_yaml(qad_bundle / "data.yaml")
    xs = [to_input([letterbox(load_rgb(p), 128)[0]]) for p in ds.val_images[:4]]
    ref = np.concatenate([torch_backend(load_detector(qad_bundle / "weights.pt"))(x) for x in xs])
    ort_out = np.concatenate([onnxruntime_backend(b.path / "model-int8.onnx")(x) for x in xs])
    assert cosine(ref, ort_out) >= 0.99

    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "intel", "--out", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    ov = load_bundle(tmp_path / "ov", verify=True)
    assert [a["name"] for a in ov.metrics["artifacts"]] == ["openvino-int8"]
    out = openvino_backend(ov.path / "openvino-int8" / "model.xml", "int8")(xs[0])
    assert out.shape == ref[:1].shape and cosine(ref[:1], out) >= 0.99
    assert not (ov.path / "model-int8.onnx").exists()  # only the OpenVINO IR's source; not in an intel bundle


@pytest.mark.slow
@pytest.mark.slow
def test_quiet_export_of_a_qat_student_shows_no_library_deprecation_notice(qad_bundle, tmp_path):
    """ModelOpt's import makes torch 2.14 warn that torch.jit.script is deprecated: under -q that notice printed two
    lines (file and source line) to a CI log with nothing else in it. stdout stays empty."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "export", str(qad_bundle), "--target", "cpu",
                        "--out", str(tmp_path / "e"), "-q"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "deprecated" not in p.stderr and "Warning" not in p.stderr, p.stderr
    assert "Inserted" not in p.stderr, p.stderr  # ModelOpt's count of quantizers, printed as it restores them



def test_qat_export_calibrates_only_onnx_runtimes_form_on_the_calibration_data_given(qad_bundle, tmp_path):
    """The trained ranges are not calibrated, but ONNX Runtime's form calibrates what training left in float: on
    ``--calibration-data`` when given (recorded, and another graph than the train split's), with the trained scales
    the same in both. A target whose INT8 is the trained graph alone (OpenVINO) calibrates nothing and refuses
    the folder in one line, as before."""
    from PIL import Image

    from kdctl.bundle import load_bundle

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(8):  # dark frames: other ranges than the training images
        Image.new("RGB", (128, 96), (3 * i, 2 * i, i)).save(frames / f"f{i}.png")
    run = CliRunner()
    res = run.invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--calibration-data", str(frames),
                           "--out", str(tmp_path / "cal"), "-q"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "cal", verify=True)
    assert b.manifest["inputs"]["calibration_data"]["images"] == 8
    (art,) = b.metrics["artifacts"]
    assert art["settings"]["calibration_images"] == 8 and art["settings"]["onnxruntime_form"]["used"] is True
    assert run.invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--out", str(tmp_path / "d"),
                            "-q"]).exit_code == 0

    def scales(path):  # quantizer scales by the tensor they quantize
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}

    cal, default = scales(tmp_path / "cal" / "model-int8.onnx"), scales(tmp_path / "d" / "model-int8.onnx")
    assert cal.keys() == default.keys()
    differ = {t for t in cal if cal[t] != default[t]}
    trained = _trained_tensors(qad_bundle)
    assert differ and not differ & trained, sorted(differ & trained)  # calibration moved only untrained scales
    res = run.invoke(app, ["export", str(qad_bundle), "--target", "intel", "--calibration-data", str(frames),
                           "--out", str(tmp_path / "ov")])  # (ModelOpt's restore chatter reaches this runner too)
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "ov").exists()
    assert res.output.strip().splitlines()[-1].startswith(f"Error: --calibration-data {frames}: no artifact of this "
                                                         "export is calibrated (openvino-int8")
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(frames.iterdir())[:2]:
        (few / f.name).write_bytes(f.read_bytes())
    res = run.invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--calibration-data", str(few),
                           "--out", str(tmp_path / "few-out")])
    assert res.exit_code == 2 and not (tmp_path / "few-out").exists()
    assert " ".join(res.output.split()).endswith(
        f"Error: --calibration-data {few}: it holds 2 images; INT8 calibration needs at least 8 (ONNX Runtime's form "
        "of a quantization-aware student calibrates what training left in float; give --data or --calibration-data, "
        "or export its trained graph alone with --artifact openvino-int8)")


def _trained_tensors(bundle) -> set[str]:
    """The tensors a QAT bundle's trained graph quantizes (activations and weights)."""
    import tempfile

    from kdctl.bundle import load_bundle
    from kdctl.detectors.yolo import load_detector
    from kdctl.export.onnx import export_onnx
    from kdctl.export.quantize import strip_quantizers

    imgsz = int(load_bundle(bundle).metrics["imgsz"])
    with tempfile.TemporaryDirectory() as d:
        m = onnx.load(str(export_onnx(load_detector(bundle / "weights.pt"), Path(d) / "q.onnx", imgsz, opset=17)))
    return set(strip_quantizers(m)[0])


def test_qat_export_falls_back_to_the_trained_graph_where_onnx_runtimes_form_departs_from_it(qad_bundle, tmp_path,
                                                                                            monkeypatch):
    """Where ONNX Runtime's form does not compute what the trained graph computes (cosine under 0.99 over the
    calibration images; here made so by negating its output), or cannot be built (a calibrator failing), the export
    writes the trained graph, as before this form existed, and records why; it is still checked against PyTorch and
    passes."""
    import onnxruntime as ort

    import kdctl.export.quantize as quantize
    from kdctl.bundle import load_bundle

    real = quantize.quantize_qat_onnxruntime

    def departing(trained, out_path, *args, **kwargs):  # the real form, its output negated
        settings = real(trained, out_path, *args, **kwargs)
        m = onnx.load(str(out_path))
        y = m.graph.output[0].name
        next(n for n in m.graph.node if y in n.output).output[:] = [f"{y}_before"]
        m.graph.node.append(helper.make_node("Neg", [f"{y}_before"], [y]))
        onnx.save(m, str(out_path))
        return settings

    monkeypatch.setattr(quantize, "quantize_qat_onnxruntime", departing)
    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--out", str(tmp_path / "e"), "-q"])
    assert res.exit_code == 0, res.output
    (art,) = load_bundle(tmp_path / "e", verify=True).metrics["artifacts"]
    form = art["settings"]["onnxruntime_form"]
    assert form["used"] is False and form["cosine_to_trained_graph"] < 0.99, form
    assert f"(cosine {form['cosine_to_trained_graph']:.4f}, under 0.99)" in form["note"]
    assert "slower than FP32" in form["note"] and art["settings"]["activations"] == "uint8 (zero point 128)"
    assert art["parity"]["ok"] is True and art["parity"]["cosine"] >= 0.99
    assert not (tmp_path / "e" / "model-int8.ort.onnx").exists()
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "e" / "model-int8.onnx"), opts, providers=["CPUExecutionProvider"])
    assert "QLinearConv" not in [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    def failing(*a, **k):  # ONNX Runtime's histogram calibrators on a near-constant tensor
        raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")

    monkeypatch.setattr(quantize, "quantize_qat_onnxruntime", failing)
    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--calibration-method", "entropy",
                                   "--out", str(tmp_path / "f"), "-q"])
    assert res.exit_code == 0, res.output
    (art,) = load_bundle(tmp_path / "f", verify=True).metrics["artifacts"]
    assert art["settings"]["onnxruntime_form"] == {"used": False, "note": (
        "ONNX Runtime's integer form (the tensors training left in float quantized too, entropy over 24 images) could "
        "not be built (ValueError: Too many bins for data range. Cannot create 2048 finite-sized bins.); this is the "
        "trained graph, whose convolutions ONNX Runtime runs in float: slower than FP32 (docs/benchmarks.md). For CPU "
        "speed export this student for the intel (OpenVINO) target, or use post-training INT8")}
    assert art["parity"]["ok"] is True


def test_a_qat_export_interrupted_inside_onnx_runtimes_form_stops_instead_of_falling_back(qad_bundle, tmp_path,
                                                                                          monkeypatch):
    """A library that turns the KeyboardInterrupt raised in the Python it calls into its own error (OpenVINO's
    frontend does) must not make the export take the interruption for that form's failure and carry on with the
    trained graph: Ctrl-C (recorded by the CLI's handler, as here) stops the run, nothing is published."""
    import signal

    import kdctl.export.quantize as quantize
    from kdctl import faults

    def interrupted(*a, **k):
        faults.record_signal(signal.SIGINT)
        raise RuntimeError("Check 'false' failed: KeyboardInterrupt")

    monkeypatch.setattr(quantize, "quantize_qat_onnxruntime", interrupted)
    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--out", str(tmp_path / "e")])
    assert res.exit_code == 130, res.output
    assert "Interrupted (nothing half-written was published)" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()


def test_qat_export_with_only_float_artifacts_is_one_line(qad_bundle, tmp_path):
    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--artifact", "onnx-fp32", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "exports INT8 only" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("stage", ["train", "distill"])
def test_quantization_aware_training_from_random_weights_is_refused(tmp_path, tiny_data, trained_bundle, stage):
    """A student built from its model YAML has nothing for the ranges to be calibrated on (yolo11n and yolo26n: every
    gradient non-finite at the first step, Ultralytics' own quantize=8 too): one line before any work, exit 2."""
    teacher = f"teacher: {{model: {trained_bundle}}}\n" if stage == "distill" else ""
    losses = ", losses: [{name: kd_logit}]" if stage == "distill" else ""
    r = tmp_path / "q.yaml"
    r.write_text(f"name: q\n{teacher}student: {{model: yolo26n.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                 f"train: {{epochs: 1, imgsz: 128}}\ndistill: {{quantize: int8{losses}}}\n")
    line = refused_in_one_line([stage, str(r), "--out", str(tmp_path / "x")], tmp_path / "x")
    assert "q.yaml: distill.quantize: int8 fine-tunes a trained student" in line
    assert "'yolo26n.yaml' is a model config with random weights" in line
    # no command takes it: recipe check refuses it in the same words, where it printed OK
    assert refused_in_one_line(["recipe", "check", str(r)], tmp_path / "x") == line


def test_quantize_field_is_validated(tmp_path, tiny_data):
    r = tmp_path / "bad.yaml"
    r.write_text(f"student: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\ndistill: {{quantize: int4}}\n")
    res = CliRunner().invoke(app, ["recipe", "check", str(r)])
    assert res.exit_code != 0 and "distill.quantize" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_training_from_a_checkpoint_starts_from_its_weights(tmp_path, tiny_data, trained_bundle):
    """A student given as a bundle is fine-tuned, not re-initialised (Ultralytics drops a checkpoint's weights
    unless ``pretrained`` is set). With a learning rate of 1e-9 the weights must come back unchanged."""
    from kdctl.detectors.yolo import load_detector
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    r = tmp_path / "ft.yaml"
    r.write_text(f"""
name: ft
student: {{model: {trained_bundle}}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, lr0: 1.0e-9, optimizer: AdamW, warmup_epochs: 0, warmup_bias_lr: 0.0}}
""")
    out = run_training(load_recipe(r), stage="train", source=str(r), out=tmp_path / "ft").path
    before = load_detector(trained_bundle / "weights.pt").state_dict()
    after = load_detector(out / "weights.pt").state_dict()
    convs = [k for k in before if k.endswith("conv.weight")]
    assert convs and all(torch.allclose(before[k], after[k], atol=1e-3) for k in convs)


@pytest.mark.slow
def test_qad_resume_after_kill(tmp_path, tiny_data, qat_base):
    """SIGKILL after epoch 1 of 2, then --resume: the quantizers and their ranges come back from the checkpoint."""
    from kdctl.bundle import load_bundle
    from kdctl.detectors.yolo import is_qat, load_detector

    r = _qad_recipe(tmp_path, tiny_data, qat_base, epochs=2)
    out = tmp_path / "qad"
    argv = ["distill", str(r), "--out", str(out)]
    kill_at(argv, "train:epoch-saved@1")
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    b = load_bundle(out, verify=True)
    assert len(b.metrics["epochs"]) == 2 and b.metrics["qat"]["enabled"] > 0
    assert is_qat(load_detector(out / "weights.pt"))
    assert not (tmp_path / ".qad.work").exists()


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("student,loss", [("rtdetr_bundle", "detr_logit"),
                                          ("'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'", "roi_kd")])
def test_qad_of_other_families_exports_their_qdq_graph(tmp_path, tiny_data, request, student, loss):
    """RT-DETR and Faster R-CNN students train with fake quantization too (backbone and neck/FPN quantized; the
    transformer decoder, or the RPN and RoI heads, kept float as their post-training INT8 keeps them): the Q/DQ ONNX
    matches the fake-quantized PyTorch model in ONNX Runtime, and its OpenVINO IR too. The Faster R-CNN student's
    ranges are calibrated with BatchNorm on batch statistics (on a barely trained student, running statistics near
    their initial values shrink deep activations to ~1e-10 and made every gradient NaN)."""
    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector
    from kdctl.detectors.yolo import is_qat

    run = CliRunner()
    if student.endswith("_bundle"):  # the session's trained student of that family, its own teacher here
        base = request.getfixturevalue(student)
    else:  # trained here at the QAD's 64 px (a Faster R-CNN keeps the input size it was built for)
        base = tmp_path / "base"
        (tmp_path / "base.yaml").write_text(f"name: base\nstudent: {{model: {student}}}\ndata: {{yolo: {tiny_data}}}\n"
                                            "train: {epochs: 1, imgsz: 64, batch: 4}\n")
        assert run.invoke(app, ["train", str(tmp_path / "base.yaml"), "--out", str(base), "-q"]).exit_code == 0
    qad = tmp_path / "qad.yaml"
    qad.write_text(f"name: q\nstudent: {{model: {base}}}\nteacher: {{model: {base}}}\n"
                   f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 64, batch: 4, lr0: 0.0003, "
                   f"warmup_epochs: 0}}\ndistill: {{quantize: int8, losses: [{{name: {loss}}}]}}\n")
    res = run.invoke(app, ["distill", str(qad), "--out", str(tmp_path / "q"), "--json"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "q", verify=True)
    assert 0 < b.metrics["qat"]["enabled"] < b.metrics["qat"]["quantizers"]  # the float part's are off
    (epoch,) = b.metrics["epochs"]
    kd = {k: v for k, v in epoch.items() if k.startswith("train/kd_")}
    assert kd and all(v > 0 for v in kd.values())
    assert all(math.isfinite(v) for k, v in epoch.items() if k.startswith("train/"))
    assert is_qat(load_detector(tmp_path / "q" / "weights.pt"))
    for target, artifact in (("cpu", "onnx-int8"), ("intel", "openvino-int8")):
        res = run.invoke(app, ["export", str(tmp_path / "q"), "--target", target, "--out", str(tmp_path / target)])
        assert res.exit_code == 0, res.output
        (art,) = load_bundle(tmp_path / target, verify=True).metrics["artifacts"]
        assert art["name"] == artifact and art["parity"]["ok"] and art["parity"]["cosine"] >= 0.99
        if target == "cpu":
            assert art["settings"]["int8_convs"] > 0 and art["settings"]["calibration"].startswith("none")
            # ONNX Runtime's integer form matches RT-DETR's trained graph; this barely trained Faster R-CNN's it does
            # not (0.96; another 1-epoch one trained by the CLI: 0.999998), and the trained graph is written, saying why
            form = art["settings"]["onnxruntime_form"]
            assert form["used"] or (form["cosine_to_trained_graph"] < 0.99 and "slower than FP32" in form["note"])


def test_quantization_aware_training_is_refused_where_init_auto_falls_back_to_random_weights(tmp_path, tiny_data,
                                                                                               trained_bundle):
    """distill.init: auto with a student the teacher's weights cannot fill (another layer layout) falls back to a
    random start; with distill.quantize that is QAT from random weights again: one line naming why, exit 2."""
    r = tmp_path / "q.yaml"
    r.write_text(f"name: q\nteacher: {{model: {trained_bundle}}}\nstudent: {{model: yolo26n.yaml}}\n"
                 f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 128}}\n"
                 "distill: {init: auto, quantize: int8, losses: [{name: kd_logit}]}\n")
    line = refused_in_one_line(["distill", str(r), "--out", str(tmp_path / "x")], tmp_path / "x")
    assert "distill.init: auto leaves 'yolo26n.yaml' at random weights here (the teacher has" in line


def test_qat_export_at_a_static_batch_calibrates_and_checks_in_groups(qad_bundle, tmp_path):
    """--batch 3 on a quantization-aware student: its trained Q/DQ graph and ONNX Runtime's form (calibrated on 8
    images in groups of 3) take 3 images a call, both checked against the fake-quantized student."""
    import onnx

    from kdctl.bundle import load_bundle

    res = CliRunner().invoke(app, ["export", str(qad_bundle), "--target", "cpu", "--batch", "3",
                                   "--calibration-images", "8", "--out", str(tmp_path / "b3"), "-q"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "b3", verify=True)
    (a,) = b.metrics["artifacts"]
    assert a["name"] == "onnx-int8" and a["settings"]["batch"] == 3 and a["parity"]["images"] == 8
    assert a["metrics"]["images"] == 8 and a["parity"]["ok"] is not False
    dim = onnx.load(str(tmp_path / "b3" / a["files"][0])).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3


def test_a_quantization_aware_teacher_is_not_cut_to_the_datasets_classes():
    """Its class convolutions carry per-channel quantizers, which a cut would drop or misalign: such a teacher is
    read whole (refused for head KD where its classes differ, as before), never as a different model."""
    from kdctl.detectors import keep_classes

    m, _ = _quantized_kd_model()
    m.names = {0: "a", 1: "b", 2: "c"}
    assert type(m.model[-1].cv3[0][-1]) is not torch.nn.Conv2d  # ModelOpt's quantized convolution
    assert keep_classes(m, [2, 0], ["c", "a"]) is None
