"""Pre- and post-processing shared by every backend (PyTorch, ONNX Runtime, OpenVINO, TensorRT), in NumPy,
so exported models are judged by exactly the code that judges the PyTorch model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from kdctl.data.resolve import crowd_path, label_path
from kdctl.evaluate.coco import Detections, GroundTruth

# A backend: float32 NCHW RGB 0..1 batch -> raw head output (N, 4 + nc, anchors), boxes as cx, cy, w, h pixels.
Backend = Callable[[np.ndarray], np.ndarray]


def load_rgb(path: Path) -> np.ndarray:
    """The image as RGB pixels, turned upright by its EXIF orientation tag as OpenCV (and so Ultralytics' training
    and validation) reads it: a phone photo's labels are drawn on the upright image. 16-bit grey keeps its high byte,
    as OpenCV reads it (Pillow's ``convert("RGB")`` clips it at 255: a white image)."""
    from PIL import ImageOps

    from kdctl.data.validate import read_image

    def rgb(im) -> np.ndarray:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 'I;16' ('I' from a 16-bit PNG in older Pillow)
            grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"))

    return read_image(path, rgb)


def letterbox(img: np.ndarray, size: int, fill: int = 114) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio into a ``size``×``size`` canvas, centred, as Ultralytics does."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    if (nw, nh) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    dw, dh = (size - nw) / 2, (size - nh) / 2
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    canvas = np.full((size, size, 3), fill, np.uint8)
    canvas[top:top + nh, left:left + nw] = img
    return canvas, r, (left, top)


def to_input(canvases: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(canvases).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Greedy NMS; returns kept indices in descending score order."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        ious = inter / (area[i] + area[rest] - inter + 1e-9)
        order = rest[ious <= iou]
    return np.asarray(keep, dtype=np.int64)


# the lowest class score a detection keeps (Ultralytics' val conf=0.001): the evaluator's, and the parity check's floor
CONF_FLOOR = 0.001


def postprocess(raw: np.ndarray, conf: float = CONF_FLOOR, iou: float = 0.7, max_det: int = 300,
                max_candidates: int = 30000) -> list[Detections]:
    """Raw (N, 4 + nc, A) -> per-image detections in input pixels; multi-label, class-aware NMS."""
    out = []
    for pred in raw.astype(np.float32, copy=False):
        boxes_cxcywh, cls_scores = pred[:4].T, pred[4:].T           # (A, 4), (A, nc)
        a_idx, c_idx = np.nonzero(cls_scores > conf)
        scores = cls_scores[a_idx, c_idx]
        if scores.size > max_candidates:
            top = np.argpartition(-scores, max_candidates)[:max_candidates]
            a_idx, c_idx, scores = a_idx[top], c_idx[top], scores[top]
        b = boxes_cxcywh[a_idx]
        xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
        offset = c_idx[:, None].astype(np.float32) * 7680.0  # class-aware NMS in one pass
        keep = nms(xyxy + offset, scores, iou, max_det)
        out.append(Detections(xyxy[keep], scores[keep], c_idx[keep].astype(np.int64)))
    return out


def unletterbox(d: Detections, r: float, pad: tuple[float, float], shape: tuple[int, int]) -> Detections:
    b = d.boxes.copy()
    b[:, [0, 2]] = ((b[:, [0, 2]] - pad[0]) / r).clip(0, shape[1])
    b[:, [1, 3]] = ((b[:, [1, 3]] - pad[1]) / r).clip(0, shape[0])
    return Detections(b, d.scores, d.classes)


def read_labels(img_path: Path, shape: tuple[int, int]) -> GroundTruth:
    """YOLO label file (class cx cy w h, normalised) -> pixel xyxy ground truth, with the image's crowd regions
    (a converted COCO set's ``crowd/`` file, if any) flagged."""
    from kdctl.data.validate import LabelError, parse_labels
    from kdctl.errors import DataError

    h, w = shape
    try:
        objects = parse_labels(label_path(img_path))
        where = crowd_path(img_path)
        crowd = parse_labels(where) if where is not None else np.zeros((0, 5))
    except LabelError as e:
        raise DataError(str(e)) from None
    rows = np.concatenate([objects, crowd])
    if not len(rows):
        return GroundTruth(np.zeros((0, 4)), np.zeros(0, np.int64))
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    is_crowd = np.arange(len(rows)) >= len(objects)
    return GroundTruth(boxes, rows[:, 0].astype(np.int64), is_crowd if is_crowd.any() else None)


def predict_images(backend: Backend, images: list[Path], imgsz: int, batch: int = 1, progress=None,
                   conf: float = CONF_FLOOR, iou: float = 0.7) -> list[Detections]:
    """Detections per image. A backend with a ``fixed_batch`` attribute (static-shape export) gets exactly that
    many images per call, the last call padded with blank canvases."""
    fixed = getattr(backend, "fixed_batch", None)
    batch = fixed or batch
    dets: list[Detections] = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        metas, canvases = [], []
        for p in chunk:
            img = load_rgb(p)
            canvas, r, pad = letterbox(img, imgsz)
            canvases.append(canvas)
            metas.append((r, pad, img.shape[:2]))
        while fixed and len(canvases) < fixed:
            canvases.append(np.full_like(canvases[0], 114))
        raw = np.asarray(backend(to_input(canvases)))[:len(chunk)]
        for d, (r, pad, shape) in zip(postprocess(raw, conf=conf, iou=iou), metas):
            dets.append(unletterbox(d, r, pad, shape))
        if progress:
            progress(len(chunk))
    return dets


def ground_truth(images: list[Path]) -> list[GroundTruth]:
    out = []
    for p in images:
        h, w = _size(p)
        out.append(read_labels(p, (h, w)))
    return out


def _size(p: Path) -> tuple[int, int]:
    from kdctl.data.validate import read_image

    w, h = read_image(p, oriented_size)
    return h, w


def oriented_size(im) -> tuple[int, int]:
    """(width, height) of the upright image: EXIF orientations 5-8 turn it by 90° (as :func:`load_rgb` does)."""
    w, h = im.size
    try:
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # an unreadable EXIF block is no orientation (OpenCV ignores it too)
        turned = False
    return (h, w) if turned else (w, h)
