"""det_kd: the teacher's final detections (any family) as soft targets of a YOLO student's own detection loss —
pseudo-labels by hand, the loss against Ultralytics' own on the same targets, the soft targets against the
assigner re-run, each family's final output, and the pairs it refuses in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdctl.detectors.yolo import KDDetectionModel, build_criterion, build_detector, final_detections, teacher_forward
from kdctl.distill.losses.detections import TeacherDetectionKD, pseudo_batch, pseudo_labels
from kdctl.errors import RecipeError
from kdctl.recipe.schema import LossSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "kdctl/assets/models/yolov8-tiny.yaml")


def _student():
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    m = KDDetectionModel(TINY, nc=3, verbose=False)
    m.args = get_cfg()
    m.criterion = m.init_criterion()
    return m.train()


def _dense(rows, size=128.0):
    """(1, 4 + 3, K) from rows of (cx, cy, w, h in pixels, p0, p1, p2)."""
    return torch.tensor(rows, dtype=torch.float32).T[None]


def test_pseudo_labels_by_hand():
    """Class-agnostic NMS at 0.7 (one target per object, its whole class distribution kept), the min_score
    threshold on the best class, boxes normalised by the input size, most confident first."""
    rows = [[40, 40, 20, 20, 0.1, 0.8, 0.05],    # kept
            [41, 40, 20, 20, 0.6, 0.2, 0.0],     # IoU 0.9 with the first, other class: suppressed all the same
            [100, 60, 30, 10, 0.0, 0.0, 0.35],   # kept
            [10, 100, 8, 8, 0.05, 0.08, 0.09],   # below min_score 0.1
            [60, 60, 0, 10, 0.9, 0.0, 0.0]]      # empty box
    out = pseudo_labels(_dense(rows), (128, 128), 0.1)
    assert len(out) == 1
    boxes, probs = out[0]["boxes"], out[0]["probs"]
    assert torch.allclose(boxes, torch.tensor([[40, 40, 20, 20], [100, 60, 30, 10]]) / 128.0)
    assert torch.allclose(probs, torch.tensor([[0.1, 0.8, 0.05], [0.0, 0.0, 0.35]]))
    assert len(pseudo_labels(_dense(rows), (128, 128), 0.9)[0]["boxes"]) == 0


def test_with_certain_one_hot_detections_it_is_the_task_loss_on_those_boxes():
    """A teacher certain of its boxes (probability 1 in one class) makes det_kd exactly the student's own loss
    with those boxes as the labels."""
    m = _student()
    img = torch.rand(2, 3, 128, 128)
    rows0 = [[40, 40, 30, 20, 0, 1, 0], [90, 80, 40, 40, 0, 0, 1]]
    rows1 = [[64, 64, 50, 50, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    dense = torch.cat([_dense(rows0), _dense(rows1)])
    preds = m.predict(img)
    value = TeacherDetectionKD()({"preds": preds, "criterion": m.criterion}, {"dense": dense})
    batch = {"batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[1.0], [2.0], [0.0]]),
             "bboxes": torch.tensor([[40, 40, 30, 20], [90, 80, 40, 40], [64, 64, 50, 50]]) / 128.0, "img": img}
    loss, _ = m.criterion(preds, batch)  # Ultralytics: the gained sum times the batch size
    assert value.item() == pytest.approx(loss.sum().item() / 2, rel=1e-5)


def test_soft_targets_are_the_assigned_score_times_the_teachers_probabilities():
    """An uncertain teacher: on each positive, the target is the assigner's score times the teacher's class
    probabilities of the box it was given; the loss is BCE to those targets plus the box and DFL terms weighted by
    them, all over their sum (Ultralytics' normalisation), with its gains, reassembled here from the assigner."""
    from ultralytics.utils.tal import make_anchors

    m = _student()
    crit = m.criterion
    img = torch.rand(2, 3, 128, 128)
    rows0 = [[40, 40, 30, 20, 0.1, 0.7, 0.2], [90, 80, 40, 40, 0.0, 0.3, 0.5]]
    rows1 = [[64, 64, 50, 50, 0.4, 0.1, 0.0], [0, 0, 0, 0, 0, 0, 0]]
    dense = torch.cat([_dense(rows0), _dense(rows1)])
    preds = m.predict(img)
    value = TeacherDetectionKD()({"preds": preds, "criterion": crit}, {"dense": dense})

    labels = pseudo_labels(dense, (128, 128), 0.1)
    batch, probs = pseudo_batch(labels, "cpu")
    assert probs.shape == (2, 2, 3) and probs[1, 1].abs().sum() == 0  # image 1: one box, padded
    anchors, strides = make_anchors(preds["feats"], crit.stride, 0.5)
    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
    targets = crit.preprocess(targets, 2, scale_tensor=torch.tensor([128.0] * 4))
    gt_labels, gt = targets.split((1, 4), 2)
    mask_gt = gt.sum(2, keepdim=True).gt_(0.0)
    distri, logits = preds["boxes"].permute(0, 2, 1), preds["scores"].permute(0, 2, 1)
    pd = crit.bbox_decode(anchors, distri)
    with torch.no_grad():
        _, tb, scores, fg, gt_idx = crit.assigner(logits.sigmoid(), pd * strides, anchors * strides, gt_labels, gt,
                                                  mask_gt)
    assert fg.any()
    p = torch.stack([probs[i][gt_idx[i]] for i in range(2)])                  # each anchor's box's probabilities
    soft = scores.sum(-1, keepdim=True) * p * fg[..., None]
    assert not torch.allclose(soft, scores)                                    # the soft targets differ from one-hot
    total = soft.sum().clamp(min=1)
    cls = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / total
    imgsz = torch.tensor(preds["feats"][0].shape[2:], dtype=distri.dtype) * crit.stride[0]
    box, dfl = crit.bbox_loss(distri, pd, anchors, tb / strides, soft, total, fg, imgsz, strides)
    h = m.args
    expected = h.box * box + h.cls * cls + h.dfl * dfl
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)


def test_final_detections_of_each_family():
    """YOLO's eval output as it is, an end-to-end head's boxes as one-hot rows, RT-DETR's queries in pixels (as
    kdctl's RT-DETR output reads them), a Faster R-CNN teacher run whole."""
    from kdctl.detectors import torchvision as tv
    from kdctl.detectors.rtdetr import DenseOutput
    from kdctl.detectors.rtdetr import build_detector as build_rtdetr

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        v8 = build_detector("yolov8n.yaml", nc=3).eval()
        raw = teacher_forward(v8, x)
        assert torch.equal(final_detections(v8, x, raw), raw[0])
        # an end-to-end head exported with its post-processing: (N, k, 6) rows x1, y1, x2, y2, score, class
        e2e = build_detector("yolov10n.yaml", nc=3).eval()
        y = torch.tensor([[[10.0, 20.0, 30.0, 60.0, 0.8, 2.0], [0.0, 0.0, 4.0, 4.0, 0.1, 0.0]]]).repeat(2, 1, 1)
        d = final_detections(e2e, x, (y, None))
        assert d.shape == (2, 7, 2)
        assert torch.allclose(d[0, :, 0], torch.tensor([20.0, 40.0, 20.0, 40.0, 0.0, 0.0, 0.8]))
        assert torch.allclose(d[1, :, 1], torch.tensor([2.0, 2.0, 4.0, 4.0, 0.1, 0.0, 0.0]))
        rt = build_rtdetr(str(ROOT / "kdctl/assets/models/rtdetr-tiny.yaml"), 3).eval()
        assert torch.allclose(final_detections(rt, x, teacher_forward(rt, x)), DenseOutput(rt)(x))
        fr = tv.build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, imgsz=64).eval()
        assert torch.equal(final_detections(fr, x, None), fr(x))


def test_det_kd_trains_a_yolo_student_from_each_family():
    """In the student's loss: the teacher runs whole, its detections reach the term, the term is logged and
    moves the student's weights."""
    from kdctl.detectors import torchvision as tv
    from kdctl.detectors.rtdetr import build_detector as build_rtdetr

    torch.manual_seed(0)
    teachers = [build_detector("yolov8n.yaml", nc=3),
                build_rtdetr(str(ROOT / "kdctl/assets/models/rtdetr-tiny.yaml"), 3),
                tv.build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, imgsz=128)]
    img = torch.rand(2, 3, 128, 128)
    batch = {"img": img, "cls": torch.tensor([[0.0], [1.0]]), "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
             [0.6, 0.6, 0.3, 0.3]]), "batch_idx": torch.tensor([0.0, 1.0])}
    for teacher in teachers:
        m = _student()
        m.attach(teacher, build_criterion(m, teacher, [LossSpec(name="det_kd", params={"min_score": 0.0})], None,
                                          128))
        loss, items = m.loss(batch)
        assert items["kd_det_kd"].item() > 0
        loss.sum().backward()
        assert m.model[-1].cv3[0][-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("student, spec, message", [
    ("rtdetr", LossSpec(name="det_kd"), "an RT-DETR student learns them with detr_logit"),
    ("yolo", LossSpec(name="det_kd", level="neck"), "level: 'neck' does not apply to 'det_kd'"),
    ("yolo", LossSpec(name="det_kd", student_layers=[22]), "drop student_layers/teacher_layers"),
    ("yolo-6", LossSpec(name="det_kd"), "needs the same classes, but the student predicts 6 and the teacher 3"),
])
def test_pairs_det_kd_refuses(student, spec, message):
    from kdctl.detectors.rtdetr import build_detector as build_rtdetr

    teacher = build_detector("yolov8n.yaml", nc=3)
    s = {"rtdetr": lambda: build_rtdetr(str(ROOT / "kdctl/assets/models/rtdetr-tiny.yaml"), 3),
         "yolo": lambda: build_detector(TINY, nc=3), "yolo-6": lambda: build_detector(TINY, nc=6)}[student]()
    with pytest.raises(RecipeError, match=message):
        build_criterion(s, teacher, [spec], None, 128)


def test_a_two_stage_teacher_of_more_classes_gives_its_detections_of_the_datasets():
    """A Faster R-CNN teacher of 5 classes read for 3 of them (:func:`kdctl.detectors.keep_classes`): its final
    detections carry those classes' scores in the dataset's order and nothing of the others, so det_kd pairs it
    with a 3-class student; its classifier still has 5 classes."""
    from conftest import superset_frcnn
    from kdctl.detectors import keep_classes
    from kdctl.detectors import torchvision as tv

    torch.manual_seed(0)
    own = tv.build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, imgsz=64).eval()
    own.names = {0: "a", 1: "b", 2: "c"}
    kept = keep_classes(superset_frcnn(own, ["c", "x", "a", "y", "b"]), [2, 4, 0], ["a", "b", "c"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mine, theirs = final_detections(own, x, None), final_detections(kept, x, None)
    assert mine.shape == theirs.shape == (2, 7, tv.DETECTIONS) and (mine[:, 4:] > 0.001).any()
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-4)
    assert kept.nc == 5 and tv.dense_classes(kept) == 3
    build_criterion(_student(), kept, [LossSpec(name="det_kd")], None, 64)  # 3 classes each: taken
