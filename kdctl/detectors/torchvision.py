"""torchvision's two-stage detectors (Faster R-CNN) as a kdctl detector family: built with ``weights=None`` (nothing is
downloaded), trained by kdctl's own loop in the style of torchvision's ``references/detection/engine.py``, evaluated,
exported to ONNX (post-processing in the graph, fixed input size) and OpenVINO, profiled, and distilled from a
torchvision teacher at the backbone, neck, RPN and RoI levels (:mod:`kdctl.detectors.torchvision_kd`).

A recipe names a builder as ``torchvision:<name>`` (e.g. ``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``).
The model sees the same letterboxed ``imgsz`` canvases as every kdctl detector (its own resize is pinned to
``imgsz``), and :class:`TorchvisionDetector` returns kdctl's dense layout in eval mode: ``(N, 4 + nc, K)`` with
``cx, cy, w, h`` in input pixels and one score per class (the detection's class), K = 100 detections padded with
zeros.
"""

from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PREFIX = "torchvision:"
BUILDERS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
            "fasterrcnn_resnet50_fpn_v2")
DETECTIONS = 100
FAMILY = "torchvision"
LABEL = "torchvision"
MIN_OPSET = 11
OPENVINO_FROM_ONNX = True  # the traced PyTorch route does not carry the data-dependent post-processing
# FP16 ONNX is traced from the half-precision model, and torchvision's detection ops (RoIAlign, NMS) have no
# half-precision CPU kernels to trace through: TensorRT builds its FP16 engine from the FP32 ONNX instead
UNSUPPORTED_ARTIFACTS = ("onnx-fp16",)
TRACE_WITH_REAL_IMAGE = True
BATCH_ONE_EXPORT = True  # the per-image proposal and RoI steps are unrolled when traced: one image per graph
SET_OUTPUT = True  # detections are a set (NMS order can change with float rounding): parity pairs them first
# In half precision (fp16's 11 or bf16's 8 significant bits) the RPN's objectness ranking and its NMS keep other
# proposals where scores nearly tie, and every stage after it (RoI pooling, box regression, per-class NMS, the top
# 100) builds on those: whole detections differ, not only their digits (OpenVINO on a Xeon that runs both natively:
# 3-10 of an image's 50 most confident bf16 detections were boxes PyTorch did not output at all, and fp16 boxes were
# 32 px off). Such artifacts are judged on mAP, as INT8 is; the differences are recorded.
PARITY_ON_MAP = ("fp16", "bf16")


def builder_name(ref: str, field: str = "model", source: str = "recipe") -> str:
    from kdctl.errors import RecipeError

    name = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    if name not in BUILDERS:
        raise RecipeError(f"{source}: {field}: '{name}' is not a torchvision detector kdctl builds; valid: "
                          f"{', '.join(PREFIX + b for b in BUILDERS)}")
    return name


class TorchvisionDetector(nn.Module):
    """A torchvision detection model with what kdctl needs beside it (builder, classes, input size); in eval mode
    ``forward`` returns the dense ``(N, 4 + nc, K)`` layout, in train mode torchvision's loss dict."""

    def __init__(self, builder: str, nc: int, imgsz: int, names: dict | None = None, proposals: dict | None = None):
        super().__init__()
        from torchvision.models import detection

        self.builder, self.nc, self.imgsz = builder, nc, imgsz
        self.names = names or {i: str(i) for i in range(nc)}
        self.kept: list[int] | None = None  # the classes its dense output keeps (:func:`keep_classes`); None: all
        self.stride = torch.tensor([32.0])
        self.net = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=nc + 1,
                                               min_size=imgsz, max_size=imgsz, box_score_thresh=0.001,
                                               box_detections_per_img=DETECTIONS)
        if proposals:
            set_proposals(self.net, proposals)

    def pin_input_size(self, imgsz: int) -> None:
        """See every batch at ``imgsz`` (kdctl's letterboxed canvases): torchvision's own resize becomes a no-op."""
        self.imgsz = imgsz
        self._see_at(imgsz)

    def _see_at(self, side: int) -> None:
        self.net.transform.min_size, self.net.transform.max_size = (side,), side

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None):
        if self.training:
            return self.net(list(x.unbind(0)), targets)
        # a square canvas is detected at its own size, as a YOLO model and the exported graph (pinned to the export
        # size) do: torchvision would resize it to the training size inside the model, so `eval --imgsz`, the
        # export's PyTorch reference and a profile's PyTorch row ran another model than their artifacts; the
        # recorded training size (imgsz, saved in checkpoints) stays
        if x.shape[-2] == x.shape[-1] and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._see_at(x.shape[-1])
        return torch.stack([self._dense(o) for o in self.net(list(x.unbind(0)))])

    def _dense(self, o: dict) -> torch.Tensor:
        b, s = o["boxes"], o["scores"]
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        scores = nn.functional.one_hot(o["labels"] - 1, self.nc).to(s.dtype) * s[:, None]
        if self.kept is not None:  # a detection of another class keeps no score: it is not one of these
            scores = scores[:, self.kept]
        d = torch.cat([cxcywh, scores], 1)
        return torch.cat([d, d.new_zeros(DETECTIONS, d.shape[1])], 0)[:DETECTIONS].T

    def checkpoint(self, **extra) -> dict:
        """State dicts only (never the module); a QAT model's quantizers travel as ModelOpt state beside them."""
        from kdctl.detectors.yolo import quantizer_state

        return {"kdctl_family": FAMILY, "builder": self.builder, "nc": self.nc, "imgsz": self.imgsz,
                "names": self.names, "proposals": proposal_settings(self.net),
                "model_state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "modelopt": quantizer_state(self), **extra}


def proposal_settings(net: nn.Module) -> dict:
    """How a Faster R-CNN picks its proposals and boxes (RPN candidates kept before and after NMS, in training and at
    test time; the RPN's NMS IoU and score floor; the box head's NMS IoU): settings of the model, not of its weights,
    which a user may have built theirs with (``rpn_pre_nms_top_n_test=500``). The box head's score floor and
    detections per image are kdctl's, for COCO scoring (0.001, 100), whatever the model had."""
    return {"rpn_pre_nms_top_n": {k: int(v) for k, v in net.rpn._pre_nms_top_n.items()},
            "rpn_post_nms_top_n": {k: int(v) for k, v in net.rpn._post_nms_top_n.items()},
            "rpn_nms_thresh": float(net.rpn.nms_thresh), "rpn_score_thresh": float(net.rpn.score_thresh),
            "box_nms_thresh": float(net.roi_heads.nms_thresh)}


def set_proposals(net: nn.Module, p: dict) -> None:
    net.rpn._pre_nms_top_n = dict(p["rpn_pre_nms_top_n"])
    net.rpn._post_nms_top_n = dict(p["rpn_post_nms_top_n"])
    net.rpn.nms_thresh, net.rpn.score_thresh = p["rpn_nms_thresh"], p["rpn_score_thresh"]
    net.roi_heads.nms_thresh = p["box_nms_thresh"]


def is_checkpoint(ckpt) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("kdctl_family") == FAMILY


def _restore_qat(model: TorchvisionDetector, ckpt: dict) -> None:
    if ckpt.get("modelopt"):
        from kdctl.detectors.yolo import restore_quantizers

        restore_quantizers(model, ckpt["modelopt"])


def from_checkpoint(ckpt: dict) -> TorchvisionDetector:
    m = TorchvisionDetector(ckpt["builder"], int(ckpt["nc"]), int(ckpt["imgsz"]), ckpt.get("names"),
                            ckpt.get("proposals"))  # older checkpoints: the builder's
    _restore_qat(m, ckpt)  # before the weights: the state dict holds the quantizers' ranges too
    m.load_state_dict(ckpt["model_state"])
    return m.float().eval()


STATE_KEYS = ("model", "state_dict", "model_state_dict", "ema")  # where training scripts keep a state dict
CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"  # (nc + 1, features): background is class 0


def from_saved(obj) -> TorchvisionDetector | None:
    """The detector in a loaded ``.pt``: a kdctl checkpoint, or a Faster R-CNN a user saved their own way --
    ``torch.save(model)``, ``torch.save(model.state_dict())``, or torchvision's references' ``checkpoint.pth``
    (``{"model": state_dict, "args": ...}``; a DDP ``module.`` prefix is dropped). None when ``obj`` holds no
    torchvision two-stage detector; :class:`NotACheckpoint` (one line) when it holds one kdctl cannot rebuild.

    kdctl rebuilds the model with the builder whose weights have exactly these shapes and loads them (the classes
    are torchvision's: label k + 1 is the dataset's class k); BatchNorm layers frozen by a pretrained backbone
    (``FrozenBatchNorm2d``: no ``num_batches_tracked``) load into plain ones, the same in eval mode. The two
    MobileNetV3 builders share their weights' shapes and differ in the RPN's test-time proposal counts (150 for
    the 320 one, 1000): a whole model, or the references' ``args.model``, says which; a bare state dict is taken
    as the 320 one. A whole model keeps its own proposal settings (:func:`proposal_settings`: a model built with
    ``rpn_pre_nms_top_n_test=500`` detects as it did). Such a file names no classes: one of torchvision's COCO
    layout (91 outputs) is named with its COCO categories (:func:`coco_names`)."""
    if is_checkpoint(obj):
        return from_checkpoint(obj)
    found = _saved_state(obj)
    if found is None:
        return None
    state, module, hint = found
    from kdctl.detectors import NotACheckpoint

    if not isinstance(state[CLS_SCORE], torch.Tensor) or state[CLS_SCORE].ndim != 2 or state[CLS_SCORE].shape[0] < 2:
        raise NotACheckpoint(f"its {CLS_SCORE} is not a (classes + 1, features) weight")
    nc = int(state[CLS_SCORE].shape[0]) - 1
    refs = {b: _reference(b, nc) for b in BUILDERS}
    matches = [b for b, ref in refs.items() if _same_shapes(state, ref.state_dict())]
    if not matches:
        raise NotACheckpoint(f"a torchvision detector's weights ({nc} classes) that none of kdctl's builders takes "
                             f"({', '.join(BUILDERS)}: other layers or shapes)")
    builder = hint if hint in matches else matches[0]
    if module is not None:
        testing = module.rpn._pre_nms_top_n.get("testing")
        builder = next((b for b in matches if refs[b].rpn._pre_nms_top_n["testing"] == testing), builder)
        _check_rebuilt(module, refs[builder], builder)
    imgsz = int((module or refs[builder]).transform.min_size[-1])
    m = TorchvisionDetector(builder, nc, imgsz, coco_names(nc),
                            proposal_settings(module) if module is not None else None)
    m.net.load_state_dict({**m.net.state_dict(), **state})  # a frozen BatchNorm's num_batches_tracked stays 0
    return m.float().eval()


def coco_names(nc: int) -> dict | None:
    """The class names of a torchvision detector saved without them (its state dict, the whole model, the references'
    checkpoint) whose classifier has torchvision's COCO layout, 91 outputs (background, 80 categories and 10 unused
    'N/A' ids): the categories every torchvision COCO detection weight names (``weights.meta["categories"]``), so
    that a COCO model is read for a person/car set by name, as a YOLO one is. None for any other class count: its
    classes stay unnamed ('0', '1', ...)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    categories = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # the enum's metadata: nothing fetched
    return dict(enumerate(categories[1:])) if nc + 1 == len(categories) else None


def keep_classes(model: TorchvisionDetector, index: list[int], names: list[str]) -> TorchvisionDetector:
    """A copy of a Faster R-CNN whose detections are only those of its classes ``index``, in that order, named
    ``names`` (a COCO teacher for a dataset of some of its classes, selected by name). Its softmax stays over all
    of its classes, so a detection of another class is dropped, not handed to a kept class: what pycocotools scores
    on a subset of categories, and the targets ``det_kd`` takes from it. Its RoI classifier still predicts every
    class (``nc``), so RoI-level KD, which compares it with the student's, is refused for it."""
    import copy

    if model.kept is not None:
        index = [model.kept[i] for i in index]
    kept = copy.deepcopy(model)
    kept.kept, kept.names = list(index), dict(enumerate(names))
    return kept


def dense_classes(model: TorchvisionDetector) -> int:
    """How many class scores its dense output (its detections) carries: its classes, or those it keeps."""
    return model.nc if model.kept is None else len(model.kept)


def with_classes(model: TorchvisionDetector, ds, seed: int = 0) -> list[int] | None:
    """Fit a checkpoint's box predictor, in place, to the classes of the dataset ``ds`` it is to be fine-tuned on,
    the way Ultralytics loads a YOLO or RT-DETR checkpoint of other classes: each class the checkpoint names too
    keeps its classification and box-regression rows, moved to the dataset's index; the others start fresh
    (``seed``); the background row is kept where any class is (:meth:`kdctl.data.resolve.Dataset.start_index`).
    Returns that index, None where the predictor is taken as it is. A quantization-aware checkpoint is only taken
    for its own classes: its predictor carries quantizer modules a fresh one would not."""
    from kdctl.data.resolve import listed_names
    from kdctl.errors import KdctlError

    index = ds.start_index(model.names, model.nc)
    theirs = listed_names(model.names)[:model.nc]
    model.names = dict(enumerate(ds.names))
    if index is None:
        return None
    pred = model.net.roi_heads.box_predictor
    cls, box = pred.cls_score, pred.bbox_pred
    if type(cls) is not nn.Linear or type(box) is not nn.Linear:
        raise KdctlError(f"a quantization-aware Faster R-CNN checkpoint of {model.nc} classes "
                         f"({', '.join(theirs)}) cannot be fine-tuned on {ds.nc} "
                         f"({', '.join(ds.names)}): fine-tune its float model, then train it quantization-aware")
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = FastRCNNPredictor(cls.in_features, ds.nc + 1)
    if max(index) >= 0:
        rows = [(0, 0)] + [(t + 1, s + 1) for t, s in enumerate(index) if s >= 0]  # row 0: background
        with torch.no_grad():
            for t, s in rows:
                new.cls_score.weight[t], new.cls_score.bias[t] = cls.weight[s], cls.bias[s]
                new.bbox_pred.weight[4 * t:4 * t + 4] = box.weight[4 * s:4 * s + 4]
                new.bbox_pred.bias[4 * t:4 * t + 4] = box.bias[4 * s:4 * s + 4]
    model.net.roi_heads.box_predictor = new.to(cls.weight.device, cls.weight.dtype)
    model.nc = ds.nc
    return index


def _saved_state(obj) -> tuple[dict, nn.Module | None, str | None] | None:
    """(state dict, the whole model if saved so, a builder named beside it) of a torchvision two-stage detector."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    hint = None
    if isinstance(obj, dict):  # torchvision's references keep their argparse options under "args"
        args = obj.get("args")
        hint = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
        hint = hint if isinstance(hint, str) else None  # compared with builder names below
    for d in (obj, *(obj.get(k) for k in STATE_KEYS)) if isinstance(obj, dict) else (obj,):
        if isinstance(d, GeneralizedRCNN):
            return d.state_dict(), d, hint
        if isinstance(d, dict) and d and all(isinstance(k, str) for k in d):
            if all(k.startswith("module.") for k in d):
                d = {k[len("module."):]: v for k, v in d.items()}
            if CLS_SCORE in d and all(isinstance(v, torch.Tensor) for v in d.values()):
                return d, None, hint
    return None


def _reference(builder: str, nc: int) -> nn.Module:
    """The builder's model with torchvision's defaults, on the meta device (shapes and settings, no memory)."""
    from torchvision.models import detection

    with torch.device("meta"):
        return getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=nc + 1)


def _same_shapes(state: dict, ref: dict) -> bool:
    optional = {k for k in ref if k.endswith(".num_batches_tracked")}
    return set(ref) - optional <= set(state) <= set(ref) and all(tuple(state[k].shape) == tuple(ref[k].shape)
                                                                  for k in state)


def _check_rebuilt(module: nn.Module, ref: nn.Module, builder: str) -> None:
    """A whole model whose anchors or input normalisation are not the builder's defaults would be another model
    once rebuilt from its weights: refused, naming what differs."""
    from kdctl.detectors import NotACheckpoint

    ours, theirs = ref.rpn.anchor_generator, module.rpn.anchor_generator
    for what, a, b in (("anchor sizes", theirs.sizes, ours.sizes),
                       ("anchor aspect ratios", theirs.aspect_ratios, ours.aspect_ratios),
                       ("image_mean", module.transform.image_mean, ref.transform.image_mean),
                       ("image_std", module.transform.image_std, ref.transform.image_std)):
        if _floats(a) != _floats(b):
            raise NotACheckpoint(f"its {what} ({_short(a)}) are not torchvision's {builder} defaults ({_short(b)}), "
                                 "which kdctl rebuilds it with")


def _floats(v):
    return [_floats(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def _short(v) -> str:
    s = str(tuple(v) if isinstance(v, list) else v)
    return s if len(s) <= 60 else s[:57] + "..."


QAT_SCOPE = "net.backbone."  # quantized in QAT, as post-training INT8 quantizes (float_tail): backbone and FPN


def prepare_qat(model: TorchvisionDetector, loader, device, batches: int = 8) -> None:
    """Insert ModelOpt INT8 fake quantizers (symmetric, per-channel weights) into the backbone and FPN convolutions,
    ranges calibrated on ``batches`` training batches, then fixed; the RPN, RoI heads and the post-processing stay
    float (what kdctl's post-training INT8 quantizes too)."""
    import modelopt.torch.quantization as mtq

    from kdctl.detectors.yolo import library_output_to_stderr

    def forward_loop(m):
        for bn in norms:  # ModelOpt puts the model in eval mode for calibration
            bn.train()
        for (x, _targets), _ in zip(loader, range(batches)):
            m(x.to(device))

    # Ranges from activations as training sees them: BatchNorm on batch statistics (its running statistics are
    # put back afterwards). With running statistics, a student that has not been trained yet (BatchNorm at its
    # initial mean 0 / variance 1) shrinks its deep activations to ~1e-10, and ranges that small make every
    # gradient NaN as soon as training normalises by batch statistics.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), library_output_to_stderr():
            mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
            mtq.disable_quantizer(model, lambda n: not n.startswith(QAT_SCOPE))
    finally:
        for m, st in zip(norms, saved):
            m.load_state_dict(st)
        model.train(was)


def build_detector(cfg: str, nc: int, imgsz: int = 320) -> TorchvisionDetector:
    return TorchvisionDetector(builder_name(str(cfg)), nc, imgsz).eval()


def plain_student(model: nn.Module) -> nn.Module:
    return model.float().eval()


def save_checkpoint(model: TorchvisionDetector, path: Path, train_args: dict) -> None:
    torch.save(model.checkpoint(epoch=-1, train_args=train_args), path)


def export_module(model: nn.Module, imgsz: int, batch: int = 1, *, dynamic: bool = False,
                  fmt: str = "onnx") -> tuple[nn.Module, torch.Tensor]:
    """A copy at this input size, eval mode, no gradients (post-processing stays in the graph; fixed size)."""
    from kdctl.detectors import traceable_copy

    m = traceable_copy(model)
    m.pin_input_size(imgsz)
    for coder in (m.net.rpn.box_coder, m.net.roi_heads.box_coder):
        coder.decode = _traceable_decode.__get__(coder)
    # Traced on a real image when the export stage gives one (``example_input``): a blank canvas yields degenerate
    # proposals, and the tracer bakes some of their counts into the graph
    example = getattr(model, "example_input", None)
    x = torch.from_numpy(example[:1]).repeat(batch, 1, 1, 1) if example is not None and example.shape[-1] == imgsz \
        else torch.zeros(batch, 3, imgsz, imgsz)
    return _ExportForm(m), x


class _ExportForm(nn.Module):
    """The detector as it is traced for export: torchvision's ``batched_nms`` replaced, while tracing, by the same
    coordinate-offset NMS without its ``if boxes.numel() == 0`` guard. That guard is scripted into an ONNX ``If``,
    and OpenVINO's CPU plugin (2026.4) returns wrong detections from it on the first run of some images (the
    ONNX Runtime output of the same graph, and OpenVINO's second run, are right). Boxes are clipped to the
    ``imgsz`` canvas before both NMS calls, so ``imgsz + 1`` separates the classes as torchvision's
    ``max coordinate + 1`` does."""

    def __init__(self, detector: TorchvisionDetector):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import boxes as box_ops

        original, offset = box_ops.batched_nms, float(self.detector.imgsz + 1)

        def batched_nms(boxes, scores, idxs, iou_threshold):
            return box_ops.nms(boxes + (idxs.to(boxes) * offset)[:, None], scores, iou_threshold)

        box_ops.batched_nms = batched_nms
        try:
            return self.detector(x)
        finally:
            box_ops.batched_nms = original


def _traceable_decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """``BoxCoder.decode`` without its ``if box_sum > 0`` branch, which tracing bakes in: its ``reshape(box_sum, -1)``
    then fails in every runtime on an image with no region proposals (``(0, 16)`` cannot be reshaped to
    ``(0, -1)``). ``rel_codes`` is already ``(sum of boxes, 4 * classes)`` wherever torchvision calls it, so the shapes
    are taken from it instead of inferred."""
    pred = self.decode_single(rel_codes, torch.cat(boxes, dim=0))
    return pred.reshape(pred.shape[0], pred.shape[1] // 4, 4)


def float_tail(nodes: list[tuple[str, str | None]], model: nn.Module) -> list[str]:
    """INT8 quantizes the backbone (and FPN) convolutions only; the RPN, RoI heads and the post-processing (box
    decoding, NMS, RoIAlign) stay in float."""
    keep_quant = ("backbone",)
    return [n for n, _ in nodes if not any(f"/{k}/" in n or f".{k}." in n for k in keep_quant)]


# ---- training: kdctl's own loop, in the shape of torchvision's references/detection/engine.py ----------------------

class _Images(torch.utils.data.Dataset):
    """Letterboxed RGB canvases in 0..1 and their boxes (xyxy, canvas pixels) with labels 1..nc (0 = background)."""

    def __init__(self, images: list[Path], imgsz: int, augment: bool, fliplr: float = 0.5):
        self.images, self.imgsz, self.augment, self.fliplr = images, imgsz, augment, fliplr

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from kdctl.evaluate.predict import letterbox, load_rgb, read_labels

        img = load_rgb(self.images[i])
        canvas, r, (left, top) = letterbox(img, self.imgsz)
        gt = read_labels(self.images[i], img.shape[:2])
        if gt.crowd is not None:  # crowd regions are for scoring only; torchvision's references drop them too
            gt = type(gt)(gt.boxes[~gt.crowd], gt.classes[~gt.crowd])
        boxes = torch.as_tensor(gt.boxes, dtype=torch.float32).reshape(-1, 4) * r
        boxes[:, [0, 2]] += left
        boxes[:, [1, 3]] += top
        x = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).float() / 255.0
        if self.augment and random.random() < self.fliplr:  # horizontal flip (train.fliplr, Ultralytics' 0.5)
            x = x.flip(-1)
            boxes[:, [0, 2]] = self.imgsz - boxes[:, [2, 0]]
        keep = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
        return x, {"boxes": boxes[keep], "labels": torch.as_tensor(gt.classes, dtype=torch.int64)[keep] + 1}


def _collate(batch):
    xs, ts = zip(*batch)
    return torch.stack(xs), list(ts)


def lr_scale(step: int, warmup: int, total: int, lrf: float | None = None, cos: bool = False) -> float:
    """The learning rate at optimizer ``step`` of ``total`` as a fraction of lr0: a linear warm-up over ``warmup``
    steps times the decay. Without ``lrf`` or ``cos`` the loop's own decay, linear to 1 % (floored there); with
    them Ultralytics' schedules by its settings, per step instead of per epoch: linear from 1 to ``lrf``, or with
    ``cos`` a half cosine from 1 to ``lrf`` (0.01 when only ``cos`` is given)."""
    ramp = min(1.0, (step + 1) / warmup)
    if lrf is None and not cos:
        return ramp * max(0.01, 1 - step / total)
    lrf = 0.01 if lrf is None else float(lrf)
    x = min(1.0, step / total)
    if cos:
        return ramp * (((1 - math.cos(x * math.pi)) / 2) * (lrf - 1) + 1)
    return ramp * ((1 - x) * (1.0 - lrf) + lrf)


class Trainer:
    """Train a :class:`TorchvisionDetector`: SGD (momentum 0.9) or AdamW, linear warm-up, linear or cosine decay
    (:func:`lr_scale`), gradient clipping at 10, a non-finite loss stops the run, COCO mAP on the validation set
    after each epoch, ``last.pt`` / ``best.pt`` and ``results.csv`` in ``project/name`` (the files and callbacks
    kdctl's training stage reads from Ultralytics' trainer), resume from ``last.pt``."""

    EVENTS = ("on_train_start", "on_train_epoch_start", "on_train_batch_end", "on_train_epoch_end", "on_model_save",
              "on_fit_epoch_end")

    def __init__(self, overrides: dict, distill=None):
        self.callbacks = {e: [] for e in self.EVENTS}
        self.resume_from = overrides.get("resume")
        ckpt = None
        if self.resume_from:
            ckpt = torch.load(self.resume_from, map_location="cpu", weights_only=False)
            overrides = {**ckpt["train_args"], **{k: v for k, v in overrides.items() if k != "resume"}}
        self.args = dict(overrides)
        self.save_dir = Path(self.args["project"]) / self.args["name"]
        self.epochs, self.imgsz = int(self.args["epochs"]), int(self.args["imgsz"])
        from kdctl import distributed

        device = str(self.args.get("device", "cpu"))
        if device == "mps":  # as Ultralytics does (and kdctl's YOLO runs): Apple's GPU where there is one, else the CPU
            device = "mps" if torch.backends.mps.is_available() else "cpu"
        if device not in ("cpu", "", "mps") and not torch.cuda.is_available():
            from kdctl.errors import KdctlError

            raise KdctlError(f"train.device: '{device}' asks for a CUDA GPU, and none is available here; use 'cpu'")
        self.world = distributed.world_size() if distributed.under_torchrun() else 1
        if self.world > 1:  # a torchrun rank: this rank's device, then join the job (gloo on CPU, NCCL on GPU)
            self.device = distributed.rank_device(device)
            distributed.init_process_group(self.device)
        elif "," in device:
            from kdctl.errors import KdctlError

            raise KdctlError(f"train.device: '{device}': several GPUs train on torchrun ranks (kdctl distill/train "
                             "launches them); this trainer runs in one process")
        else:
            self.device = torch.device("cpu" if device in ("cpu", "") else "mps" if device == "mps" else
                                       f"cuda:{device}" if device.isdigit() else "cuda")
        self.main = distributed.rank() <= 0  # validates, logs and checkpoints
        from kdctl.data.resolve import load_yolo_yaml

        self.data = load_yolo_yaml(self.args["data"], skip_invalid=True)
        names = {i: n for i, n in enumerate(self.data.names)}
        ref = str(self.args["model"])
        if ref.startswith(PREFIX):
            self.model = TorchvisionDetector(builder_name(ref), len(names), self.imgsz, names)
        else:  # a torchvision checkpoint (kdctl's or a user's own): fine-tune it, at this recipe's input size
            self.model = from_saved(torch.load(ref, map_location="cpu", weights_only=False))
            with_classes(self.model, self.data, int(self.args.get("seed", 0)))  # recorded by kdctl.models.as_started
            self.model.pin_input_size(self.imgsz)
        self.start_epoch, self.best, self.ckpt = 0, -1.0, ckpt
        if ckpt is not None:
            from kdctl.detectors.yolo import is_qat

            if not is_qat(self.model):
                _restore_qat(self.model, ckpt)  # resuming quantization-aware training: its quantizers first
            self.model.load_state_dict(ckpt["model_state"])
            self.start_epoch, self.best = int(ckpt["epoch"]) + 1, float(ckpt.get("best_fitness", -1))
        self.model.to(self.device)
        self.epoch, self.loss, self.loss_items, self.metrics, self.train_loader = 0, None, {}, {}, None
        self.kd, self.distiller = None, None
        if distill is not None:  # a DistillSetup: the frozen teacher and the recipe's losses
            from kdctl.detectors.torchvision_kd import Distiller, build_criterion

            teacher = distill.teacher.float().to(self.device)
            self.kd = build_criterion(self.model, teacher, distill.losses, distill.balance, self.imgsz,
                                      distill.source, distill.balance_batches, distill.balance_cap)
            if ckpt is not None and ckpt.get("kd_state"):
                self.kd.load_state_dict(ckpt["kd_state"]["weights"])
                self.kd.load_balance_state(ckpt["kd_state"]["balance"])
            self.distiller = Distiller(teacher, self.kd, self.imgsz)

    def add_callback(self, event: str, fn) -> None:
        self.callbacks[event].append(fn)

    def _run(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

    def _optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.kd.parameters() if p.requires_grad] if self.kd is not None else []
        lr = float(self.args.get("lr0", 0.01))
        decay = float(self.args.get("weight_decay", 1e-4))  # torchvision's references' defaults, unless the recipe's
        if str(self.args.get("optimizer", "auto")) in ("AdamW", "Adam"):  # train: sets them
            return torch.optim.AdamW(params, lr=lr, betas=(float(self.args.get("momentum", 0.9)), 0.999),
                                     weight_decay=decay)
        return torch.optim.SGD(params, lr=lr, momentum=float(self.args.get("momentum", 0.9)), weight_decay=decay)

    def train(self) -> None:
        seed = int(self.args.get("seed", 0))
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        images = _Images(self.data.train_images, self.imgsz, augment=True, fliplr=float(self.args.get("fliplr", 0.5)))
        batch = int(self.args.get("batch", 8))
        sampler = None
        if self.world > 1:  # train.batch is the global batch: each rank takes its share of every step
            sampler = torch.utils.data.distributed.DistributedSampler(images, shuffle=True, seed=seed)
            batch = max(1, batch // self.world)
            random.seed(seed + 1 + distributed_rank())  # other flips on each rank, as other images
        self.train_loader = torch.utils.data.DataLoader(
            images, batch_size=batch, shuffle=sampler is None, sampler=sampler, collate_fn=_collate,
            num_workers=int(self.args.get("workers", 0)), generator=g)
        if self.args.get("quantize") == 8:
            from kdctl.detectors.yolo import is_qat

            if not is_qat(self.model):  # not yet (a resumed or QAT-trained student carries its quantizers)
                calib = torch.utils.data.DataLoader(_Images(self.data.train_images, self.imgsz, augment=False),
                                                    batch_size=batch, shuffle=False, collate_fn=_collate)
                prepare_qat(self.model, calib, self.device)
        self.step = _Step(self.model, self.kd, self.distiller)
        if self.world > 1:  # DDP over the student and the KD adapters together; the teacher is not a submodule
            self.step = nn.parallel.DistributedDataParallel(
                self.step, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        opt = self._optimizer()
        if self.ckpt is not None and self.ckpt.get("optimizer"):
            opt.load_state_dict(self.ckpt["optimizer"])
        warmup = max(1, round(float(self.args.get("warmup_epochs", 1.0)) * len(self.train_loader)))
        total = self.epochs * len(self.train_loader)
        lr0 = float(self.args.get("lr0", 0.01))
        self.save_dir.joinpath("weights").mkdir(parents=True, exist_ok=True)
        self._run("on_train_start")
        t0 = time.perf_counter()
        for self.epoch in range(self.start_epoch, self.epochs):
            self._run("on_train_epoch_start")
            if sampler is not None:
                sampler.set_epoch(self.epoch)
            sums = self._train_one_epoch(opt, warmup, total, lr0)
            self._run("on_train_epoch_end")
            if self.main:
                self.metrics = self._validate()
                fitness = self.metrics["metrics/mAP50-95(B)"]
                self._log(sums, time.perf_counter() - t0)  # seconds since this process started, as Ultralytics
                self._save(opt, fitness)
                self._run("on_fit_epoch_end")
            if self.world > 1:
                torch.distributed.barrier()  # the others wait while rank 0 validates and checkpoints

    def _train_one_epoch(self, opt, warmup: int, total: int, lr0: float) -> dict:
        """One pass over the training images; mixed precision (autocast + gradient scaling, as torchvision's
        references do with ``--amp``) on a CUDA device unless ``train.amp`` is off."""
        self.model.train()
        amp = self.device.type == "cuda" and bool(self.args.get("amp", True))
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        params = [p for g in opt.param_groups for p in g["params"]]
        sums: dict[str, float] = {}
        for i, (x, targets) in enumerate(self.train_loader):
            step = self.epoch * len(self.train_loader) + i
            scale = lr_scale(step, warmup, total, self.args.get("lrf"), bool(self.args.get("cos_lr")))
            for group in opt.param_groups:
                group["lr"] = lr0 * scale
            x = x.to(self.device)
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            with torch.autocast(self.device.type, enabled=amp):
                losses = self.step(x, targets)
            loss = sum(losses.values())
            self.loss = loss.detach().view(1)
            self.loss_items = {k: v.detach() for k, v in losses.items()}
            if not math.isfinite(float(loss.detach())):
                self._run("on_train_batch_end")  # kdctl's callback stops the run with a one-line error
                raise FloatingPointError(f"loss is {float(loss)} at epoch {self.epoch + 1}")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, 10.0)
            scaler.step(opt)
            scaler.update()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            self._run("on_train_batch_end")
        means = {k: v / max(1, len(self.train_loader)) for k, v in sums.items()}
        if self.world > 1:  # the epoch's means over every rank's batches (what results.csv reports)
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            means = dict(zip(keys, (t / self.world).tolist()))
        return means

    def _validate(self) -> dict:
        from kdctl.evaluate import evaluate_backend, torch_backend

        m = evaluate_backend(torch_backend(self.model, device=str(self.device)), self.data.val_images,
                             self.data.names, self.imgsz)
        return {"metrics/mAP50-95(B)": m["map50_95"], "metrics/mAP50(B)": m["map50"]}

    def _log(self, sums: dict, seconds: float) -> None:
        row = {"epoch": self.epoch + 1, "time": round(seconds, 3), **{f"train/{k}": round(v, 5) for k, v in sums.items()},
               **{k: round(v, 5) for k, v in self.metrics.items()}}
        path = self.save_dir / "results.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _save(self, opt, fitness: float) -> None:
        args = {k: v for k, v in self.args.items() if isinstance(v, (int, float, str, bool, type(None)))}
        state = {"epoch": self.epoch, "best_fitness": max(self.best, fitness), "train_args": args,
                 "optimizer": opt.state_dict()}
        if self.kd is not None:  # adapters and auto-balance, for --resume; never part of the published student
            state["kd_state"] = {"weights": self.kd.state_dict(), "balance": self.kd.balance_state()}
        weights = self.save_dir / "weights"
        tmp = weights / "last.pt.tmp"
        torch.save(self.model.checkpoint(**state), tmp)
        tmp.replace(weights / "last.pt")
        if fitness >= self.best:
            self.best = fitness
            torch.save(self.model.checkpoint(**{**state, "optimizer": None, "kd_state": None}), weights / "best.pt.tmp")
            (weights / "best.pt.tmp").replace(weights / "best.pt")
        self._run("on_model_save")


def distributed_rank() -> int:
    from kdctl.distributed import rank

    return max(rank(), 0)


class _Step(nn.Module):
    """One training forward: the student's task losses and, when distilling, the weighted KD terms, as one dict.
    A module so that DDP can wrap the student and the KD adapters together (their gradients are averaged across
    ranks in the same backward pass)."""

    def __init__(self, model: nn.Module, kd: nn.Module | None, distiller):
        super().__init__()
        self.model, self.kd = model, kd
        self._distiller = [distiller]  # not a submodule: it holds the frozen teacher

    def forward(self, x: torch.Tensor, targets: list[dict]) -> dict:
        distiller = self._distiller[0]
        if distiller is None:
            return self.model(x, targets)
        from kdctl.distill.losses.registry import kd_item

        task, kd = distiller.step(self.model, x, targets)
        return {**task, **{kd_item(n): v for n, v in kd.items()}}


def trainer(overrides: dict, callbacks=None, distill=None) -> Trainer:
    """kdctl's training loop; with ``distill`` (a ``DistillSetup``) the student learns from the frozen teacher at the
    recipe's levels as well (:mod:`kdctl.detectors.torchvision_kd`)."""
    return Trainer(overrides, distill)

