"""torchvision's Faster R-CNN as a detector family: built without weights, trained by kdctl's own loop (resume,
non-finite stop), the dense output, and the chain to ONNX / OpenVINO exports and a profile."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at
from kdctl.cli.main import app

BUILDER = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"


def test_dense_output_pads_and_one_hot_scores():
    """Detections (xyxy, score, label 1..nc) -> (N, 4 + nc, 100): cx, cy, w, h and the score in its class row."""
    from kdctl.detectors.torchvision import DETECTIONS, TorchvisionDetector

    m = TorchvisionDetector(BUILDER.split(":")[1], nc=3, imgsz=64).eval()

    class Stub(torch.nn.Module):
        def forward(self, images, targets=None):
            return [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 4.0]]),
                     "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([3, 1])}
                    for _ in images]

    m.net = Stub()
    y = m(torch.zeros(2, 3, 64, 64))
    assert y.shape == (2, 7, DETECTIONS)
    torch.testing.assert_close(y[0, :, 0], torch.tensor([20.0, 40.0, 20.0, 40.0, 0.0, 0.0, 0.9]))
    torch.testing.assert_close(y[1, :, 1], torch.tensor([4.0, 2.0, 8.0, 4.0, 0.25, 0.0, 0.0]))
    assert float(y[:, :, 2:].abs().sum()) == 0.0  # padding


def _recipe(tmp_path, tiny_data, epochs: int = 1, lr0: float = 0.01, imgsz: int = 64):
    r = tmp_path / "fr.yaml"
    r.write_text(f"name: fr\nstudent: {{model: '{BUILDER}'}}\ndata: {{yolo: {tiny_data}}}\n"
                 f"train: {{epochs: {epochs}, imgsz: {imgsz}, batch: 8, lr0: {lr0}, optimizer: SGD}}\n")
    return r


@pytest.mark.slow
def test_faster_rcnn_chain_train_export_profile(tmp_path, tiny_data):
    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector

    run = CliRunner()
    res = run.invoke(app, ["train", str(_recipe(tmp_path, tiny_data, epochs=2, imgsz=128)), "--out", str(tmp_path / "fr")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "fr", verify=True)
    assert b.metrics["epochs"][0]["train/loss_objectness"] > 0
    model = load_detector(tmp_path / "fr" / "weights.pt")
    assert isinstance(model, TorchvisionDetector) and model.nc == 3
    res = run.invoke(app, ["export", str(tmp_path / "fr"), "--target", "cpu", "--calibration-images", "16", "--out",
                           str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    arts = {a["name"]: a for a in load_bundle(tmp_path / "cpu", verify=True).metrics["artifacts"]}
    assert arts["onnx-fp32"]["parity"]["ok"] is True and arts["onnx-int8"]["metrics"] is not None
    res = run.invoke(app, ["export", str(tmp_path / "fr"), "--target", "intel", "--artifact", "openvino-fp32",
                           "--artifact", "openvino-int8", "--calibration-images", "16", "--out", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    ov = {a["name"]: a for a in load_bundle(tmp_path / "ov", verify=True).metrics["artifacts"]}
    assert ov["openvino-fp32"]["parity"]["ok"] is True
    assert ov["openvino-int8"]["settings"]["converted_from"] == "onnx (Q/DQ)"
    res = run.invoke(app, ["export", str(tmp_path / "fr"), "--target", "jetson", "--calibration-images", "16",
                           "--out", str(tmp_path / "jetson")])
    assert res.exit_code == 0, res.output
    jet = load_bundle(tmp_path / "jetson", verify=True).metrics
    assert jet["skipped_artifacts"] == {"onnx-fp16": "not available for this detector family"}
    assert {a["name"] for a in jet["artifacts"]} >= {"onnx-fp32", "onnx-int8"}
    res = run.invoke(app, ["profile", str(tmp_path / "cpu"), "--runs", "3", "--warmup", "1", "--out",
                           str(tmp_path / "prof")])
    assert res.exit_code == 0, res.output


def test_non_finite_loss_stops_the_run_in_one_line(tmp_path, tiny_data, monkeypatch):
    from kdctl.detectors.torchvision import TorchvisionDetector

    real = TorchvisionDetector.forward

    def nan_loss(self, x, targets=None):
        out = real(self, x, targets)
        return {k: v * float("nan") for k, v in out.items()} if self.training else out

    monkeypatch.setattr(TorchvisionDetector, "forward", nan_loss)
    res = CliRunner().invoke(app, ["train", str(_recipe(tmp_path, tiny_data)), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1, res.output
    assert "loss is not finite at epoch 1" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.work").exists()


@pytest.mark.slow
def test_resume_after_kill(tmp_path, tiny_data):
    from kdctl.bundle import load_bundle

    argv = ["train", str(_recipe(tmp_path, tiny_data, epochs=2)), "--out", str(tmp_path / "fr")]
    kill_at(argv, "train:epoch-saved@1")
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "fr", verify=True)
    assert [e["epoch"] for e in b.metrics["epochs"]] == [1, 2]
    assert not (tmp_path / ".fr.work").exists()
