"""The recipe schema: the single source of fields, defaults, validation errors and the JSON Schema.

A recipe is data, never code. Every stage copies the resolved recipe into its bundle.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kdctl.limits import IMGSZ_MAX, SEED_MAX
from kdctl.runtimes import ARTIFACTS  # names only: the registry imports no runtime

LEVELS = ("backbone", "neck", "head", "rpn", "roi", "query", "feature", "logit")
# Roles a recipe may name instead of layer indices; resolved per model by kdctl.distill.taps.
ROLES = ("backbone", "neck", "head")


def _leaf_types(t) -> set:
    """The types a field annotation admits (through Annotated, Optional and unions)."""
    origin = get_origin(t)
    if origin is Annotated:
        return _leaf_types(get_args(t)[0])
    if origin in (Union, UnionType):
        return set().union(*(_leaf_types(a) for a in get_args(t)))
    return {t}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info):
        """``epochs: true`` is a slip, not 1 (pydantic's lax mode would take it as 1)."""
        if isinstance(v, bool):
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"got {str(v).lower()}; give a number")
        return v


# sections a recipe may give as one string, short for this one field of theirs (data: data.yaml, teacher: best.pt);
# the sections' own validators take both forms, kdctl.recipe.bases.expand_short_forms writes the long one
SHORT_FORMS = {"data": "yolo", "teacher": "model", "student": "model"}


def _short_form(field: str):
    """A section's validator taking one string as ``{field: string}``."""
    def expand(cls, v):
        return {field: v} if isinstance(v, str) else v

    return model_validator(mode="before")(classmethod(expand))


class ModelSpec(Strict):
    """A detector: an Ultralytics model YAML name (``yolov8n.yaml``), a ``.pt`` file, a bundle directory, or a
    torchvision builder (``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``, built without weights).
    ``teacher: best.pt`` is short for ``teacher: {model: best.pt}``."""

    model: str = Field(description="Model YAML name/path, .pt checkpoint path, kdctl bundle directory, or "
                                   "torchvision:<builder>")
    nc: int | None = Field(None, ge=1, description="Override the class count (defaults to the dataset's)")

    _short = _short_form(SHORT_FORMS["teacher"])

    @field_validator("model")
    @classmethod
    def _model_form(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if v.lower().endswith((".yaml", ".yml", ".pt", ".pth")) or "/" in v or "\\" in v or v in (".", ".."):
            return v
        if v.startswith("torchvision:"):
            return v
        raise ValueError(f"'{v}' is not a model YAML (.yaml), a checkpoint (.pt), a bundle directory or a "
                         "torchvision builder (torchvision:fasterrcnn_mobilenet_v3_large_320_fpn)")


class SyntheticData(Strict):
    train: int = Field(400, ge=1, le=100_000, description="Training images")
    val: int = Field(100, ge=1, le=100_000, description="Validation images")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Generator seed (same seed, same images)")
    imgsz: int = Field(320, ge=64, le=2048, description="Side of the generated square images")
    scene: Literal["cluttered", "clear", "dense"] = Field(
        "cluttered", description="cluttered: many small, occluded objects among clutter; clear: fewer, larger "
        "objects; dense: other shapes than clear's, more and smaller objects among clutter")
    classes: int = Field(6, ge=1, le=12, description="Shape classes (at most 12; 9 for scene 'dense')")

    @field_validator("classes")
    @classmethod
    def _classes_in_scene(cls, v: int, info):
        from kdctl.data.synth import scene_classes

        scene = info.data.get("scene")
        if scene is not None and v > scene_classes(scene):
            raise ValueError(f"{v}; scene '{scene}' has {scene_classes(scene)} shapes")
        return v


class CocoData(Strict):
    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str


DATA_SOURCES = ("yolo", "coco", "synthetic")


class DataSpec(Strict):
    """Exactly one of: an Ultralytics dataset YAML, a COCO-JSON dataset, or the built-in generator. A bare path,
    ``data: data.yaml`` (Ultralytics' ``data=``), is short for ``data: {yolo: data.yaml}``."""

    yolo: str | None = Field(None, description="Path to an Ultralytics dataset YAML (data.yaml)")
    coco: CocoData | None = None
    synthetic: SyntheticData | None = None
    skip_invalid: bool = Field(False, description="Leave out images whose label or image file is invalid "
                               "(listed in the bundle) instead of stopping with an error")

    _short = _short_form(SHORT_FORMS["data"])

    @field_validator("yolo")
    @classmethod
    def _yaml_file(cls, v: str | None) -> str | None:
        suffix = Path(v.strip()).suffix.lower() if v is not None else ".yaml"
        if suffix not in (".yaml", ".yml"):
            hint = " (a COCO dataset is data.coco: train_images, train_annotations, ...)" if suffix == ".json" else ""
            raise ValueError(f"'{v}' is not a dataset YAML (.yaml){hint}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in DATA_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of yolo, coco, synthetic (got {', '.join(given) or 'none'})")
        return self


# train: fields handed to Ultralytics' trainer under their own names when given (TrainSpec, below); of them, those
# kdctl's Faster R-CNN loop applies too
ULTRALYTICS_TRAIN = ("lrf", "cos_lr", "momentum", "weight_decay", "warmup_momentum", "box", "cls", "dfl", "hsv_h",
                     "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr",
                     "mixup", "copy_paste")
TORCHVISION_TRAIN = ("lrf", "cos_lr", "momentum", "weight_decay", "fliplr")


class TrainSpec(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    imgsz: int = Field(320, ge=32, le=IMGSZ_MAX)
    batch: int = Field(16, ge=1, le=4096)
    lr0: float = Field(0.01, gt=0, le=1, description="Initial learning rate (Ultralytics accepts at most 1)")
    optimizer: Literal["auto", "SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp"] = "auto"
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Training seed (NumPy's range: 0 to 2**32 - 1)")
    device: str = Field("cpu", description="'cpu', a CUDA index like '0', or 'cuda'")
    workers: int = Field(0, ge=0, le=64)
    amp: bool = True
    patience: int = Field(100, ge=0)
    mosaic: float = Field(1.0, ge=0, le=1)
    close_mosaic: int = Field(0, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    nbs: int | None = Field(
        None, ge=1, le=4096,
        description="Nominal batch size (Ultralytics' nbs, default 64): gradients accumulate over round(nbs / batch) "
                    "batches per optimizer step. On a few hundred images the default leaves ~6 steps an epoch; "
                    "nbs equal to batch steps every batch (the quickstart's setting, docs/benchmarks.md). YOLO and "
                    "RT-DETR only: kdctl's Faster R-CNN loop steps every batch, as torchvision's references do")
    val: bool = Field(
        True, description="Validate after every epoch (the progress bar's mAP, per-epoch metrics, and the best epoch's "
                          "weights are kept); false: only after the last epoch, whose weights are kept (Ultralytics' "
                          "val=False): about a second an epoch saved on the built-in data, and another random stream than "
                          "a validated run's (same seed, other result). YOLO and RT-DETR only")
    threads: int | None = Field(
        None, ge=1, le=256,
        description="CPU threads torch trains with (default: Ultralytics' cpu_count - 1, at most 8, which is one "
                    "on a 2-core machine; torch's own default for Faster R-CNN). The thread count changes the "
                    "arithmetic, so the same seed gives another run at another count")
    warmup_bias_lr: float | None = Field(
        None, ge=0, le=1, description="Bias learning rate at the start of warm-up (default: Ultralytics' 0.1, "
                                      "which trains better from scratch here than 0 even with AdamW; see "
                                      "docs/benchmarks.md)")
    # Ultralytics' own training settings, under its names and in its ranges; left out (None): Ultralytics' default.
    # kdctl's Faster R-CNN loop takes lrf, cos_lr, momentum, weight_decay and fliplr (its one augmentation) and refuses
    # the others.
    lrf: float | None = Field(None, ge=0, le=1, description="Final learning rate as a fraction of lr0 (0.01)")
    cos_lr: bool | None = Field(None, description="Cosine learning-rate schedule instead of linear (false)")
    momentum: float | None = Field(None, ge=0, le=1, description="SGD momentum or Adam beta1 (0.937)")
    weight_decay: float | None = Field(None, ge=0, le=1, description="Weight decay (0.0005)")
    warmup_momentum: float | None = Field(None, ge=0, le=1, description="Momentum at the start of warm-up (0.8)")
    box: float | None = Field(None, gt=0, le=100, description="Box loss gain (7.5)")
    cls: float | None = Field(None, gt=0, le=100, description="Classification loss gain (0.5)")
    dfl: float | None = Field(None, gt=0, le=100, description="Distribution focal loss gain (1.5)")
    hsv_h: float | None = Field(None, ge=0, le=1, description="Hue augmentation, a fraction (0.015)")
    hsv_s: float | None = Field(None, ge=0, le=1, description="Saturation augmentation, a fraction (0.7)")
    hsv_v: float | None = Field(None, ge=0, le=1, description="Value (brightness) augmentation, a fraction (0.4)")
    degrees: float | None = Field(None, ge=0, le=180, description="Rotation, ± degrees (0)")
    translate: float | None = Field(None, ge=0, le=1, description="Translation, ± a fraction of the size (0.1)")
    scale: float | None = Field(None, ge=0, lt=1, description="Scale gain, ± (0.5)")
    shear: float | None = Field(None, ge=0, le=180, description="Shear, ± degrees (0)")
    perspective: float | None = Field(None, ge=0, le=0.001, description="Perspective, a fraction (0)")
    flipud: float | None = Field(None, ge=0, le=1, description="Vertical flip probability (0)")
    fliplr: float | None = Field(None, ge=0, le=1, description="Horizontal flip probability (0.5; 0 for text, "
                                                               "digits, anything a mirror changes)")
    mixup: float | None = Field(None, ge=0, le=1, description="MixUp probability (0)")
    copy_paste: float | None = Field(None, ge=0, le=1, description="Copy-paste probability, segment labels only (0)")

    @field_validator("imgsz")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the detector's largest stride), got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from kdctl.distributed import as_indices

        given = str(v).strip().lower()
        if given in ("cpu", "cuda", "mps"):
            return given
        ids = [p.strip() for p in as_indices(given).split(",") if p.strip()]  # 'cuda:0' is '0', as in Ultralytics
        if ids and all(p.isdigit() for p in ids):
            twice = sorted({p for p in ids if ids.count(p) > 1})
            if twice:
                raise ValueError(f"'{given}' names GPU {twice[0]} twice; give each index once")
            return ",".join(ids)
        raise ValueError(f"'{given}' is not a device; use 'cpu', 'cuda' or GPU indices like '0' or '0,1'")


class LossSpec(Strict):
    """One distillation term: a registered loss attached to layers of both models."""

    name: str = Field(description="A registered loss name; `kdctl list losses` shows them")
    level: Literal["backbone", "neck", "head", "rpn", "roi", "query", "feature", "logit"] | None = Field(
        None, description="Taxonomy level; defaults to the loss's own level")
    student_layers: list[int | str] | Literal["backbone", "neck", "head"] | None = Field(
        None, description="Layers of the student: indices into the layer list (4), module paths (model.6.m.0), "
                          "or a role; defaults from the level")
    teacher_layers: list[int | str] | Literal["backbone", "neck", "head"] | None = Field(
        None, description="Layers of the teacher: indices, module paths, or a role; defaults from the level")
    strides: list[Annotated[int, Field(ge=1, le=1024, strict=True)]] | None = Field(
        None, description="Feature losses: of the layer pairs, keep those whose student map has these strides "
                          "(input size / map width; 8 is P3), e.g. [8] for the stride-8 backbone map only")
    weight: float = Field(1.0, ge=0, le=1e6)
    # any float here: the loss registry checks each value's type and range (kdctl.distill.losses.registry), and names
    # the parameter without pydantic's union-member suffix
    params: dict[str, Annotated[float, Field(allow_inf_nan=True)] | int | bool | str] = Field(
        default_factory=dict, description="Loss-specific parameters (e.g. tau)")


    @field_validator("student_layers", "teacher_layers")
    @classmethod
    def _paths(cls, v):
        import re

        if isinstance(v, list) and not v:  # a term over no layer pair (it failed at the first training step)
            raise ValueError("is empty; name at least one layer, or leave it out for the level's defaults")
        for x in v if isinstance(v, list) else []:
            if isinstance(x, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", x):
                raise ValueError(f"'{x}' is neither a layer index nor a module path like model.6.m.0")
        return v

    @field_validator("student_layers", "teacher_layers", mode="before")
    @classmethod
    def _no_bool_for_a_layer(cls, v):
        """``[true, 9]`` is a slip, not layer 1 (pydantic's lax mode would take it as 1)."""
        for x in v if isinstance(v, list) else []:
            if isinstance(x, bool):
                raise ValueError(f"got {str(x).lower()}; give a layer index (4) or a module path (model.6.m.0)")
        return v

    @field_validator("strides")
    @classmethod
    def _strides(cls, v):
        if v is not None and not v:
            raise ValueError("is empty; name at least one stride (8 is P3), or leave it out for every pair")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"{v} names a stride twice")
        return v


class CacheSpec(Strict):
    """``distill.cache``: replay the teacher's head outputs from disk instead of running the teacher each step."""

    path: str | None = Field(None, description="Cache folder (default: $KDCTL_CACHE/teacher-outputs/<recipe name>, "
                                               "$XDG_CACHE_HOME/kdctl or ~/.cache/kdctl without KDCTL_CACHE); built "
                                               "by `kdctl cache build` "
                                               "or by distill when missing")
    top_k: int = Field(256, ge=1, le=100_000, description="Anchors stored per view (the teacher's most confident); "
                                                         "the other anchors get their mean class logit")


class DistillSpec(Strict):
    losses: list[LossSpec] = Field(default_factory=list)
    cache: CacheSpec | None = Field(
        None, description="Teacher-output cache for head-level losses (kd_logit, ld): the teacher runs once per "
                          "augmented view of the whole run (`kdctl cache build`), training replays exactly those "
                          "views; feature-level losses still run the teacher online")
    auto_balance: float | None = Field(
        None, gt=0, le=100,
        description="Scale each KD weight so its median over the first balance_batches batches is this fraction "
                    "of the task loss's median; scales are then fixed (and reused on --resume)")
    balance_batches: int = Field(8, ge=1, le=1000, description="Batches whose medians set the auto-balance scales")
    balance_cap: float | None = Field(
        4.0, gt=0, description="With auto_balance: no KD term may exceed this many times its share of the task "
                               "loss on any batch (scaled down, gradient direction kept); null turns it off")
    stop_epoch: int | None = Field(
        None, ge=1, le=100_000,
        description="Distill for this many epochs, then train on the task loss alone to the end (the teacher no "
                    "longer runs; mmrazor's StopDistillHook); must be below train.epochs. Unset: every epoch")
    warmup_epochs: int | None = Field(
        None, ge=1, le=100_000,
        description="Ramp every KD term in over this many epochs: epoch e (1-based) weighs it e/warmup_epochs of "
                    "its weight, full from then on (the student's first epochs follow the labels more than the "
                    "teacher's features); decided from the epoch number, so --resume continues the ramp. Must be "
                    "below train.epochs (and distill.stop_epoch). Unset: full weight from the first epoch. Not "
                    "train.warmup_epochs, Ultralytics' learning-rate warm-up")
    init: Literal["teacher", "auto"] | None = Field(
        None, description="teacher: start the student from the teacher's weights, each tensor cut to the student's "
                          "shape by evenly spaced channels, part by part (weight selection, Xu et al. ICLR 2024) "
                          "instead of a random draw; YOLO pairs of one layer layout with the student no wider or "
                          "deeper (yolov8n → yolov8-tiny, yolov8m → yolov8n, yolo11s → yolo11n; across YOLO and "
                          "RT-DETR of one backbone and neck the decoder starts at random), the student built "
                          "from a model YAML; any other pair is an error. auto: the same where the pair allows it, "
                          "else a random start (the reason is recorded in the bundle)")
    quantize: Literal["int8"] | None = Field(
        None, description="int8: quantization-aware distillation (every family). The student trains "
                          "with INT8 fake quantization (NVIDIA ModelOpt, ranges calibrated on 8 training batches) "
                          "against the float teacher; "
                          "start from a trained float student and fine-tune for a few epochs at a low lr0. "
                          "`kdctl export` then writes its Q/DQ graph as is, without a second calibration. With "
                          "`kdctl train` it is plain quantization-aware training (no teacher)")


class ExportSpec(Strict):
    target: str = Field("cpu", description="A preset in deploy/targets (cpu, intel, jetson, rpi, ...)")
    artifacts: list[str] | None = Field(None, description="Override the preset's artifacts, e.g. [onnx-fp32, onnx-int8]")
    imgsz: int | None = Field(None, ge=32, le=IMGSZ_MAX)
    opset: int | None = Field(None, ge=11, le=23)
    batch: int | None = Field(None, ge=1, le=256, description="Input batch of the exported graphs (default: the "
                              "preset's, 1); with dynamic, the largest batch TensorRT engines are built for")
    dynamic: bool | None = Field(None, description="A free batch axis in the exported graphs (default: the preset's)")
    calibration_images: int | None = Field(None, ge=1, le=10_000, description="INT8 calibration images from the "
                                           "train split (default: 64): all of a smaller split are used, and the "
                                           "export says so (--calibration-images asks exactly)")
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = None
    max_map_drop: float | None = Field(None, ge=0, le=1, description="mAP50-95 an INT8/FP16/BF16 export may lose "
                                       "against PyTorch FP32, in mAP units (0.01 = 1 point)")

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: list[str] | None) -> list[str] | None:
        bad = [a for a in v or [] if a not in ARTIFACTS]
        if bad:
            raise ValueError(f"unknown artifact '{bad[0]}'; valid: {', '.join(ARTIFACTS)}")
        return v


class ProfileSpec(Strict):
    """Defaults of ``kdctl profile`` for the bundles of this recipe; its flags override them."""

    warmup: int = Field(10, ge=0, description="Untimed inferences first (--warmup)")
    runs: int = Field(100, ge=1, description="Timed batch-1 inferences (--runs)")
    batch: int = Field(1, description="Latency batch: 1 only (latency is measured at batch 1, as trtexec's and "
                                      "benchmark_app's defaults; throughput_batch sets the batched throughput)")
    throughput_batch: int = Field(8, ge=1, le=256, description="Batch for throughput (--throughput-batch)")
    threads: int | None = Field(None, ge=1, description="Inference threads (--threads; default: all usable cores)")
    hint: Literal["latency", "throughput"] = Field(
        "latency", description="How throughput is measured (--hint): 'latency' = one synchronous request at a time, "
                               "batched at throughput_batch; 'throughput' = requests in flight at once: OpenVINO "
                               "artifacts under OpenVINO's THROUGHPUT hint (its streams and asynchronous requests, "
                               "as benchmark_app's default), ONNX Runtime on the CPU one request per thread "
                               "(onnxruntime_perf_test -c N -x 1), other runtimes as 'latency'. Latency is measured "
                               "one request at a time either way")

    @field_validator("batch")
    @classmethod
    def _batch_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"got {v}; latency is measured at batch 1: set throughput_batch for batched throughput")
        return v


class GateSpec(Strict):
    min_map50_95: float | None = Field(None, ge=0, le=1)
    min_map50: float | None = Field(None, ge=0, le=1)
    max_p50_ms: float | None = Field(None, gt=0, description="Median latency, ms (benchmark_app's and trtexec's headline)")
    max_p90_ms: float | None = Field(None, gt=0)
    max_p99_ms: float | None = Field(None, gt=0)
    min_fps: float | None = Field(None, gt=0, description="Throughput, images/s, as kdctl profile measures it")
    max_size_mb: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)
    max_latency_regression: float | None = Field(None, ge=0, description="Fraction, e.g. 0.03 = 3 % slower")
    max_map_regression: float | None = Field(None, ge=0, description="mAP50-95 points (0..1 scale)")


class Recipe(Strict):
    """A kdctl recipe: what to train or distill, on which data, and how to ship and judge it."""

    # the file it was read from (path, sha256) and the --set texts applied to it: provenance for the bundle's
    # inputs, outside the recipe's fields (a bundle's recipe is the recipe as run, compared by --resume and --reuse)
    _origin: dict | None = PrivateAttr(None)
    _inherited: dict = PrivateAttr(default_factory=dict)  # field -> the base file it came from (kdctl.recipe.bases)

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128,
                      description="The run's name: its default output folder (runs/<stage>/<name>), so a file name")
    teacher: ModelSpec | None = None
    student: ModelSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    gate: GateSpec = Field(default_factory=GateSpec)

    def refusal(self, stage: str, source: str = "recipe") -> str | None:
        """Why ``kdctl train`` (``stage='train'``) or ``kdctl distill`` (``'distill'``) would refuse this recipe
        before any work, as one line naming the field; None where it takes it. ``recipe check`` says so too."""
        if stage == "distill" and not self.distill.losses and not self.distill.init:
            return (f"{source}: distill.losses: empty; list at least one loss (`kdctl list losses`) or set "
                    "distill.init: teacher, or use `kdctl train` for training without a teacher")
        if stage == "distill" and self.teacher is None:
            return f"{source}: teacher: required for distillation"
        if stage == "train" and self.distill.init:
            return (f"{source}: distill.init: '{self.distill.init}' starts the student from a teacher; "
                    "run `kdctl distill` (kdctl train has no teacher)")
        if self.distill.quantize and not self.distill.init and is_model_config(self.student.model):
            return (f"{source}: distill.quantize: {self.distill.quantize} fine-tunes a trained student with fake "
                    f"quantization, its ranges calibrated on it once; student.model '{self.student.model}' is a model "
                    "config with random weights (from them yolo11n and yolo26n diverge at the first step): train it "
                    "first without quantize and name that bundle as student.model")
        return None


def is_model_config(spec: str) -> bool:
    """A model built from its config (a model YAML, a torchvision builder), so with random weights: kdctl downloads
    none. False for a checkpoint or a bundle."""
    return spec.startswith("torchvision:") or (Path(spec).suffix in (".yaml", ".yml") and not Path(spec).is_dir())
