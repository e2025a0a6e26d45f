"""Box mAP with the COCO conventions of pycocotools' ``COCOeval`` (bbox, area 'all', maxDets=100):
per-image-per-class top-100 detections, greedy matching by score at IoU 0.50:0.05:0.95, 101-point
interpolated precision, classes without ground truth left out of the mean. Crowd regions (COCO ``iscrowd: 1``)
are ignore regions as in COCOeval: a detection inside one (IoU against a crowd box = intersection / detection
area) is neither a true nor a false positive, and crowd boxes are not counted as objects to find."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class Detections:
    boxes: np.ndarray    # (K, 4) xyxy pixels
    scores: np.ndarray   # (K,)
    classes: np.ndarray  # (K,) int


@dataclass
class GroundTruth:
    boxes: np.ndarray    # (K, 4) xyxy pixels
    classes: np.ndarray  # (K,) int
    crowd: np.ndarray | None = None  # (K,) bool: an ignore region (COCO iscrowd), not an object; None: none are


def box_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes (no +1 pixel convention, as pycocotools); against a ``crowd``
    box of ``b`` the overlap is intersection / area of ``a`` (pycocotools' iscrowd rule)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    if crowd is not None and crowd.any():
        union = np.where(crowd[None, :], area_a[:, None], union)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match(dt_boxes, gt_boxes, crowd: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two (T, D) bool arrays: detection d is a true positive at threshold t, and d is ignored at t (it matched a
    crowd region). pycocotools' greedy rule: detections by score, ground truth with crowd regions last; an
    object is matched once, a crowd region any number of times, and only when no object matches."""
    tp = np.zeros((len(IOU_THRESHOLDS), len(dt_boxes)), bool)
    ignored = np.zeros_like(tp)
    if not len(gt_boxes) or not len(dt_boxes):
        return tp, ignored
    crowd = np.zeros(len(gt_boxes), bool) if crowd is None else np.asarray(crowd, bool)
    order = np.argsort(crowd, kind="mergesort")  # objects first, as COCOeval sorts by its ignore flag
    gt_boxes, crowd = gt_boxes[order], crowd[order]
    ious = box_iou(dt_boxes, gt_boxes, crowd)
    for ti, t in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(len(gt_boxes), bool)
        for d in range(len(dt_boxes)):
            best, m = min(t, 1 - 1e-10), -1
            for g in range(len(gt_boxes)):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:  # matched an object: crowd regions come after
                    break
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m >= 0:
                taken[m] = True
                (ignored if crowd[m] else tp)[ti, d] = True
    return tp, ignored


def evaluate_map(dets: list[Detections], gts: list[GroundTruth], nc: int, max_dets: int = 100) -> dict:
    """mAP50-95, mAP50, mAP75 and per-class AP50-95 over all images; 0..1 scale."""
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} prediction sets for {len(gts)} images")
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), nc))
    for c in range(nc):
        scores, tps, igs, n_gt = [], [], [], 0
        for dt, gt in zip(dets, gts):
            mine = gt.classes == c
            crowd = gt.crowd[mine] if gt.crowd is not None else None
            n_gt += int(mine.sum() - (crowd.sum() if crowd is not None else 0))
            sel = np.nonzero(dt.classes == c)[0]
            order = sel[np.argsort(-dt.scores[sel], kind="mergesort")][:max_dets]
            scores.append(dt.scores[order])
            tp, ig = _match(dt.boxes[order], gt.boxes[mine], crowd)
            tps.append(tp)
            igs.append(ig)
        if n_gt == 0:
            continue
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        tp = np.concatenate(tps, axis=1)[:, order]
        ig = np.concatenate(igs, axis=1)[:, order]
        tp_sum = np.cumsum(tp, axis=1).astype(float)
        fp_sum = np.cumsum(~tp & ~ig, axis=1).astype(float)
        for ti in range(len(IOU_THRESHOLDS)):
            rc = tp_sum[ti] / n_gt
            pr = tp_sum[ti] / (tp_sum[ti] + fp_sum[ti] + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            q = np.zeros(len(RECALL_POINTS))
            idx = np.searchsorted(rc, RECALL_POINTS, side="left")
            valid = idx < len(pr)
            q[valid] = pr[idx[valid]]
            precision[ti, :, c] = q
    has_gt = precision[0, 0, :] > -1
    if not has_gt.any():
        return {"map50_95": 0.0, "map50": 0.0, "map75": 0.0, "per_class_ap50_95": [None] * nc}
    p = precision[:, :, has_gt]
    per_class = [float(precision[:, :, c].mean()) if has_gt[c] else None for c in range(nc)]
    return {"map50_95": float(p.mean()), "map50": float(p[0].mean()), "map75": float(p[5].mean()),
            "per_class_ap50_95": per_class}
