"""What every exporter returns, and the check that makes an export finished: the exported model, run in its
own runtime on real images, must match PyTorch within a per-backend tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdctl.evaluate.predict import Backend

# Tolerances on the decoded head output: boxes in input pixels (scaled by imgsz), class scores in 0..1.
TOLERANCE = {
    "fp32": {"box_frac": 1e-3, "score": 2e-3},
    "fp16": {"box_frac": 1e-2, "score": 2e-2},
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


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, imgsz: int, precision: str) -> dict:
    """Max/mean absolute difference of boxes (pixels) and scores; ``ok`` against the precision's tolerance."""
    if reference.shape != candidate.shape:
        return {"ok": False, "reason": f"output shape {candidate.shape} != PyTorch {reference.shape}"}
    db = np.abs(reference[:, :4] - candidate[:, :4])
    ds = np.abs(reference[:, 4:] - candidate[:, 4:])
    res = {"box_max_abs": float(db.max()), "box_mean_abs": float(db.mean()),
           "score_max_abs": float(ds.max()), "score_mean_abs": float(ds.mean()),
           "cosine": cosine(reference, candidate)}
    if precision == "int8-qat":
        res["tolerance"] = {"cosine": MIN_COSINE_QAT}
        res["ok"] = bool(res["cosine"] >= MIN_COSINE_QAT)
        return res
    tol = TOLERANCE.get(precision)
    if tol is None:  # int8 is judged on mAP, not on raw outputs
        res["ok"] = None
        return res
    res["tolerance"] = {"box_max_abs": tol["box_frac"] * imgsz, "score_max_abs": tol["score"]}
    res["ok"] = bool(res["box_max_abs"] <= tol["box_frac"] * imgsz and res["score_max_abs"] <= tol["score"])
    return res


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two outputs, flattened (1.0 for two all-zero outputs)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else float(a @ b / max(na * nb, 1e-300))


def validate_outputs(reference: Backend, candidate: Backend, batches: list[np.ndarray], imgsz: int,
                     precision: str, align=None) -> dict:
    """Run both backends on the same real, preprocessed images and compare (worst case over images).
    ``align(reference, candidate)`` pairs outputs first where positions are a set (DETR queries)."""
    ref = np.concatenate([reference(x) for x in batches])
    out = np.concatenate([np.asarray(candidate(x), dtype=np.float32) for x in batches])
    info = {}
    if align is not None and ref.shape == out.shape:
        ref, out, info = align(ref, out)
    res = {**compare_outputs(ref, out, imgsz, precision), **info}
    res["images"] = int(ref.shape[0])
    return res


def file_size_mb(root: Path, files: list[str]) -> float:
    return sum((root / f).stat().st_size for f in files) / 1e6


from kdctl.bundle import reference_metrics  # noqa: E402,F401  (where export bundles are read)
