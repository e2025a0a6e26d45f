"""A detection set from another generator than kdctl's shapes, to check a recipe off the data it was tuned on:
the digits 0-9 drawn in a TrueType font (Pillow's own, nothing downloaded) at 14-60 px, in random colours, on
noisy colour gradients of varying, non-square sizes (160-256 × 112-200 px), lightly blurred, saved as JPEG; up to
six non-overlapping digits an image, YOLO layout. Ten classes where the built-in scenes have three or six, glyphs
that differ by their strokes (6/9, 1/7) rather than by outline, and no image at the training size.

    python bench/glyph_data.py data/glyphs --train 800 --val 200
    python bench/distill_families.py --data data/glyphs/data.yaml --teacher runs/train/glyphs-teacher \\
        --student yolov8-tiny.yaml --train imgsz=160 --families head-inherit head --no-ultralytics --jobs 2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CLASSES = list("0123456789")


def _image(rng: random.Random, image: Path, label: Path) -> None:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    w, h = rng.randint(160, 256), rng.randint(112, 200)
    c0, c1 = (np.array([rng.random() for _ in range(3)]) for _ in range(2))
    t = np.linspace(0, 1, w)[None, :, None]
    base = np.zeros((h, w, 3), np.float32)
    base[:] = (c0 * (1 - t) + c1 * t) * 255
    base += np.random.default_rng(rng.randint(0, 1 << 30)).normal(0, 18, base.shape)  # in float32
    im = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw, rows, boxes = ImageDraw.Draw(im), [], []
    for _ in range(rng.randint(1, 6)):
        k, size = rng.randrange(len(CLASSES)), rng.randint(14, 60)
        font = ImageFont.load_default(size=size)
        x, y = rng.randint(0, w - 10), rng.randint(0, h - 10)
        left, top, right, bottom = draw.textbbox((x, y), CLASSES[k], font=font)
        if right > w or bottom > h or right - left < 4 or bottom - top < 4:
            continue
        if any(not (right < bl or left > br or bottom < bt or top > bb) for bl, bt, br, bb in boxes):
            continue  # digits never overlap: each box is the glyph's own ink
        draw.text((x, y), CLASSES[k], font=font, fill=tuple(rng.randint(0, 255) for _ in range(3)))
        boxes.append((left, top, right, bottom))
        rows.append(f"{k} {(left + right) / 2 / w:.6f} {(top + bottom) / 2 / h:.6f} {(right - left) / w:.6f} "
                    f"{(bottom - top) / h:.6f}")
    im.filter(ImageFilter.GaussianBlur(rng.random() * 0.8)).save(image, quality=90)
    label.write_text("".join(r + "\n" for r in rows))


def write(root: Path, train: int, val: int) -> Path:
    """The set under ``root`` (a new folder); returns its data.yaml. The same counts give the same images."""
    root.mkdir(parents=True)
    for split, n, seed in (("train", train, 1), ("val", val, 2)):
        rng = random.Random(seed)
        for folder in ("images", "labels"):
            (root / folder / split).mkdir(parents=True)
        for i in range(n):
            _image(rng, root / "images" / split / f"{i:05d}.jpg", root / "labels" / split / f"{i:05d}.txt")
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: '{c}'\n" for i, c in enumerate(CLASSES)))
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a new folder for the dataset")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--val", type=int, default=200)
    a = ap.parse_args(argv)
    if a.out.exists():
        ap.error(f"{a.out}: already exists; choose a new folder")
    print(write(a.out, a.train, a.val))


if __name__ == "__main__":
    main()
