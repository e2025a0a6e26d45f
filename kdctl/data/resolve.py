"""Turn a recipe's ``data`` section into an Ultralytics dataset YAML on disk plus what evaluation needs.

Ultralytics YAMLs are checked (names, splits, paths) and rewritten with an absolute ``path``; COCO-JSON datasets
are converted once into a cached YOLO layout (images linked, not copied); the synthetic set is generated once per
setting into the cache. Cache writes go to a temporary directory renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdctl.errors import DataError

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def cache_dir() -> Path:
    return Path(os.environ.get("KDCTL_CACHE", Path.home() / ".cache" / "kdctl"))


@dataclass
class Dataset:
    yaml: Path                 # an Ultralytics data YAML with an absolute path
    names: list[str]
    train_images: list[Path]
    val_images: list[Path]

    @property
    def nc(self) -> int:
        return len(self.names)

    def describe(self) -> dict:
        return {"yaml": str(self.yaml), "nc": self.nc, "names": self.names,
                "train_images": len(self.train_images), "val_images": len(self.val_images)}


def label_path(img: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, extension ``.txt``."""
    s = str(img)
    i = s.rfind(f"{os.sep}images{os.sep}")
    if i < 0:
        return img.with_suffix(".txt")
    return Path(s[:i] + f"{os.sep}labels{os.sep}" + s[i + 8:]).with_suffix(".txt")


def _list_images(spec, root: Path, source: str, field: str) -> list[Path]:
    entries = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for e in entries:
        p = Path(str(e))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMG_EXTS)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else (p.parent / q).resolve())
        else:
            raise DataError(f"{source}: {field}: '{p}' is neither an image directory nor a .txt image list")
    if not out:
        raise DataError(f"{source}: {field}: no images found in '{spec}'")
    return out


def load_yolo_yaml(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset YAML not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with path/train/val/names")
    for key in ("train", "val", "names"):
        if key not in data or data[key] in (None, "", [], {}):
            raise DataError(f"{path}: field '{key}' is missing")
    names = data["names"]
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(f"{path}: field 'names': class ids must be 0..{len(keys) - 1} without gaps, got {keys}")
        names = [str(names[k]) for k in keys]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DataError(f"{path}: field 'names': expected a list or an id->name mapping")
    if "nc" in data and int(data["nc"]) != len(names):
        raise DataError(f"{path}: field 'nc': {data['nc']} does not match the {len(names)} names")
    root_field = data.get("path")
    if root_field:
        root = Path(root_field).expanduser()
        if not root.is_absolute():
            root = next((c for c in (path.parent / root, Path.cwd() / root) if c.is_dir()), path.parent / root)
    else:
        root = path.parent
    if not root.is_dir():
        raise DataError(f"{path}: field 'path': directory '{root}' not found")
    root = root.resolve()
    train = _list_images(data["train"], root, str(path), "train")
    val = _list_images(data["val"], root, str(path), "val")
    for split, images in (("train", train), ("val", val)):
        if not any(label_path(p).is_file() for p in images):
            raise DataError(f"{path}: {split}: none of its {len(images)} images has a label file (expected e.g. "
                            f"{label_path(images[0])})")
    return Dataset(path, names, train, val)


def normalised_yaml(ds: Dataset, out: Path) -> Path:
    """Write a copy of the dataset YAML with an absolute root, so training never depends on the CWD."""
    data = yaml.safe_load(ds.yaml.read_text(encoding="utf-8"))
    root = Path(data.get("path") or ds.yaml.parent)
    if not root.is_absolute():
        root = next((c for c in (ds.yaml.parent / root, Path.cwd() / root) if c.is_dir()), ds.yaml.parent / root)
    data["path"] = str(root.resolve())
    data["names"] = {i: n for i, n in enumerate(ds.names)}
    data.pop("download", None)  # never let a trainer fetch a dataset
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def atomic_build(final: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place; an existing one is kept."""
    if final.exists():
        return final
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def synthetic_dataset(train: int, val: int, seed: int, imgsz: int, classes: int, progress=None) -> Dataset:
    from kdctl.data.synth import write_dataset

    key = f"synth-v1-{classes}c-{imgsz}px-{train}t-{val}v-s{seed}"
    final = cache_dir() / "synthetic" / key
    final.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        write_dataset(tmp, train=train, val=val, seed=seed, imgsz=imgsz, classes=classes, progress=progress,
                      root=final)

    atomic_build(final, build)
    return load_yolo_yaml(final / "data.yaml")


def _read_coco(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{path}: field '{key}' is missing or not a list")
    for i, im in enumerate(coco["images"]):
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(f"{path}: images[{i}].{key} is missing")
    for i, a in enumerate(coco["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(f"{path}: annotations[{i}].{key} is missing")
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise DataError(f"{path}: annotations[{i}].bbox must be [x, y, width, height]")
    return coco


def coco_dataset(train_images: str, train_annotations: str, val_images: str, val_annotations: str) -> Dataset:
    """Convert a COCO-JSON dataset into a cached YOLO layout (categories sorted by id become 0..nc-1)."""
    tr_json, va_json = Path(train_annotations), Path(val_annotations)
    tr, va = _read_coco(tr_json), _read_coco(va_json)
    cats = sorted(tr["categories"], key=lambda c: c["id"])
    if [c["id"] for c in sorted(va["categories"], key=lambda c: c["id"])] != [c["id"] for c in cats]:
        raise DataError(f"{va_json}: field 'categories' differs from {tr_json}'s")
    key = hashlib.sha256("\0".join(
        [str(Path(p).resolve()) for p in (train_images, val_images)] +
        [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (tr_json, va_json)]).encode()).hexdigest()[:16]
    final = cache_dir() / "coco" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    index = {c["id"]: i for i, c in enumerate(cats)}

    def convert(tmp: Path) -> None:
        for split, coco, img_dir, src in (("train", tr, Path(train_images), tr_json), ("val", va, Path(val_images), va_json)):
            if not img_dir.is_dir():
                raise DataError(f"{src}: images directory '{img_dir}' not found")
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            anns: dict[int, list] = {}
            for a in coco["annotations"]:
                anns.setdefault(a["image_id"], []).append(a)
            for im in coco["images"]:
                src_img = img_dir / im["file_name"]
                if not src_img.is_file():
                    raise DataError(f"{src}: image '{im['file_name']}' (id {im['id']}) not found in {img_dir}")
                stem = Path(str(im["file_name"]).replace("/", "__")).stem
                link = tmp / "images" / split / f"{stem}{src_img.suffix}"
                os.symlink(src_img.resolve(), link)
                w, h = float(im["width"]), float(im["height"])
                lines = []
                for a in anns.get(im["id"], []):
                    if a.get("iscrowd", 0):
                        continue
                    if a["category_id"] not in index:
                        raise DataError(f"{src}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
                    if x2 - x1 <= 0 or y2 - y1 <= 0:
                        continue
                    lines.append(f"{index[a['category_id']]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                                 f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
                (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        (tmp / "data.yaml").write_text(yaml.safe_dump({
            "path": str(final.resolve()), "train": "images/train", "val": "images/val",
            "names": {i: c["name"] for i, c in enumerate(cats)}}, sort_keys=False))

    atomic_build(final, convert)
    return load_yolo_yaml(final / "data.yaml")


def resolve_data(spec, progress=None) -> Dataset:
    """``spec`` is a recipe's :class:`~kdctl.recipe.schema.DataSpec` (or its dict)."""
    d = spec if isinstance(spec, dict) else spec.model_dump()
    if d.get("synthetic"):
        s = d["synthetic"]
        return synthetic_dataset(s["train"], s["val"], s["seed"], s["imgsz"], s["classes"], progress)
    if d.get("yolo"):
        return load_yolo_yaml(d["yolo"])
    if d.get("coco"):
        return coco_dataset(**d["coco"])
    raise DataError("data: give one of yolo, coco, synthetic")
