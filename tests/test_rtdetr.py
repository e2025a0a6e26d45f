"""Ultralytics RT-DETR as a detector family: the dense output, set-aware parity, what INT8 keeps in float, and the
chain train -> export (ONNX, OpenVINO) -> profile -> gate on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at
from kdctl.cli.main import app
from kdctl.models import ASSET_MODELS

TINY = ASSET_MODELS / "rtdetr-tiny.yaml"


def test_family_dispatch():
    from kdctl.detectors import family, rtdetr, yolo

    assert family(str(TINY)) is rtdetr and family("rtdetr-l.yaml") is rtdetr
    assert family("yolov8n.yaml") is yolo and family(str(ASSET_MODELS / "yolov8-tiny.yaml")) is yolo
    assert family(rtdetr.build_detector(TINY, 3)) is rtdetr


def test_dense_output_scales_boxes_to_input_pixels_and_applies_sigmoid():
    """Raw last-layer boxes (normalised cx, cy, w, h) and logits -> (N, 4 + nc, Q) in pixels of a 64x128 input."""
    from kdctl.detectors.rtdetr import DenseOutput

    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.125], [0.1, 0.9, 0.2, 0.4]]])       # (N=1, Q=2, 4)
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])                            # (N, Q, nc=2)

    class Stub(torch.nn.Module):
        def forward(self, x):
            first = (boxes * 0 + 9, logits * 0 + 9)  # earlier decoder layers: must be ignored
            return None, (torch.stack([first[0], boxes]), torch.stack([first[1], logits]), None, None, None)

    y = DenseOutput(Stub())(torch.zeros(1, 3, 64, 128))  # H = 64, W = 128
    assert y.shape == (1, 6, 2)
    expected_boxes = [[64.0, 16.0, 64.0, 8.0], [12.8, 57.6, 25.6, 25.6]]
    torch.testing.assert_close(y[0, :4].T, torch.tensor(expected_boxes))
    torch.testing.assert_close(y[0, 4:].T, torch.sigmoid(logits[0]))


def _queries(rng, n=40, nc=3, size=128.0):
    boxes = rng.uniform(8, size - 8, (n, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (n, nc)).astype(np.float32)
    return np.concatenate([boxes, scores], 1).T[None]  # (1, 4 + nc, Q)


def test_align_outputs_pairs_a_permuted_set_exactly():
    from kdctl.export.base import align_sets as align_outputs

    ref = _queries(np.random.default_rng(0))
    cand = ref[:, :, np.random.default_rng(1).permutation(ref.shape[2])]
    assert np.abs(ref - cand).max() > 1  # position by position they differ ...
    r, c, info = align_outputs(ref, cand)
    assert np.array_equal(r, c)          # ... as sets they are the same
    assert info == {"queries_compared": 20, "queries_unmatched": 0}  # the more confident half


def test_align_outputs_tolerates_a_few_swapped_queries_but_not_many():
    from kdctl.export.base import align_sets as align_outputs

    rng = np.random.default_rng(2)
    ref = _queries(rng)
    conf = ref[0, 4:].max(0)
    top = np.argsort(-conf)[:20]
    one = ref.copy()
    one[0, 0, top[3]] += 40.0            # one confident query is another anchor's (moved 40 px of 128)
    r, c, info = align_outputs(ref, one)
    assert info["queries_unmatched"] == 1 and np.abs(r - c).max() < 1e-6
    many = ref.copy()
    many[0, 0, top[:6]] += 40.0          # 6 of 20: a real difference, compared and reported
    r, c, info = align_outputs(ref, many)
    assert info["queries_unmatched"] == 0 and np.abs(r - c).max() >= 40.0 - 1e-3


def test_int8_keeps_the_decoder_float_and_quantizes_the_cnn(tmp_path):
    import onnx

    from kdctl.detectors import float_tail, rtdetr
    from kdctl.export.onnx import export_onnx

    m = rtdetr.build_detector(TINY, 3).eval()
    p = export_onnx(m, tmp_path / "m.onnx", 64, opset=17)
    nodes = [(n.name, n.op_type) for n in onnx.load(str(p)).graph.node]
    kept = set(float_tail(nodes, m))
    convs = [n for n, op in nodes if op == "Conv"]
    decoder = [n for n, _ in nodes if "/model.22/" in n or n.startswith("/model/model.22")]
    assert decoder and all(n in kept for n in decoder)
    backbone = [n for n in convs if "model.22" not in n]
    assert backbone and not any(n in kept for n in backbone)


@pytest.mark.long
@pytest.mark.slow
def test_rtdetr_chain_train_export_profile_gate(rtdetr_bundle, tmp_path):
    from kdctl.bundle import load_bundle
    from kdctl.detectors import rtdetr
    from kdctl.detectors.yolo import load_detector

    assert isinstance(load_detector(rtdetr_bundle / "weights.pt"), rtdetr.RTDETRDetectionModel)
    run = CliRunner()
    res = run.invoke(app, ["eval", str(rtdetr_bundle), "--out", str(tmp_path / "eval"), "--json"])
    assert res.exit_code == 0, res.output
    assert 0 <= json.loads(res.stdout)["map50_95"] <= 1
    res = run.invoke(app, ["export", str(rtdetr_bundle), "--target", "cpu", "--calibration-images", "8", "--out",
                           str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "cpu", verify=True)
    arts = {a["name"]: a for a in b.metrics["artifacts"]}
    assert set(arts) == {"onnx-fp32", "onnx-int8"} and b.metrics["opset"] >= rtdetr.MIN_OPSET
    assert arts["onnx-fp32"]["parity"]["ok"] is True and arts["onnx-fp32"]["parity"]["queries_compared"] > 0
    assert arts["onnx-int8"]["settings"]["excluded_nodes"] > 0  # the decoder stays float
    res = run.invoke(app, ["export", str(rtdetr_bundle), "--target", "intel", "--artifact", "openvino-fp32",
                           "--artifact", "openvino-bf16", "--artifact", "openvino-int8", "--calibration-images", "8",
                           "--out", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    ov = {a["name"]: a for a in load_bundle(tmp_path / "ov", verify=True).metrics["artifacts"]}
    assert ov["openvino-fp32"]["parity"]["ok"] is True and ov["openvino-int8"]["metrics"] is not None
    assert ov["openvino-bf16"]["parity"]["ok"] is True  # one top-k over the queries: held to bf16's tolerance
    res = run.invoke(app, ["export", str(rtdetr_bundle), "--target", "jetson", "--calibration-images", "8", "--out",
                           str(tmp_path / "jetson")])
    assert res.exit_code == 0, res.output  # the TensorRT-form Q/DQ graph passes TensorRT's operator and Q/DQ rules
    jet = load_bundle(tmp_path / "jetson", verify=True)
    assert (jet.path / "build_engine.sh").is_file() and (jet.path / "model-int8.onnx").is_file()
    res = run.invoke(app, ["profile", str(tmp_path / "cpu"), "--runs", "5", "--warmup", "1", "--out",
                           str(tmp_path / "prof"), "--json"])
    assert res.exit_code == 0, res.output
    res = run.invoke(app, ["gate", str(tmp_path / "prof"), "--min-map", "0.0", "--out", str(tmp_path / "gate")])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_rtdetr_resume_after_kill(tmp_path, tiny_data):
    """SIGKILL after epoch 1 of 2, then --resume: Ultralytics' RT-DETR trainer continues, the bundle verifies."""
    from kdctl.bundle import load_bundle

    r = tmp_path / "rt.yaml"
    r.write_text(f"name: rt\nstudent: {{model: rtdetr-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                 "train: {epochs: 2, imgsz: 64, batch: 8}\n")
    argv = ["train", str(r), "--out", str(tmp_path / "rt")]
    kill_at(argv, "train:epoch-saved@1")
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "rt", verify=True)
    assert [e["epoch"] for e in b.metrics["epochs"]] == [1, 2]
    assert not (tmp_path / ".rt.work").exists()
