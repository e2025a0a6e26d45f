"""Turn a recipe's ``data`` section into an Ultralytics dataset YAML on disk plus what evaluation needs.

Ultralytics YAMLs are checked (names, splits, paths) and rewritten with an absolute ``path``; COCO-JSON datasets
are converted once into a cached YOLO layout (images linked, not copied); the synthetic set is generated once per
setting into the cache. Cache writes go to a temporary directory renamed into place.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdctl import faults
from kdctl.errors import DataError, json_kind, parse_json
from kdctl.recipe.validation import YamlProblem, parse_yaml, refuse_other_kind

# Ultralytics' IMG_FORMATS that Pillow decodes without a plugin (its DNG, HEIC/HEIF and PFM need one)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo", ".avif", ".jp2")


def cache_dir() -> Path:
    """Where kdctl caches generated and converted datasets and teacher outputs: ``$KDCTL_CACHE``, else
    ``$XDG_CACHE_HOME/kdctl``, else ``~/.cache/kdctl``. A variable set but empty counts as unset, as the XDG
    specification says (an empty ``KDCTL_CACHE`` used to mean the working directory)."""
    if os.environ.get("KDCTL_CACHE"):
        return Path(os.environ["KDCTL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "kdctl"


@dataclass
class Dataset:
    yaml: Path                 # an Ultralytics data YAML with an absolute path
    names: list[str]
    train_images: list[Path]   # validated (see kdctl.data.validate); bad ones left out only with skip_invalid
    val_images: list[Path]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # split -> "file[:line]: what"
    val_split: str = "val"     # the YAML's split in val_images: 'val', or the one asked for ('test', 'train')
    checks: dict = field(default_factory=dict)  # split -> SplitCheck of the splits validated (counts per class)
    notes: list[str] = field(default_factory=list)  # read as Ultralytics reads it, likely not as meant (data check)

    @property
    def nc(self) -> int:
        return len(self.names)

    def describe(self) -> dict:
        d = {"yaml": str(self.yaml), "nc": self.nc, "names": self.names,
             "train_images": len(self.train_images), "val_images": len(self.val_images)}
        if self.val_split != "val":
            d["scored_split"] = self.val_split
        if any(self.skipped.values()):
            d["skipped"] = {split: {"count": len(v), "items": v[:1000]} for split, v in self.skipped.items() if v}
        return d

    def check_model_classes(self, nc: int, what: str, flag: str = "--data", names=None) -> None:
        """A model must predict exactly this dataset's classes to be scored on it, in the same order
        (:meth:`check_model_names`)."""
        if nc != self.nc:
            raise DataError(f"{self.yaml}: names: the dataset has {self.nc} classes but {what} predicts {nc}; "
                            f"give a {flag} with the model's classes")
        self.check_model_names(names, what)

    def check_model_names(self, names, what: str) -> None:
        """Refuse a model whose class names (``model.names``) are this dataset's in another order: it would be
        scored, or distilled from, class against wrong class without a word (Ultralytics does not compare them).
        Names that differ otherwise (other words, a model built from a YAML: '0', '1', ...) are not judged."""
        theirs = listed_names(names)
        key = [name_key(n) for n in theirs]
        ours = [name_key(n) for n in self.names]
        placeholder = theirs == [str(i) for i in range(len(theirs))]  # a model built from a YAML names none
        if len(theirs) == self.nc and not placeholder and key != ours and sorted(key) == sorted(ours):
            moved = next(i for i, (a, b) in enumerate(zip(key, ours)) if a != b)
            raise DataError(f"{self.yaml}: names: {what} has this dataset's classes in another order (class "
                            f"{moved} is '{theirs[moved]}' there, '{self.names[moved]}' here), so its class "
                            f"{moved} would be taken for '{self.names[moved]}'; the model's order is "
                            f"{', '.join(theirs)}")

    def class_index(self, names) -> list[int] | None:
        """Where a model of more classes than this dataset's holds them, found by name (case and surrounding
        spaces aside): its class index for each of this dataset's classes, in this dataset's order, when its names
        include every one of them once; a COCO teacher for a person/car set gives ``[0, 2]``. None otherwise: as
        many classes (these, in this order or another, which :meth:`check_model_names` refuses since which order is
        right cannot be told; or others, taken by index), a model that names none (built from a YAML), or names
        that do not cover this dataset's (refused where the classes must match)."""
        key = [name_key(n) for n in listed_names(names)]
        ours = [name_key(n) for n in self.names]
        if len(key) <= len(ours) or len(set(ours)) < len(ours) or any(key.count(n) != 1 for n in ours):
            return None
        return [key.index(n) for n in ours]

    def start_index(self, names, nc: int) -> list[int] | None:
        """Where a checkpoint of ``nc`` classes named ``names`` starts each of this dataset's classes when it is
        fine-tuned on it, as Ultralytics loads a YOLO or RT-DETR checkpoint (``DetectionModel.load``,
        ``_remap_cls_by_names``) and kdctl's Faster R-CNN loop does: the checkpoint's class of the same name (case
        and surrounding spaces aside; of a name given twice, the last, as Ultralytics), or -1 for a class it starts
        fresh. None where the class rows are taken as they are: as many classes, named the same in the same order,
        or names that match none of these (a checkpoint that names none, other words)."""
        theirs = listed_names(names)[:nc]
        placeholder = any(all(n == str(i) for i, n in enumerate(ns)) for ns in (theirs, self.names))
        lookup = {name_key(n): i for i, n in enumerate(theirs)}
        index = [-1 if placeholder else lookup.get(name_key(n), -1) for n in self.names]
        if nc == self.nc and (max(index) < 0 or index == list(range(nc))):
            return None
        return index


def name_key(name) -> str:
    """A class name as names are compared (a model's with a dataset's): case and surrounding spaces aside."""
    return str(name).strip().casefold()


def listed_names(names) -> list[str]:
    """A model's class names (``model.names``: Ultralytics' ``{id: name}``, or a list) as a list of strings in class
    order; whatever a checkpoint of other code holds there (keys of mixed types, numbers, nothing) is read as
    well as it can be, never an error: the names are compared, not trusted."""
    if isinstance(names, dict):
        try:
            items = sorted(names.items(), key=lambda kv: int(kv[0]))
        except (TypeError, ValueError):
            items = list(names.items())
        return [str(n) for _, n in items]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


def class_keys(names: list[str]) -> list[str]:
    """What per-class results (AP, object counts) are keyed by: the class names, except that a name several classes
    share (Ultralytics trains such a dataset: a COCO export with two categories of one name, a merged label set) is
    given with its class id, ``car (class 3)``, so no class reads as, or overwrites, another."""
    count = Counter(names)
    return [f"{n} (class {i})" if count[n] > 1 else n for i, n in enumerate(names)]


def _beside_images(img: Path, folder: str) -> Path | None:
    s = str(img)
    i = s.rfind(f"{os.sep}images{os.sep}")
    return None if i < 0 else Path(s[:i] + f"{os.sep}{folder}{os.sep}" + s[i + 8:]).with_suffix(".txt")


def label_path(img: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, extension ``.txt``."""
    return _beside_images(img, "labels") or img.with_suffix(".txt")


def images_digest(images: list[Path]) -> str:
    """sha256 of a set of labelled images as kdctl reads it: each image's name and size and its label file's bytes,
    in order. Cheap on a large set (no image is read), and the same for a dataset copied or moved elsewhere."""
    import hashlib

    h = hashlib.sha256()
    for p in images:
        p = Path(p)
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
        lp = label_path(p)
        h.update(lp.read_bytes() if lp.is_file() else b"-")
    return h.hexdigest()


def crowd_path(img: Path) -> Path | None:
    """Where a converted COCO set keeps an image's crowd regions (``iscrowd: 1``; YOLO rows, ``crowd/`` beside
    ``labels/``): Ultralytics never reads them (it skips crowd annotations too); kdctl's evaluator ignores
    detections on them, as COCOeval does. None for an image outside an ``images/`` folder."""
    return _beside_images(img, "crowd")


def _listed_image(line: str, lst: Path) -> Path:
    """One line of a .txt image list, as Ultralytics reads it: ``./x`` beside the list, an absolute path as is, any
    other relative path from the working directory. kdctl first looks beside the list (where a list that travels with
    its dataset means it), so a run does not depend on where it was started; failing that, Ultralytics' place."""
    q = Path(line)
    if q.is_absolute():
        return q
    beside = Path(os.path.abspath(lst.parent / q))  # a linked image keeps its place: its label is beside the link
    if line.startswith("./") or beside.exists() or beside.is_symlink():
        return beside
    here = Path.cwd() / q
    return Path(os.path.abspath(here)) if here.exists() else beside  # not found: named beside the list


def _split_path(spec: str, root: Path) -> Path:
    """A split given as one path, where Ultralytics finds it: under the root, or, for a ``../x`` that is not there,
    ``x`` under the root (Roboflow's exports write ``train: ../train/images`` beside ``train/``)."""
    p = Path(spec)
    if p.is_absolute():
        return p
    if not (root / p).exists() and spec.startswith("../") and (root / spec[3:]).exists():
        return root / spec[3:]
    return root / p


def _list_images(spec, root: Path, source: str, field: str | None) -> list[Path]:
    where = f"{source}: {field}" if field else source  # field None: ``source`` names the option itself
    entries = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for e in entries:
        if isinstance(spec, list):  # a list's entries are taken as written: Ultralytics has no fallback for them
            p = Path(str(e)) if Path(str(e)).is_absolute() else root / str(e)
        else:
            p = _split_path(str(e), root)
        if p.is_dir():
            # files only: a folder named like an image (``x.jpg/``) is no image (a dangling link is, and is named);
            # nothing hidden, as Ultralytics' glob: macOS's ``._x.jpg`` resource forks, ``.ipynb_checkpoints/``
            out += sorted(q for q in p.rglob("*")
                          if q.suffix.lower() in IMG_EXTS and (q.is_symlink() or not q.is_dir())
                          and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file() and p.suffix == ".txt":
            try:  # a byte-order mark is allowed, as Ultralytics reads lists with utf-8-sig
                lines = p.read_text(encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError:
                raise DataError(f"{where}: image list '{p}' is not UTF-8 text") from None
            out += [_listed_image(line.strip(), p) for line in lines if line.strip()]
        else:
            raise DataError(f"{where}: '{p}' is neither an image directory nor a .txt image list")
    if not out:
        raise DataError(f"{where}: no images found in '{spec}'")
    return out


def list_images(spec: str | Path, source: str) -> list[Path]:
    """The images of a folder (searched recursively, hidden entries left out) or of a ``.txt`` list, read as a
    dataset split's are; ``source`` names where the path was given, in a one-line error."""
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{source}: '{p}' not found (give an image folder or a .txt image list)")
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):  # Ultralytics' export calibrates on its data=
        raise DataError(f"{source}: '{p}' is a dataset YAML; give an image folder or a .txt image list (a dataset's "
                        "train split calibrates with --data)")
    return _list_images(str(p.resolve()), Path.cwd(), source, None)


def _renamed(data: dict) -> dict:
    """Ultralytics' one key rename: a YAML that names its validation split ``validation`` is read as ``val``."""
    if isinstance(data, dict) and "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    return data


def _dataset_root(data: dict, yaml_path: Path) -> Path:
    """The dataset's root: ``path`` (default: the YAML's folder). A relative one is looked up beside the YAML, then
    where Ultralytics looks for it: the working directory, then Ultralytics' ``datasets_dir`` setting."""
    if not data.get("path"):
        return yaml_path.parent
    root = Path(data["path"]).expanduser()
    if root.is_absolute():
        return root
    for place in (yaml_path.parent, Path.cwd()):
        if (place / root).is_dir():
            return place / root
    from kdctl.detectors.ultralytics_env import datasets_dir  # only asked when needed: it imports Ultralytics

    shared = datasets_dir() / root
    return shared if shared.is_dir() else yaml_path.parent / root


def _ultralytics_dataset(name: Path) -> Path:
    """``coco8.yaml`` by bare name and not a file here: the YAML Ultralytics ships by that name, as ``yolo train
    data=coco8.yaml`` reads it, where its images are already in place (its ``path`` in the working directory or
    Ultralytics' ``datasets_dir``). Ultralytics would download them; kdctl downloads nothing, so it says where they
    go. Any other name comes back as it was given."""
    from kdctl.detectors.ultralytics_env import datasets_dir, shipped_dataset

    shipped = shipped_dataset(name.name)
    if shipped is None:
        return name
    try:
        data = _renamed(parse_yaml(shipped))
    except YamlProblem:
        return name
    if not isinstance(data, dict):
        return name
    if _dataset_root(data, shipped).is_dir():  # its path: in the working directory or datasets_dir, as Ultralytics
        return shipped
    root = Path(str(data.get("path") or "")).expanduser()
    raise DataError(f"{name}: dataset YAML not found here; Ultralytics ships one by that name and downloads its "
                    f"images into {datasets_dir() / root} on first use, but kdctl downloads no data: put the dataset "
                    "there, or give the path of a dataset YAML on this machine")


def load_yolo_yaml(path: str | Path, *, skip_invalid: bool = False, splits: tuple[str, ...] = ("train", "val"),
                   score: str = "val") -> Dataset:
    """Read and validate an Ultralytics dataset YAML: names, splits, every label line and every image of the
    ``splits`` that will be used (the others are listed, not checked). ``score``: the YAML split that becomes
    ``val_images`` (``kdctl eval --split test``, as Ultralytics' ``val split=test``)."""
    path = Path(path)
    if not os.path.lexists(path) and len(path.parts) == 1:
        path = _ultralytics_dataset(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a directory; give its data.yaml" if path.is_dir() else
                                       "not a regular file (a device, pipe or socket); give a dataset YAML"
                                       if path.exists() else "dataset YAML not found"))
    try:
        data = parse_yaml(path)
    except YamlProblem as e:
        raise DataError(f"{path}: {e}" + (" (a dataset YAML is text)" if "UTF-8" in str(e) else "")) from None
    refuse_other_kind(data, path, "a dataset YAML", DataError)  # a recipe, a COCO annotation file as --data
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with path/train/val/names")
    data = _renamed(data)
    skip_invalid = skip_invalid or data.get("kdctl_skip_invalid") is True  # a bundle trained that way
    for key in ("train", "val"):
        if data.get(key) not in (None, "") and not isinstance(data[key], (str, list)):
            raise DataError(f"{path}: field '{key}': expected a path or a list of paths")
    if data.get("path") and not isinstance(data["path"], str):  # the root is one folder (empty: the YAML's)
        raise DataError(f"{path}: field 'path': expected the dataset's root folder (one path), got a "
                        f"{type(data['path']).__name__}")
    nc = data.get("nc")
    if isinstance(nc, (str, float)):  # Ultralytics reads '6' and 6.0 as 6 (6.5, 'six', nan: refused below, named)
        try:
            count = float(nc)
        except ValueError:
            count = math.nan
        if count.is_integer():
            data["nc"] = nc = int(count)
    if data.get("names") in (None, "", [], {}) and isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
        data["names"] = [f"class_{i}" for i in range(nc)]  # Ultralytics' names for a dataset that gives only nc
    for key in ("train", "val", "names"):
        if key not in data or data[key] in (None, "", [], {}):
            raise DataError(f"{path}: field '{key}' is missing" + (" (or give nc, the class count)" if key == "names"
                                                                  else ""))
    names = data["names"]
    if isinstance(names, dict):
        def class_id(k):  # Ultralytics reads the ids with int(): '0' and 0 are the same class
            if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit())):
                raise DataError(f"{path}: field 'names': class id {k!r} is not a whole number")
            return int(k)

        by_id = {}
        for k, v in names.items():
            i = class_id(k)
            if i in by_id:
                raise DataError(f"{path}: field 'names': class id {i} is given twice")
            by_id[i] = v
        keys = sorted(by_id)
        if keys != list(range(len(keys))):
            raise DataError(f"{path}: field 'names': class ids must be 0..{len(keys) - 1} without gaps, got {keys}")
        raw = [by_id[k] for k in keys]
    elif isinstance(names, list):
        raw = names
    else:
        raise DataError(f"{path}: field 'names': expected a list or an id->name mapping")
    names = [str(n) for n in raw]
    notes = [f"{path}: field 'names': class {i} is named '{v}': " + (
        "the YAML gives it no value (empty, or ~)" if v is None else "the YAML gives it as a boolean (a bare "
        "yes/no/on/off/true/false: YAML 1.1, as PyYAML and Ultralytics read it); quote the word to name the class by "
        "it") for i, v in enumerate(raw) if v is None or isinstance(v, bool)]
    if "nc" in data and (not isinstance(data["nc"], int) or isinstance(data["nc"], bool)):
        raise DataError(f"{path}: field 'nc': {data['nc']!r} is not a whole number (the class count)")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{path}: field 'nc': {data['nc']!r} does not match the {len(names)} names")
    kpt = data.get("kpt_shape")  # a pose dataset: Ultralytics' detector trains on the boxes of its rows
    if kpt is not None and not (isinstance(kpt, list) and len(kpt) == 2 and all(type(v) is int for v in kpt)
                                and kpt[0] > 0 and kpt[1] in (2, 3)):
        raise DataError(f"{path}: field 'kpt_shape': expected [keypoints, 2 or 3], got {kpt!r}")
    channels = data.get("channels")  # Ultralytics ≥ 8.3.x builds a model of that many input channels
    if channels is not None and (type(channels) is not int or channels != 3):
        from kdctl.errors import shown

        raise DataError(f"{path}: field 'channels': {shown(channels)}: kdctl trains, scores and exports 3-channel "
                        "(RGB) detectors; remove the field or set it to 3 (grey images are read as RGB, as Ultralytics "
                        "reads them by default)")
    root = _dataset_root(data, path)
    fetch = (f"; the YAML's download: fetches it in Ultralytics, but kdctl downloads no data: put the dataset in "
             f"{root} first" if data.get("download") else "")
    if not root.is_dir():
        moved = ("; it is the copy a kdctl bundle keeps of the dataset it was trained on, which has moved or been "
                 "removed since: give --data with the dataset YAML where it is now"
                 if (Path(path).parent / "manifest.json").is_file() else fetch)
        raise DataError(f"{path}: field 'path': directory '{root}' not found{moved}")
    root = root.resolve()
    from kdctl.data.validate import check_split

    if data.get(score) in (None, "", []):
        raise DataError(f"{path}: field '{score}' is missing (the split to score)")
    found, skipped, checks = {}, {}, {}
    for split in ("train", "val"):
        key = score if split == "val" else split
        try:
            images = _list_images(data[key], root, str(path), key)
        except DataError as e:  # a split not there yet (a dataset Ultralytics would download)
            raise DataError(f"{e}{fetch}" if "is neither an image directory" in str(e) else str(e)) from None
        images = _where_labels_are(data[key], root, images, str(path), key)
        if split not in splits:
            found[split], skipped[split] = images, []
            continue
        if not any(p.exists() for p in images):  # a list of paths that are not there: no label check applies
            raise DataError(f"{path}: {key}: none of its {len(images)} listed images exists (first: {images[0]})")
        if not any(label_path(p).is_file() for p in images):
            raise DataError(f"{path}: {key}: none of its {len(images)} images has a label file (expected e.g. "
                            f"{label_path(images[0])})")
        res = check_split(images, len(names), label_path, skip_invalid=skip_invalid,
                          pose_columns=5 + kpt[0] * kpt[1] if kpt else None)
        if not res.images:
            raise DataError(f"{path}: {key}: all {len(images)} images are invalid (first: {res.skipped[0]})")
        if res.objects == 0:
            raise DataError(f"{path}: {key}: no objects: every label file of its {len(res.images)} images is "
                            "empty")
        found[split], skipped[split], checks[split] = res.images, res.skipped, res
    return Dataset(path, names, found["train"], found["val"], skipped, val_split=score, checks=checks, notes=notes)


def normalised_yaml(ds: Dataset, out: Path, image_lists: bool = True) -> Path:
    """Write a copy of the dataset YAML with an absolute root, so training never depends on the CWD.

    When images were skipped as invalid, ``image_lists`` points the splits at lists of the kept images (beside
    ``out``, for the trainer); otherwise the splits stay as they were and ``kdctl_skip_invalid: true`` tells the
    next reader (``kdctl eval``/``export`` of the bundle) to leave the same images out again."""
    data = _renamed(parse_yaml(ds.yaml))  # read and checked by load_yolo_yaml before
    data["path"] = str(_dataset_root(data, ds.yaml).resolve())
    data["names"] = {i: n for i, n in enumerate(ds.names)}
    data.pop("download", None)  # never let a trainer fetch a dataset
    if any(ds.skipped.values()) and not image_lists:
        data["kdctl_skip_invalid"] = True
    elif image_lists and (any(ds.skipped.values()) or any(_is_list(data[k]) for k in ("train", "val"))
                          or any(_linked(data[k], Path(data["path"])) for k in ("train", "val"))):
        # train on the validated images only, and on the very files kdctl checked: lists of absolute paths (a .txt
        # list's relative lines are found beside it first, where Ultralytics looks in the working directory; a
        # linked split folder is followed by Ultralytics to where its labels are not)
        for split, images in (("train", ds.train_images), ("val", ds.val_images)):
            lst = out.parent / f"{split}-images.txt"
            lst.write_text("".join(f"{os.path.abspath(p)}\n" for p in images))  # links kept: labels sit by them
            data[split] = str(lst.resolve())
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _linked(spec, root: Path) -> bool:
    """A split folder reached through a link (``images/train -> /mnt/store/train``): Ultralytics resolves it and then
    looks for the labels beside the link's target, where there are none; kdctl reads them beside the link."""
    return any(os.path.abspath(p) != str(p.resolve()) for p in
               ([root / str(e) for e in spec] if isinstance(spec, list) else [_split_path(str(spec), root)]))


def _where_labels_are(spec, root: Path, images: list[Path], source: str, key: str) -> list[Path]:
    """A split folder reached through a link keeps its labels beside the link (kdctl's reading, :func:`_linked`), or,
    where none are there, beside the link's target (Ultralytics' reading): then the images are the target's."""
    if isinstance(spec, list) or _is_list(spec) or not _linked(spec, root) or \
            any(label_path(p).is_file() for p in images):
        return images
    real = _list_images(str(_split_path(str(spec), root).resolve()), root, source, key)
    return real if any(label_path(p).is_file() for p in real) else images


def _is_list(spec) -> bool:
    return any(str(e).endswith(".txt") for e in (spec if isinstance(spec, list) else [spec]))


def atomic_build(final: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place; an existing one is kept.

    Builders of one ``final`` take turns on ``.NAME.lock`` (a second one waits, then finds it built), so the
    ``.NAME.tmp-*`` siblings found while holding it are a killed builder's and are removed."""
    from kdctl.bundle.output import OutputLock
    from kdctl.bundle.store import remove_stale_temps, temp_sibling

    if final.exists():
        return final
    lock = OutputLock(final)
    lock.acquire(wait=True)
    try:
        if final.exists():
            return final
        remove_stale_temps(final)
        tmp = temp_sibling(final)
        tmp.mkdir(parents=True)
        try:
            faults.point("build:begun")
            build(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # made meanwhile by something other than a builder: keep it
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def synthetic_dataset(train: int, val: int, seed: int, imgsz: int, classes: int, progress=None,
                      scene: str = "cluttered") -> Dataset:
    from kdctl.data.synth import write_dataset

    key = f"synth-v1-{'' if scene == 'cluttered' else scene + '-'}{classes}c-{imgsz}px-{train}t-{val}v-s{seed}"
    final = cache_dir() / "synthetic" / key
    final.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        write_dataset(tmp, train=train, val=val, seed=seed, imgsz=imgsz, classes=classes, progress=progress,
                      root=final, scene=scene)

    atomic_build(final, build)
    return load_yolo_yaml(final / "data.yaml")


def _read_coco(path: Path, img_dir: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        coco = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: expected a COCO object with 'images', 'annotations' and 'categories', got "
                        f"{json_kind(coco)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{path}: field '{key}' is missing or not a list")
    cat_ids = set()
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or "name" not in c:
            raise DataError(f"{path}: categories[{i}]: needs an integer 'id' and a 'name'")
        if c["id"] in cat_ids:
            raise DataError(f"{path}: categories[{i}].id: {c['id']} repeats")
        cat_ids.add(c["id"])
    if not cat_ids:
        raise DataError(f"{path}: field 'categories' is empty")
    sizes, from_file = {}, set()
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{path}: images[{i}]: expected an object")
        for key in ("id", "file_name"):
            if key not in im:
                raise DataError(f"{path}: images[{i}].{key} is missing")
        if "width" not in im and "height" not in im and isinstance(im["file_name"], str) and im["file_name"]:
            _size_from_file(im, img_dir, f"{path}: images[{i}]")  # optional in exports; boxes need it: the file's
            from_file.add(i)
        for key in ("width", "height"):
            if key not in im:
                raise DataError(f"{path}: images[{i}].{key} is missing")
        if not _is_int(im["id"]) or im["id"] in sizes:
            raise DataError(f"{path}: images[{i}].id: {im['id']!r} is not a unique integer")
        for key in ("width", "height"):
            if not _is_number(im[key]) or im[key] <= 0:
                raise DataError(f"{path}: images[{i}].{key}: {im[key]!r} is not a positive number")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(f"{path}: images[{i}].file_name: {im['file_name']!r} is not a file name")
        sizes[im["id"]] = (float(im["width"]), float(im["height"]))
    bad: dict[int, str] = {}
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{path}: annotations[{i}]: expected an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(f"{path}: annotations[{i}].{key} is missing")
        if not _is_int(a["image_id"]) or a["image_id"] not in sizes:
            raise DataError(f"{path}: annotations[{i}].image_id: {a['image_id']!r} is not in 'images'")
        why = _bbox_problem(a, cat_ids, sizes[a["image_id"]])
        if why and a["image_id"] not in bad:
            bad[a["image_id"]] = f"{path}: annotations[{i}].{why}"
    coco["_invalid_images"] = bad
    coco["_sized_from_file"] = from_file  # their sizes are the files' own: nothing to check against
    return coco


def _size_from_file(im: dict, img_dir: Path, where: str) -> None:
    """Fill a COCO image entry's missing width and height from its file's header (EXIF-upright, as it is trained)."""
    from kdctl.data.validate import open_image
    from kdctl.evaluate.predict import oriented_size

    f = _coco_image(img_dir, im["file_name"])
    try:
        with open_image(f) as pic:
            im["width"], im["height"] = oriented_size(pic)
    except Exception as e:  # missing or not an image: the size cannot be had
        raise DataError(f"{where}: width and height are missing and '{f}' cannot be read for them "
                        f"({type(e).__name__})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bbox_problem(a: dict, cat_ids: set, size: tuple[float, float]) -> str | None:
    if not _is_int(a["category_id"]) or a["category_id"] not in cat_ids:
        return f"category_id: {a['category_id']!r} is not one of the categories' ids"
    b = a["bbox"]
    if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
        return f"bbox: {b!r} is not [x, y, width, height] of 4 finite numbers"
    x, y, w, h = b
    if w < 0 or h < 0:
        return f"bbox: width and height must be >= 0 (got {w:g}, {h:g})"
    if w == 0 or h == 0:  # no box: the conversion skips it, as Ultralytics' COCO converter does
        return None
    if x >= size[0] or y >= size[1] or x + w <= 0 or y + h <= 0:
        return f"bbox: {b} lies outside its {size[0]:g}x{size[1]:g} image"
    return None


def _coco_image(img_dir: Path, file_name: str) -> Path:
    """Where an image of a COCO JSON is: ``file_name`` under the images folder; failing that its base name there, for
    exports that write the folder into ``file_name`` (``images/0001.jpg``, ``train2017/0001.jpg``) when the images
    folder given is that folder itself. Not found: the first, as named."""
    first = img_dir / file_name
    if first.is_file() or Path(file_name).name == file_name:
        return first
    flat = img_dir / Path(file_name).name
    return flat if flat.is_file() else first


def _check_sizes(coco: dict, src: Path, img_dir: Path) -> None:
    """Each image's width and height in the JSON against its file (read from the header): boxes are normalised by
    the JSON's numbers, so a set whose images were resized after annotation would train on misplaced boxes,
    silently. Either the stored or the EXIF-upright size matches. A mismatch is an invalid image."""
    from kdctl.data.validate import open_image
    from kdctl.evaluate.predict import oriented_size

    bad, from_file = coco["_invalid_images"], coco.get("_sized_from_file", set())
    for i, im in enumerate(coco["images"]):
        if i in from_file:
            continue
        f = _coco_image(img_dir, str(im["file_name"]))
        if im["id"] in bad or not f.is_file():
            continue  # a missing file is named by the conversion
        try:
            with open_image(f) as pic:
                sizes = {pic.size, oriented_size(pic)}
        except Exception:  # not an image: named when the images are checked
            continue
        w, h = float(im["width"]), float(im["height"])
        if not any(abs(w - a) < 1 and abs(h - b) < 1 for a, b in sizes):
            a, b = next(iter(sizes))
            bad[im["id"]] = (f"{src}: images[{i}] ('{im['file_name']}'): width x height {w:g}x{h:g} differs from the "
                             f"file's {a}x{b}; its boxes would be scaled wrongly")


def coco_dataset(train_images: str, train_annotations: str, val_images: str, val_annotations: str,
                 skip_invalid: bool = False) -> Dataset:
    """Convert a COCO-JSON dataset into a cached YOLO layout (categories sorted by id become 0..nc-1)."""
    tr_json, va_json = Path(train_annotations), Path(val_annotations)
    tr, va = _read_coco(tr_json, Path(train_images)), _read_coco(va_json, Path(val_images))
    for coco, src, img_dir in ((tr, tr_json, Path(train_images)), (va, va_json, Path(val_images))):
        _check_sizes(coco, src, img_dir)
    skipped = {}
    for split, coco in (("train", tr), ("val", va)):
        bad = coco.pop("_invalid_images")
        if bad and not skip_invalid:
            raise DataError(f"{next(iter(bad.values()))} (pass --skip-invalid or set data.skip_invalid to leave "
                            "such images out)")
        coco["images"] = [im for im in coco["images"] if im["id"] not in bad]
        skipped[split] = list(bad.values())
    cats = sorted(tr["categories"], key=lambda c: c["id"])
    if [c["id"] for c in sorted(va["categories"], key=lambda c: c["id"])] != [c["id"] for c in cats]:
        raise DataError(f"{va_json}: field 'categories' differs from {tr_json}'s")
    key = hashlib.sha256("\0".join(
        [str(Path(p).resolve()) for p in (train_images, val_images)] +
        [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (tr_json, va_json)] +
        [f"skip={skip_invalid}", "layout=2"]).encode()).hexdigest()[:16]  # 2: crowd/ beside labels/
    final = cache_dir() / "coco" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    index = {c["id"]: i for i, c in enumerate(cats)}

    def convert(tmp: Path) -> None:
        for split, coco, img_dir, src in (("train", tr, Path(train_images), tr_json),
                                          ("val", va, Path(val_images), va_json)):
            if not img_dir.is_dir():
                raise DataError(f"{src}: images directory '{img_dir}' not found")
            for folder in ("images", "labels", "crowd"):
                (tmp / folder / split).mkdir(parents=True)
            anns: dict[int, list] = {}
            for a in coco["annotations"]:
                anns.setdefault(a["image_id"], []).append(a)
            stems: set[str] = set()  # a.jpg and a.png must not share a.txt
            ids_by_name: dict[str, object] = {}
            for im in coco["images"]:
                src_img = _coco_image(img_dir, im["file_name"])
                if not src_img.is_file():
                    raise DataError(f"{src}: image '{im['file_name']}' (id {im['id']}) not found in {img_dir}")
                if im["file_name"] in ids_by_name:
                    raise DataError(f"{src}: images: '{im['file_name']}' is listed twice (ids "
                                    f"{ids_by_name[im['file_name']]} and {im['id']}); give each image one entry")
                ids_by_name[im["file_name"]] = im["id"]
                stem = Path(str(im["file_name"]).replace("/", "__")).stem
                if stem in stems:
                    stem = f"{stem}__id{im['id']}"
                stems.add(stem)
                link = tmp / "images" / split / f"{stem}{src_img.suffix}"
                os.symlink(src_img.resolve(), link)
                w, h = float(im["width"]), float(im["height"])
                rows: dict[bool, list[str]] = {False: [], True: []}  # objects; crowd regions (ignored, not trained)
                for a in anns.get(im["id"], []):
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
                    if x2 - x1 <= 0 or y2 - y1 <= 0:
                        continue
                    rows[bool(a.get("iscrowd", 0))].append(
                        f"{index[a['category_id']]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                        f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
                (tmp / "labels" / split / f"{stem}.txt").write_text("".join(f"{r}\n" for r in rows[False]))
                if rows[True]:
                    (tmp / "crowd" / split / f"{stem}.txt").write_text("".join(f"{r}\n" for r in rows[True]))
        (tmp / "data.yaml").write_text(yaml.safe_dump({
            "path": str(final.resolve()), "train": "images/train", "val": "images/val",
            "names": {i: c["name"] for i, c in enumerate(cats)}}, sort_keys=False))

    atomic_build(final, convert)
    try:
        ds = load_yolo_yaml(final / "data.yaml", skip_invalid=skip_invalid)
    except DataError as e:  # a split-wide problem of the converted layout: name the user's JSON, not kdctl's cache
        text, head = str(e), f"{final / 'data.yaml'}: "
        for split, src in (("train", tr_json), ("val", va_json)):
            if text.startswith(f"{head}{split}: "):
                raise DataError(f"{src}: {text[len(head) + len(split) + 2:]}") from None
        raise
    for split in ("train", "val"):
        ds.skipped[split] = skipped[split] + ds.skipped.get(split, [])
    return ds


def is_recipe_file(path: Path) -> bool:
    """A kdctl recipe (by its keys), where a dataset YAML may be given too (``data check``, ``--data``)."""
    from kdctl.recipe.validation import YamlProblem, file_kind, parse_yaml

    if not Path(path).is_file():
        return False
    try:
        d = parse_yaml(Path(path))
    except YamlProblem:
        return False  # reported by the dataset reader, which names the file
    return file_kind(d) == "a kdctl recipe"


def dataset_yaml(path: str | Path, skip_invalid: bool = False) -> Path:
    """``--data`` of eval and export: a dataset YAML, as given; or a recipe, read as the YAML of its ``data:``
    section (a COCO set converted as training converts it, the synthetic set generated), so that a COCO-JSON set
    can be scored and calibrated on without a bundle trained on it."""
    if not is_recipe_file(Path(path)):
        return Path(path)
    from kdctl.recipe import load_recipe

    return resolve_data(load_recipe(path).data, skip_invalid=skip_invalid).yaml


def resolve_data(spec, progress=None, skip_invalid: bool | None = None) -> Dataset:
    """``spec`` is a recipe's :class:`~kdctl.recipe.schema.DataSpec` (or its dict); ``skip_invalid`` (the
    ``--skip-invalid`` flag) overrides ``data.skip_invalid``."""
    d = spec if isinstance(spec, dict) else spec.model_dump()
    skip = bool(d.get("skip_invalid")) if skip_invalid is None else skip_invalid
    if d.get("synthetic"):
        s = d["synthetic"]
        return synthetic_dataset(s["train"], s["val"], s["seed"], s["imgsz"], s["classes"], progress,
                                 s.get("scene", "cluttered"))
    if d.get("yolo"):
        return load_yolo_yaml(d["yolo"], skip_invalid=skip)
    if d.get("coco"):
        return coco_dataset(**d["coco"], skip_invalid=skip)
    raise DataError("data: give one of yolo, coco, synthetic")
