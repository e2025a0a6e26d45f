"""A deterministic synthetic detection dataset in Ultralytics (YOLO) format.

Made to separate model capacities: classes differ by shape, not colour; object sizes span 8 px to almost
half the image (log-uniform, so many are small); unlabeled distractors clutter a textured background; and
later objects occlude earlier ones, an object staying labeled only while enough of it is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "star",
               "diamond", "hexagon", "crescent", "frame", "arrow", "pentagon")
MIN_VISIBLE = 0.4  # fraction of an object's pixels that must stay visible for it to keep its label


def _regular(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, s: int, rot: float) -> None:
    """Draw class ``cls`` filled with 255 into an ``s``×``s`` mask."""
    c, r = s / 2, s / 2 - 1
    t = max(2, int(s * 0.18))  # stroke for hollow shapes
    name = CLASS_NAMES[cls]
    if name == "circle":
        draw.ellipse([1, 1, s - 2, s - 2], fill=255)
    elif name == "square":
        draw.polygon(_regular(c, c, r, 4, rot + math.pi / 4), fill=255)
    elif name == "triangle":
        draw.polygon(_regular(c, c, r, 3, rot), fill=255)
    elif name == "cross":
        w = s * 0.16
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon([(c - dx * r + px, c - dy * r + py), (c + dx * r + px, c + dy * r + py),
                          (c + dx * r - px, c + dy * r - py), (c - dx * r - px, c - dy * r - py)], fill=255)
    elif name == "ring":
        draw.ellipse([1, 1, s - 2, s - 2], fill=255)
        draw.ellipse([1 + t, 1 + t, s - 2 - t, s - 2 - t], fill=0)
    elif name == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = rot + math.pi * k / 5
            pts.append((c + rr * math.cos(a), c + rr * math.sin(a)))
        draw.polygon(pts, fill=255)
    elif name == "diamond":
        draw.polygon([(c + r * 0.55 * math.cos(rot + a) - 0, c + r * math.sin(rot + a)) for a in
                      (0, math.pi / 2, math.pi, 3 * math.pi / 2)], fill=255)
    elif name == "hexagon":
        draw.polygon(_regular(c, c, r, 6, rot), fill=255)
    elif name == "crescent":
        draw.ellipse([1, 1, s - 2, s - 2], fill=255)
        off = s * 0.3
        draw.ellipse([1 + off * math.cos(rot), 1 + off * math.sin(rot),
                      s - 2 + off * math.cos(rot), s - 2 + off * math.sin(rot)], fill=0)
    elif name == "frame":
        draw.polygon(_regular(c, c, r, 4, rot + math.pi / 4), fill=255)
        draw.polygon(_regular(c, c, max(r - t * 1.4, 1), 4, rot + math.pi / 4), fill=0)
    elif name == "arrow":
        pts = [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)]
        ca, sa = math.cos(rot), math.sin(rot)
        draw.polygon([(c + r * (x * ca - y * sa), c + r * (x * sa + y * ca)) for x, y in pts], fill=255)
    elif name == "pentagon":
        draw.polygon(_regular(c, c, r, 5, rot), fill=255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour gradient + sinusoidal texture + noise, so 'flat means background' never holds."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    for _ in range(rng.integers(1, 4)):
        f = rng.uniform(2, 24)
        a = rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)) + rng.uniform(0, 6.3))
        img += wave[..., None] * rng.uniform(5, 30, 3)
    img += rng.normal(0, rng.uniform(3, 12), img.shape)
    return np.clip(img, 0, 255)


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 6
    imgsz: int = 320
    min_objects: int = 2
    max_objects: int = 12
    distractors: tuple[int, int] = (2, 10)
    min_size: int = 8
    max_frac: float = 0.45   # largest object side, as a fraction of the image
    blur_p: float = 0.3
    first_class: int = 0     # index into CLASS_NAMES of class 0, so scenes can use other shapes


# Scenes: "cluttered" (the default: many small objects, clutter, occlusion; hard for a small CPU budget),
# "clear" (fewer, larger objects and little clutter: a YOLOv8n reaches a strong mAP within minutes on a CPU, so
# the teacher-student gap that distillation closes is a real one) and "dense" (a second learnable set unlike
# "clear": other shapes, more and smaller objects, more clutter and blur, so no loss is tuned to one generator).
SCENES = {
    "cluttered": {},
    "clear": {"min_objects": 1, "max_objects": 4, "distractors": (0, 2), "min_size": 24, "max_frac": 0.6,
              "blur_p": 0.1},
    "dense": {"min_objects": 3, "max_objects": 8, "distractors": (1, 6), "min_size": 14, "max_frac": 0.4,
              "blur_p": 0.25, "first_class": 3},
}


def scene_classes(scene: str) -> int:
    """How many classes ``scene`` can draw (its shapes run from its first class to the end of CLASS_NAMES)."""
    return len(CLASS_NAMES) - SCENES[scene].get("first_class", 0)


def render_image(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Image.Image, list[tuple[int, float, float, float, float]]]:
    """One image and its labels as (class, x1, y1, x2, y2) in pixels (visible extent)."""
    size = cfg.imgsz
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)
    objects: list[tuple[int, int]] = []  # (object id, class) for labeled objects; distractors get id -2
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_dis = int(rng.integers(*cfg.distractors))
    kinds = [("obj", i) for i in range(n_obj)] + [("dis", i) for i in range(n_dis)]
    order = rng.permutation(len(kinds))
    area = {}
    max_size = max(cfg.min_size + 1, int(size * cfg.max_frac))
    for oid, k in enumerate(order):
        kind = kinds[k][0]
        s = int(round(math.exp(rng.uniform(math.log(cfg.min_size), math.log(max_size)))))
        mask_img = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(mask_img)
        if kind == "obj":
            cls = int(rng.integers(cfg.classes))
            _draw_shape(d, cfg.first_class + cls, s, float(rng.uniform(0, 2 * math.pi)))
        else:  # irregular blob or scribble: unlabeled clutter
            cls = -1
            if rng.random() < 0.5:
                n = int(rng.integers(5, 9))
                ang = np.sort(rng.uniform(0, 2 * math.pi, n))
                rad = rng.uniform(0.25, 0.5, n) * s
                d.polygon([(s / 2 + r * math.cos(a), s / 2 + r * math.sin(a)) for a, r in zip(ang, rad)], fill=255)
            else:
                pts = [tuple(rng.uniform(0, s, 2)) for _ in range(int(rng.integers(2, 5)))]
                d.line(pts, fill=255, width=max(1, s // 10))
        mask = np.asarray(mask_img) > 127
        if mask.sum() < 4:
            continue
        x0 = int(rng.integers(-s // 4, size - 3 * s // 4 + 1))
        y0 = int(rng.integers(-s // 4, size - 3 * s // 4 + 1))
        xs, ys = slice(max(x0, 0), min(x0 + s, size)), slice(max(y0, 0), min(y0 + s, size))
        m = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        colour = rng.uniform(0, 255, 3)
        shade = colour + rng.normal(0, 10, (m.shape[0], m.shape[1], 3))
        region = img[ys, xs]
        region[m] = shade[m]
        owner[ys, xs][m] = oid if cls >= 0 else -2
        if cls >= 0:
            objects.append((oid, cls))
            area[oid] = int(mask.sum())  # full (unclipped) area, so objects cut by the border also count
    labels = []
    for oid, cls in objects:
        ys_, xs_ = np.nonzero(owner == oid)
        if len(xs_) < max(6, MIN_VISIBLE * area[oid]):
            continue
        labels.append((cls, float(xs_.min()), float(ys_.min()), float(xs_.max() + 1), float(ys_.max() + 1)))
    pil = Image.fromarray(img.astype(np.uint8))
    if rng.random() < cfg.blur_p:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return pil, labels


def write_dataset(out: str | Path, *, train: int = 400, val: int = 100, seed: int = 0, imgsz: int = 320,
                  classes: int = 6, progress=None, root: str | Path | None = None, scene: str = "cluttered") -> Path:
    """Write ``images/{train,val}``, ``labels/{train,val}`` and ``data.yaml``; returns the data.yaml path.

    Each split draws from its own seeded stream, so ``val`` does not change when ``train`` grows. ``root`` is the
    directory data.yaml names as ``path`` (default ``out``): where the set will live once a temporary ``out`` is
    renamed into place.
    """
    import yaml

    out = Path(out)
    if scene not in SCENES:
        raise ValueError(f"scene '{scene}'; valid: {', '.join(SCENES)}")
    if not 1 <= classes <= scene_classes(scene):
        raise ValueError(f"classes must be 1..{scene_classes(scene)} for scene '{scene}'")
    cfg = SynthConfig(classes=classes, imgsz=imgsz, **SCENES[scene])
    for split, n, stream in (("train", train, 0), ("val", val, 1)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, stream, i])
            im, labels = render_image(rng, cfg)
            stem = f"{split}_{i:06d}"
            im.save(out / "images" / split / f"{stem}.png", optimize=False, compress_level=1)
            lines = [f"{c} {(x1 + x2) / 2 / imgsz:.6f} {(y1 + y2) / 2 / imgsz:.6f} {(x2 - x1) / imgsz:.6f} "
                     f"{(y2 - y1) / imgsz:.6f}" for c, x1, y1, x2, y2 in labels]
            (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            if progress:
                progress()
    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({
        "path": str(Path(root or out).resolve()), "train": "images/train", "val": "images/val",
        "names": {i: CLASS_NAMES[cfg.first_class + i] for i in range(classes)},
        "kdctl_synthetic": {"seed": seed, "train": train, "val": val, "imgsz": imgsz, "classes": classes,
                            "scene": scene},
    }, sort_keys=False))
    return data_yaml
