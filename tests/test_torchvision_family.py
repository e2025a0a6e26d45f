"""torchvision's Faster R-CNN as a detector family: built without weights, trained by kdctl's own loop (resume,
non-finite stop), the dense output, and the chain to ONNX / OpenVINO exports and a profile."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at, superset_frcnn
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

    stub = Stub()
    stub.transform = m.net.transform  # the size the canvases are seen at
    m.net = stub
    y = m(torch.zeros(2, 3, 64, 64))
    assert y.shape == (2, 7, DETECTIONS)
    torch.testing.assert_close(y[0, :, 0], torch.tensor([20.0, 40.0, 20.0, 40.0, 0.0, 0.0, 0.9]))
    torch.testing.assert_close(y[1, :, 1], torch.tensor([4.0, 2.0, 8.0, 4.0, 0.25, 0.0, 0.0]))
    assert float(y[:, :, 2:].abs().sum()) == 0.0  # padding


def _recipe(tmp_path, tiny_data, epochs: int = 1, lr0: float = 0.01):
    r = tmp_path / "fr.yaml"
    r.write_text(f"name: fr\nstudent: {{model: '{BUILDER}'}}\ndata: {{yolo: {tiny_data}}}\n"
                 f"train: {{epochs: {epochs}, imgsz: 64, batch: 8, lr0: {lr0}, optimizer: SGD}}\n")
    return r


@pytest.mark.long
@pytest.mark.slow
def test_faster_rcnn_chain_train_export_profile(tmp_path, frcnn_bundle):
    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector

    run = CliRunner()
    fr = frcnn_bundle
    b = load_bundle(fr, verify=True)
    assert b.metrics["epochs"][0]["train/loss_objectness"] > 0
    model = load_detector(fr / "weights.pt")
    assert isinstance(model, TorchvisionDetector) and model.nc == 3
    res = run.invoke(app, ["export", str(fr), "--target", "cpu", "--calibration-images", "8", "--out",
                           str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    arts = {a["name"]: a for a in load_bundle(tmp_path / "cpu", verify=True).metrics["artifacts"]}
    assert arts["onnx-fp32"]["parity"]["ok"] is True and arts["onnx-int8"]["metrics"] is not None
    res = run.invoke(app, ["profile", str(tmp_path / "cpu"), "--runs", "3", "--warmup", "1", "--out",
                           str(tmp_path / "prof")])
    assert res.exit_code == 0, res.output
    # its weights.pt as a checkpoint file (copied out of the bundle: inside it, it is the bundle): scored at the size
    # it was trained at, to the bundle's own mAP
    shutil.copy(fr / "weights.pt", tmp_path / "frcnn.pt")
    res = run.invoke(app, ["eval", str(tmp_path / "frcnn.pt"), "--data", str(fr / "data.yaml"), "--out",
                           str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    ev = load_bundle(tmp_path / "ev").metrics
    assert ev["imgsz"] == b.metrics["imgsz"] and ev["map50_95"] == b.metrics["map50_95"]


def test_a_two_stage_model_of_more_classes_is_scored_on_the_datasets_by_name(tmp_path, tiny_data, frcnn_bundle):
    """``kdctl eval coco_frcnn.pt --data person_car.yaml``: a Faster R-CNN of more classes, its names including the
    dataset's in another order, is scored on the dataset's classes, found by name: its detections of other classes
    are dropped (its softmax stays over all of its classes: as pycocotools scores a subset of categories). Here the
    other classes never score, so the detections and the mAP are the bundle's own model's. It was refused ('3
    classes but ... predicts 5')."""
    from kdctl.bundle import load_bundle
    from kdctl.detectors import keep_classes, load_detector
    from kdctl.detectors.torchvision import save_checkpoint
    from kdctl.evaluate import torch_backend
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input

    own = load_detector(frcnn_bundle / "weights.pt")
    names = [own.names[i] for i in range(3)]
    big = superset_frcnn(own, ["dog", names[2], "cat", names[0], names[1]])
    save_checkpoint(big, tmp_path / "big.pt", {})
    kept = keep_classes(big, [3, 4, 1], names)
    assert (kept.nc, kept.names, big.kept) == (5, dict(enumerate(names)), None)  # a copy; its classifier unchanged
    images = sorted((tiny_data.parent / "images" / "val").glob("*.png"))
    x = to_input([letterbox(load_rgb(f), 128)[0] for f in images[:4]])
    mine, theirs = torch_backend(own)(x), torch_backend(kept)(x)
    assert (mine[:, 4:] > 0.001).sum() > 0 and mine.shape == theirs.shape  # detections to compare
    torch.testing.assert_close(torch.from_numpy(theirs), torch.from_numpy(mine), atol=1e-4, rtol=1e-4)
    # a detection of a class it does not keep is dropped, not given to a kept one
    only = torch_backend(keep_classes(own, [1], [names[1]]))(x)
    assert only.shape[1] == 5 and np.array_equal(only[:, 4], mine[:, 5]) and np.array_equal(only[:, :4], mine[:, :4])
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "big.pt"), "--data", str(tiny_data),
                                   "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    picked = {"model_nc": 5, "index": {names[0]: 3, names[1]: 4, names[2]: 1}}
    ev = load_bundle(tmp_path / "ev")
    assert json.loads(res.stdout)["classes"] == ev.manifest["inputs"]["classes"] == picked
    assert ev.metrics["map50_95"] == pytest.approx(load_bundle(frcnn_bundle).metrics["map50_95"], abs=1e-4)


# the chain's other targets, apart so that a worker takes them beside the chain (each export is tens of seconds)
@pytest.mark.long
@pytest.mark.slow
def test_faster_rcnn_exports_for_intel(tmp_path, frcnn_bundle):
    from kdctl.bundle import load_bundle

    res = CliRunner().invoke(app, ["export", str(frcnn_bundle), "--target", "intel", "--calibration-images", "8",
                                   "--out", str(tmp_path / "ov")])  # the whole preset: fp32, fp16, bf16, int8
    assert res.exit_code == 0, res.output
    ov = {a["name"]: a for a in load_bundle(tmp_path / "ov", verify=True).metrics["artifacts"]}
    assert ov["openvino-fp32"]["parity"]["ok"] is True
    for half in ("openvino-fp16", "openvino-bf16"):  # judged on mAP (PARITY_ON_MAP), the differences recorded
        p = ov[half]["parity"]
        assert p["ok"] is None and p["judged_on"] == "mAP" and "box_max_abs" in p, (half, p)
        assert ov[half]["metrics"]["map50_95_drop"] is not None
    assert ov["openvino-int8"]["settings"]["converted_from"] == "onnx"
    assert ov["openvino-int8"]["settings"]["tool"] == "nncf" and ov["openvino-int8"]["settings"]["ignored_ops"] > 0


@pytest.mark.long
@pytest.mark.slow
def test_faster_rcnn_exports_at_another_size_and_for_jetson(tmp_path, frcnn_bundle):
    from kdctl.bundle import load_bundle

    run, fr = CliRunner(), frcnn_bundle
    res = run.invoke(app, ["export", str(fr), "--target", "cpu", "--imgsz", "96", "--calibration-images", "8",
                           "--out", str(tmp_path / "cpu96")])  # another size than the training's 128
    assert res.exit_code == 0, res.output
    at96 = {a["name"]: a for a in load_bundle(tmp_path / "cpu96", verify=True).metrics["artifacts"]}
    assert at96["onnx-fp32"]["parity"]["ok"] is True and at96["onnx-int8"]["metrics"] is not None
    res = run.invoke(app, ["export", str(fr), "--target", "jetson", "--calibration-images", "8",
                           "--out", str(tmp_path / "jetson")])
    assert res.exit_code == 0, res.output
    jet = load_bundle(tmp_path / "jetson", verify=True).metrics
    assert jet["skipped_artifacts"] == {"onnx-fp16": "not available for this detector family"}
    assert {a["name"] for a in jet["artifacts"]} >= {"onnx-fp32", "onnx-int8"}


def test_half_precision_detections_are_judged_on_map_and_a_wrong_shape_still_fails():
    """In fp16 or bf16 a two-stage detector keeps other proposals where scores tie, so whole detections differ from
    PyTorch's (a failed raw check on a sound export): such artifacts are judged on mAP, the differences recorded.
    FP32 stays held to PyTorch's outputs, and so do the other families in half precision."""
    import numpy as np

    from kdctl.detectors import parity_on_map, rtdetr
    from kdctl.detectors.torchvision import TorchvisionDetector
    from kdctl.export.base import validate_outputs
    from kdctl.models import ASSET_MODELS

    m = TorchvisionDetector(BUILDER.split(":")[1], nc=3, imgsz=64)
    assert parity_on_map(m, "bf16") and parity_on_map(m, "fp16")
    assert not parity_on_map(m, "fp32") and not parity_on_map(m, "int8")
    assert not parity_on_map(rtdetr.build_detector(ASSET_MODELS / "rtdetr-tiny.yaml", 3), "bf16")
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(8, 120, (1, 4, 40)), rng.uniform(0, 1, (1, 3, 40))], 1).astype(np.float32)
    other = ref.copy()
    other[0, 0, :] += 40.0  # every detection another box: far beyond any tolerance
    x = [np.zeros((1, 3, 64, 64), np.float32)]
    strict = validate_outputs(lambda _: ref, lambda _: other, x, 128, "bf16", sets=True)
    assert strict["ok"] is False and strict["box_max_abs"] >= 40.0 - 1e-3
    judged = validate_outputs(lambda _: ref, lambda _: other, x, 128, "bf16", sets=True, on_map=True)
    assert judged["ok"] is None and judged["judged_on"] == "mAP" and "tolerance" not in judged
    assert judged["box_max_abs"] == strict["box_max_abs"]  # recorded all the same
    short = validate_outputs(lambda _: ref, lambda _: ref[:, :, :20], x, 128, "bf16", sets=True, on_map=True)
    assert short["ok"] is False  # a wrong output shape is a broken export whatever the precision


def test_eval_runs_at_the_canvas_size_not_the_training_size():
    """A model trained at 64 px given 96-px canvases (``eval --imgsz 96``, the export's PyTorch reference at 96)
    detects at 96, as its export to 96 does; torchvision resized them to 64 inside the model, so a Faster R-CNN
    exported at any other size failed parity (cosine 0.67), fp32 included. The training size it records stays."""
    import copy

    from kdctl.detectors.torchvision import TorchvisionDetector

    torch.manual_seed(0)
    m = TorchvisionDetector(BUILDER.split(":")[1], 3, 64).eval()
    at96 = copy.deepcopy(m)
    at96.pin_input_size(96)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        y, ref = m(x), at96(x)
    assert (ref[:, 4:] > 0).any()  # real detections, not two empty sets
    assert torch.equal(y, ref)
    assert m.imgsz == 64 and m.checkpoint()["imgsz"] == 64


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
    assert res.output.strip().endswith("lower train.lr0")  # a run without KD terms: no KD weights to lower
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.work").exists()


def test_non_finite_loss_of_a_quantization_aware_run_says_what_qat_wants(tmp_path, tiny_data, frcnn_bundle,
                                                                           monkeypatch):
    """Quantization-aware training that diverges (a barely trained student, a high lr0): the one line points to a
    well-trained float start and a low lr0, where ranges calibrated on the student decide."""
    from kdctl.detectors.torchvision import TorchvisionDetector

    real = TorchvisionDetector.forward

    def nan_loss(self, x, targets=None):
        out = real(self, x, targets)
        return {k: v * float("nan") for k, v in out.items()} if self.training else out

    monkeypatch.setattr(TorchvisionDetector, "forward", nan_loss)
    r = tmp_path / "q.yaml"
    r.write_text(f"name: q\nstudent: {{model: {frcnn_bundle}}}\ndata: {{yolo: {tiny_data}}}\n"
                 "train: {epochs: 1, imgsz: 128, batch: 8, lr0: 0.01, optimizer: SGD}\ndistill: {quantize: int8}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1, res.output
    assert "loss is not finite at epoch 1" in res.output and "lower train.lr0; quantization-aware training wants a " \
        "well-trained float student to start from" in " ".join(res.output.split())
    assert not (tmp_path / "x").exists()


def test_fine_tuning_takes_the_recipes_input_size(tmp_path, tiny_data, frcnn_bundle):
    """A checkpoint built at 128 px and fine-tuned (or QAD-trained) at 64 sees kdctl's 64-px canvases as they are and
    records 64: it kept its own size, resized every batch to 128 inside the model, and its INT8 export failed parity
    (cosine 0.81)."""
    from kdctl.detectors import load_detector

    r = tmp_path / "ft.yaml"
    r.write_text(f"name: ft\nstudent: {{model: {frcnn_bundle}}}\ndata: {{yolo: {tiny_data}}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8, lr0: 0.001, optimizer: SGD}\n")
    assert load_detector(frcnn_bundle / "weights.pt").imgsz == 128
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "ft"), "-q"])
    assert res.exit_code == 0, res.output
    m = load_detector(tmp_path / "ft" / "weights.pt")
    assert m.imgsz == 64 and m.net.transform.min_size == (64,) and m.net.transform.max_size == 64


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


def _rpn_peak(m, x) -> float:
    """max over anchors of ``sum_c relu(conv(features))_c``, the RPN head's hidden activation summed."""
    seen = []
    h = m.net.rpn.head.conv.register_forward_hook(lambda mod, i, o: seen.append(float(o.sum(1).max())))
    with torch.no_grad():
        m(x)
    h.remove()
    return max(seen)


def test_export_runs_images_without_region_proposals(tmp_path):
    """A trained two-stage detector finds no region proposal on some images (all objectness below the RPN's score
    threshold): the exported graph must give the same empty result there as PyTorch, in ONNX Runtime and OpenVINO,
    instead of failing (a traced ``reshape(0, -1)``) - and carry no ``If`` node (OpenVINO 2026.4 answers wrongly from
    the scripted empty-guard of ``batched_nms`` on the first run of some images)."""
    import math

    import numpy as np
    import onnx

    from kdctl.detectors.torchvision import TorchvisionDetector
    from kdctl.export.onnx import export_onnx
    from kdctl.export.openvino import export_openvino
    from kdctl.runtimes.onnxruntime import onnxruntime_backend
    from kdctl.runtimes.openvino import openvino_backend

    torch.manual_seed(0)
    m = TorchvisionDetector(BUILDER.split(":")[1], nc=3, imgsz=96).eval()
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 96, 96), dtype=np.float32), np.full((1, 3, 96, 96), 0.5, np.float32)]
    peaks = [_rpn_peak(m, torch.from_numpy(x)) for x in images]
    busy, empty = (0, 1) if peaks[0] > peaks[1] else (1, 0)
    # objectness = w * sum_c hidden_c + b at every anchor, with the RPN score threshold (0.05) half-way between the
    # two images' peaks, 2 logits apart: one image has region proposals, the other none
    w = 4.0 / abs(peaks[0] - peaks[1])
    with torch.no_grad():
        m.net.rpn.head.cls_logits.weight.fill_(w)
        m.net.rpn.head.cls_logits.bias.fill_(math.log(0.05 / 0.95) - w * (peaks[0] + peaks[1]) / 2)
        ref = [m(torch.from_numpy(x)).numpy() for x in images]
    assert np.abs(ref[empty]).sum() == 0 and np.abs(ref[busy]).sum() > 0  # no proposals -> no detections

    m.example_input = images[busy]
    onnx_path = export_onnx(m, tmp_path / "m.onnx", 96)
    assert "If" not in {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    xml = export_openvino(onnx_path, tmp_path / "ov", "fp32")
    for run in (onnxruntime_backend(onnx_path), openvino_backend(xml, "fp32")):
        outs = [run(x) for x in images]
        assert outs[empty].shape == ref[empty].shape and np.abs(outs[empty]).sum() == 0
        # an untrained RoI head scores its boxes in near-ties, which NMS may break differently: only "detects"
        assert outs[busy].shape == ref[busy].shape and (outs[busy][0, 4:].max(0) > 0).sum() > 0


def test_mps_trains_where_ultralytics_would(tmp_path, tiny_data):
    """``train.device: mps`` runs a YOLO on the CPU where there is no Apple GPU (Ultralytics' rule); the Faster R-CNN
    loop refused it as 'a CUDA GPU' (exit 2) instead. Now it follows the same rule."""
    r = tmp_path / "mps.yaml"
    r.write_text(_recipe(tmp_path, tiny_data).read_text().replace("optimizer: SGD}", "optimizer: SGD, device: mps}"))
    assert "device: mps" in r.read_text()
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0 and "CUDA" not in res.output, res.output
    assert (tmp_path / "m" / "weights.pt").is_file()
    from kdctl.bundle import load_bundle

    assert load_bundle(tmp_path / "m").metrics["train_device"] == ("mps" if torch.backends.mps.is_available() else
                                                                   "cpu")  # where it ran; the recipe says mps


def _saved_forms(tmp_path):
    """One Faster R-CNN (MobileNetV3-Large FPN, 3 classes + background) saved the ways users save theirs."""
    import argparse

    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    net = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4).eval()
    sd = net.state_dict()
    frozen = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # DDP, frozen BN
    forms = {"state_dict": sd, "ddp_frozen_bn": frozen,  # torchvision's references: checkpoint.pth
             "references": {"model": sd, "optimizer": {}, "epoch": 3,
                            "args": argparse.Namespace(model="fasterrcnn_mobilenet_v3_large_fpn")},
             "whole": net}
    for name, obj in forms.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    return net


def test_a_users_own_faster_rcnn_weights_load_as_the_model_they_are(tmp_path):
    """``torch.save(model)``, its state dict (DDP prefix and frozen BatchNorm too) and torchvision's references'
    ``checkpoint.pth`` load as that detector: the builder whose shapes they have, the classes from the box predictor,
    and the same detections as the user's model (at the input size it is given)."""
    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector

    net = _saved_forms(tmp_path)
    x = torch.rand(2, 3, 256, 256)  # 4800 anchors: more proposals than either RPN keeps
    net.transform.min_size, net.transform.max_size = (256,), 256
    with torch.no_grad():
        ref = TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", 3, 256).eval()
        ref.net = net
        want = ref(x)
    assert int((want[:, 4:] > 0).sum()) > 0  # detections to compare
    # a bare state dict cannot tell the two MobileNetV3 builders apart (same shapes): the 320 one
    builders = {"state_dict": ("fasterrcnn_mobilenet_v3_large_320_fpn", 320),
                "ddp_frozen_bn": ("fasterrcnn_mobilenet_v3_large_320_fpn", 320),
                "references": ("fasterrcnn_mobilenet_v3_large_fpn", 800),
                "whole": ("fasterrcnn_mobilenet_v3_large_fpn", 800)}
    for name, (builder, imgsz) in builders.items():
        m = load_detector(tmp_path / f"{name}.pt")
        assert isinstance(m, TorchvisionDetector) and not m.training, name
        assert (m.builder, m.nc, m.imgsz, m.names) == (builder, 3, imgsz, {0: "0", 1: "1", 2: "2"}), name
        with torch.no_grad():
            got = m(x)
        if builder == "fasterrcnn_mobilenet_v3_large_fpn":
            assert torch.equal(got, want), name
        else:  # the same weights; the 320 builder's RPN keeps 150 proposals per image instead of 1000
            assert got.shape == want.shape and not torch.equal(got, want), name
            ref.net.rpn._pre_nms_top_n["testing"] = ref.net.rpn._post_nms_top_n["testing"] = 150
            with torch.no_grad():
                assert torch.equal(got, ref(x)), name
            ref.net.rpn._pre_nms_top_n["testing"] = ref.net.rpn._post_nms_top_n["testing"] = 1000


def test_a_whole_faster_rcnn_keeps_its_own_proposal_settings(tmp_path):
    """A model a user built with other proposal counts and NMS thresholds (``rpn_pre_nms_top_n_test=300``...) was
    rebuilt with the builder's (1000 proposals, NMS 0.7/0.5): other detections than the user's model gives. They are
    kept, and travel in kdctl's own checkpoint; a checkpoint written before them gets the builder's."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector, from_checkpoint, proposal_settings

    torch.manual_seed(0)
    mine = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=40, rpn_nms_thresh=0.6, rpn_score_thresh=0.01,
                box_nms_thresh=0.3)
    net = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=256,
                                            max_size=256, **mine).eval()
    torch.save(net, tmp_path / "whole.pt")
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", 3, 256).eval()
        default = ref(x)
        ref.net = net
        want = ref(x)
    assert not torch.equal(default, want)  # the settings change the detections
    m = load_detector(tmp_path / "whole.pt")
    expected = {"rpn_pre_nms_top_n": {"training": 2000, "testing": 300},
                "rpn_post_nms_top_n": {"training": 2000, "testing": 40}, "rpn_nms_thresh": 0.6,
                "rpn_score_thresh": 0.01, "box_nms_thresh": 0.3}
    assert proposal_settings(m.net) == expected
    with torch.no_grad():
        assert torch.equal(m(x), want)
    ckpt = m.checkpoint()
    assert proposal_settings(from_checkpoint(ckpt).net) == expected
    del ckpt["proposals"]  # a checkpoint kdctl wrote before they were kept
    assert proposal_settings(from_checkpoint(ckpt).net) == proposal_settings(TorchvisionDetector(m.builder, 3,
                                                                                                256).net)


@pytest.mark.parametrize("what, says", [
    ("image_std", "image_std ((0.5, 0.5, 0.5)) are not torchvision's fasterrcnn_mobilenet_v3_large_320_fpn defaults"),
    ("mask_head", "a torchvision detector's weights (3 classes) that none of kdctl's builders takes"),
    ("no_classes", "roi_heads.box_predictor.cls_score.weight is not a (classes + 1, features) weight"),
])
def test_faster_rcnn_weights_kdctl_cannot_rebuild_are_one_line(tmp_path, tiny_data, what, says):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from kdctl.detectors.torchvision import CLS_SCORE

    torch.manual_seed(0)
    std = [0.5, 0.5, 0.5] if what == "image_std" else None
    net = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4, image_std=std)
    obj = net if what == "image_std" else dict(net.state_dict())
    if what == "mask_head":  # Mask R-CNN's weights: the box predictor and more
        obj["roi_heads.mask_head.0.0.weight"] = torch.zeros(256, 256, 3, 3)
    if what == "no_classes":
        obj[CLS_SCORE] = torch.zeros(1, 1024)
    torch.save(obj, tmp_path / "user.pt")
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "user.pt"), "--data", str(tiny_data), "--out",
                                   str(tmp_path / "ev")])
    assert res.exit_code != 0 and res.exception is None or isinstance(res.exception, SystemExit), res.output
    line = " ".join(res.output.split())
    assert "Traceback" not in res.output and f"cannot load checkpoint '{tmp_path / 'user.pt'}'" in line, line
    assert says in line, line
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_a_users_faster_rcnn_weights_are_scored_taught_from_and_fine_tuned(tmp_path, tiny_data, frcnn_bundle):
    """A trained Faster R-CNN saved as torchvision's references save it (``{"model": state_dict, "args": ...}``)
    scores what kdctl's own checkpoint of the same weights scores, teaches a distillation, and a bare state dict of
    it is fine-tuned as the student."""
    import argparse

    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector

    m = load_detector(frcnn_bundle / "weights.pt")
    teacher, student = tmp_path / "checkpoint.pth", tmp_path / "student.pt"
    torch.save({"model": m.net.state_dict(), "epoch": 1, "args": argparse.Namespace(model=m.builder)}, teacher)
    torch.save(m.net.state_dict(), student)
    run = CliRunner()
    scores = []
    for i, model in enumerate((frcnn_bundle, teacher)):
        res = run.invoke(app, ["eval", str(model), "--data", str(tiny_data), "--imgsz", "128", "--out",
                               str(tmp_path / f"ev{i}")])
        assert res.exit_code == 0, res.output
        scores.append(load_bundle(tmp_path / f"ev{i}", verify=True).metrics)
    assert scores[0]["map50_95"] > 0 and scores[1]["map50_95"] == scores[0]["map50_95"]
    assert scores[1]["per_class_ap50_95"] == scores[0]["per_class_ap50_95"]  # class k is torchvision's label k + 1
    r = tmp_path / "kd.yaml"
    r.write_text(f"name: user-frcnn\nstudent: {{model: '{student}'}}\nteacher: {{model: '{teacher}'}}\n"
                 f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 64, batch: 8, lr0: 0.001, optimizer: SGD}}\n"
                 "distill: {losses: [{name: roi_kd, params: {temperature: 2.0}}]}\n")
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    assert b.manifest["inputs"]["teacher"]["sha256"] == _file_sha(teacher)
    assert b.metrics["epochs"][0]["train/kd_roi_kd"] > 0
    tuned = load_detector(tmp_path / "kd" / "weights.pt")
    assert (tuned.builder, tuned.nc, tuned.imgsz) == ("fasterrcnn_mobilenet_v3_large_320_fpn", 3, 64)


def test_a_coco_layout_model_saved_without_names_is_read_with_torchvisions_coco_categories(tmp_path, tiny_data):
    """A Faster R-CNN state dict of torchvision's COCO layout (91 outputs: background, 80 categories, 10 unused
    'N/A' ids), as ``torch.save(fasterrcnn_resnet50_fpn(weights="DEFAULT").state_dict())`` writes it, names no
    classes; kdctl names them with torchvision's COCO categories, so the model is scored, taught from and
    fine-tuned on a person/car set by name (they were placeholders '0'...'89', taken for none of the dataset's).
    Another class count stays unnamed."""
    import yaml

    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector

    torch.manual_seed(0)
    coco, other = tmp_path / "coco.pt", tmp_path / "other.pt"
    torch.save(TorchvisionDetector(BUILDER.split(":")[1], 90, 64).net.state_dict(), coco)
    torch.save(TorchvisionDetector(BUILDER.split(":")[1], 5, 64).net.state_dict(), other)
    m = load_detector(coco)
    assert (m.nc, m.names[0], m.names[2], m.names[11], m.names[89]) == (90, "person", "car", "N/A", "toothbrush")
    assert load_detector(other).names == {i: str(i) for i in range(5)}
    data = tmp_path / "person-car.yaml"
    data.write_text(yaml.safe_dump({**yaml.safe_load(tiny_data.read_text()), "names": ["person", "car", "dog"]}))
    picked = {"model_nc": 90, "index": {"person": 0, "car": 2, "dog": 17}}
    res = CliRunner().invoke(app, ["eval", str(coco), "--data", str(data), "--imgsz", "64", "--out",
                                   str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["classes"] == picked, res.output
    r = tmp_path / "ft.yaml"
    r.write_text(f"name: ft\nstudent: {{model: '{coco}'}}\nteacher: {{model: '{coco}'}}\ndata: {{yolo: {data}}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8}\ndistill: {losses: [{name: rpn_kd}]}\n")
    res = CliRunner().invoke(app, ["recipe", "check", str(r), "--models", "--json"])
    assert res.exit_code == 0, res.output
    checked = json.loads(res.stdout)  # fine-tuned from its rows of those names, teaching its detections of them
    assert checked["student_classes"] == checked["teacher_classes"] == picked


def _file_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(m) -> dict:
    """A Faster R-CNN's box predictor rows per torchvision label (0: background): classification weight and bias,
    and its 4 box-regression weight rows and biases."""
    p = m.net.roi_heads.box_predictor
    c, b = p.cls_score, p.bbox_pred
    return {k: [t.detach().clone() for t in (c.weight[k], c.bias[k], b.weight[4 * k:4 * k + 4],
                                             b.bias[4 * k:4 * k + 4])] for k in range(c.out_features)}


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_checkpoint_of_other_classes_keeps_its_class_rows_by_name():
    """A Faster R-CNN checkpoint fine-tuned on a dataset of other classes, as Ultralytics loads a YOLO one: each
    dataset class the checkpoint names (case and spaces aside) keeps its classification and box rows at the
    dataset's index, a class it lacks starts fresh, the background row stays; the same classes in another order are
    reordered. It kept its 5-way predictor and took the dataset's names over it, so the dataset's class 0 trained
    the checkpoint's class 0 ('x' here) and the model predicted classes the dataset does not have."""
    from pathlib import Path

    from torch import nn
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    from kdctl.data.resolve import Dataset
    from kdctl.detectors.torchvision import TorchvisionDetector, with_classes
    from kdctl.errors import KdctlError

    def data(*names):
        return Dataset(Path("d.yaml"), list(names), [], [])

    builder = BUILDER.split(":")[1]
    torch.manual_seed(0)
    m = TorchvisionDetector(builder, 5, 64, dict(enumerate(["x", " Triangle", "y", "circle", "square"])))
    before = _rows(m)
    assert with_classes(m, data("circle", "square", "triangle", "hexagon"), seed=1) == [3, 4, 1, -1]
    after = _rows(m)
    assert m.nc == 4 and m.names == {0: "circle", 1: "square", 2: "triangle", 3: "hexagon"} and len(after) == 5
    for t, s in ((0, 0), (1, 4), (2, 5), (3, 2)):  # background; circle, square, triangle from labels 4, 5, 2
        assert _same(after[t], before[s]), (t, s)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        fresh = FastRCNNPredictor(m.net.roi_heads.box_predictor.cls_score.in_features, 5)
    assert _same(after[4], [fresh.cls_score.weight[4], fresh.cls_score.bias[4], fresh.bbox_pred.weight[16:20],
                            fresh.bbox_pred.bias[16:20]])  # hexagon: fresh, from the seed
    with torch.no_grad():
        assert m.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 4 + 4, 100)  # predicts the dataset's 4 classes

    # the same classes in another order: reordered; in the same order, or names matching nothing at the same
    # count (a checkpoint that names none): kept whole, by index
    m = TorchvisionDetector(builder, 3, 64, dict(enumerate(["square", "triangle", "circle"])))
    before = _rows(m)
    assert with_classes(m, data("circle", "square", "triangle")) == [2, 0, 1]
    assert [_same(_rows(m)[t], before[s]) for t, s in ((0, 0), (1, 3), (2, 1), (3, 2))] == [True] * 4
    kept = m.net.roi_heads.box_predictor
    assert with_classes(m, data("Circle", "square", "triangle")) is None and m.net.roi_heads.box_predictor is kept
    m.names = {0: "0", 1: "1", 2: "2"}
    assert with_classes(m, data("circle", "square", "triangle")) is None and m.net.roi_heads.box_predictor is kept
    assert m.names == {0: "circle", 1: "square", 2: "triangle"}
    assert with_classes(m, data("cat", "dog")) == [-1, -1] and m.nc == 2  # nothing matches, other count: fresh
    assert m.net.roi_heads.box_predictor.cls_score.out_features == 3

    class QuantLinear(nn.Linear):  # what ModelOpt puts in a quantization-aware model
        pass

    p = m.net.roi_heads.box_predictor
    p.cls_score = QuantLinear(p.cls_score.in_features, 3)
    with pytest.raises(KdctlError, match="quantization-aware .* of 2 classes .* cannot be fine-tuned on 3"):
        with_classes(m, data("cat", "dog", "owl"))

    # the rule, as Ultralytics' DetectionModel.load applies it: a name given twice is its last class
    ds = data("circle", "square")
    assert ds.start_index(["circle", "square"], 2) is None and ds.start_index(["a", "b"], 2) is None
    assert ds.start_index(["square", "circle"], 2) == [1, 0] and ds.start_index(["a", "square"], 2) == [-1, 1]
    assert ds.start_index(["circle", "x", "circle", "square"], 4) == [2, 3]
    assert ds.start_index({0: "0", 1: "1", 2: "2"}, 3) == [-1, -1]  # names none: nothing found, other count
    assert ds.start_index(["circle", "square", "cat"], 2) is None  # names beyond its classes are not its own


@pytest.mark.slow
def test_fine_tuning_a_checkpoint_of_more_classes_trains_the_datasets_by_name(tmp_path, tiny_data):
    """kdctl train of a Faster R-CNN checkpoint of 5 classes on the 3-class set: the bundle's model predicts the 3,
    each started from the checkpoint's rows of its name (at a learning rate too small to move them); the run says so
    and the bundle records it."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import TorchvisionDetector, save_checkpoint

    names = load_yolo_yaml(tiny_data).names
    torch.manual_seed(0)
    m = TorchvisionDetector(BUILDER.split(":")[1], 5, 64, dict(enumerate(["dog", names[2], "cat", names[0],
                                                                           names[1]])))
    save_checkpoint(m, tmp_path / "big.pt", {})
    r = tmp_path / "ft.yaml"
    r.write_text(f"name: ft\nstudent: {{model: big.pt}}\ndata: {{yolo: {tiny_data}}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8, lr0: 1.0e-12, warmup_epochs: 0, optimizer: SGD}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "ft"), "--json"])
    assert res.exit_code == 0, res.output
    start = {"model_nc": 5, "index": {names[0]: 3, names[1]: 4, names[2]: 1}}
    assert json.loads(res.stdout)["student_classes"] == start
    assert json.loads((tmp_path / "ft" / "manifest.json").read_text())["inputs"]["student"]["classes"] == start
    tuned = load_detector(tmp_path / "ft" / "weights.pt")
    assert tuned.nc == 3 and tuned.names == dict(enumerate(names))
    old, new = _rows(m), _rows(tuned)
    for t, s in ((0, 0), (1, 4), (2, 5), (3, 2)):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(new[t], old[s])), (t, s)


def test_the_loops_flip_momentum_and_weight_decay_are_the_recipes(tmp_path, tiny_data):
    """train.fliplr, momentum and weight_decay, as Ultralytics names them, set kdctl's Faster R-CNN loop's
    horizontal flip probability and optimizer; left out, torchvision's references' (0.5, 0.9, 1e-4)."""
    import random

    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors.torchvision import Trainer, _Images

    images = load_yolo_yaml(tiny_data).train_images[:4]
    plain = [t["boxes"] for _, t in _Images(images, 128, augment=False)]
    random.seed(0)
    assert all(torch.equal(t["boxes"], p) for (_, t), p in zip(_Images(images, 128, True, fliplr=0.0), plain))
    random.seed(0)
    flipped = [not torch.equal(t["boxes"], p) for (_, t), p in zip(_Images(images, 128, True, fliplr=1.0), plain)]
    assert all(flipped)

    def optimizer(**args):
        tr = Trainer.__new__(Trainer)
        tr.model, tr.kd, tr.args = torch.nn.Linear(2, 2), None, args
        return tr._optimizer().param_groups[0]

    sgd = optimizer(lr0=0.02)
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.9, 1e-4)
    sgd = optimizer(lr0=0.02, momentum=0.8, weight_decay=5e-4)
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.8, 5e-4)
    adam = optimizer(lr0=0.001, optimizer="AdamW", momentum=0.85, weight_decay=0.01)
    assert (adam["betas"], adam["weight_decay"]) == ((0.85, 0.999), 0.01)
    assert optimizer(lr0=0.001, optimizer="AdamW")["betas"] == (0.9, 0.999)


def test_the_loops_schedule_follows_lrf_and_cos_lr():
    """train.lrf and cos_lr give kdctl's Faster R-CNN loop Ultralytics' schedules, per step: linear from lr0 to
    lr0 * lrf, or a half cosine between them; left out, the loop's own linear decay to 1 %. The warm-up ramps each."""
    from collections import defaultdict

    from kdctl.detectors.torchvision import Trainer, lr_scale

    # hand-computed: step 5 of 10 after a 2-step warm-up is halfway through the decay
    assert lr_scale(5, 2, 10) == pytest.approx(0.5)
    assert lr_scale(9, 2, 10) == pytest.approx(0.1) and lr_scale(10, 2, 10) == pytest.approx(0.01)
    assert lr_scale(5, 2, 10, lrf=0.2) == pytest.approx(0.5 * 0.8 + 0.2)
    assert lr_scale(10, 2, 10, lrf=0.2) == pytest.approx(0.2)
    assert lr_scale(5, 2, 10, lrf=0.2, cos=True) == pytest.approx(0.6)  # cos(pi/2) = 0: the midpoint
    assert lr_scale(2, 2, 10, lrf=0.2, cos=True) == pytest.approx(1 - 0.8 * (1 - math.cos(0.2 * math.pi)) / 2)
    assert lr_scale(10, 2, 10, cos=True) == pytest.approx(0.01)  # Ultralytics' lrf when only cos_lr is given
    assert lr_scale(0, 4, 10, lrf=0.2) == pytest.approx(0.25)  # first warm-up step: a quarter of the rate

    def last_lr(**args):  # the rate of the last of 4 steps of the loop's epoch
        tr = Trainer.__new__(Trainer)
        w = torch.nn.Parameter(torch.ones(2))
        tr.model, tr.kd, tr.args, tr.epoch = torch.nn.Linear(1, 1), None, args, 0
        tr.device, tr.callbacks, tr.world = torch.device("cpu"), defaultdict(list), 1
        tr.train_loader = [(torch.zeros(1), [])] * 4
        tr.step = lambda x, targets: {"loss": (w ** 2).sum()}
        opt = torch.optim.SGD([w], lr=0.1)
        tr._train_one_epoch(opt, 1, 4, 0.1)
        return opt.param_groups[0]["lr"]

    assert last_lr() == pytest.approx(0.1 * 0.25)
    assert last_lr(lrf=0.5) == pytest.approx(0.1 * (0.25 * 0.5 + 0.5))
    assert last_lr(lrf=0.5, cos_lr=True) == pytest.approx(0.1 * (1 - 0.5 * (1 - math.cos(0.75 * math.pi)) / 2))
