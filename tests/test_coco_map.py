"""Our COCO mAP agrees with pycocotools' COCOeval on the same predictions."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from kdctl.evaluate.coco import Detections, GroundTruth, evaluate_map


def random_case(seed, n_img=12, nc=4, crowd=False):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(n_img):
        k = rng.integers(0, 8)
        xy = rng.uniform(0, 200, (k, 2))
        wh = rng.uniform(4, 80, (k, 2))
        gb = np.concatenate([xy, xy + wh], 1)
        gc = rng.integers(0, nc, k)
        # crowd regions: big boxes, some around objects of their class, some where detections land
        cr = (rng.random(k) < 0.3) if crowd else None
        if crowd:
            gb[cr, 2:] += rng.uniform(20, 80, (cr.sum(), 2))
        gts.append(GroundTruth(gb, gc, cr))
        # detections: jittered copies of some GT (some with wrong class) plus random false positives
        keep = rng.random(k) < 0.8
        jit = gb[keep] + rng.normal(0, 6, (keep.sum(), 4))
        jc = np.where(rng.random(keep.sum()) < 0.85, gc[keep], rng.integers(0, nc, keep.sum()))
        m = rng.integers(0, 6)
        fxy = rng.uniform(0, 200, (m, 2))
        fb = np.concatenate([fxy, fxy + rng.uniform(4, 60, (m, 2))], 1)
        boxes = np.concatenate([jit, fb]) if len(jit) + m else np.zeros((0, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = np.round(rng.uniform(0.01, 1, len(boxes)), 3)  # rounding makes ties, as real models do
        classes = np.concatenate([jc, rng.integers(0, nc, m)]).astype(int)
        dets.append(Detections(boxes, scores, classes))
    return dets, gts, nc


def pycocotools_map(dets, gts, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    aid = 1
    for i, (d, g) in enumerate(zip(dets, gts)):
        images.append({"id": i, "width": 400, "height": 400})
        crowd = g.crowd if g.crowd is not None else np.zeros(len(g.boxes), bool)
        for b, c, cr in zip(g.boxes, g.classes, crowd):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": aid, "image_id": i, "category_id": int(c), "bbox": [*map(float, b[:2]), float(w), float(h)],
                         "area": float(w * h), "iscrowd": int(cr)})
            aid += 1
        for b, s, c in zip(d.boxes, d.scores, d.classes):
            results.append({"image_id": i, "category_id": int(c),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(nc)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats[0], e.stats[1], e.stats[2]


@pytest.mark.parametrize("seed", range(6))
def test_matches_pycocotools(seed):
    dets, gts, nc = random_case(seed)
    ours = evaluate_map(dets, gts, nc)
    ref = pycocotools_map(dets, gts, nc)
    assert ours["map50_95"] == pytest.approx(ref[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(ref[1], abs=1e-6)
    assert ours["map75"] == pytest.approx(ref[2], abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_crowd_regions_are_ignored_as_pycocotools_does(seed):
    """COCO's iscrowd boxes: detections on them are neither TP nor FP, they are no objects to find, and a
    detection's overlap with one is intersection / its own area."""
    dets, gts, nc = random_case(100 + seed, n_img=16, crowd=True)
    assert sum(int(g.crowd.sum()) for g in gts) > 3
    ours = evaluate_map(dets, gts, nc)
    ref = pycocotools_map(dets, gts, nc)
    assert ours["map50_95"] == pytest.approx(ref[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(ref[1], abs=1e-6)
    assert ours["map75"] == pytest.approx(ref[2], abs=1e-6)


def test_a_detection_inside_a_crowd_region_costs_nothing():
    obj, region = [0, 0, 10, 10], [40, 40, 100, 100]
    gt = [GroundTruth(np.array([obj, region], float), np.array([0, 0]), np.array([False, True]))]
    hit = np.array([obj], float)
    inside = np.array([[50, 50, 60, 60]], float)  # IoU with the region 0.03, but all of it lies inside: ignored
    alone = evaluate_map([Detections(hit, np.array([0.5]), np.array([0]))], gt, 1)["map50_95"]
    more = evaluate_map([Detections(np.concatenate([inside, hit]), np.array([0.9, 0.5]), np.array([0, 0]))], gt, 1)
    assert alone == pytest.approx(1.0) and more["map50_95"] == pytest.approx(1.0)
    as_object = [GroundTruth(gt[0].boxes, gt[0].classes)]  # the same box as an object: one miss, one FP
    assert evaluate_map([Detections(np.concatenate([inside, hit]), np.array([0.9, 0.5]), np.array([0, 0]))],
                        as_object, 1)["map50_95"] < 0.5


def test_perfect_and_empty_predictions():
    g = [GroundTruth(np.array([[0, 0, 10, 10], [20, 20, 50, 60.0]]), np.array([0, 1]))]
    perfect = [Detections(g[0].boxes.copy(), np.array([0.9, 0.8]), g[0].classes.copy())]
    assert evaluate_map(perfect, g, 2)["map50_95"] == pytest.approx(1.0)
    none = [Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))]
    assert evaluate_map(none, g, 2)["map50_95"] == 0.0
    res = evaluate_map(perfect, g, 3)  # class 2 has no ground truth: left out of the mean
    assert res["map50_95"] == pytest.approx(1.0) and res["per_class_ap50_95"][2] is None
