"""``kdctl eval``: COCO mAP of a trained model on a dataset, written as an ``eval`` bundle."""

from __future__ import annotations

import json
from pathlib import Path

from kdctl.bundle import Bundle, BundleWriter, claim_output, load_bundle, next_run_dir
from kdctl.progress import Step


def evaluate_bundle(bundle: str | Path, *, data: str | Path | None = None, imgsz: int | None = None,
                    out: str | Path | None = None, runs_dir: str | Path = "runs", batch: int = 8,
                    overwrite: bool = False, skip_invalid: bool = False, split: str = "val",
                    progress=None) -> Bundle:
    """``split``: the dataset YAML's split to score (``val``, or ``test``/``train`` as Ultralytics' ``split=``)."""
    src = load_bundle(bundle, stages=("train", "distill"), verify=True)
    out = Path(out) if out else next_run_dir(runs_dir, "eval", src.path.resolve().name, reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        return _evaluate(src, data, imgsz, out, batch, overwrite, skip_invalid, split, progress)


def _evaluate(src: Bundle, data, imgsz, out: Path, batch: int, overwrite: bool, skip_invalid: bool, split: str,
              progress) -> Bundle:
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_with_records, torch_backend
    from kdctl.evaluate.records import add_records
    from kdctl.models import check_imgsz, load_bundle_weights, model_classes

    ds = load_yolo_yaml(data if data else src.file("data"), skip_invalid=skip_invalid, splits=("val",), score=split)
    size = imgsz or int(src.metrics.get("imgsz") or (src.recipe or {}).get("train", {}).get("imgsz", 640))
    model = load_bundle_weights(src)
    check_imgsz(size, model)
    ds.check_model_classes(model_classes(model), f"the model of {src.path}", names=getattr(model, "names", None))
    step = Step(progress, "evaluate (COCO mAP)", total=len(ds.val_images))
    metrics, records = evaluate_with_records(torch_backend(model), ds.val_images, ds.names, size, batch=batch,
                                             progress=step.advance)
    with BundleWriter(out, stage="eval", recipe=src.recipe, parents=[src], overwrite=overwrite,
                      inputs={"data": ds.describe(), "model": str(src.file("weights"))}) as w:
        w.metrics.update({"runtime": "pytorch", "precision": "fp32", "split": split, **metrics})
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        w.add_output("metrics", "metrics.json")
        add_records(w, records, ds.val_images)  # what the report's paired interval resamples
    return w.bundle
