"""``kdctl eval``: COCO mAP of a trained model on a dataset, written as an ``eval`` bundle."""

from __future__ import annotations

import json
from pathlib import Path

from kdctl.bundle import Bundle, BundleWriter, artifact_given, claim_output, load_bundle, next_run_dir
from kdctl.progress import Step


def evaluate_bundle(bundle: str | Path, *, data: str | Path | None = None, imgsz: int | None = None,
                    out: str | Path | None = None, runs_dir: str | Path = "runs", batch: int = 8,
                    overwrite: bool = False, skip_invalid: bool = False, split: str = "val", device: str = "cpu",
                    artifact: str | None = None, progress=None) -> Bundle:
    """``split``: the dataset YAML's split to score (``val``, or ``test``/``train`` as Ultralytics' ``split=``);
    ``device``: ``cpu``, ``cuda`` or a GPU index (:func:`kdctl.evaluate.torch_device`).
    ``bundle`` may also be a checkpoint file (``best.pt``, as Ultralytics' ``yolo val model=best.pt``), scored on
    ``data``, which it then needs, or an export bundle: one of its artifacts (``artifact``) in its own runtime,
    as ``yolo val model=best.onnx`` (:func:`_evaluate_artifact`)."""
    from kdctl.errors import KdctlError
    from kdctl.evaluate import runtime_device, torch_device
    from kdctl.models import is_checkpoint_file

    if is_checkpoint_file(bundle):
        return _evaluate_checkpoint(Path(bundle), data, imgsz, out, runs_dir, batch, overwrite, skip_invalid, split,
                                    torch_device(device), progress)
    bundle, picked = artifact_given(bundle, None if artifact is None else [artifact])
    artifact = picked[0] if picked else None
    src = load_bundle(bundle, stages=("train", "distill", "export"), verify=True)
    if artifact is not None and src.stage != "export":
        raise KdctlError(f"--artifact: {src.path} is a {src.stage} bundle, which holds a PyTorch model; --artifact "
                         "picks an exported artifact of an export bundle")
    if src.stage == "export":  # the artifact's runtime finds its GPU; a device has no PyTorch to ask (README)
        dev = runtime_device(device)
    else:
        dev = torch_device(device)
    out = Path(out) if out else next_run_dir(runs_dir, "eval", src.path.resolve().name, reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        if src.stage == "export":
            return _evaluate_artifact(src, artifact, data, imgsz, out, batch, overwrite, skip_invalid, split, dev,
                                      progress)
        return _evaluate(src, data, imgsz, out, batch, overwrite, skip_invalid, split, dev, progress)


def _evaluate_checkpoint(path: Path, data, imgsz, out, runs_dir, batch: int, overwrite: bool, skip_invalid: bool,
                         split: str, device: str, progress) -> Bundle:
    """A model file of the user's (an Ultralytics ``best.pt``, a kdctl ``weights.pt``): no bundle records its data
    or size, so ``--data`` is required and the size is the one it was trained at (its ``train_args``), else 640."""
    from kdctl.models import checkpoint_input, load_model, trained_size

    ref = checkpoint_input(path, data, "score", "kdctl eval")
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


def _evaluate_artifact(src: Bundle, artifact: str | None, data, imgsz, out: Path, batch: int, overwrite: bool,
                       skip_invalid: bool, split: str, device: str, progress) -> Bundle:
    """One artifact of an export bundle, run in its own runtime (as the export scored it, and as ``kdctl profile``
    runs it), on ``data`` (default: the dataset the export was checked on) at the size its graph was exported at:
    the same numbers as the export's on the same images, and a held-out split's where asked."""
    from kdctl.errors import BackendUnavailable, KdctlError
    from kdctl.runtimes import available, bundle_artifacts, check_export_metrics, for_format, open_runner

    check_export_metrics(src)  # a resealed manifest of another shape: one line, as profile says it
    arts = bundle_artifacts(src)  # TensorRT engines built on the device too: their only accuracy check is here
    if artifact is None and len(arts) != 1:
        raise KdctlError(f"--artifact: {src.path} holds {', '.join(a['name'] for a in arts) or 'no artifact'}; "
                         "name the one to score, e.g. --artifact " + (arts[-1]["name"] if arts else "onnx-fp32"))
    art = next((a for a in arts if artifact in (None, a["name"])), None)
    if art is None:
        raise KdctlError(f"--artifact: '{artifact}' is not in {src.path}; it has: "
                         f"{', '.join(a['name'] for a in arts)}")
    size = int(src.metrics["imgsz"])
    if imgsz is not None and imgsz != size:
        raise KdctlError(f"--imgsz {imgsz}: {art['name']} of {src.path} was exported for {size} px inputs and takes "
                         "no other size; leave --imgsz out, or export again at that size")
    ok, why = available(for_format(art["format"]).name)
    if not ok:
        raise BackendUnavailable(f"{art['name']}: {why}")
    if art["format"] == "openvino" and device != "cpu":
        raise KdctlError(f"--device {device}: {art['name']} runs on the CPU (kdctl's OpenVINO runner); leave --device "
                         "out")
    run_on = "cuda" if art["format"] == "tensorrt" else device
    data = data or _export_data(src)
    try:
        backend = open_runner(src.path, art, None, run_on)
    except BackendUnavailable as e:  # e.g. no CUDA provider for --device cuda
        raise BackendUnavailable(f"--device {device}: {art['name']}: {e}", exit_code=e.exit_code) from None
    info = getattr(backend, "info", {}) or {}
    inputs = {"artifact": art["name"], **({"engine_sha256": art["engine_sha256"]} if "engine_sha256" in art else {})}
    return _score(backend, f"{art['name']} of {src.path}", src.recipe, [src], inputs, data, size,
                  out, batch, overwrite, skip_invalid, split, run_on, progress,
                  classes=len(src.metrics.get("names") or []) or None, names=src.metrics.get("names"),
                  runtime={"runtime": info.get("runtime", for_format(art["format"]).name), "artifact": art["name"],
                           "precision": art["precision"]})


def _export_data(src: Bundle) -> Path:
    """The dataset an export was checked on, where it was its source bundle's own (``data.yaml``) and that bundle
    is still here, unchanged; else ``--data`` is needed (a dataset given to the export by path may have moved, or
    been edited, since)."""
    from kdctl.bundle import trained_source
    from kdctl.errors import KdctlError

    if (src.manifest.get("inputs") or {}).get("data_from") == "the source bundle":
        status, parent, _ = trained_source(src)
        if status == "found":
            return load_bundle(parent.path, stages=("train", "distill"), verify=True).file("data")
    raise KdctlError(f"--data: required to score an artifact of {src.path} (the dataset it was checked on is not "
                     "its source bundle's, or that bundle is not here as it was); give the dataset YAML, e.g. --data "
                     "data.yaml")


def _score(model, what: str, recipe, parents: list, inputs: dict, data, size: int, out: Path, batch: int,
           overwrite: bool, skip_invalid: bool, split: str, device: str, progress, *, classes: int | None = None,
           names=None, runtime: dict | None = None) -> Bundle:
    """Score ``model`` (a PyTorch model, or with ``runtime`` an artifact's backend that predicts ``classes``
    classes) on ``data``'s ``split`` and write the eval bundle."""
    from kdctl.data.resolve import dataset_yaml, load_yolo_yaml
    from kdctl.errors import DataError
    from kdctl.evaluate import class_columns, evaluate_with_records, torch_backend
    from kdctl.evaluate.records import add_records
    from kdctl.models import check_imgsz, dataset_classes, model_classes, scored_classes

    given = dataset_yaml(data, skip_invalid)
    try:
        ds = load_yolo_yaml(given, skip_invalid=skip_invalid, splits=("val",), score=split)
    except DataError as e:  # of a recipe's dataset (a COCO set converted in kdctl's cache): named by the recipe
        if given == Path(data):
            raise
        raise DataError(f"--data {data}: its dataset's {str(e).removeprefix(f'{given}: ')}",
                        exit_code=e.exit_code) from None
    picked = None
    if runtime is None:
        check_imgsz(size, model)
        # a model of more classes than the dataset (a COCO one for a person/car set): scored on the dataset's, by
        # name, as distill reads such a teacher
        model, picked = dataset_classes(model, ds)
        classes, names, backend = model_classes(model), getattr(model, "names", None), torch_backend(model, device)
    else:
        backend = model
    if classes is not None:  # an export of an older kdctl may not list its classes
        index, found = scored_classes(names, classes, ds)
        if index is not None:  # an artifact keeps its classes: its other classes' detections are not counted
            backend, classes, names, picked = class_columns(backend, index), ds.nc, ds.names, found
        ds.check_model_classes(classes, what, names=names)
    if picked is not None:
        inputs = {**inputs, "classes": picked}
    step = Step(progress, "evaluate (COCO mAP)", total=len(ds.val_images))
    metrics, records = evaluate_with_records(backend, ds.val_images, ds.names, size, batch=batch,
                                             progress=step.advance)
    from kdctl.data.resolve import images_digest

    with BundleWriter(out, stage="eval", recipe=recipe, parents=parents, overwrite=overwrite,
                      inputs={"data": ds.describe(), **inputs}) as w:
        w.metrics.update({"runtime": "pytorch", "precision": "fp32", **(runtime or {}), "device": device,
                          "split": split, **metrics, "eval_sha256": images_digest(ds.val_images)})
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        w.add_output("metrics", "metrics.json")
        add_records(w, records, ds.val_images)  # what the report's paired interval resamples
    return w.bundle
