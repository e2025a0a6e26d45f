"""A bundle's evaluation records (``eval-records.npz``): how every validation image's detections matched its labels,
so that a later stage can recompute the bundle's mAP on resamples of those images, paired with another bundle
scored on the same images (the report's interval of a distillation gain).

Each image has a key: the first 16 hex digits of the SHA-256 of its file, its label file and its crowd file, so two
bundles are paired only where they were scored on the very same images and labels, wherever those lay on disk."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from kdctl.evaluate.coco import IOU_THRESHOLDS, MatchRecords

RECORDS_FILE = "eval-records.npz"
ROLE = "eval_records"
_FORMAT = 1


class RecordsError(ValueError):
    """Evaluation records that cannot be read as such."""


def image_keys(images: list[Path]) -> list[str]:
    """One key per image (see the module's docstring); a missing label or crowd file hashes as empty."""
    from kdctl.data.resolve import crowd_path, label_path

    keys = []
    for p in images:
        h = hashlib.sha256()
        for f in (p, label_path(p), crowd_path(p)):
            h.update(b"\0")
            if f is not None and f.is_file():
                h.update(f.read_bytes())
        keys.append(h.hexdigest()[:16])
    return keys


def _pack(flags: np.ndarray) -> np.ndarray:
    """(T, D) bool -> (D,) uint16, bit t set where flags[t]."""
    return (flags.astype(np.uint16) << np.arange(flags.shape[0], dtype=np.uint16)[:, None]).sum(0).astype(np.uint16)


def _unpack(bits: np.ndarray) -> np.ndarray:
    return ((bits[None, :] >> np.arange(len(IOU_THRESHOLDS), dtype=np.uint16)[:, None]) & 1).astype(bool)


def save_records(path: Path, records: MatchRecords, keys: list[str]) -> Path:
    """Write ``records`` and the images' ``keys`` (compressed NumPy arrays, no pickles)."""
    if len(keys) != records.images:
        raise ValueError(f"{len(keys)} image keys for {records.images} images")
    buf = io.BytesIO()
    np.savez_compressed(buf, format=np.array(_FORMAT), image=records.image.astype(np.int32),
                        classes=records.classes.astype(np.int32), scores=np.asarray(records.scores),
                        tp=_pack(records.tp), ignored=_pack(records.ignored), n_gt=records.n_gt.astype(np.int32),
                        keys=np.array(keys, dtype="U16"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def add_records(writer, records: MatchRecords, images: list[Path]) -> None:
    """Write the records of ``images`` into the bundle being written (a :class:`~kdctl.bundle.BundleWriter`)."""
    save_records(writer.path / RECORDS_FILE, records, image_keys(images))
    writer.add_output(ROLE, RECORDS_FILE)


def has_records(bundle) -> bool:
    """Whether a bundle keeps evaluation records (every train, distill and eval bundle since 2026-12-05)."""
    return ROLE in (bundle.manifest.get("outputs") or {})


def metrics_problem(bundle) -> str | None:
    """Whether a bundle's published mAP is what its records give (None: it is, or it has no records): the number
    the report and the gate read is re-derived from the per-image evidence, not only hash-checked."""
    from kdctl.evaluate.coco import map_from_records

    rel = (bundle.manifest.get("outputs") or {}).get(ROLE)
    if rel is None:
        return None
    try:
        records, keys = load_records(bundle.path / rel)
    except RecordsError as e:  # named as verify names files: relative to the bundle
        return str(e).replace(str(bundle.path / rel), rel, 1)
    got = map_from_records(records)
    if "map50_95" not in bundle.metrics:  # written with the records, always: its absence is an edit
        return f"manifest.json: metrics.map50_95 is missing, though {rel} holds the evaluation it came from"
    for k in ("map50_95", "map50", "map75"):
        if k in bundle.metrics and bundle.metrics[k] != got[k]:
            return f"manifest.json: metrics.{k} {bundle.metrics[k]!r} is not what {rel} gives ({got[k]!r})"
    for k in ("eval_images", "images"):  # train/distill, eval
        if k in bundle.metrics and bundle.metrics[k] != len(keys):
            return f"manifest.json: metrics.{k} {bundle.metrics[k]!r}, but {rel} holds {len(keys)} images"
    return None


def load_records(path: Path) -> tuple[MatchRecords, list[str]]:
    """Read what :func:`save_records` wrote; RecordsError for anything else (a bundle's hash check comes first)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = int(z["format"])
            if fmt != _FORMAT:
                raise RecordsError(f"{path}: evaluation records of format {fmt}, this kdctl reads {_FORMAT}")
            kinds = {k: z[k].dtype.kind for k in ("image", "classes", "scores", "tp", "ignored", "n_gt", "keys")}
            if kinds != {"image": "i", "classes": "i", "scores": "f", "tp": "u", "ignored": "u", "n_gt": "i",
                         "keys": "U"}:
                raise RecordsError(f"{path}: evaluation records with arrays of other types ({kinds})")
            image, classes, scores = z["image"].astype(np.int64), z["classes"].astype(np.int64), z["scores"]
            tp, ignored, n_gt, keys = _unpack(z["tp"]), _unpack(z["ignored"]), z["n_gt"].astype(np.int64), z["keys"]
    except RecordsError:
        raise
    except (OSError, KeyError, EOFError, ValueError, TypeError) as e:
        raise RecordsError(f"{path}: not kdctl evaluation records ({type(e).__name__})") from None
    n, d = n_gt.shape[0] if n_gt.ndim == 2 else -1, len(image)
    if (n < 0 or len(keys) != n or len(classes) != d or len(scores) != d or tp.shape[1] != d or ignored.shape[1] != d
            or (d and (image.min() < 0 or image.max() >= n or classes.min() < 0 or classes.max() >= n_gt.shape[1]))):
        raise RecordsError(f"{path}: evaluation records whose arrays do not fit together")
    return MatchRecords(image, classes, scores, tp, ignored, n_gt), [str(k) for k in keys]


def aligned(ra: MatchRecords, ka: list[str], rb: MatchRecords, kb: list[str]) -> MatchRecords | None:
    """``rb`` (of images ``kb``) with its images in ``ka``'s order, or None unless both score the same images and
    labels: the same keys, each once, and the same ground-truth counts per image and class."""
    if ka != kb:
        if sorted(ka) != sorted(kb) or len(set(ka)) != len(ka):
            return None
        where = {k: i for i, k in enumerate(kb)}
        rb = reorder(rb, [where[k] for k in ka])
    if ra.n_gt.shape != rb.n_gt.shape or (ra.n_gt != rb.n_gt).any():
        return None
    return rb


def reorder(r: MatchRecords, order: list[int]) -> MatchRecords:
    """Records with their images in ``order`` (``order[i]``: the old index of the new image ``i``)."""
    new_of_old = np.empty(len(order), np.int64)
    new_of_old[np.asarray(order, np.int64)] = np.arange(len(order))
    return MatchRecords(new_of_old[r.image], r.classes, r.scores, r.tp, r.ignored, r.n_gt[np.asarray(order)])
