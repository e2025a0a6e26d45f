"""Two-stage distillation end to end on torchvision's Faster R-CNN: RPN-, RoI- and feature-level terms in kdctl's
own training loop, per-term logging, auto-balance, resume after a kill, export of the distilled student, and the
pairs and levels it refuses in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from conftest import kill_at, refused_in_one_line, superset_frcnn
from kdctl.cli.main import app

STUDENT = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
SAME_ANCHORS_TEACHER = "torchvision:fasterrcnn_mobilenet_v3_large_fpn"
LOSSES = ("[{name: rpn_kd, params: {temperature: 2.0}}, {name: roi_kd, params: {temperature: 2.0}}, "
          "{name: roi_mimic}, {name: pkd, level: neck}, {name: fgfi, level: neck}]")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher checkpoint file (the MobileNetV3 FPN builder: the student's anchor layout)."""
    import torch

    from kdctl.detectors.torchvision import TorchvisionDetector, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(TorchvisionDetector(SAME_ANCHORS_TEACHER.split(":")[1], nc=3, imgsz=64), path, {})
    return path


def _recipe(tmp_path, data, teacher, losses=LOSSES, epochs=1, student=STUDENT, balance_batches=8):
    r = tmp_path / "kd.yaml"
    r.write_text(f"name: frkd\nstudent: {{model: '{student}'}}\nteacher: {{model: '{teacher}'}}\n"
                 f"data: {{yolo: {data}}}\ntrain: {{epochs: {epochs}, imgsz: 64, batch: 4, lr0: 0.01, "
                 f"optimizer: SGD}}\ndistill: {{auto_balance: 0.25, balance_batches: {balance_batches}, "
                 f"losses: {losses}}}\n")
    return r


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_distill_two_stage_logs_every_level_and_exports(tmp_path, tiny_data, teacher_ckpt):
    from kdctl.bundle import load_bundle

    before = _sha(teacher_ckpt)
    run = CliRunner()
    res = run.invoke(app, ["distill", str(_recipe(tmp_path, tiny_data, teacher_ckpt)), "--out", str(tmp_path / "kd"),
                           "--json"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    terms = {t["name"]: t for t in b.metrics["kd_terms"]}
    assert set(terms) == {"rpn_kd", "roi_kd", "roi_mimic", "pkd", "fgfi"}
    assert terms["rpn_kd"]["student_layers"] == ["rpn"] and terms["roi_mimic"]["teacher_layers"] == ["roi"]
    assert terms["pkd"]["student_layers"] == ["net.backbone[0]", "net.backbone[1]"]
    assert terms["pkd"]["teacher_layers"] == ["net.backbone[0]", "net.backbone[1]"]  # same stride, same key
    assert all(t["scale"] > 0 for t in terms.values())  # auto-balance settled a scale for every term
    epoch = b.metrics["epochs"][0]
    assert all(epoch[f"train/kd_{n}"] > 0 for n in terms) and epoch["train/loss_objectness"] > 0, json.dumps(epoch)
    assert _sha(teacher_ckpt) == before
    assert b.manifest["parents"] == [] or all(p for p in b.manifest["parents"])
    res = run.invoke(app, ["export", str(tmp_path / "kd"), "--target", "cpu", "--artifact", "onnx-fp32",
                           "--out", str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    art = load_bundle(tmp_path / "cpu", verify=True).metrics["artifacts"][0]
    assert art["parity"]["ok"] is True  # the published student carries no KD adapters or hooks


@pytest.mark.slow
def test_two_stage_distill_resumes_after_a_kill(tmp_path, tiny_data, teacher_ckpt):
    from kdctl.bundle import load_bundle

    argv = ["distill", str(_recipe(tmp_path, tiny_data, teacher_ckpt, losses="[{name: roi_mimic}]", epochs=2,
                                balance_batches=4)),
            "--out", str(tmp_path / "kd")]
    kill_at(argv, "train:epoch-saved@1")
    ckpt_dir = tmp_path / ".kd.work" / "train"
    import torch

    saved = torch.load(ckpt_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    scales = saved["kd_state"]["balance"]["scales"]
    assert scales is not None and saved["kd_state"]["weights"] is not None
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    assert [e["epoch"] for e in b.metrics["epochs"]] == [1, 2]
    assert b.metrics["kd_terms"][0]["scale"] == pytest.approx(scales[0])  # the balance of the killed run
    assert not (tmp_path / ".kd.work").exists()


@pytest.mark.parametrize("losses,student,teacher,message", [
    ("[{name: rpn_kd}]", STUDENT, "torchvision:fasterrcnn_resnet50_fpn",
     "distill.losses[0]: 'rpn_kd': the RPN anchor layouts differ"),
    ("[{name: kd_logit}]", STUDENT, SAME_ANCHORS_TEACHER, "'kd_logit' is a dense-head loss for YOLO detectors"),
    ("[{name: roi_kd, level: rpn}]", STUDENT, SAME_ANCHORS_TEACHER, "distill.losses[0].level: 'roi_kd' applies at roi, not 'rpn'"),
    ("[{name: pkd, student_layers: [net.nothing]}]", STUDENT, SAME_ANCHORS_TEACHER,
     "distill.losses[0].student_layers: no module 'net.nothing'"),
    ("[{name: pkd, level: neck, strides: [16]}]", STUDENT, SAME_ANCHORS_TEACHER,
     "distill.losses[0].strides: no student map of layers ['net.backbone[0]', 'net.backbone[1]'] is at stride 16 at "
     "imgsz 64; their strides: 32"),
    ("[{name: cwd}]", STUDENT, "yolov8-tiny.yaml", "teacher.model: a YOLO teacher"),
    ("[{name: kd_logit}]", "yolov8-tiny.yaml", SAME_ANCHORS_TEACHER, "'kd_logit' needs a YOLO teacher's dense head"),
    ("[{name: ld}]", "yolov8-tiny.yaml", SAME_ANCHORS_TEACHER, "or through its final detections (det_kd)"),
    ("[{name: roi_kd}]", "yolov8-tiny.yaml", "yolov8-tiny.yaml", "distill.losses[0]: 'roi_kd' reads the RoI head of two-stage (torchvision) detectors"),
])
def test_two_stage_pairs_and_levels_refused_in_one_line(tmp_path, tiny_data, losses, student, teacher, message):
    r = _recipe(tmp_path, tiny_data, teacher, losses=losses, student=student)
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd")])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output, res.output
    assert str(r) in res.output
    assert not (tmp_path / "kd").exists()


@pytest.mark.slow
def test_faster_rcnn_teacher_teaches_a_yolo_student_at_matching_strides(tmp_path, tiny_data):
    """Cross-family: the ResNet-50 FPN's P3-P5 maps pair with the YOLO neck's P3-P5 by stride (P2 has no partner);
    the teacher runs only its transform and backbone + FPN."""
    from kdctl.bundle import load_bundle

    r = _recipe(tmp_path, tiny_data, "torchvision:fasterrcnn_resnet50_fpn", student="yolov8-tiny.yaml",
                losses="[{name: pkd, level: neck}]")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    term = b.metrics["kd_terms"][0]
    assert term["student_layers"] == [15, 18, 21]
    assert term["teacher_layers"] == ["net.backbone[1]", "net.backbone[2]", "net.backbone[3]"]
    assert b.metrics["epochs"][0]["train/kd_pkd"] > 0


@pytest.mark.slow
def test_a_faster_rcnn_teacher_of_more_classes_teaches_its_detections_of_the_datasets(tmp_path, tiny_data,
                                                                                      frcnn_bundle):
    """A Faster R-CNN teacher of more classes than the dataset (a COCO one for a person/car set), its names including
    the dataset's in another order: det_kd takes its detections of the dataset's classes, found by name (its other
    classes' detections dropped), so with other classes that never score the run is its own-classes teacher's, step
    for step; the bundle records the selection. RoI KD, which compares its classifier with the student's, is
    refused in one line; RoI mimic (features only) is taken. Both were refused ('the student predicts 3 and the
    teacher 5')."""
    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector
    from kdctl.detectors.torchvision import save_checkpoint

    own = load_detector(frcnn_bundle / "weights.pt")
    names = [own.names[i] for i in range(3)]
    save_checkpoint(superset_frcnn(own, [names[1], "dog", names[0], "cat", names[2]]), tmp_path / "big.pt", {})
    outs = {}
    for name, teacher in (("own", frcnn_bundle), ("superset", tmp_path / "big.pt")):
        r = tmp_path / f"{name}.yaml"
        r.write_text(f"name: {name}\nteacher: {{model: '{teacher}'}}\nstudent: {{model: yolov8-tiny.yaml}}\n"
                     f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}\n"
                     "distill: {losses: [{name: det_kd, params: {min_score: 0.01}}]}\n")
        res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        outs[name] = load_bundle(tmp_path / name, verify=True)
    own_b, sup = outs["own"], outs["superset"]
    assert sup.manifest["inputs"]["teacher"]["classes"] == {"model_nc": 5,
                                                             "index": {names[0]: 2, names[1]: 0, names[2]: 4}}
    assert "classes" not in own_b.manifest["inputs"]["teacher"]
    kd = [b.metrics["epochs"][0]["train/kd_det_kd"] for b in (own_b, sup)]
    assert kd[0] > 0 and kd[1] == pytest.approx(kd[0], rel=1e-4)
    # scored on the dataset's classes: its own-classes model's mAP (that teacher is a bundle scored alike)
    assert sup.metrics["teacher"]["map50_95"] == pytest.approx(load_bundle(frcnn_bundle).metrics["map50_95"],
                                                               abs=1e-4)
    r = _recipe(tmp_path, tiny_data, tmp_path / "big.pt", losses="[{name: roi_kd}]")
    says = refused_in_one_line(["distill", str(r), "--out", str(tmp_path / "roi")], tmp_path / "roi")
    assert "'roi_kd' needs the same classes, but the student predicts 3 and the teacher 5" in says
    # its RoI-pooled features alone need no classes in common (RoI mimic): taken, as distill would take it
    r = _recipe(tmp_path, tiny_data, tmp_path / "big.pt", losses="[{name: roi_mimic}]")
    res = CliRunner().invoke(app, ["recipe", "check", str(r), "--models", "--json"])
    assert res.exit_code == 0 and [t["loss"] for t in json.loads(res.stdout)["kd_terms"]] == ["roi_mimic"], res.output
