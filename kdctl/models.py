"""Resolve a recipe's model spec (YAML name, .pt checkpoint, or bundle) into something trainable/loadable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdctl.errors import RecipeError

ASSET_MODELS = Path(__file__).parent / "assets" / "models"


@dataclass
class ResolvedModel:
    kind: str            # "yaml" | "checkpoint" | "torchvision"
    ref: str             # what Ultralytics is given: YAML path/name or .pt path
    sha256: str | None   # of the checkpoint file, when there is one
    bundle: object = None  # kdctl.bundle.Bundle when it came from one


def _download_hint(p: Path, untrained: bool = True) -> str:
    """``yolov8n.pt`` by bare name, which Ultralytics downloads: kdctl downloads nothing, so it says what to give
    instead (``untrained``: in a recipe, the model's YAML also does, trained from a random start)."""
    from kdctl.detectors.ultralytics_env import ships_model

    if len(p.parts) != 1 or not ships_model(p.stem + ".yaml"):
        return ""
    return (f"; kdctl downloads no weights (Ultralytics fetches '{p.name}' by name): give the path to a copy on "
            "this machine" + (f", or build the model untrained from '{p.stem}.yaml'" if untrained else ""))


def resolve_model(spec: str, field: str, source: str) -> ResolvedModel:
    from kdctl.bundle import load_bundle, sha256_file
    from kdctl.bundle.store import weights_of_bundle

    if spec.startswith("torchvision:"):
        from kdctl.detectors.torchvision import builder_name

        builder_name(spec, field, source)
        return ResolvedModel("torchvision", spec, None)
    p = Path(spec)
    if p.is_dir() or weights_of_bundle(p):  # a bundle, or its own weights.pt (load_bundle reads it as the bundle)
        from kdctl.errors import BundleError
        try:
            b = load_bundle(p, stages=("train", "distill"), verify=True)
        except BundleError as e:
            raise RecipeError(f"{source}: {field}: {e}", exit_code=e.exit_code) from None
        w = b.file("weights")
        return ResolvedModel("checkpoint", str(w), b.manifest["files"][w.relative_to(b.path).as_posix()]["sha256"], b)
    if is_checkpoint_file(p):
        if not p.is_file():
            raise RecipeError(f"{source}: {field}: checkpoint '{spec}' not found{_download_hint(p)}")
        return ResolvedModel("checkpoint", str(p.resolve()), sha256_file(p))
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            _check_model_yaml(p, field, source)
            return ResolvedModel("yaml", str(p.resolve()), None)
        if (ASSET_MODELS / p.name).is_file() and len(p.parts) == 1:
            return ResolvedModel("yaml", str(ASSET_MODELS / p.name), None)
        if len(p.parts) == 1:
            from kdctl.detectors.yolo import check_model_name

            check_model_name(p.name, field, source)
            return ResolvedModel("yaml", p.name, None)
        raise RecipeError(f"{source}: {field}: model YAML '{spec}' not found")
    if not p.exists():  # most often a teacher bundle not trained yet (recipes/quickstart.yaml on a fresh checkout)
        hint = "; train the teacher first (kdctl train <its recipe>)" if field == "teacher.model" else ""
        raise RecipeError(f"{source}: {field}: '{spec}' not found: no bundle directory, .pt or model YAML there (a "
                          f"relative path is read beside the recipe, then from the working directory){hint}")
    raise RecipeError(f"{source}: {field}: '{spec}' is not a .yaml, a .pt or a bundle directory")


def _check_model_yaml(path: Path, field: str, source: str) -> None:
    """A model YAML names its layers in ``backbone`` and ``head`` lists (Ultralytics' format)."""
    from kdctl.recipe.validation import YamlProblem, parse_yaml

    try:
        cfg = parse_yaml(path)
    except YamlProblem as e:
        raise RecipeError(f"{source}: {field}: '{path}' is not valid YAML ({e})") from None
    missing = [k for k in ("backbone", "head") if not isinstance((cfg or {}).get(k) if isinstance(cfg, dict) else None, list)]
    if missing:
        raise RecipeError(f"{source}: {field}: '{path}' is not a model YAML (no '{missing[0]}' layer list; "
                          "a dataset YAML given as a model?)")


def load_bundle_weights(bundle):
    """The FP32 eval-mode detector of a train/distill bundle (already verified); a broken file is one line."""
    from kdctl.detectors import load_detector
    from kdctl.errors import BundleError

    path = bundle.file("weights")
    try:
        model = load_detector(path)
    except Exception as e:
        raise BundleError(f"{path}: cannot load the model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    check_family(model, "weights", str(path))
    return model


def check_family(model_or_cfg, field: str, source: str) -> None:
    """A detection model of a family kdctl has (one line naming the field otherwise)."""
    from kdctl.detectors import family, torchvision
    from kdctl.detectors.yolo import check_family as check_ultralytics

    if family(model_or_cfg) is not torchvision:
        check_ultralytics(model_or_cfg, field, source)


def model_classes(model) -> int:
    """How many classes a detector predicts."""
    from kdctl.detectors.yolo import num_classes

    return num_classes(model)


def dataset_classes(model, ds) -> tuple:
    """``model`` as it is read for the dataset ``ds``: where it predicts more classes than the dataset and its class
    names include the dataset's (a COCO-trained model for a person/car set; :meth:`kdctl.data.resolve.Dataset.
    class_index`), a copy that predicts the dataset's classes in the dataset's order
    (:func:`kdctl.detectors.keep_classes`), with the record ``{"model_nc": its class count, "index": {dataset class:
    its class index}}``; else ``model`` itself and None."""
    from kdctl.detectors import keep_classes

    index, record = scored_classes(getattr(model, "names", None), model_classes(model), ds)
    kept = keep_classes(model, index, ds.names) if index is not None else None
    return (model, None) if kept is None else (kept, record)


def scored_classes(names, nc: int, ds) -> tuple[list[int] | None, dict | None]:
    """Where a model (or an artifact) of ``nc`` classes named ``names`` predicts more classes than the dataset
    ``ds`` and they include the dataset's by name (:meth:`kdctl.data.resolve.Dataset.class_index`): its class
    index for each of the dataset's classes, and the record ``{"model_nc": nc, "index": {dataset class: its
    class index}}``; else (None, None)."""
    index = ds.class_index(names)
    if index is None or max(index) >= nc:  # names beyond its head's classes: not its own
        return None, None
    return index, {"model_nc": nc, "index": dict(zip(ds.names, index))}


def as_started(model, ds, seed: int = 0) -> tuple:
    """A checkpoint student as its trainer starts it on the dataset ``ds``, and the record of how, where its classes
    are not the dataset's (:meth:`kdctl.data.resolve.Dataset.start_index`): Ultralytics builds a YOLO or RT-DETR
    model of the dataset's classes and loads the checkpoint into it, its class rows matched by name
    (``DetectionModel.load``); kdctl's torchvision loop fits the box predictor the same way
    (:func:`kdctl.detectors.torchvision.with_classes`). ``recipe check --models`` and distill's checks then judge
    the student that trains (a COCO checkpoint fine-tuned on a person/car set predicts 2 classes, not 80); the
    record is ``{"model_nc": its class count, "index": {dataset class: its class of that name, or None: fresh}}``,
    None where the checkpoint is taken as it is. A quantization-aware YOLO or RT-DETR checkpoint is taken as it is."""
    from kdctl.detectors import family, torchvision
    from kdctl.detectors.yolo import is_qat

    fam, nc = family(model), model_classes(model)
    if fam is torchvision:
        from kdctl.detectors.torchvision import with_classes

        index = with_classes(model, ds, seed)
    else:
        index = ds.start_index(getattr(model, "names", None), nc)
        if index is None or is_qat(model) or not isinstance(getattr(model, "yaml", None), dict):
            return model, None
        import copy

        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            started = fam.build_detector(copy.deepcopy(model.yaml), ds.nc)
        started.names = dict(enumerate(ds.names))
        started.load(model, verbose=False)
        model = started.eval()
    if index is None:
        return model, None
    return model, {"model_nc": nc, "index": {n: (i if i >= 0 else None) for n, i in zip(ds.names, index)}}


def load_model(resolved: ResolvedModel, nc: int, field: str, source: str):
    """An FP32 eval-mode ``nn.Module`` (a trained checkpoint, or a freshly initialised YAML model)."""
    from kdctl.detectors import load_detector

    if resolved.kind == "torchvision":
        from kdctl.detectors.torchvision import build_detector

        return build_detector(resolved.ref, nc)
    if resolved.kind == "checkpoint":
        try:
            model = load_detector(resolved.ref)
        except Exception as e:  # a corrupt or foreign .pt: say which file, not a traceback
            from kdctl.detectors import load_problem

            why = load_problem(e, resolved.ref)
            raise RecipeError(f"{source}: {field}: cannot load checkpoint '{resolved.ref}': {why}") from None
        check_family(model, f"{field} ('{resolved.ref}')", source)
        return model
    try:
        check_family(resolved.ref, f"{field} ('{resolved.ref}')", source)
    except RecipeError:
        raise
    except Exception:  # a YAML that does not even parse as a model: reported by the build below
        pass
    try:
        from kdctl.detectors import family

        return family(resolved.ref).build_detector(resolved.ref, nc).eval()
    except Exception as e:  # a YAML whose layers do not build: say which file
        why = (f"its field '{e.args[0]}' is missing" if _missing_top_field(e, resolved.ref) else
               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise RecipeError(f"{source}: {field}: cannot build a model from '{resolved.ref}' ({why})") from None


def _missing_top_field(e: Exception, cfg) -> bool:
    """Whether ``e`` is Ultralytics' KeyError for a model YAML without ``nc``, ``backbone`` or ``head`` (a KeyError
    can also name a module the YAML uses that Ultralytics does not have)."""
    if type(e) is not KeyError or len(e.args) != 1 or e.args[0] not in ("nc", "backbone", "head"):
        return False
    try:
        import yaml

        return e.args[0] not in (yaml.safe_load(Path(str(cfg)).read_text()) or {})
    except Exception:  # not a readable YAML file (a bare Ultralytics name): not this case
        return False


def is_checkpoint_file(path: str | Path) -> bool:
    """A model file (``best.pt``; ``BEST.PT`` too, as Ultralytics loads any weights file name) rather than a bundle
    directory, where a recipe, eval and export take either. A bundle's own weights.pt is its bundle."""
    from kdctl.bundle.store import weights_of_bundle

    return Path(path).suffix.lower() in (".pt", ".pth") and not Path(path).is_dir() and not weights_of_bundle(path)


def checkpoint_input(path: Path, data, verb: str, command: str, why: str = "") -> ResolvedModel:
    """A checkpoint file given to ``kdctl eval``/``export`` in place of a bundle: it exists, resolves, and comes with
    the ``--data`` it needs, since a checkpoint records no dataset (``why``: what the command does with it)."""
    from kdctl.errors import KdctlError

    if not path.is_file():
        raise KdctlError(f"{path}: checkpoint not found{_download_hint(path, untrained=False)}")
    ref = resolve_model(str(path), "model", command)
    if data is None:
        raise KdctlError(f"--data: required to {verb} the checkpoint {path} (a checkpoint carries no dataset{why}); "
                         "give the dataset YAML, e.g. --data data.yaml")
    return ref


def trained_size(model) -> int | None:
    """The input size a loaded checkpoint was trained at: Ultralytics keeps it in its train arguments, kdctl's
    Faster R-CNN as ``imgsz``; None where neither says (a model pickled by other code)."""
    args = getattr(model, "args", None)
    size = args.get("imgsz") if isinstance(args, dict) else getattr(model, "imgsz", None)
    if isinstance(size, (list, tuple)) and size:  # imgsz=[h, w] (Ultralytics takes both forms): its longer side
        size = max(size) if all(type(v) is int for v in size) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_imgsz(imgsz: int, model, flag: str = "--imgsz", whose: str = "the model's", error=None) -> int:
    """An input size the detector can take: a multiple of its largest stride (else ``error``, a KdctlError class,
    naming the nearest sizes that are)."""
    from kdctl.detectors.yolo import max_stride
    from kdctl.errors import KdctlError

    stride = max_stride(model)
    if imgsz % stride:
        lower, upper = imgsz // stride * stride, (imgsz // stride + 1) * stride
        raise (error or KdctlError)(f"{flag}: {imgsz} is not a multiple of {stride}, {whose} largest stride; use "
                                    f"{upper}" + (f" or {lower}" if lower else ""))
    return imgsz
