"""DETR-family distillation: the Hungarian-matched logit loss against a brute-force search over assignments, and
RT-DETR distillation end to end (logit + feature levels, cross-family RT-DETR <-> YOLO at the feature level,
resume after a kill, export of the distilled student)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at
from kdctl.cli.main import app
from kdctl.distill.losses.detr import DETRLogitDistillation


def _giou(a, b) -> float:
    """GIoU of two cx, cy, w, h boxes, written out."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _kl(t: float, s: float, T: float) -> float:
    p, q = 1 / (1 + math.exp(-t / T)), 1 / (1 + math.exp(-s / T))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_detr_logit_matches_by_brute_force_and_weights_by_teacher_confidence():
    g = torch.Generator().manual_seed(11)
    layers, n, q, qt, nc, T = 2, 2, 4, 3, 2, 2.0
    s = {"boxes": torch.rand(layers, n, q, 4, generator=g) * 0.4 + 0.2,
         "logits": torch.randn(layers, n, q, nc, generator=g) * 2}
    t = {"boxes": torch.rand(n, qt, 4, generator=g) * 0.4 + 0.2, "logits": torch.randn(n, qt, nc, generator=g) * 2}
    wc, w1, wg = 1.0, 5.0, 2.0
    per = []
    for lay in range(layers):
        for img in range(n):
            def parts(i, j):
                sb, tb = s["boxes"][lay, img, i].tolist(), t["boxes"][img, j].tolist()
                kl = sum(_kl(t["logits"][img, j, c].item(), s["logits"][lay, img, i, c].item(), T) for c in range(nc)) / nc
                l1 = sum(abs(x - y) for x, y in zip(sb, tb))
                return kl, l1, _giou(sb, tb)

            best = None
            for rows in itertools.permutations(range(q), qt):  # each teacher query j gets student query rows[j]
                cost = sum(wc * k + w1 * l - wg * gi for k, l, gi in (parts(i, j) for j, i in enumerate(rows)))
                if best is None or cost < best[0]:
                    best = (cost, rows)
            num = den = 0.0
            for j, i in enumerate(best[1]):
                k, l, gi = parts(i, j)
                w = max(1 / (1 + math.exp(-x)) for x in t["logits"][img, j].tolist())
                num += w * (wc * T * T * k + w1 * l + wg * (1 - gi))
                den += w
            per.append(num / den)
    expected = sum(per) / len(per)
    got = DETRLogitDistillation(cls_weight=wc, l1_weight=w1, giou_weight=wg, temperature=T)(s, t).item()
    assert got == pytest.approx(expected, rel=1e-5)
    same = {"boxes": t["boxes"][None].repeat(layers, 1, 1, 1), "logits": t["logits"][None].repeat(layers, 1, 1, 1)}
    assert DETRLogitDistillation()(same, t).item() == pytest.approx(0.0, abs=1e-5)  # identical predictions


def test_detr_logit_refuses_other_classes():
    s = {"boxes": torch.rand(1, 1, 3, 4), "logits": torch.randn(1, 1, 3, 2)}
    t = {"boxes": torch.rand(1, 3, 4), "logits": torch.randn(1, 3, 5)}
    with pytest.raises(ValueError, match="same classes"):
        DETRLogitDistillation()(s, t)


def _recipe(tmp_path, data, student, teacher, losses, epochs=1):
    r = tmp_path / "kd.yaml"
    r.write_text(f"name: rdkd\nstudent: {{model: {student}}}\nteacher: {{model: {teacher}}}\ndata: {{yolo: {data}}}\n"
                 f"train: {{epochs: {epochs}, imgsz: 64, batch: 4}}\n"
                 f"distill: {{auto_balance: 0.25, balance_batches: 4, losses: {losses}}}\n")
    return r


@pytest.mark.slow
def test_rtdetr_distill_logit_and_feature_levels_then_export(tmp_path, tiny_data):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    from kdctl.bundle import load_bundle
    from kdctl.detectors import load_detector

    losses = "[{name: detr_logit, params: {temperature: 2.0}}, {name: pkd, level: neck}]"
    run = CliRunner()
    res = run.invoke(app, ["distill", str(_recipe(tmp_path, tiny_data, "rtdetr-tiny.yaml", "rtdetr-tiny.yaml", losses)),
                           "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    terms = {t["name"]: t for t in b.metrics["kd_terms"]}
    assert terms["detr_logit"]["student_layers"] == ["query"] and terms["pkd"]["student_layers"] == [15, 18, 21]
    assert all(b.metrics["epochs"][0][f"train/kd_{n}"] > 0 for n in terms)
    student = load_detector(tmp_path / "kd" / "weights.pt")
    assert type(student) is RTDETRDetectionModel and not any(k.startswith("kd.") for k in student.state_dict())
    res = run.invoke(app, ["export", str(tmp_path / "kd"), "--target", "cpu", "--artifact", "onnx-fp32",
                           "--out", str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "cpu", verify=True).metrics["artifacts"][0]["parity"]["ok"] is True


@pytest.mark.slow
@pytest.mark.parametrize("student,teacher", [("yolov8-tiny.yaml", "rtdetr-tiny.yaml"),
                                             ("rtdetr-tiny.yaml", "yolov8-tiny.yaml")])
def test_cross_family_feature_distillation(tmp_path, tiny_data, student, teacher):
    from kdctl.bundle import load_bundle

    res = CliRunner().invoke(app, ["distill", str(_recipe(tmp_path, tiny_data, student, teacher,
                                                          "[{name: pkd, level: neck}]")), "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "kd", verify=True).metrics["epochs"][0]["train/kd_pkd"] > 0


@pytest.mark.slow
def test_rtdetr_distill_resumes_after_a_kill(tmp_path, tiny_data):
    from kdctl.bundle import load_bundle

    argv = ["distill", str(_recipe(tmp_path, tiny_data, "rtdetr-tiny.yaml", "rtdetr-tiny.yaml",
                                   "[{name: detr_logit}]", epochs=2)), "--out", str(tmp_path / "kd")]
    kill_at(argv, "train:epoch-saved@1")
    res = CliRunner().invoke(app, [*argv, "--resume"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "kd", verify=True)
    assert [e["epoch"] for e in b.metrics["epochs"]] == [1, 2] and b.metrics["epochs"][1]["train/kd_detr_logit"] > 0


def test_recipe_check_models_resolves_terms_and_refuses_a_bad_pair(tmp_path, tiny_data):
    """``recipe check --models`` builds both models and the criterion as distill would, without training."""
    import json

    good = _recipe(tmp_path, tiny_data, "rtdetr-tiny.yaml", "rtdetr-tiny.yaml",
                   "[{name: detr_logit}, {name: pkd, level: neck}]")
    res = CliRunner().invoke(app, ["recipe", "check", str(good), "--models", "--json"])
    assert res.exit_code == 0, res.output
    terms = {t["name"]: t for t in json.loads(res.stdout)["kd_terms"]}
    assert terms["detr_logit"]["student_layers"] == ["query"] and len(terms["pkd"]["teacher_layers"]) == 3
    bad = _recipe(tmp_path, tiny_data, "yolov8-tiny.yaml", "rtdetr-tiny.yaml", "[{name: ld}]")
    res = CliRunner().invoke(app, ["recipe", "check", str(bad), "--models"])
    assert res.exit_code == 2 and "distill.losses[0]: 'ld' is a dense-head loss" in res.output, res.output
    # a YOLO student of an RT-DETR teacher is pointed at the loss that can teach it the teacher's predictions
    assert "learns an RT-DETR teacher's predictions from its final detections (det_kd)" in " ".join(res.output.split())
    assert not list(tmp_path.glob("runs*")) and not (tmp_path / "kd").exists()  # nothing trained or written


def test_yolo_teacher_detections_become_queries():
    """Teach-DETR's targets from a YOLO teacher: NMS keeps one of two overlapping boxes of a class, drops scores
    under the floor, normalises boxes to the input, and turns class probabilities into logits; an end-to-end head's
    (x1, y1, x2, y2, score, class) rows give one-hot-ish logits."""
    from kdctl.detectors.rtdetr import TEACHER_MIN_SCORE, teacher_detections

    nc = 2
    y = torch.zeros(1, 4 + nc, 4)
    y[0, :4] = torch.tensor([[32.0, 33.0, 96.0, 50.0], [32.0, 34.0, 90.0, 48.0], [16.0, 16.0, 64.0, 10.0],
                             [16.0, 16.0, 64.0, 10.0]]).T  # cx, cy, w, h in pixels
    y[0, 4:] = torch.tensor([[0.9, 0.1], [0.8, 0.05], [0.2, 0.6], [TEACHER_MIN_SCORE / 2, 0.0]]).T
    out = teacher_detections(y, (128, 128))
    assert len(out["boxes"]) == 1 and out["boxes"][0].shape == (2, 4)  # box 1 suppressed by box 0, box 3 too weak
    torch.testing.assert_close(out["boxes"][0][0], torch.tensor([32.0, 33.0, 96.0, 50.0]) / 128)
    torch.testing.assert_close(out["logits"][0][0].sigmoid(), torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(out["boxes"][0][1], torch.tensor([16.0, 16.0, 64.0, 10.0]) / 128)
    torch.testing.assert_close(out["logits"][0][1].sigmoid(), torch.tensor([0.2, 0.6]))
    from kdctl.detectors.yolo import build_detector, final_detections

    e2e = torch.tensor([[[10.0, 20.0, 50.0, 60.0, 0.7, 1.0], [0.0, 0.0, 1.0, 1.0, 0.001, 0.0]]])
    dense = final_detections(build_detector("yolov10n.yaml", nc=nc), torch.zeros(1, 3, 100, 200), (e2e, None))
    out = teacher_detections(dense, (100, 200))
    assert out["boxes"][0].shape == (1, 4)
    torch.testing.assert_close(out["boxes"][0][0], torch.tensor([30.0 / 200, 40.0 / 100, 40.0 / 200, 40.0 / 100]))
    torch.testing.assert_close(out["logits"][0][0].sigmoid(), torch.tensor([1e-4, 0.7]))


def test_detr_logit_with_per_image_teacher_lists():
    """A YOLO teacher's detections vary per image: a list per image, an image without any contributes 0."""
    g = torch.Generator().manual_seed(2)
    s = {"boxes": torch.rand(1, 2, 4, 4, generator=g) * 0.5 + 0.2, "logits": torch.randn(1, 2, 4, 3, generator=g)}
    t = {"boxes": [s["boxes"][0, 0, :2].clone(), torch.zeros(0, 4)],
         "logits": [s["logits"][0, 0, :2].clone(), torch.zeros(0, 3)]}
    assert DETRLogitDistillation()(s, t).item() == pytest.approx(0.0, abs=1e-5)  # image 0 matches exactly
    t["logits"][0] = t["logits"][0] + 1.0
    one = DETRLogitDistillation()({"boxes": s["boxes"][:, :1], "logits": s["logits"][:, :1]},
                                  {"boxes": t["boxes"][:1], "logits": t["logits"][:1]}).item()
    assert one > 0 and DETRLogitDistillation()(s, t).item() == pytest.approx(one / 2, rel=1e-5)


@pytest.mark.slow
def test_yolo_teacher_to_rtdetr_student_logit_level(tmp_path, tiny_data, trained_bundle):
    """Teach-DETR's setting end to end: an RT-DETR student matched to a trained YOLO teacher's detections."""
    from kdctl.bundle import load_bundle

    r = _recipe(tmp_path, tiny_data, "rtdetr-tiny.yaml", trained_bundle, "[{name: detr_logit}]")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    epoch = load_bundle(tmp_path / "kd", verify=True).metrics["epochs"][0]
    assert math.isfinite(epoch["train/kd_detr_logit"]) and epoch["train/kd_detr_logit"] >= 0


def test_detr_query_loss_by_hand():
    """KD-DETR: query k of every student layer against the teacher's answer to the same query, no matching."""
    from kdctl.distill.losses.detr import DETRQueryDistillation

    g = torch.Generator().manual_seed(21)
    layers, n, k, nc, T = 2, 2, 3, 2, 2.0
    s = {"boxes": torch.rand(layers, n, k, 4, generator=g) * 0.4 + 0.2,
         "logits": torch.randn(layers, n, k, nc, generator=g) * 2}
    t = {"boxes": torch.rand(n, k, 4, generator=g) * 0.4 + 0.2, "logits": torch.randn(n, k, nc, generator=g) * 2}
    per = []
    for lay in range(layers):
        for img in range(n):
            num = den = 0.0
            for q in range(k):
                sb, tb = s["boxes"][lay, img, q].tolist(), t["boxes"][img, q].tolist()
                kl = sum(_kl(t["logits"][img, q, c].item(), s["logits"][lay, img, q, c].item(), T)
                         for c in range(nc)) / nc
                l1 = sum(abs(a - b) for a, b in zip(sb, tb))
                w = max(1 / (1 + math.exp(-v)) for v in t["logits"][img, q].tolist())
                num += w * (0.5 * T * T * kl + 3.0 * l1 + 1.5 * (1 - _giou(sb, tb)))
                den += w
            per.append(num / den)
    got = DETRQueryDistillation(cls_weight=0.5, l1_weight=3.0, giou_weight=1.5, temperature=T)(s, t).item()
    assert got == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_distillation_queries_decoded_by_both_models():
    """The teacher's most confident boxes plus random ones; both decoders answer the same queries (an identical
    teacher answers exactly as the student's last layer), and the student's answers carry gradients."""
    import copy

    from kdctl.detectors.rtdetr import decode_queries, distillation_boxes
    from kdctl.models import load_model, resolve_model

    t_boxes = torch.rand(2, 6, 4) * 0.5 + 0.2
    t_logits = torch.full((2, 6, 3), -5.0)
    t_logits[:, 4, 1], t_logits[:, 1, 0] = 3.0, 2.0  # queries 4 and 1 are the confident ones
    boxes = distillation_boxes(t_boxes, t_logits, k=2, r=3)
    assert boxes.shape == (2, 5, 4)
    torch.testing.assert_close(boxes[:, :2], torch.stack([t_boxes[:, 4], t_boxes[:, 1]], 1))
    assert (boxes[:, 2:, :2] >= 0.05).all() and (boxes[:, 2:, 2:] <= 0.5).all()

    torch.manual_seed(0)
    student = load_model(resolve_model("rtdetr-tiny.yaml", "student.model", "test"), 3, "student.model", "test")
    teacher = copy.deepcopy(student).eval()
    x = torch.rand(2, 3, 64, 64)
    grab = {}
    for name, m in (("s", student), ("t", teacher)):
        h = m.model[-1].register_forward_pre_hook(lambda mod, args, name=name: grab.__setitem__(name, args[0]))
        m.eval()
        with torch.no_grad():
            m.predict(x)
        h.remove()
    with torch.no_grad():
        sb, sl = decode_queries(student.model[-1], grab["s"], boxes)
        tb, tl = decode_queries(teacher.model[-1], grab["t"], boxes)
    torch.testing.assert_close(sb[-1], tb[-1])
    torch.testing.assert_close(sl[-1], tl[-1])
    student.train()
    sb, sl = decode_queries(student.model[-1], [f.detach() for f in grab["s"]], boxes)
    assert sb.shape[0] == len(student.model[-1].decoder.layers) and sl.shape[1:] == (2, 5, 3)
    sl.sum().backward()
    assert student.model[-1].dec_score_head[-1].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_the_rtdetr_teacher_chain_from_the_shipped_recipes(tmp_path, tiny_data):
    """recipes/rtdetr-teacher.yaml then recipes/rtdetr-distill-inherit.yaml, on small data: kdctl's rtdetr-small
    starts as an exact copy of a YOLOv8n teacher's backbone and neck (no KD term), then the tiny RT-DETR starts from
    a selection of that RT-DETR's and learns its decoder's answers; each bundle names the one before as parent."""
    from pathlib import Path

    import yaml

    from kdctl.bundle import load_bundle

    runner, root = CliRunner(), Path(__file__).resolve().parents[1] / "recipes"
    yolo = tmp_path / "yolo.yaml"
    yolo.write_text(f"name: y\nstudent: {{model: yolov8n.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                    "train: {epochs: 1, imgsz: 64, batch: 8, workers: 0}\n")
    assert runner.invoke(app, ["train", str(yolo), "--out", str(tmp_path / "yolo"), "--quiet"]).exit_code == 0
    chain = (("rtdetr-teacher.yaml", tmp_path / "yolo", tmp_path / "rt-teacher", []),
             ("rtdetr-distill-inherit.yaml", tmp_path / "rt-teacher", tmp_path / "rt-student", ["detr_logit"]))
    for name, teacher, out, terms in chain:
        d = yaml.safe_load((root / name).read_text())
        assert d["teacher"]["model"] in ("runs/train/quickstart-teacher", "runs/train/rtdetr-teacher")
        d.update(teacher={"model": str(teacher)}, data={"yolo": str(tiny_data)})
        d["train"].update(epochs=1, imgsz=64, batch=8)
        (tmp_path / name).write_text(yaml.safe_dump(d))
        res = runner.invoke(app, ["distill", str(tmp_path / name), "--out", str(out), "--json", "--quiet"])
        assert res.exit_code == 0, res.output
        assert list(json.loads(res.stdout)["kd_terms"]) == terms
    y, t, s = (load_bundle(tmp_path / n) for n in ("yolo", "rt-teacher", "rt-student"))
    backbone_neck = 2_259_536  # YOLOv8n's layers 0-21 at 3 classes, as Ultralytics builds them
    assert t.metrics["init"]["selected_params"] == backbone_neck and t.metrics["init"]["kept"] == pytest.approx(
        backbone_neck / y.metrics["params"], abs=1e-4)
    assert t.metrics["init"]["head"].startswith("RTDETRDecoder (random start")
    assert s.metrics["init"]["from"] == "teacher"
    assert s.metrics["init"]["selected_params"] == 567_208  # the tiny RT-DETR's layers 0-21 (1/8 width), all selected
    assert [p["id"] for p in t.manifest["parents"]] == [y.id] and [p["id"] for p in s.manifest["parents"]] == [t.id]
