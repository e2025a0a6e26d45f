"""What every exporter returns, and the check that makes an export finished: the exported model, run in its
own runtime on real images, must match PyTorch within a per-backend tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdctl.evaluate.predict import CONF_FLOOR, Backend

# Tolerances on the decoded head output: boxes in input pixels (scaled by imgsz), class scores in 0..1.
TOLERANCE = {
    "fp32": {"box_frac": 1e-3, "score": 2e-3},
    "fp16": {"box_frac": 1e-2, "score": 2e-2},
    # bfloat16 keeps 8 significant bits to fp16's 11: measured on OpenVINO with AMX (YOLOv8 at 128 and 640 px,
    # RT-DETR): boxes up to 1.8 % of the input off (mean 0.1 %), scores up to 0.014; mAP is checked on its own
    "bf16": {"box_frac": 4e-2, "score": 5e-2},
}
# A QAT student's INT8 graph against its fake-quantized PyTorch model: the same arithmetic up to rounding ties and
# the runtime's integer kernels, so single values can flip one quantization step; the whole output must agree.
MIN_COSINE_QAT = 0.99


@dataclass
class Artifact:
    """One exported model: format, precision, files (relative to the bundle), and what it was checked to do."""

    name: str                     # e.g. "onnx-int8"
    format: str                   # onnx | openvino | tensorrt
    precision: str                # fp32 | fp16 | int8
    files: list[str]
    runtime: dict = field(default_factory=dict)   # runtime name, version, precision actually used
    parity: dict | None = None
    metrics: dict | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "precision": self.precision, "files": self.files,
                "runtime": self.runtime, "parity": self.parity, "metrics": self.metrics, "settings": self.settings}


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, imgsz: int, precision: str,
                    on_map: bool = False) -> dict:
    """Max/mean absolute difference of boxes (pixels) and scores; ``ok`` against the precision's tolerance.
    ``on_map``: the differences are recorded but do not decide (``ok`` None): judged on mAP, as INT8 is.

    Scores are compared at every position; boxes where either output can make a detection (a class score above
    :data:`~kdctl.evaluate.predict.CONF_FLOOR`, the lowest any evaluation keeps). A background anchor's box, which
    no postprocessing keeps, can be hundreds of pixels wide and off the image, and differ by several pixels in
    bfloat16 (one step of 8 significant bits at 700 px is 4 px) without any detection changing."""
    if reference.shape != candidate.shape:
        return {"ok": False, "reason": f"output shape {candidate.shape} != PyTorch {reference.shape}"}
    live = np.maximum(reference[:, 4:].max(1), candidate[:, 4:].max(1)) > CONF_FLOOR  # (N, A)
    db = np.abs(reference[:, :4] - candidate[:, :4]).transpose(0, 2, 1)[live]  # (boxes compared, 4)
    ds = np.abs(reference[:, 4:] - candidate[:, 4:])
    res = {"box_max_abs": float(db.max(initial=0.0)), "box_mean_abs": float(db.mean()) if db.size else 0.0,
           "boxes_compared": len(db), "score_max_abs": float(ds.max()), "score_mean_abs": float(ds.mean()),
           "cosine": cosine(reference, candidate)}
    if precision == "int8-qat":
        res["tolerance"] = {"cosine": MIN_COSINE_QAT}
        res["ok"], res["judged_on"] = bool(res["cosine"] >= MIN_COSINE_QAT), "outputs"
        return res
    tol = None if on_map else TOLERANCE.get(precision)
    if tol is None:  # int8 (and an on_map precision) is judged on mAP, not on raw outputs
        res["ok"], res["judged_on"] = None, "mAP"
        return res
    res["tolerance"] = {"box_max_abs": tol["box_frac"] * imgsz, "score_max_abs": tol["score"]}
    res["ok"] = bool(res["box_max_abs"] <= tol["box_frac"] * imgsz and res["score_max_abs"] <= tol["score"])
    res["judged_on"] = "outputs"
    return res


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two outputs, flattened (1.0 for two all-zero outputs)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else float(a @ b / max(na * nb, 1e-300))


UNMATCHED_BOX = 0.05      # a pair whose boxes differ by more than 5 % of the image is two different queries
MAX_UNMATCHED = 0.10      # ... and up to 10 % of the compared queries may be such pairs


def align_sets(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pair a runtime's outputs with PyTorch's where they are a set (DETR queries, a two-stage detector's
    detections) before comparing them; returns both (restricted to the pairs whose comparison is well defined) and
    what was left out.

    Each image's candidate queries are reordered by Hungarian matching (box L1 in units
    of the image size, plus score L1). Its queries come from a top-k over the encoder's anchor scores, and which
    anchors make the cut can change with float rounding where scores nearly tie (common in barely trained models):
    the least confident half of the queries is not compared, nor are up to 10 % of the rest whose matched boxes
    are more than 5 % of the image apart (a different query, not a numerical error). Beyond 10 %, all are
    compared, and the check fails. The mAP check sees every query."""
    from scipy.optimize import linear_sum_assignment

    refs, cands, dropped, compared = [], [], 0, 0
    for i in range(reference.shape[0]):
        r, c = reference[i].T, candidate[i].T  # (Q, 4 + nc)
        conf = r[:, 4:].max(1)
        keep = np.flatnonzero(conf >= np.median(conf))
        scale = max(float(np.abs(r[:, :4]).max()), 1.0)
        box = np.abs(r[keep, None, :4] - c[None, :, :4]).sum(-1) / scale
        ri, ci = linear_sum_assignment(box + np.abs(r[keep, None, 4:] - c[None, :, 4:]).sum(-1))
        far = np.abs(r[keep[ri], :4] - c[ci, :4]).max(1) / scale > UNMATCHED_BOX
        if far.sum() <= MAX_UNMATCHED * len(ri):
            ri, ci, dropped = ri[~far], ci[~far], dropped + int(far.sum())
        compared += len(ri)
        refs.append(r[keep[ri]])
        cands.append(c[ci])
    n = min(len(x) for x in refs)  # images keep different counts: compare the first n of each
    pack = lambda xs: np.stack([x[:n] for x in xs]).transpose(0, 2, 1)  # noqa: E731
    return pack(refs), pack(cands), {"queries_compared": compared, "queries_unmatched": dropped}


def validate_outputs(reference: Backend, candidate: Backend, batches: list[np.ndarray], imgsz: int,
                     precision: str, sets: bool = False, on_map: bool = False) -> dict:
    """Run both backends on the same real, preprocessed images and compare (worst case over images).
    ``sets``: the outputs are sets, paired first by :func:`align_sets`. ``on_map``: the differences are recorded
    but do not decide (``ok`` None): the artifact is judged on mAP, as INT8 is."""
    ref = np.concatenate([reference(x) for x in batches])
    out = np.concatenate([np.asarray(candidate(x), dtype=np.float32) for x in batches])
    info = {}
    if sets and ref.shape == out.shape:
        ref, out, info = align_sets(ref, out)
    res = {**compare_outputs(ref, out, imgsz, precision, on_map=on_map), **info}  # a wrong shape still fails
    res["images"] = int(ref.shape[0])
    return res


def file_size_mb(root: Path, files: list[str]) -> float:
    return sum((root / f).stat().st_size for f in files) / 1e6

