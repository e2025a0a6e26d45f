"""The synthetic generator: deterministic per seed, valid YOLO labels, hard enough (small objects, clutter)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from kdctl.data import synth
from kdctl.data.synth import CLASS_NAMES, SCENES, SynthConfig, render_image, scene_classes, write_dataset


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "data.yaml":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_dataset(tmp_path / "a", train=6, val=2, seed=7, imgsz=96).parent
    b = write_dataset(tmp_path / "b", train=6, val=2, seed=7, imgsz=96).parent
    c = write_dataset(tmp_path / "c", train=6, val=2, seed=8, imgsz=96).parent
    assert digest(a) == digest(b) != digest(c)


def test_val_split_independent_of_train_size(tmp_path):
    a = write_dataset(tmp_path / "a", train=3, val=2, seed=1, imgsz=96).parent
    b = write_dataset(tmp_path / "b", train=9, val=2, seed=1, imgsz=96).parent
    assert digest(a / "images" / "val") == digest(b / "images" / "val")


def test_labels_are_valid_yolo(tmp_path):
    y = write_dataset(tmp_path, train=20, val=5, seed=0, imgsz=128, classes=5)
    data = yaml.safe_load(y.read_text())
    assert data["names"] == {i: CLASS_NAMES[i] for i in range(5)}
    n = 0
    for lf in (tmp_path / "labels").rglob("*.txt"):
        for line in lf.read_text().splitlines():
            c, cx, cy, w, h = line.split()
            assert 0 <= int(c) < 5
            cx, cy, w, h = map(float, (cx, cy, w, h))
            assert 0 < w <= 1 and 0 < h <= 1
            assert 0 <= cx - w / 2 + 1e-6 and cx + w / 2 <= 1 + 1e-6
            assert 0 <= cy - h / 2 + 1e-6 and cy + h / 2 <= 1 + 1e-6
            n += 1
    assert n > 40
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 20


def test_hard_enough_small_objects_and_scale_range():
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(60):
        _, labels = render_image(np.random.default_rng([0, 0, i]), SynthConfig(imgsz=320))
        sizes += [max(x2 - x1, y2 - y1) for _, x1, y1, x2, y2 in labels]
    sizes = np.array(sizes)
    assert (sizes < 16).mean() > 0.1          # many small objects
    assert sizes.max() / sizes.min() > 8      # strong scale variation
    assert rng is not None


def test_boxes_match_visible_pixels():
    """Each label's box is the visible extent of its object: pixels at the box edges differ from the
    background texture often enough that labels are not placed on empty space."""
    img, labels = render_image(np.random.default_rng([5, 0, 0]), SynthConfig(imgsz=256))
    assert labels and img.size == (256, 256)
    for _, x1, y1, x2, y2 in labels:
        assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256


def test_dense_scene_draws_other_shapes_than_clear(tmp_path, monkeypatch):
    """'dense' is the second built-in set: its class 0 is a cross, not clear's circle, and data.yaml says so."""
    y = write_dataset(tmp_path, train=4, val=1, seed=0, imgsz=96, classes=4, scene="dense")
    assert yaml.safe_load(y.read_text())["names"] == {0: "cross", 1: "ring", 2: "star", 3: "diamond"}
    drawn = []
    real = synth._draw_shape
    monkeypatch.setattr(synth, "_draw_shape", lambda d, cls, s, rot: (drawn.append(cls), real(d, cls, s, rot)))
    for i in range(10):
        render_image(np.random.default_rng([0, 0, i]), SynthConfig(classes=2, imgsz=96, **SCENES["dense"]))
    assert drawn and set(drawn) == {CLASS_NAMES.index("cross"), CLASS_NAMES.index("ring")}


def test_dense_scene_has_more_smaller_objects_than_clear():
    def stats(scene):
        n, sizes = 0, []
        for i in range(40):
            _, labels = render_image(np.random.default_rng([0, 0, i]), SynthConfig(classes=6, imgsz=128,
                                                                                   **SCENES[scene]))
            n += len(labels)
            sizes += [max(x2 - x1, y2 - y1) for _, x1, y1, x2, y2 in labels]
        return n / 40, float(np.median(sizes))

    (n_clear, s_clear), (n_dense, s_dense) = stats("clear"), stats("dense")
    assert n_dense > 1.5 * n_clear and s_dense < 0.75 * s_clear


def test_scene_class_count_is_bounded_by_its_shapes(tmp_path):
    assert scene_classes("clear") == len(CLASS_NAMES) and scene_classes("dense") == len(CLASS_NAMES) - 3
    with pytest.raises(ValueError, match="1..9 for scene 'dense'"):
        write_dataset(tmp_path, train=1, val=1, imgsz=64, classes=10, scene="dense")
