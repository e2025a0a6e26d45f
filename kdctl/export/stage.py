"""``kdctl export``: turn a train/distill bundle into a verified export bundle for a target device.

Every artifact is run in its own runtime on real validation images and compared with PyTorch (raw outputs for
FP32/FP16) and scored with the same COCO evaluation as ``kdctl eval``; an export that fails either check, or
loses more mAP than ``max_map_drop``, fails as a whole and writes nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from kdctl import faults
from kdctl.bundle import Bundle, BundleWriter, claim_output, load_bundle, next_run_dir
from kdctl.bundle.store import device_engine
from kdctl.errors import (BackendUnavailable, BundleError, CheckFailed, DataError, KdctlError, distinct, first_line,
                          given_by, shown)
from kdctl.export.base import MIN_COSINE_QAT, Artifact, file_size_mb, validate_outputs
from kdctl.export.targets import ARTIFACTS, TargetPreset, load_target, onnx_int8_scheme
from kdctl.limits import IMGSZ_MAX
from kdctl.progress import Step

MIN_CALIBRATION = 8  # fewer images than this give scales that swing with every image
DEFAULT_CALIBRATION = 64  # unless asked for: this many, or the whole train split where it is smaller


@dataclass
class ExportOptions:
    target: str = "cpu"
    artifacts: list[str] | None = None
    imgsz: int | None = None
    opset: int | None = None
    batch: int | None = None  # the preset's batch / dynamic unless given
    dynamic: bool | None = None
    calibration_images: int | None = None  # None: DEFAULT_CALIBRATION, or all of a smaller train split
    calibration_method: str | None = None
    max_map_drop: float | None = None
    data: str | None = None
    calibration_data: str | None = None  # an image folder or .txt list for INT8 calibration (no labels needed)
    eval_images: int | None = None  # cap on validation images for mAP (None: all)
    parity_images: int = 8
    skip_invalid: bool = False
    given: frozenset = frozenset()  # the fields a command-line flag set (the rest came from the recipe, or defaults)

    @classmethod
    def from_recipe(cls, recipe: dict | None, *, bundle: Path | None = None, **overrides) -> "ExportOptions":
        base = _recipe_export(recipe, bundle)
        opts = cls(**{k: v for k, v in base.items() if k in cls.__dataclass_fields__ and v is not None})
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        opts.given = frozenset(k for k, v in overrides.items() if v is not None)
        return opts

    def source(self, field: str, bundle: Path) -> str:
        """Where a value came from, for an error: the flag a user typed, or the recipe field of the bundle."""
        return given_by("--" + field.replace("_", "-"), field in self.given, bundle, f"export.{field}")


def _recipe_export(recipe: dict | None, bundle: Path | None) -> dict:
    """The recipe's ``export:`` section, checked again as the schema checks it (the bundle's manifest may be older
    than this kdctl, or edited): a bad field is one line naming it, not an error inside the export. Fields of other
    kdctl versions are left to them."""
    from kdctl.recipe.schema import ExportSpec
    from kdctl.recipe.validation import bundle_section

    bundle_section(recipe, "export", ExportSpec, Path(bundle) / "manifest.json" if bundle is not None else None,
                   known_only=True)
    return dict((recipe or {}).get("export") or {})


def _need(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BackendUnavailable(f"{what} needs the '{module}' package, which is not installed "
                                 f"(pip install {module})")


class _Inputs(Sequence):
    """Input batches of ``group`` images each, made when one is asked for from the letterboxed images, which are
    kept as uint8 (a quarter of the float32 input): the 64 INT8 calibration images at 4096 px are 12.9 GB as float32
    inputs, held through the whole export (their calibration was killed for memory), 3.2 GB as pixels. The last
    batch is completed from the first images again (each image appears at least once; a repeat changes neither a
    calibration range nor a worst-case parity difference)."""

    def __init__(self, paths: list[Path], imgsz: int, group: int = 1):
        from kdctl.evaluate.predict import letterbox, load_rgb

        self.canvases, self.group = [letterbox(load_rgb(p), imgsz)[0] for p in paths], group

    def grouped(self, n: int) -> _Inputs:
        """The same images (not a copy of their pixels) in batches of ``n``."""
        other = copy.copy(self)
        other.group = n
        return other

    def __len__(self) -> int:
        return -(-len(self.canvases) // self.group)

    def __getitem__(self, i):
        from kdctl.evaluate.predict import to_input

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return to_input([self.canvases[(i * self.group + k) % len(self.canvases)] for k in range(self.group)])


def _images_digest(paths: list[Path]) -> str:
    """sha256 over the calibration images' names and bytes, in order: which images calibrated an export."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spread over the list (deterministic, covers the whole set)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


@dataclass
class _Source:
    """What an export starts from: a train/distill bundle, or a checkpoint file of the user's (an Ultralytics
    ``best.pt``, as ``yolo export model=best.pt``), which records no dataset (``--data`` gives it), no recipe and
    no lineage: its path and hash go into the export bundle's inputs instead."""

    path: Path                    # the bundle directory or the checkpoint file (named in errors)
    trained: int | None           # a bundle's training size (a checkpoint's is read from its model)
    bundle: Bundle | None = None
    checkpoint: object = None     # kdctl.models.ResolvedModel of a checkpoint file

    @property
    def name(self) -> str:
        return self.bundle.path.resolve().name if self.bundle else self.path.stem

    @property
    def recipe(self) -> dict | None:
        return self.bundle.recipe if self.bundle else None

    @property
    def parents(self) -> list:
        return [self.bundle] if self.bundle else []

    @property
    def inputs(self) -> dict:
        if self.bundle:
            return {"weights": str(self.bundle.file("weights"))}
        return {"weights": self.checkpoint.ref, "weights_sha256": self.checkpoint.sha256}

    def data(self) -> Path | None:
        return self.bundle.file("data") if self.bundle else None

    def load(self) -> tuple:
        """The FP32 model and the size it was trained at."""
        from kdctl.models import load_bundle_weights, load_model, trained_size

        if self.bundle:
            return load_bundle_weights(self.bundle), self.trained
        model = load_model(self.checkpoint, 0, "model", "kdctl export")
        return model, trained_size(model) or 640


def _bundle_source(bundle: str | Path) -> _Source:
    src = load_bundle(bundle, stages=("train", "distill"), verify=True)
    trained = src.metrics.get("imgsz") or 640  # an integer or None (checked when the bundle was loaded)
    if not 32 <= trained <= IMGSZ_MAX:
        raise BundleError(f"{src.path / 'manifest.json'}: metrics.imgsz: must be the training input size "
                          f"(32..{IMGSZ_MAX}), got {shown(trained)}")
    return _Source(src.path, trained, bundle=src)


def _checkpoint_source(path: Path, options: ExportOptions) -> _Source:
    from kdctl.models import checkpoint_input

    ref = checkpoint_input(path, options.data, "export", "kdctl export",
                           ", and the export calibrates INT8 on it and scores every artifact on it")
    return _Source(path, None, checkpoint=ref)


def export_bundle(bundle: str | Path, options: ExportOptions, *, out: str | Path | None = None,
                  runs_dir: str | Path = "runs", overwrite: bool = False, progress=None) -> Bundle:
    """Export a train/distill bundle, or a checkpoint file with ``options.data`` (see :class:`_Source`)."""
    from kdctl.models import is_checkpoint_file

    src = _checkpoint_source(Path(bundle), options) if is_checkpoint_file(bundle) else _bundle_source(bundle)
    preset = load_target(options.target)
    out = Path(out) if out else next_run_dir(runs_dir, "export", f"{src.name}-{preset.name}", reserve=True)
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        return _export(src, preset, options, out, overwrite, progress)


def _export(src: _Source, preset: TargetPreset, options: ExportOptions, out: Path, overwrite: bool,
            progress) -> Bundle:
    from kdctl import detectors
    from kdctl.data.resolve import dataset_yaml, load_yolo_yaml
    from kdctl.detectors import yolo
    from kdctl.evaluate import torch_backend
    from kdctl.models import check_imgsz

    wanted = _known_artifacts(options, preset)
    # the validation split is checked whole (every image is scored); of the train split only the calibration
    # images are read, and checked when chosen (a COCO-sized split took minutes to check for 64 images)
    ds = load_yolo_yaml(dataset_yaml(options.data, options.skip_invalid) if options.data else src.data(),
                        skip_invalid=options.skip_invalid, splits=("val",))
    model, trained = src.load()
    qat = yolo.is_qat(model)
    wanted, skipped, unsupported = _for_model(wanted, model, qat, src.path, preset, options)
    classes = _Classes.scored(model, ds, src.path)
    preset = _with_batch(preset, options, model, src.path)
    where = ("--imgsz" if options.imgsz else f"target {options.target}: imgsz" if preset.imgsz else
             f"{src.path}: the training imgsz")  # the size the check names is the one that was given
    imgsz = check_imgsz(options.imgsz or preset.imgsz or trained, model, flag=where)
    _check_batch_memory(preset, imgsz, options, src.path)
    opset = _opset(options, preset, model, wanted, qat)
    calib = _Calibration.chosen(options, preset, ds, wanted, qat, src.path, imgsz)
    if calib.skipped and not calib.data:  # train images left out of calibration: listed with the dataset's
        ds.skipped["train"] = calib.skipped
    val_images = _spread(ds.val_images, options.eval_images) if options.eval_images else ds.val_images
    keep_float = (lambda nodes: detectors.float_tail(nodes, model)) if preset.keep_head_fp else None
    parity_batches = _Inputs(val_images[:options.parity_images], imgsz)
    if getattr(detectors.family(model), "TRACE_WITH_REAL_IMAGE", False) and parity_batches:
        model.example_input = parity_batches[0]

    made, evaluated = _planned(wanted, qat)
    plan = Step(progress, f"export → {preset.name}", total=len(made) + 1)
    ev = Step(progress, "evaluate artifacts (COCO mAP)", total=len(val_images) * (len(evaluated) + 1))
    checks = _Checks(torch_backend(model), classes.scored_backend, model, qat, imgsz, val_images, ds.names,
                     parity_batches, options.max_map_drop, ev.advance)
    checks.score_reference()
    plan.advance()
    static = not preset.dynamic and preset.batch > 1  # a static graph takes exactly its batch: images in groups of it
    calibration = _Inputs(calib.images, imgsz, preset.batch if static else 1)
    if static:
        checks.batches = parity_batches.grouped(preset.batch)
    elif preset.dynamic:  # checked on several images per call: a traced size of 1 left in the graph shows there
        checks.batches = parity_batches.grouped(max(2, min(preset.batch, 8)))
    inputs = {"target": preset.model_dump(), **src.inputs, "data": ds.describe(),
              "data_from": "--data" if options.data else "the source bundle",  # what kdctl eval of an artifact reuses
              **({"classes": classes.picked} if classes.picked else {}), **calib.inputs()}

    with BundleWriter(out, stage="export", recipe=src.recipe, parents=src.parents, overwrite=overwrite,
                      inputs=inputs) as w:
        arts = _build(w.path, model, preset, made, imgsz, opset, calib.method, calibration, keep_float, plan,
                      options, val_images, ds.names, classes.scored_backend, qat=qat)
        for a in arts:  # the batch each graph takes, and the images (not the groups of a static batch) calibrated
            a.settings.setdefault("batch", preset.batch)
            a.settings.setdefault("dynamic", preset.dynamic)
            if "calibration_images" in a.settings:
                a.settings["calibration_images"] = len(calib.images)
                if calib.capped:
                    a.settings["note"] = "; ".join(filter(None, (a.settings.get("note"), calib.capped)))
        for a in arts:
            if checks.verify(a):
                a.settings["size_mb"] = round(file_size_mb(w.path, a.files), 3)
        _write_outputs(w, arts, preset, wanted, imgsz, out.name)
        from kdctl.data.resolve import images_digest

        w.metrics.update({
            "target": preset.name, "imgsz": imgsz, "opset": opset,
            "pytorch": {**_short(checks.ref_metrics), "model": "fake-quantized (QAT)" if qat else "fp32"},
            "params": sum(p.numel() for p in model.parameters()), "gflops": yolo.gflops(model, imgsz),
            "artifacts": [a.to_dict() for a in arts], "eval_images": len(val_images),
            "eval_sha256": images_digest(val_images),  # which images the mAPs are of: a gate's baseline must match
            "names": classes.names,  # the artifacts' classes
        })
        if unsupported:
            w.metrics["skipped_artifacts"] = {a: "not available for this detector family" for a in unsupported}
        if not qat:
            w.metrics["pytorch_fp32"] = _short(checks.ref_metrics)  # the key bundles of kdctl 0.2 carry
        else:
            w.metrics["qat"] = {**yolo.quantizer_summary(model), "skipped_artifacts": skipped,
                                "reference": "the fake-quantized PyTorch student (parity and mAP drop are "
                                             "measured against it)"}
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2, default=str))
        w.add_output("metrics", "metrics.json")
    return w.bundle


def _known_artifacts(options: ExportOptions, preset: TargetPreset) -> list[str]:
    """The artifacts asked for (``--artifact``, else the preset's), each a known one whose runtime is installed."""
    wanted = options.artifacts or preset.artifacts
    bad = [a for a in wanted if a not in ARTIFACTS]
    if bad:
        raise DataError(f"--artifact: unknown artifact '{bad[0]}'; valid: {', '.join(ARTIFACTS)}")
    if any(a.startswith("openvino") for a in wanted):
        _need("openvino", "OpenVINO export")
    if "openvino-int8" in wanted:
        _need("nncf", "OpenVINO INT8 export")
    _need("onnxruntime", "ONNX export checks")
    return wanted


def _for_model(wanted: list[str], model, qat: bool, where: Path, preset: TargetPreset,
               options: ExportOptions) -> tuple[list[str], list[str], list[str]]:
    """(the artifacts this model exports, the float ones a QAT student skips, the preset's ones its family cannot
    make); an artifact asked for by ``--artifact`` that the family cannot make is refused."""
    from kdctl import detectors

    skipped = []
    if qat:  # its INT8 graph is the trained model; float artifacts would be a different, never-trained model
        skipped = [a for a in wanted if not a.endswith("int8")]
        wanted = [a for a in wanted if a.endswith("int8")]
        if not wanted:
            raise DataError(f"{where}: a quantization-aware trained student exports INT8 only, and "
                            f"{'--artifact' if options.artifacts else f'target {preset.name}'} lists no INT8 "
                            f"artifact ({', '.join(skipped)}); add --artifact onnx-int8 or openvino-int8")
    unsupported = [a for a in wanted if a in getattr(detectors.family(model), "UNSUPPORTED_ARTIFACTS", ())]
    if unsupported and options.artifacts:
        raise DataError(f"--artifact: {unsupported[0]} is not available for {type(model).__name__} models")
    return [a for a in wanted if a not in unsupported], skipped, unsupported  # a preset's: skipped


@dataclass
class _Classes:
    """The classes an export is scored on: the model's own, or where it predicts more classes than the dataset
    (a COCO one, calibrated on a person/car set) the dataset's, found by name; such a model is exported whole, as
    Ultralytics exports it."""

    names: list[str]              # the classes the artifacts predict (what kdctl eval of an artifact reads)
    index: list[int] | None       # the model's class for each of the dataset's; None: the dataset's own
    picked: dict | None           # the record of that selection (inputs.classes)

    @classmethod
    def scored(cls, model, ds, where: Path) -> "_Classes":
        from kdctl.data.resolve import listed_names
        from kdctl.models import model_classes, scored_classes

        names = listed_names(getattr(model, "names", None))[:model_classes(model)]
        index, picked = scored_classes(names, model_classes(model), ds)
        if index is None:
            ds.check_model_classes(model_classes(model), f"the model of {where}", names=names)
            return cls(ds.names, None, None)
        return cls(names, index, picked)

    def scored_backend(self, backend):
        """``backend`` as it is scored on the dataset's classes."""
        from kdctl.evaluate import class_columns

        return backend if self.index is None else class_columns(backend, self.index)


def _opset(options: ExportOptions, preset: TargetPreset, model, wanted: list[str], qat: bool) -> int:
    from kdctl import detectors

    opset = max(options.opset or preset.opset, detectors.min_opset(model))
    qdq = [a for a in wanted if a in ("onnx-int8", "tensorrt-int8")]
    if qdq and opset < 13 and not qat:  # ORT wrote DequantizeLinear(axis=...) into an opset-11 graph, then failed
        raise DataError(f"{'--opset' if options.opset else f'target {preset.name}: opset'} {opset}: {qdq[0]} is "
                        "per-channel Q/DQ, which needs opset 13 or later; give a later opset, or leave the INT8 "
                        "ONNX out (--artifact onnx-fp32)")
    return opset


@dataclass
class _Calibration:
    """The INT8 calibration images an export uses (none where nothing is calibrated), where they came from, and
    why fewer were taken than the recipe asked for."""

    images: list[Path]
    method: str
    data: str | None = None       # --calibration-data (an image folder or list), else the dataset's train split
    capped: str | None = None
    skipped: list[str] | None = None  # images left out as invalid (--skip-invalid), of --calibration-data or the split

    def inputs(self) -> dict:
        if not self.data:
            return {}
        left_out = {"skipped": {"count": len(self.skipped), "items": self.skipped[:1000]}} if self.skipped else {}
        return {"calibration_data": {"source": str(Path(self.data).resolve()), "images": len(self.images),
                                     "sha256": _images_digest(self.images), **left_out}}

    @classmethod
    def chosen(cls, options: ExportOptions, preset: TargetPreset, ds, wanted: list[str], qat: bool,
               where: Path, imgsz: int) -> "_Calibration":
        from kdctl.data.resolve import list_images
        from kdctl.limits import available_memory_bytes, memory_size

        method = options.calibration_method or preset.calibration_method
        # a QAT student's ranges were learned; ONNX Runtime's form of it needs its convolutions' output ranges too
        needs = any(a.endswith("int8") for a in wanted) and (
            not qat or ("onnx-int8" in wanted and onnx_int8_scheme(preset, wanted) == "onnxruntime"))
        given = f"--calibration-data {options.calibration_data}" if options.calibration_data else None
        if given and not needs:
            raise DataError(f"{given}: no artifact of this export is calibrated ({', '.join(wanted)}"
                            f"{', a quantization-aware student' if qat else ''}); leave --calibration-data out")
        pool = (list_images(options.calibration_data, "--calibration-data") if given else
                ds.train_images or ds.val_images)
        pool_name = options.calibration_data if given else f"the train split of {ds.yaml}"
        n = options.calibration_images or min(DEFAULT_CALIBRATION, len(pool))
        capped = None
        if needs and len(pool) < n and "calibration_images" not in options.given:
            # a recipe's count was written for its own data (the export may be of another dataset, --set data=...):
            # all of a smaller pool is used, as Ultralytics' INT8 export does, and said; a count typed as a flag is kept
            capped = f"calibrated on all {len(pool)} images of {pool_name} (recipe export.calibration_images: {n})"
            n = len(pool)
        if needs and n < MIN_CALIBRATION:
            if options.calibration_images and not capped:
                raise DataError(f"{options.source('calibration_images', where)}: {n} is too few for INT8 "
                                f"calibration (at least {MIN_CALIBRATION})")
            raise DataError(f"{given or ds.yaml}: {'it holds' if given else 'the train split has'} "
                            f"{len(pool)} image{'s' if len(pool) != 1 else ''}; INT8 calibration needs at least "
                            f"{MIN_CALIBRATION} (" +
                            ("ONNX Runtime's form of a quantization-aware student calibrates what training left in "
                             "float; give --data or --calibration-data, or export its trained graph alone with "
                             "--artifact openvino-int8" if qat else
                             "export float artifacts only with --artifact, or give --data or --calibration-data") + ")")
        if needs and len(pool) < n:
            raise DataError(f"{options.source('calibration_images', where)}: {n} calibration images "
                            f"requested, but {pool_name} has only {len(pool)}")
        pixels, available = n * 3 * imgsz * imgsz, available_memory_bytes()
        if needs and available and 2 * pixels > available:  # kept as uint8 through the export (_Inputs)
            named = options.source("calibration_images", where) if options.calibration_images else "export"
            raise DataError(f"{named}: {n} calibration images at {imgsz} px are {memory_size(pixels)} of pixels, "
                            f"kept through the export, more than half this machine's available memory "
                            f"({memory_size(available)}); give fewer with --calibration-images")
        images = _spread(pool, n) if needs else []
        images, left_out = _checked_calibration(images, pool, given or pool_name, options.skip_invalid)
        if left_out and len(images) < MIN_CALIBRATION:
            raise DataError(f"{given or ds.yaml}: {len(images)} of {'its' if given else 'the train split'} images "
                            f"{'is' if len(images) == 1 else 'are'} valid after leaving out {len(left_out)} invalid "
                            f"(first: {left_out[0]}); INT8 calibration needs at least {MIN_CALIBRATION}")
        if left_out and len(images) < n:
            capped = (f"calibrated on the {len(images)} valid images of {pool_name} ({len(left_out)} of {n} left "
                      "out as invalid)")
        return cls(images, method, options.calibration_data, capped, left_out)


def _checked_calibration(images: list[Path], pool: list[Path], given: str, skip: bool) -> tuple[list[Path], list[str]]:
    """The chosen calibration images, checked now (``--calibration-data``'s are unlabelled, the train split's were
    not checked with the dataset): a broken one is one line naming it, before any work; with --skip-invalid it is
    left out and listed, and the next image of the pool not taken yet stands in for it."""
    from kdctl.data.validate import check_image

    taken = set(images)
    spare = (p for p in pool if p not in taken)
    queue, kept, left_out = list(images), [], []
    while queue:
        img = queue.pop(0)
        problem = check_image(img)
        if problem is None:
            kept.append(img)
            continue
        if not skip:
            raise DataError(f"{img}: {problem} ({given}; --skip-invalid leaves such images out)")
        left_out.append(f"{img}: {problem}")
        if (stand_in := next(spare, None)) is not None:
            queue.append(stand_in)
    return kept, left_out


@dataclass
class _Checks:
    """Every artifact is held to the PyTorch model it came from: its outputs on the parity images, then its COCO
    mAP on the validation images, and the drop against PyTorch's within ``max_map_drop``."""

    reference: object             # the PyTorch model's backend (its own classes)
    scored: object                # a backend -> that backend as it is scored on the dataset's classes
    model: object
    qat: bool
    imgsz: int
    val_images: list[Path]
    names: list[str]
    batches: Sequence[np.ndarray]  # parity inputs, in the graphs' batch
    max_map_drop: float | None
    advance: object = None        # the evaluation bar's step
    ref_metrics: dict | None = None
    ref_records: object = None

    def __post_init__(self):
        self.images = len(self.batches)  # images compared (a static batch's groups repeat some)

    def score_reference(self) -> None:
        """PyTorch's mAP and evaluation records, which every artifact's drop is measured against."""
        from kdctl.evaluate import evaluate_with_records

        self.ref_metrics, self.ref_records = evaluate_with_records(self.scored(self.reference), self.val_images,
                                                                   self.names, self.imgsz, progress=self.advance)

    def verify(self, a: Artifact) -> bool:
        """Fill ``a.parity`` and ``a.metrics``, or fail the export; False for an artifact not here to check (an
        engine built on the device)."""
        from kdctl import detectors
        from kdctl.evaluate import evaluate_with_records
        from kdctl.evaluate.coco import drop_interval

        backend = a.runtime.pop("_backend", None)
        if (a.format == "tensorrt" and not a.files) or backend is None:
            return False
        runtime = a.runtime.get("runtime", a.format)
        try:
            a.parity = validate_outputs(self.reference, backend, self.batches, self.imgsz,
                                        "int8-qat" if self.qat else a.precision, sets=detectors.set_output(self.model),
                                        on_map=not self.qat and detectors.parity_on_map(self.model, a.precision))
            a.parity["images"] = self.images
        except Exception as e:  # the runtime refuses the exported graph on a real image
            raise CheckFailed(f"export {a.name}: {runtime} cannot run the exported model on the validation images "
                              f"({first_line(e)})") from None
        if a.parity.get("ok") is False:
            raise CheckFailed(f"export {a.name}: outputs differ from PyTorch"
                              f"{' (the fake-quantized student)' if self.qat else ''} beyond tolerance "
                              f"({json.dumps({k: v for k, v in a.parity.items() if k != 'ok'})})")
        try:
            a.metrics, records = evaluate_with_records(self.scored(backend), self.val_images, self.names, self.imgsz,
                                                       progress=self.advance)
        except Exception as e:
            raise CheckFailed(f"export {a.name}: {runtime} cannot run the exported model on every validation image "
                              f"({first_line(e)})") from None
        ref = self.ref_metrics["map50_95"]
        drop = a.metrics["map50_95_drop"] = ref - a.metrics["map50_95"]
        # the paired interval over the validation images: a drop the images alone could make, or a real one
        a.metrics["map50_95_drop_ci95"] = lo_hi = drop_interval(self.ref_records, records)
        if self.max_map_drop is not None and a.precision != "fp32" and drop > self.max_map_drop:
            told = distinct("{:.4f}", drop, self.max_map_drop)[0]  # 0.02004 against 0.02: not "0.0200"
            raise CheckFailed(f"export {a.name}: mAP50-95 {a.metrics['map50_95']:.4f} is {told} below "
                              f"{'the fake-quantized PyTorch student' if self.qat else 'PyTorch FP32'} "
                              f"({ref:.4f}), by {lo_hi[0]:.4f} to {lo_hi[1]:.4f} over resamples of the "
                              f"{len(self.val_images)} validation images (95 %); export.max_map_drop is "
                              f"{self.max_map_drop}")
        return True


def _write_outputs(w, arts: list[Artifact], preset: TargetPreset, wanted: list[str], imgsz: int, name: str) -> None:
    """The artifacts, the device package where one is wanted and target.yaml, as the bundle's outputs."""
    device_files = []
    if preset.runtime == "tensorrt" or any(a.startswith("tensorrt") for a in wanted):
        from kdctl.export.tensorrt import write_device_package

        onnx_files = {a.name: a.files[0] for a in arts if a.format == "onnx"}
        device_files = write_device_package(w.path, onnx_files, preset, imgsz,
                                            any(a.format == "tensorrt" and a.files for a in arts), name)
    (w.path / "target.yaml").write_text(yaml.safe_dump(preset.model_dump(), sort_keys=False))
    for a in arts:
        for f in a.files:
            w.add_output(a.name if len(a.files) == 1 else f"{a.name}:{Path(f).name}", f)
    for f in device_files:
        w.add_output(Path(f).stem.lower().replace("_", "-"), f)
    w.extra["artifacts"] = {a.name: {"files": a.files, "format": a.format, "precision": a.precision} for a in arts}
    # engines build_engine.sh makes on the device: allowed beside the bundle's files, hashed by profile
    w.extra["device_built"] = [e for e in map(device_engine, w.extra["artifacts"].values()) if e]


def _with_batch(preset: TargetPreset, options: ExportOptions, model, bundle: Path) -> TargetPreset:
    """The preset with ``--batch``/``--dynamic`` (or the recipe's export.batch/dynamic) applied: the bundle's
    target.yaml and manifest record the graphs' batch as exported."""
    from kdctl import detectors

    update = {k: getattr(options, k) for k in ("batch", "dynamic") if getattr(options, k) is not None}
    preset = preset.model_copy(update=update)
    if (preset.dynamic or preset.batch > 1) and getattr(detectors.family(model), "BATCH_ONE_EXPORT", False):
        field = "dynamic" if preset.dynamic else "batch"
        where = options.source(field, bundle) if field in update else f"target {preset.name}: {field}"
        raise DataError(f"{where}: {type(model).__name__} models export with one image per graph (their per-image "
                        f"proposal and RoI steps are unrolled when traced); give batch 1, not dynamic")
    return preset


# a detector's forward at N images takes up to ~18x its input in activations (YOLOv8m at 640 px, measured); tracing,
# the runtimes' sessions and the checks beside it: about twice that
BATCH_MEMORY_FACTOR = 32


def _check_batch_memory(preset: TargetPreset, imgsz: int, options: ExportOptions, bundle: Path) -> None:
    """Refuse, before any work, a batch this machine cannot trace and check (it would be killed for memory instead,
    leaving nothing but a killed process to read)."""
    from kdctl.limits import available_memory_bytes, memory_size

    if preset.batch == 1:
        return
    need, avail = BATCH_MEMORY_FACTOR * preset.batch * 3 * imgsz * imgsz * 4, available_memory_bytes()
    if avail and need > avail:
        where = options.source("batch", bundle) if options.batch is not None else f"target {preset.name}: batch"
        raise DataError(f"{where}: {preset.batch} images of {imgsz} px need about {memory_size(need)} to export and "
                        f"check (their input alone is {memory_size(need / BATCH_MEMORY_FACTOR)}), more than this "
                        f"machine's available memory ({memory_size(avail)}); give a smaller batch")


def _planned(wanted: list[str], qat: bool) -> tuple[list[str], list[str]]:
    """The artifacts an export makes (``wanted`` and the ONNX files its TensorRT engines are built from: the builders
    make exactly these) and those of them it evaluates (TensorRT engines only where they are built here)."""
    made = list(wanted)
    if any(a.startswith("tensorrt") for a in wanted) and not qat and "onnx-fp32" not in made:
        made.append("onnx-fp32")
    if "tensorrt-int8" in wanted and "onnx-int8" not in made:
        made.append("onnx-int8")
    evaluated = [a for a in made if not a.startswith("tensorrt")]
    if len(evaluated) < len(made):
        from kdctl.runtimes.tensorrt import tensorrt_status

        if tensorrt_status()[0]:
            evaluated = made
    return made, evaluated


def _short(m: dict) -> dict:
    return {k: m[k] for k in ("map50_95", "map50", "map75")}


def _build(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int, method: str,
           calibration: Sequence[np.ndarray], keep_float, plan: Step, options: ExportOptions,
           val_images: list[Path], names: list[str], scored, qat: bool = False) -> list[Artifact]:
    """Write each artifact into ``root``; each carries a backend (under runtime['_backend']) to verify it.
    ``scored``: a backend as it is scored on ``names`` (the dataset's classes)."""
    if qat:
        arts = _build_qat(root, model, preset, wanted, imgsz, opset, method, calibration, plan)
    else:
        arts = _build_onnx(root, model, preset, wanted, imgsz, opset, method, calibration, keep_float, plan)
        arts += _build_openvino(root, model, preset, wanted, imgsz, opset, calibration, keep_float, plan, options,
                                val_images, names, scored)
    arts += _build_tensorrt(root, model, preset, wanted, imgsz, opset, plan)
    fp32 = root / "model-fp32.onnx"
    if fp32.is_file() and not any(fp32.name in a.files for a in arts):
        fp32.unlink()  # only the intermediate for INT8 calibration; not part of this target's package
    int8 = root / "model-int8.onnx"
    if int8.is_file() and not any(int8.name in a.files for a in arts) and preset.runtime != "tensorrt":
        int8.unlink()  # a QAT student's Q/DQ graph, only the source of its OpenVINO IR here
    return arts


def _ort_runtime() -> dict:
    import onnxruntime as ort

    return {"runtime": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider"}


def _build_onnx(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int, method: str,
                calibration: Sequence[np.ndarray], keep_float, plan: Step) -> list[Artifact]:
    from kdctl.export.onnx import export_onnx
    from kdctl.runtimes.onnxruntime import onnxruntime_backend

    arts: list[Artifact] = []
    ort_rt = _ort_runtime()
    fp32 = root / "model-fp32.onnx"
    settings = {"opset": opset, "batch": preset.batch, "dynamic": preset.dynamic, "nms": preset.nms,
                "simplified": "onnxslim"}
    if "onnx-fp32" in wanted or "onnx-int8" in wanted:  # the FP32 graph is also what INT8 is quantized from
        export_onnx(model, fp32, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic)
    if "onnx-fp32" in wanted:
        arts.append(Artifact("onnx-fp32", "onnx", "fp32", [fp32.name],
                             {**ort_rt, "inference_precision": "fp32", "_backend": onnxruntime_backend(fp32)},
                             settings=dict(settings)))
        plan.advance()
    if "onnx-fp16" in wanted:
        p = export_onnx(model, root / "model-fp16.onnx", imgsz, opset=opset, batch=preset.batch,
                        dynamic=preset.dynamic, half=True)
        arts.append(Artifact("onnx-fp16", "onnx", "fp16", [p.name],
                             {**ort_rt, "inference_precision": "fp16", "_backend": onnxruntime_backend(p)},
                             settings={**settings, "io": "fp32"}))
        plan.advance()
    if "onnx-int8" in wanted:
        from kdctl.export.quantize import CalibrationMemoryError, quantize_onnx_int8

        p = root / "model-int8.onnx"
        try:
            q = quantize_onnx_int8(fp32, p, calibration, keep_float, method=method,
                                   scheme=onnx_int8_scheme(preset, wanted))
        except CalibrationMemoryError as e:
            from kdctl.limits import memory_size

            raise KdctlError(f"export onnx-int8: ONNX Runtime's INT8 calibration holds every intermediate tensor of "
                             f"a calibration batch at once, {memory_size(e.tensors)} for this model at {imgsz} px"
                             f"{f' and batch {preset.batch}' if preset.batch > 1 else ''} (about {memory_size(e.need)} "
                             f"in all), more than this machine's available memory ({memory_size(e.available)}); give "
                             f"a smaller --imgsz{' or --batch' if preset.batch > 1 else ''}, or leave onnx-int8 out "
                             "(--artifact)") from None
        except Exception as e:  # e.g. ONNX Runtime refusing the graph on a calibration image (its own Fail type)
            hint = "" if method == "minmax" else (f"; {method} calibration builds a histogram of every tensor, "
                                                   "--calibration-method minmax does not")
            raise CheckFailed(f"export onnx-int8: calibration failed ({first_line(e)}){hint}") from None
        if q["scheme"] == "tensorrt":
            _check_tensorrt_form(p)
        arts.append(Artifact("onnx-int8", "onnx", "int8", [p.name],
                             {**ort_rt, "inference_precision": "int8 (QDQ)", "_backend": onnxruntime_backend(p)},
                             settings={**settings, **q}))
        plan.advance()
    return arts


def _check_tensorrt_form(path: Path) -> None:
    from kdctl.export.quantize import tensorrt_qdq_problems

    problems = tensorrt_qdq_problems(path)
    if problems:
        raise CheckFailed(f"export onnx-int8: the Q/DQ model breaks TensorRT's rules: {problems[0]}")


def _build_openvino(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int,
                    calibration: Sequence[np.ndarray], keep_float, plan: Step, options: ExportOptions,
                    val_images: list[Path], names: list[str], scored) -> list[Artifact]:
    """OpenVINO IRs converted from the traced PyTorch model (see ``kdctl.export.openvino.convert``), or from the
    ONNX graph for a family whose post-processing OpenVINO's PyTorch tracing cannot carry; INT8 by NNCF either way."""
    precisions = [prec for prec in ("fp32", "fp16", "bf16", "int8") if f"openvino-{prec}" in wanted]
    if not precisions:
        return []
    from kdctl.detectors import export_module, family
    from kdctl.export.openvino import export_openvino, quantize_openvino_int8, source_name

    from_onnx = getattr(family(model), "OPENVINO_FROM_ONNX", False)
    if from_onnx:
        source = root / "model-fp32.onnx"
        if not source.is_file():
            from kdctl.export.onnx import export_onnx

            export_onnx(model, source, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic)
    else:
        module, x = export_module(model, imgsz, preset.batch, dynamic=preset.dynamic, fmt="openvino")
        source = (module, x, preset.dynamic)
    arts: list[Artifact] = []
    for prec in precisions:
        d = root / f"openvino-{prec}"
        if prec == "int8":
            validation = None
            if options.max_map_drop is not None:
                validation = (val_images, _map_validator(imgsz, names, scored))
            q = quantize_openvino_int8(source, d, calibration, keep_float, validation=validation,
                                       max_drop=options.max_map_drop)
        else:
            if prec == "bf16" and "fp32" in precisions:  # the same FP32 IR, only run at another precision
                shutil.copytree(root / "openvino-fp32", d)
            else:
                export_openvino(source, d, prec)
            q = {"compress_to_fp16": prec == "fp16", "converted_from": source_name(source)}
        arts.append(_openvino_artifact(d, prec, preset, q))
        plan.advance()
    return arts


def _openvino_artifact(d: Path, prec: str, preset: TargetPreset, settings: dict) -> Artifact:
    from kdctl.runtimes.openvino import openvino_backend

    hint = preset.openvino_int8_precision if prec == "int8" else None
    backend = openvino_backend(d / "model.xml", prec, threads=preset.threads, hint=hint)
    return Artifact(f"openvino-{prec}", "openvino", prec, [f"{d.name}/model.xml", f"{d.name}/model.bin"],
                    {**backend.runtime, "_backend": backend}, settings=settings)


def _build_qat(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int, method: str,
               calibration: Sequence[np.ndarray], plan: Step) -> list[Artifact]:
    """A quantization-aware trained student: its own Q/DQ graph (ranges learned in training, BatchNorm folded into
    the quantized convolutions) is the INT8 model: its quantizers are not calibrated again. Weight quantizers are
    folded into int8 weights (TensorRT's form, OpenVINO's source). ONNX Runtime's form is ONNX Runtime's quantizer
    run on the student's float graph with every trained scale fixed as trained: it also quantizes what training
    left in float between them (each convolution's output, SiLU), calibrated on ``calibration``, so its CPU kernels
    run integer convolutions (ModelOpt's graph as is ran them in float, slower than FP32); where that form departs
    from the trained graph beyond a QAT artifact's tolerance, the trained graph is written instead, and says why."""
    import onnx

    from kdctl import detectors
    from kdctl.export.onnx import export_onnx
    from kdctl.export.quantize import (calibration_count, fold_weight_quantizers, qdq_counts,
                                       quantize_qat_onnxruntime, to_uint8_activations)
    from kdctl.runtimes.onnxruntime import onnxruntime_backend

    arts: list[Artifact] = []
    p = root / "model-int8.onnx"
    opset = max(opset, 13)  # per-channel Q/DQ
    export_onnx(model, p, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic)
    proto = onnx.load(str(p))
    trained = type(proto)()
    trained.CopyFrom(proto)
    fold_weight_quantizers(proto)
    counts = qdq_counts(proto)
    if not counts["int8_convs"]:
        raise CheckFailed(f"export: the quantization-aware trained student exported no quantized convolution "
                          f"({counts})")
    settings = {"opset": opset, "batch": preset.batch, "dynamic": preset.dynamic, "nms": preset.nms,
                "format": "QDQ", "source": "quantization-aware training", "calibration": "none (ranges learned "
                "in training)", "weights": "int8 symmetric per-channel", **counts}
    onnx.save(proto, str(p))
    if "openvino-int8" in wanted:
        from kdctl.export.openvino import export_openvino

        export_openvino(p, root / "openvino-int8", "int8")  # from the symmetric Q/DQ graph
        arts.append(_openvino_artifact(root / "openvino-int8", "int8", preset,
                                       {**settings, "converted_from": "onnx (Q/DQ)", "tool": "openvino"}))
        plan.advance()
    if "onnx-int8" not in wanted:
        return arts
    scheme = onnx_int8_scheme(preset, wanted)
    if scheme == "onnxruntime":
        fast = root / "model-int8.ort.onnx"
        n = calibration_count(calibration)
        try:
            built = quantize_qat_onnxruntime(trained, fast, calibration,
                                             lambda nodes: detectors.float_tail(nodes, model), method)
        except Exception as e:  # e.g. a histogram calibrator on a near-constant tensor: the trained graph stands
            if faults.signalled() is not None:  # a Ctrl-C the library turned into its own error: not its failure
                raise
            built, why = None, f"could not be built ({first_line(e)})"
        else:
            # the added quantizers were never trained: the form is kept only where it computes what the trained
            # graph computes, to the tolerance a QAT artifact is held to against PyTorch
            check = validate_outputs(onnxruntime_backend(p), onnxruntime_backend(fast), calibration[:8], imgsz,
                                     "int8-qat", sets=detectors.set_output(model))
            why = None if check["ok"] else (f"differed from the trained graph (cosine "
                                            f"{distinct('{:.4f}', check['cosine'], MIN_COSINE_QAT)[0]}, under "
                                            f"{MIN_COSINE_QAT})")
        if why is None:
            fast.replace(p)
            settings = {**settings, **qdq_counts(onnx.load(str(p))), "calibration": f"none for the "
                        f"{built['trained_activations']} activations and {built['trained_weights']} weights training "
                        f"quantized (their ranges as learned); the tensors it left in float that ONNX Runtime "
                        f"quantizes (each convolution's output, SiLU): {method} over {n} images",
                        "calibration_images": n, "calibration_method": method,
                        "onnxruntime_form": {"used": True, "cosine_to_trained_graph": check["cosine"]}}
            acts = "uint8 (the trained ranges at zero point 128; the others calibrated)"
        else:
            fast.unlink(missing_ok=True)
            to_uint8_activations(proto)
            onnx.save(proto, str(p))
            settings = {**settings, "onnxruntime_form": {
                "used": False, **({"cosine_to_trained_graph": check["cosine"]} if built else {}),
                "note": f"ONNX Runtime's integer form (the tensors training left in float quantized too, {method} "
                f"over {n} images) {why}; this is the trained graph, whose convolutions ONNX Runtime runs in "
                "float: slower than FP32 (docs/benchmarks.md). For CPU speed export this student for the intel "
                "(OpenVINO) target, or use post-training INT8"}}
            acts = "uint8 (zero point 128)"
    else:
        _check_tensorrt_form(p)
        acts = "int8 symmetric"
    onnx.checker.check_model(str(p))
    arts.insert(0, Artifact("onnx-int8", "onnx", "int8", [p.name],
                            {**_ort_runtime(), "inference_precision": "int8 (QDQ)", "_backend": onnxruntime_backend(p)},
                            settings={**settings, "scheme": scheme, "activations": acts}))
    plan.advance()
    return arts


def _build_tensorrt(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int,
                    plan: Step) -> list[Artifact]:
    """TensorRT engines when TensorRT is here; otherwise a record that ``build_engine.sh`` builds them on the device."""
    arts: list[Artifact] = []
    for prec in ("fp16", "int8"):
        if f"tensorrt-{prec}" not in wanted:
            continue
        from kdctl.export.tensorrt import build_engine
        from kdctl.runtimes.tensorrt import tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            arts.append(Artifact(f"tensorrt-{prec}", "tensorrt", prec, [],
                                 {"runtime": "tensorrt", "engine_built": False, "reason": why},
                                 settings={"build_on_device": "build_engine.sh"}))
        else:
            import tensorrt as trt

            from kdctl.export.onnx import export_onnx
            from kdctl.export.tensorrt import dynamic_max_batch, strongly_typed, tensorrt_version

            src = root / "model-int8.onnx"
            if prec == "fp16" and strongly_typed(tensorrt_version(trt.__version__)):
                src = root / "model-fp16.onnx"  # a typed network takes its precision from the ONNX
                if not src.is_file():
                    export_onnx(model, src, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic, half=True)
            elif prec == "fp16":
                src = root / "model-fp32.onnx"
            info = build_engine(src, root / f"model-{prec}.engine", prec, preset.tensorrt.workspace_mb,
                                preset.tensorrt.dla_core, max_batch=dynamic_max_batch(preset))
            from kdctl.runtimes.tensorrt import tensorrt_backend

            be = tensorrt_backend(root / f"model-{prec}.engine")
            arts.append(Artifact(f"tensorrt-{prec}", "tensorrt", prec, [f"model-{prec}.engine"],
                                 {"runtime": "tensorrt", "engine_built": True, "version": info["tensorrt_version"],
                                  "inference_precision": prec, "_backend": be}, settings=info))
        plan.advance()
    return arts


def _map_validator(imgsz: int, names: list[str], scored):
    """NNCF accuracy-control validation: COCO mAP50-95 of a compiled OpenVINO model on the given images, scored on
    ``names`` (``scored``: the model's outputs as they are scored on them)."""
    from kdctl.evaluate import evaluate_backend

    from kdctl.runtimes.openvino import compiled_backend

    def validate(compiled_model, items) -> float:
        return evaluate_backend(scored(compiled_backend(compiled_model)), list(items), names, imgsz)["map50_95"]

    return validate
