"""``kdctl eval``: COCO mAP of a trained model on a dataset, written as an ``eval`` bundle."""

from __future__ import annotations

import json
from pathlib import Path

from kdctl.bundle import Bundle, BundleWriter, claim_output, load_bundle, next_run_dir
from kdctl.progress import Step


def evaluate_bundle(bundle: str | Path, *, data: str | Path | None = None, imgsz: int | None = None,
                    out: str | Path | None = None, runs_dir: str | Path = "runs", batch: int = 8,
                    overwrite: bool = False, skip_invalid: bool = False, split: str = "val", device: str = "cpu",
                    progress=None) -> Bundle:
    """``split``: the dataset YAML's split to score (``val``, or ``test``/``train`` as Ultralytics' ``split=``);
    ``device``: ``cpu``, ``cuda`` or a GPU index (:func:`kdctl.evaluate.torch_device`).
    ``bundle`` may also be a checkpoint file (``best.pt``, as Ultralytics' ``yolo val model=best.pt``), scored on
    ``data``, which it then needs."""
    from kdctl.evaluate import torch_device

    dev = torch_device(device)
    if Path(bundle).suffix in (".pt", ".pth") and not Path(bundle).is_dir():
        return _evaluate_checkpoint(Path(bundle), data, imgsz, out, runs_dir, batch, overwrite, skip_invalid, split,
                                    dev, progress)
    src = load_bundle(bundle, stages=("train", "distill"), verify=True)
    out = Path(out) if out else next_run_dir(runs_dir, "eval", src.path.resolve().name, reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        return _evaluate(src, data, imgsz, out, batch, overwrite, skip_invalid, split, dev, progress)


def _evaluate_checkpoint(path: Path, data, imgsz, out, runs_dir, batch: int, overwrite: bool, skip_invalid: bool,
                         split: str, device: str, progress) -> Bundle:
    """A model file of the user's (an Ultralytics ``best.pt``, a kdctl ``weights.pt``): no bundle records its data
    or size, so ``--data`` is required and the size is the one it was trained at (its ``train_args``), else 640."""
    from kdctl.errors import KdctlError
    from kdctl.models import load_model, resolve_model, trained_size

    if not path.is_file():
        raise KdctlError(f"{path}: checkpoint not found")
    ref = resolve_model(str(path), "model", "kdctl eval")
    if data is None:
        raise KdctlError(f"--data: required to score the checkpoint {path} (a checkpoint carries no dataset); give "
                         "the dataset YAML, e.g. --data data.yaml")
    model = load_model(ref, 0, "model", "kdctl eval")
    size = imgsz or trained_size(model) or 640
    out = Path(out) if out else next_run_dir(runs_dir, "eval", path.stem, reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[path]):
        return _score(model, f"the model of {path}", None, [], {"model": ref.ref, "model_sha256": ref.sha256},
                      data, size, out, batch, overwrite, skip_invalid, split, device, progress)


def _evaluate(src: Bundle, data, imgsz, out: Path, batch: int, overwrite: bool, skip_invalid: bool, split: str,
              device: str, progress) -> Bundle:
    from kdctl.models import load_bundle_weights

    size = imgsz or int(src.metrics.get("imgsz") or (src.recipe or {}).get("train", {}).get("imgsz", 640))
    model = load_bundle_weights(src)
    return _score(model, f"the model of {src.path}", src.recipe, [src], {"model": str(src.file("weights"))},
                  data if data else src.file("data"), size, out, batch, overwrite, skip_invalid, split, device,
                  progress)


def _score(model, what: str, recipe, parents: list, inputs: dict, data, size: int, out: Path, batch: int,
           overwrite: bool, skip_invalid: bool, split: str, device: str, progress) -> Bundle:
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_with_records, torch_backend
    from kdctl.evaluate.records import add_records
    from kdctl.models import check_imgsz, model_classes

    ds = load_yolo_yaml(data, skip_invalid=skip_invalid, splits=("val",), score=split)
    check_imgsz(size, model)
    ds.check_model_classes(model_classes(model), what, names=getattr(model, "names", None))
    step = Step(progress, "evaluate (COCO mAP)", total=len(ds.val_images))
    metrics, records = evaluate_with_records(torch_backend(model, device), ds.val_images, ds.names, size,
                                             batch=batch, progress=step.advance)
    with BundleWriter(out, stage="eval", recipe=recipe, parents=parents, overwrite=overwrite,
                      inputs={"data": ds.describe(), **inputs}) as w:
        w.metrics.update({"runtime": "pytorch", "precision": "fp32", "device": device, "split": split, **metrics})
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        w.add_output("metrics", "metrics.json")
        add_records(w, records, ds.val_images)  # what the report's paired interval resamples
    return w.bundle
