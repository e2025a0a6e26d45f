"""Pre/post-processing shared by all backends: letterbox geometry on non-square images, NMS, decoding."""

from __future__ import annotations

import numpy as np

from kdctl.evaluate.coco import Detections
from kdctl.evaluate.predict import letterbox, nms, postprocess, unletterbox


def test_letterbox_round_trip_non_square():
    img = np.zeros((50, 100, 3), np.uint8)               # h=50, w=100
    img[10:20, 30:50] = 255                               # a white box at x 30..50, y 10..20
    canvas, r, pad = letterbox(img, 64)
    assert canvas.shape == (64, 64, 3) and r == 0.64 and pad == (0, 16)
    ys, xs = np.nonzero(canvas[..., 0] > 200)
    det = Detections(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float), np.ones(1), np.zeros(1, int))
    back = unletterbox(det, r, pad, img.shape[:2]).boxes[0]
    assert np.allclose(back, [30, 10, 50, 20], atol=2.0)


def test_nms_keeps_best_and_separates_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    keep = nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5, 300)
    assert keep.tolist() == [0, 2]
    # decoded output: 2 anchors on the same spot, different classes -> both survive (class-aware NMS)
    raw = np.zeros((1, 4 + 2, 2), np.float32)
    raw[0, :4, :] = np.array([[5, 5, 10, 10]]).T           # cx, cy, w, h
    raw[0, 4, 0], raw[0, 5, 1] = 0.9, 0.8
    d = postprocess(raw)[0]
    assert sorted(d.classes.tolist()) == [0, 1] and np.allclose(d.boxes[0], [0, 0, 10, 10])
