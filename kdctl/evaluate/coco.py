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


@dataclass
class MatchRecords:
    """What the AP integration reads, per detection and per image: enough to recompute mAP on any resample of the
    images (:func:`map_from_records` with ``weights``), e.g. a paired bootstrap of two models' difference.
    Detections are in evaluation order: image by image, each image's top ``max_dets`` per class by score."""
    image: np.ndarray    # (D,) int: the detection's image index
    classes: np.ndarray  # (D,) int
    scores: np.ndarray   # (D,)
    tp: np.ndarray       # (T, D) bool: a true positive at IoU threshold t
    ignored: np.ndarray  # (T, D) bool: matched a crowd region at t (neither true nor false positive)
    n_gt: np.ndarray     # (I, C) int: objects to find per image and class (crowd regions not counted)

    @property
    def images(self) -> int:
        return int(self.n_gt.shape[0])


def match_records(dets: list[Detections], gts: list[GroundTruth], nc: int, max_dets: int = 100) -> MatchRecords:
    """Match every image's detections to its ground truth (COCOeval's per-image step, :func:`_match`)."""
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} prediction sets for {len(gts)} images")
    image, classes, scores, tps, igs = [], [], [], [], []
    n_gt = np.zeros((len(gts), nc), np.int64)
    for i, (dt, gt) in enumerate(zip(dets, gts)):
        for c in range(nc):
            mine = gt.classes == c
            crowd = gt.crowd[mine] if gt.crowd is not None else None
            n_gt[i, c] = int(mine.sum() - (crowd.sum() if crowd is not None else 0))
            sel = np.nonzero(dt.classes == c)[0]
            order = sel[np.argsort(-dt.scores[sel], kind="mergesort")][:max_dets]
            tp, ig = _match(dt.boxes[order], gt.boxes[mine], crowd)
            image.append(np.full(len(order), i, np.int64))
            classes.append(np.full(len(order), c, np.int64))
            scores.append(dt.scores[order])
            tps.append(tp)
            igs.append(ig)
    t = len(IOU_THRESHOLDS)
    return MatchRecords(np.concatenate(image) if image else np.zeros(0, np.int64),
                        np.concatenate(classes) if classes else np.zeros(0, np.int64),
                        np.concatenate(scores) if scores else np.zeros(0),
                        np.concatenate(tps, axis=1) if tps else np.zeros((t, 0), bool),
                        np.concatenate(igs, axis=1) if igs else np.zeros((t, 0), bool), n_gt)


class _Sorted:
    """Per class: the detections in score order (stable, so ties keep image order as COCOeval's concatenation
    does), with what each counts as; made once for any number of resamples."""

    def __init__(self, r: MatchRecords):
        self.nc = r.n_gt.shape[1]
        self.n_gt = r.n_gt
        self.per_class = []
        for c in range(self.nc):
            sel = np.nonzero(r.classes == c)[0]
            order = sel[np.argsort(-r.scores[sel], kind="mergesort")]
            tp = r.tp[:, order]
            self.per_class.append((r.image[order], tp, ~tp & ~r.ignored[:, order]))

    def same_ranking(self, other: "_Sorted") -> bool:
        """Whether both rank the same detections of the same images the same way with the same outcomes, so any
        resample gives both the same precision (the scores themselves may differ)."""
        return len(self.per_class) == len(other.per_class) and all(
            all(np.array_equal(x, y) for x, y in zip(mine, theirs))
            for mine, theirs in zip(self.per_class, other.per_class))

    def precision(self, weights: np.ndarray | None = None) -> np.ndarray:
        """COCOeval's precision array (T, R, C), -1 for a class without objects; ``weights``: how many times each
        image counts (a bootstrap resample), None: once each."""
        precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), self.nc))
        n_gt = self.n_gt.sum(0) if weights is None else weights @ self.n_gt
        for c, (image, tp, fp) in enumerate(self.per_class):
            if n_gt[c] == 0:
                continue
            if weights is None:
                tp_sum, fp_sum = np.cumsum(tp, axis=1).astype(float), np.cumsum(fp, axis=1).astype(float)
            else:  # an image counted k times: its detections k times, adjacent in score order (ties aside)
                w = weights[image]
                keep = w > 0
                w, tp, fp = w[keep].astype(float), tp[:, keep], fp[:, keep]
                tp_sum, fp_sum = np.cumsum(tp * w, axis=1), np.cumsum(fp * w, axis=1)
            precision[:, :, c] = _interpolate(tp_sum / n_gt[c], tp_sum / (tp_sum + fp_sum + np.spacing(1)))
        return precision


def _interpolate(rc: np.ndarray, pr: np.ndarray) -> np.ndarray:
    """(T, R): COCOeval's 101-point interpolated precision at every threshold, from the (T, D) recall and precision
    after each detection in score order: the highest precision at any recall >= r, 0 past the last."""
    t, d = rc.shape
    q = np.zeros((t, len(RECALL_POINTS)))
    if d == 0:
        return q
    envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    for ti in range(t):  # row by row: recall compared with the recall points exactly as COCOeval compares them
        idx = np.searchsorted(rc[ti], RECALL_POINTS, side="left")
        valid = idx < d
        q[ti, valid] = envelope[ti, idx[valid]]
    return q


def _summarise(precision: np.ndarray) -> dict:
    nc = precision.shape[2]
    has_gt = precision[0, 0, :] > -1
    if not has_gt.any():
        return {"map50_95": 0.0, "map50": 0.0, "map75": 0.0, "per_class_ap50_95": [None] * nc}
    p = precision[:, :, has_gt]
    per_class = [float(precision[:, :, c].mean()) if has_gt[c] else None for c in range(nc)]
    return {"map50_95": float(p.mean()), "map50": float(p[0].mean()), "map75": float(p[5].mean()),
            "per_class_ap50_95": per_class}


def map_from_records(records: MatchRecords, weights: np.ndarray | None = None) -> dict:
    """mAP50-95, mAP50, mAP75 and per-class AP50-95 from match records; ``weights`` (one per image): how many
    times each image counts, as if the image list had held it that many times (0: left out)."""
    return _summarise(_Sorted(records).precision(weights))


def evaluate_map(dets: list[Detections], gts: list[GroundTruth], nc: int, max_dets: int = 100) -> dict:
    """mAP50-95, mAP50, mAP75 and per-class AP50-95 over all images; 0..1 scale."""
    return map_from_records(match_records(dets, gts, nc, max_dets))


def paired_bootstrap(a: MatchRecords, b: MatchRecords, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mAP50-95(b) − mAP50-95(a) over resamples of the images, the same resample for both
    (the records must be of the same images, in the same order): how much of a difference between two models
    scored on one validation set is which images happened to be in it."""
    if a.n_gt.shape != b.n_gt.shape or not np.array_equal(a.n_gt, b.n_gt):
        raise ValueError("paired bootstrap: the two records are not of the same images and labels")
    rng = np.random.default_rng(seed)
    sa, sb = _Sorted(a), _Sorted(b)
    if sa.same_ranking(sb):  # every resample integrates the same curves (e.g. an FP32 export of the same model)
        return 0.0, 0.0
    n = a.images
    diffs = np.empty(resamples)
    for k in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n)
        pa, pb = sa.precision(w), sb.precision(w)
        has = pa[0, 0, :] > -1
        diffs[k] = pb[:, :, has].mean() - pa[:, :, has].mean() if has.any() else 0.0
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_resamples(detections: int) -> int:
    """1000 resamples, fewer (not under 200) where the two models' detections together pass 100,000: a resample
    costs time in proportion to them (5000 images with 100 detections each: about 0.1 s per model and resample)."""
    return int(min(1000, max(200, 1e8 // max(detections, 1))))


def drop_interval(reference: MatchRecords, candidate: MatchRecords) -> list[float]:
    """95 % paired-bootstrap interval of mAP50-95(reference) − mAP50-95(candidate) over the images both were scored
    on: how much of an export's mAP drop (positive: the candidate is lower) which images are in the set can move."""
    lo, hi = paired_bootstrap(candidate, reference,
                              resamples=bootstrap_resamples(len(reference.image) + len(candidate.image)))
    return [lo, hi]
