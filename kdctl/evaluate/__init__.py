"""mAP evaluation with COCO conventions for any backend (see :mod:`kdctl.evaluate.predict`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdctl.evaluate.coco import Detections, GroundTruth, MatchRecords, evaluate_map, map_from_records, match_records
from kdctl.evaluate.predict import Backend, ground_truth, predict_images


def torch_backend(model, device: str = "cpu", half: bool = False) -> Backend:
    """Wrap a detector of any family: returns kdctl's dense output (N, 4 + nc, A) as NumPy."""
    import torch

    from kdctl.detectors import dense_module

    model = dense_module(model.to(device).eval()).eval()
    model = model.half() if half else model.float()

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(device)
        y = model(t.half() if half else t)
        y = y[0] if isinstance(y, (tuple, list)) else y
        return y.float().cpu().numpy()

    return run


def class_columns(backend: Backend, index: list[int]) -> Backend:
    """``backend`` scored on a dataset of some of its classes: its dense output keeps the boxes and the class
    columns ``index`` (its class for each of the dataset's, in the dataset's order). A detection of another class
    is not counted, as pycocotools scores a model on a subset of its categories; for a sigmoid-per-class head it is
    exactly the model cut down to those classes (:func:`kdctl.detectors.keep_classes`)."""
    rows = np.asarray([0, 1, 2, 3] + [4 + i for i in index])

    def run(x: np.ndarray) -> np.ndarray:
        return backend(x)[:, rows]

    for attr in ("fixed_batch", "info"):  # what callers read off a backend (a static graph's batch, its runtime)
        if hasattr(backend, attr):
            setattr(run, attr, getattr(backend, attr))
    return run


def torch_device(device: str, flag: str = "--device") -> str:
    """``cpu``, ``cuda`` (the first GPU) or a GPU index (``0``, as Ultralytics' ``device=0``) as a torch device,
    refused in one line where this machine has no such GPU."""
    from kdctl.distributed import as_indices, check_device
    from kdctl.errors import KdctlError

    d = as_indices(device)  # torch's 'cuda:0' is GPU 0, as Ultralytics' select_device takes it
    if d == "cpu":
        return d
    if d != "cuda" and not d.isdigit():
        raise KdctlError(f"{flag}: '{device}'; valid: cpu, cuda, or a GPU index such as 0")
    check_device(d, flag, f"use {flag} cpu")  # the same check (and words) as a recipe's train.device
    return "cuda:0" if d == "cuda" else f"cuda:{int(d)}"


def runtime_device(device: str, flag: str = "--device") -> str:
    """``cpu`` or ``cuda`` for an exported artifact's runtime, which opens the first GPU a process sees: ``0`` and
    ``cuda:0`` are that one (as :func:`torch_device` and Ultralytics take them); another GPU is refused in one line
    that says how to make it the first."""
    from kdctl.distributed import as_indices
    from kdctl.errors import KdctlError

    d = as_indices(device)
    if d.isdigit() and int(d) > 0:
        raise KdctlError(f"{flag}: '{device}': an exported artifact runs on the first GPU its runtime sees; make GPU "
                         f"{int(d)} the first with CUDA_VISIBLE_DEVICES={int(d)} and give {flag} cuda")
    d = "cuda" if d.isdigit() else d
    if d not in ("cpu", "cuda"):
        raise KdctlError(f"{flag}: '{device}'; valid: cpu, cuda (the first GPU; also 0 or cuda:0)")
    return d


def evaluate_backend(backend: Backend, images: list[Path], names: list[str], imgsz: int, batch: int = 8,
                     progress=None) -> dict:
    return evaluate_with_records(backend, images, names, imgsz, batch, progress)[0]


def evaluate_with_records(backend: Backend, images: list[Path], names: list[str], imgsz: int, batch: int = 8,
                          progress=None) -> tuple[dict, MatchRecords]:
    """The metrics and the match records they were integrated from (:mod:`kdctl.evaluate.records`)."""
    from kdctl.data.resolve import class_keys

    dets = predict_images(backend, images, imgsz, batch=batch, progress=progress)
    records = match_records(dets, ground_truth(images), len(names))
    res = map_from_records(records)
    res["per_class_ap50_95"] = dict(zip(class_keys(names), res["per_class_ap50_95"]))
    res["images"] = len(images)
    res["imgsz"] = imgsz
    return res, records


__all__ = ["Detections", "GroundTruth", "MatchRecords", "evaluate_map", "evaluate_backend", "evaluate_with_records",
           "torch_backend", "torch_device"]
