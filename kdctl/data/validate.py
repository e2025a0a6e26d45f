"""Check a dataset before anything trains or scores on it: every label line and every image.

A label line is ``class x_center y_center width height`` (normalised) or ``class x1 y1 x2 y2 ...`` (a polygon of
at least three points, boxed as Ultralytics does). Numbers must be finite, the class an integer in ``[0, nc)``,
and boxes inside the image up to :data:`TOLERANCE`. Images must decode. By default the first problem is a one-line
error naming ``file:line``; with ``skip_invalid`` the bad images are left out and listed.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOLERANCE = 0.01  # Ultralytics' bound: normalised values may exceed [0, 1] by 1 % (rounding in converters)
MIN_SIDE = 10     # px; Ultralytics refuses smaller images too


class LabelError(ValueError):
    """One bad line: ``str()`` is ``file:line: what``."""

    def __init__(self, file: Path, line: int | None, what: str):
        self.file, self.line, self.what = file, line, what
        super().__init__(f"{file}{f':{line}' if line else ''}: {what}")


def _number(tok: str, path: Path, n: int, col: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise LabelError(path, n, f"{col} '{tok}' is not a number") from None
    if not math.isfinite(v):
        raise LabelError(path, n, f"{col} is {tok} (not finite)")
    return v


def _box_line(parts: list[str], path: Path, n: int, nc: int | None) -> list[float]:
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        raise LabelError(path, n, f"has {len(parts)} columns; expected 5 (class x_center y_center width height) "
                                  "or a polygon (class x1 y1 x2 y2 x3 y3 ...)")
    cls = _number(parts[0], path, n, "class")
    if not cls.is_integer() or cls < 0 or (nc is not None and cls >= nc):
        rng = ("class ids are whole numbers from 0" if nc is None else
               f"the dataset has {nc} class{'es' * (nc != 1)}: {'0' if nc == 1 else f'0..{nc - 1}'}")
        raise LabelError(path, n, f"class id {parts[0]} is out of range ({rng})")
    vals = [_number(t, path, n, f"column {i + 2}") for i, t in enumerate(parts[1:])]
    lo, hi = -TOLERANCE, 1 + TOLERANCE
    if len(parts) == 5:
        cx, cy, w, h = vals
        if w < 0 or h < 0:  # a zero-size box is kept, as Ultralytics keeps it (augmentation drops it in training)
            raise LabelError(path, n, f"box width/height must be >= 0 (got {w:g}, {h:g})")
        # Ultralytics' bound is on the four values, not on the box's extent: a box that overhangs the image edge
        # (centre near it, a whole width) is trained on and scored as given
        if not (lo <= cx <= hi and lo <= cy <= hi and w <= hi and h <= hi):
            raise LabelError(path, n, f"box ({cx:g} {cy:g} {w:g} {h:g}) is outside the image: coordinates must "
                                      "be normalised to [0, 1]")
        return [cls, cx, cy, w, h]
    xs, ys = vals[0::2], vals[1::2]
    if not all(lo <= v <= hi for v in vals):
        raise LabelError(path, n, "polygon point outside [0, 1]: coordinates must be normalised")
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)  # a degenerate polygon is a zero-size box, as above
    return [cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def parse_labels(path: Path, nc: int | None = None, pose_columns: int | None = None) -> np.ndarray:
    """``(n, 5)`` rows ``class cx cy w h`` from a YOLO label file (none: no objects); raises :class:`LabelError`.

    ``pose_columns``: a pose dataset's row length (``5 + keypoints x dims`` from its ``kpt_shape``), refused: kdctl
    would read an odd-length one as a polygon, where Ultralytics keeps its box."""
    if not path.exists():
        return np.zeros((0, 5))
    try:  # a byte-order mark (Notepad's UTF-8) is read past, as Ultralytics (8.4.183 on) reads labels
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise LabelError(path, None, f"cannot be read as text ({type(e).__name__})") from None
    lines = [(i, line.split()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    pose = next((i for i, parts in lines if pose_columns and len(parts) == pose_columns), None)
    if pose is not None:
        raise LabelError(path, pose, f"has {pose_columns} columns: a box with keypoints (the dataset's kpt_shape); "
                                     "kdctl reads detection labels: keep each row's first 5 columns")
    rows = [_box_line(parts, path, i, nc) for i, parts in lines]
    polygon = next((i for i, parts in lines if len(parts) > 5), None)
    box = next((i for i, parts in lines if len(parts) == 5), None)
    if polygon is not None and box is not None:  # Ultralytics drops such an image from training and validation
        raise LabelError(path, max(polygon, box), f"mixes box rows (5 columns, line {box}) and polygon rows (line "
                                                  f"{polygon}); Ultralytics leaves such an image out: give one kind")
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    # a row given twice is one object: Ultralytics' dataset drops repeats for training and validation, so scoring
    # must too (a repeat is an extra ground truth no detection can match)
    _, first = np.unique(arr, axis=0, return_index=True)
    return arr[np.sort(first)]


def open_image(path: Path):
    """PIL's own ``Image.open``: importing Ultralytics replaces it with one that, on any file Pillow cannot
    identify, tries to install and load a HEIF plugin; a broken file must simply be reported. Pillow's warning for an
    image of 89 to 179 megapixels (a decompression bomb's size, refused above that) is not printed: such an image is
    read (or, truncated, named invalid) like any other."""
    import sys
    import warnings

    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return getattr(patches, "_image_open", Image.open)(path)


LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts (git-lfs' spec)


def git_lfs_pointer(path) -> bool:
    """Whether ``path`` is a Git LFS pointer: a repository cloned without `git lfs pull` holds these small text
    files in place of its images and weights."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except (OSError, TypeError):
        return False


def image_problem(e: Exception, path=None) -> str:
    from PIL import UnidentifiedImageError

    if path is not None and git_lfs_pointer(path):
        return "cannot be decoded as an image: a Git LFS pointer file, not the image itself (`git lfs pull` fetches it)"
    if isinstance(e, UnidentifiedImageError):
        return "cannot be decoded as an image (not a format Pillow reads)"
    return f"cannot be decoded as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})"


def read_image(path: Path, use):
    """``use(image)`` on a file that must be an image; a broken one is a one-line :class:`DataError` naming it."""
    try:
        with open_image(path) as im:
            return use(im)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for a broken file; each means "not an image"
        from kdctl.errors import DataError

        raise DataError(f"{path}: {image_problem(e, path)}") from None


def check_image(path: Path) -> str | None:
    """``None`` if ``path`` decodes as an image of at least :data:`MIN_SIDE` px, else what is wrong."""
    try:
        with open_image(path) as im:
            im.verify()
        with open_image(path) as im:  # verify() leaves the file unusable; decode (JPEG at 1/8 scale) to be sure
            w, h = im.size
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            mode = im.mode
    except FileNotFoundError:
        return "image not found"
    except Exception as e:  # PIL raises many types for broken files; any of them means "not an image"
        return image_problem(e, path)
    if w < MIN_SIDE or h < MIN_SIDE:
        return f"image is {w}x{h} px; at least {MIN_SIDE}x{MIN_SIDE} needed"
    from kdctl.detectors.ultralytics_env import opencv_reads

    if mode not in EIGHT_BIT_MODES and not mode.startswith("I;16") and opencv_reads(path) is False:
        return (f"Pillow reads its {mode} pixels but OpenCV, which Ultralytics trains with, cannot (save it with 8 or "
                "16 bits per channel)")
    return None


# Pillow modes of 8 bits per channel, which OpenCV reads as Pillow does; others (32-bit float or integer) are asked
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass
class SplitCheck:
    images: list[Path]          # the usable ones, in the given order
    skipped: list[str]          # "file[:line]: what" for each image left out
    per_class: Counter = field(default_factory=Counter)  # objects per class id, over the usable images
    background: int = 0         # usable images without an object
    zero_size: list[Path] = field(default_factory=list)  # the label file of each box of zero width or height

    @property
    def objects(self) -> int:
        return sum(self.per_class.values())


def check_split(images: list[Path], nc: int, label_of, *, skip_invalid: bool, workers: int = 8,
                pose_columns: int | None = None) -> SplitCheck:
    """Validate the labels and images of one split; raise the first problem unless ``skip_invalid``."""
    from kdctl.errors import DataError

    with ThreadPoolExecutor(max_workers=workers) as pool:
        image_problems = list(pool.map(check_image, images))
    kept, skipped, per_class, background, zero_size = [], [], Counter(), 0, []
    for img, why in zip(images, image_problems):
        if why is None:
            try:
                rows = parse_labels(label_of(img), nc, pose_columns)
            except LabelError as e:
                why = str(e)
        else:
            why = f"{img}: {why}"
        if why is None:
            kept.append(img)
            per_class.update(int(c) for c in rows[:, 0])
            background += not len(rows)
            zero_size += [label_of(img)] * int(((rows[:, 3] <= 0) | (rows[:, 4] <= 0)).sum())
        elif skip_invalid:
            skipped.append(why)
        else:
            raise DataError(f"{why} (pass --skip-invalid or set data.skip_invalid to leave such images out)")
    return SplitCheck(kept, skipped, per_class, background, zero_size)
