"""Ultralytics YOLO as a kdctl detector family; the only module that imports Ultralytics. Public seams only
(``DetectionTrainer.get_model``, the model's ``loss``/``init_criterion``, callbacks, ``load_checkpoint``).

``KDDetectionModel`` is a ``DetectionModel`` that also owns the distillation criterion (so adapters are trained,
EMA-averaged and checkpointed with the student) and holds the frozen teacher by a reference that is neither
deep-copied into the EMA nor pickled into checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdctl.detectors.ultralytics_env import prepare

prepare()

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402

from kdctl.distill.criterion import (PSEUDO_KEY, PSEUDO_KINDS, DistillationCriterion, DistillContext,  # noqa: E402
                                    level_anchor_index, make_term)
from kdctl.distill.losses import LOSSES  # noqa: E402
from kdctl.distill.losses.registry import kd_item  # noqa: E402
from kdctl.distill.taps import (FeatureTaps, head_outputs, keep_strides, map_shapes, pair_same_size,  # noqa: E402
                                resolve_layers)
from kdctl import faults  # noqa: E402
from kdctl.errors import RecipeError  # noqa: E402

BALANCE_FILE = "kd_balance.json"
INIT_FILE = "init.json"  # what distill.init did to the student (beside the balance file, read into the bundle)
LABEL = "YOLO"


class TeacherRef:
    """Holds the frozen teacher beside the student without making it a submodule: EMA copies share it and
    checkpoints drop it (the trainer rebuilds it from the recipe on resume)."""

    def __init__(self, model: nn.Module | None):
        self.model = model

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"model": None}


class AssignmentTap:
    """``with AssignmentTap(criterion) as a: criterion(preds, batch)`` then ``a.regions()``: the student's label
    assignment of that call, read from its task loss's own assigner (YOLOv8/11's task-aligned assigner; an end-to-end
    head's one-to-many branch, the one head-level KD reads), so KD terms see exactly the positives the task loss
    trained on. ``pos_weight`` (N×A): each positive's target score (the weight of its DFL term), 0 elsewhere;
    ``vlr`` (N×A): the assigner's other candidates, anchor points inside a ground-truth box."""

    def __init__(self, criterion):
        branch = getattr(criterion, "one2many", criterion)
        self.assigner = getattr(branch, "assigner", None)
        if not isinstance(self.assigner, nn.Module) or not hasattr(self.assigner, "select_candidates_in_gts"):
            raise ValueError("this detector's training loss has no task-aligned assigner to read the positives "
                             "from; set the loss's positives: false")
        self.inputs = self.outputs = None

    def _hook(self, _module, args, output):
        if self.outputs is None:   # the task loss assigns once per step; keep that call's inputs and outputs
            self.inputs, self.outputs = args, output

    def __enter__(self):
        self._handle = self.assigner.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def regions(self) -> dict:
        if self.outputs is None:
            raise RuntimeError("the task loss did not call its assigner")
        _, _, anc_points, _, gt_bboxes, mask_gt = self.inputs[:6]
        _, _, target_scores, fg_mask, _ = self.outputs
        pos_weight = (target_scores.sum(-1) * fg_mask).detach()
        if gt_bboxes.shape[1] == 0:
            inside = torch.zeros_like(fg_mask)
        else:
            inside = self.assigner.select_candidates_in_gts(anc_points, gt_bboxes, mask_gt).any(1)
        return {"pos_weight": pos_weight, "vlr": inside & ~fg_mask.bool()}


class KDDetectionModel(DetectionModel):
    """A student ``DetectionModel`` whose training loss adds ``Σ w·KD`` against a frozen teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd: DistillationCriterion | None = None  # a class attribute here would hide the registered submodule
        self.teacher_ref = TeacherRef(None)
        self.cache_ref = TeacherRef(None)  # a kdctl.distill.cache.TeacherCache: head outputs replayed from disk

    def attach(self, teacher: nn.Module, criterion: DistillationCriterion) -> None:
        teacher.eval().requires_grad_(False)
        self.teacher_ref = TeacherRef(teacher)
        self.kd = criterion

    def loss(self, batch, preds=None):
        if getattr(self, "criterion", None) is None:
            self.criterion = self.init_criterion()
        # validation while training, or training after distill.stop_epoch: the task loss alone, KD items at zero
        # (the teacher does not run)
        if not self.training or self.kd is None or self.kd.stopped:
            preds = self.forward(batch["img"]) if preds is None else preds
            loss, items = self.criterion(preds, batch)
            zero = torch.zeros((), device=batch["img"].device)
            return loss, {**items, **{kd_item(n): zero for n in (self.kd.names if self.kd else [])}}
        teacher = self.teacher_ref.model
        if teacher is None:
            raise RuntimeError("distillation model has no teacher attached; refusing to train without KD")
        t_out = self._teacher_outputs(teacher, batch)
        with FeatureTaps(self, self.kd.student_layers()) as s_taps:
            preds = self.predict(batch["img"])
        s_out = dict(s_taps.outputs)
        if "detections" in self.kd.kinds():  # det_kd: the teacher's detections as targets of this student's loss
            s_out["detections"] = {"preds": preds, "criterion": self.criterion}
        ctx = DistillContext.from_batch(batch)
        if self.kd.needs_assignment:
            with AssignmentTap(self.criterion) as assignment:
                task, items = self.criterion(preds, batch)
            ctx.assigned = assignment.regions()
        else:
            task, items = self.criterion(preds, batch)
        task_per_image = float(sum(float(v) for v in items.values()))
        ctx.teacher = teacher
        kd = self.kd(s_out, t_out, ctx, task_per_image)
        kd_total = torch.stack(list(kd.values())).sum()
        items = {**items, **{kd_item(n): v.detach() for n, v in kd.items()}}
        return torch.cat([task, (kd_total * batch["img"].shape[0]).view(1)]), items


    def _teacher_outputs(self, teacher: nn.Module, batch: dict) -> dict:
        """The teacher's tapped outputs for this batch, from one teacher forward pass: head outputs from the teacher
        cache when there is one (the teacher then runs only for feature-level terms and det_kd), and under
        ``"detections"`` its final detections when a det_kd term reads them."""
        cache = self.cache_ref.model
        layers = self.kd.teacher_layers()
        heads = self.kd.teacher_head_layers() if cache is not None else []
        online = [i for i in layers if i not in heads]  # the teacher's inner maps are never cached
        detections = "detections" in self.kd.kinds()
        if cache is not None and "kd_view" not in batch:
            raise RuntimeError("teacher cache attached, but the batch carries no view ids (not from ReplayViews)")
        out = {}
        if online or detections or cache is None:
            with torch.no_grad(), FeatureTaps(teacher, online) as t_taps:
                # a two-stage teacher's forward for taps stops at its FPN; final_detections runs it whole
                raw = teacher_forward(teacher, batch["img"]) if online or not _is_two_stage(teacher) else None
                if detections:
                    out["detections"] = {"dense": final_detections(teacher, batch["img"], raw)}
            out.update(t_taps.outputs)
        if cache is not None:
            dense = cache.teacher_head(batch["kd_view"], batch["kd_crc"], batch["img"].device)
            out.update({i: dense for i in heads})
        return out


@dataclass
class DistillSetup:
    """What the trainer needs to distill: the teacher module, the recipe's loss list, and where errors point."""

    teacher: nn.Module
    losses: list  # kdctl.recipe.schema.LossSpec
    balance: float | None
    source: str = "recipe"
    balance_batches: int = 8
    balance_cap: float | None = 4.0
    cache: str | None = None  # a built teacher cache (kdctl.distill.cache) serving the head-level terms
    init: str | None = None  # "teacher": the student starts from a weight selection of the teacher
    init_note: str | None = None  # why distill.init: auto started at random instead
    teacher_classes: dict | None = None  # the dataset's classes found in the teacher's (kdctl.models.dataset_classes)


def build_criterion(student: nn.Module, teacher: nn.Module, losses, balance, imgsz: int,
                    source: str = "recipe", balance_batches: int = 8,
                    balance_cap: float | None = 4.0) -> DistillationCriterion:
    """Resolve layers, size the adapters from a dummy forward pass, and check head compatibility."""
    plans = [_plan(i, spec, student, teacher, imgsz, source) for i, spec in enumerate(losses)]
    s_all = sorted({j for p in plans if p[2].kind not in PSEUDO_KINDS for j in p[3]}, key=str)
    t_all = sorted({j for p in plans if p[2].kind not in PSEUDO_KINDS for j in p[4]}, key=str)
    dev = next(student.parameters()).device
    x = torch.zeros(2, 3, imgsz, imgsz, device=dev)
    was = student.training
    student.eval()
    with torch.no_grad(), FeatureTaps(student, s_all) as st, FeatureTaps(teacher, t_all) as tt:
        student.predict(x)
        teacher_forward(teacher, x.to(next(teacher.parameters()).device))
    student.train(was)
    seen = {}
    terms = [_sized_term(plan, st.outputs, tt.outputs, student, teacher, imgsz, source, seen, dev) for plan in plans]
    return DistillationCriterion(terms, balance, balance_batches, balance_cap).to(dev)


def _plan(i: int, spec, student: nn.Module, teacher: nn.Module, imgsz: int, source: str) -> tuple:
    """``(i, spec, entry, student sites, teacher sites)`` of the recipe's loss ``i``: the layer pairs it taps, or
    the pseudo-site of a loss that reads predictions; a loss this pair of models cannot take is refused here."""
    entry = LOSSES[spec.name]
    level = spec.level or entry.default_level
    if entry.kind == "detections":
        _check_detections_pair(student, teacher, spec, i, source)
        return i, spec, entry, ["detections"], ["detections"]
    if entry.kind in ("detr", "detr_query"):
        _check_detr_pair(student, teacher, spec, i, source, need_detr_teacher=entry.kind == "detr_query")
        return i, spec, entry, [PSEUDO_KEY[entry.kind]], [PSEUDO_KEY[entry.kind]]
    if entry.kind in ("rpn", "roi"):
        part = "RPN" if entry.kind == "rpn" else "RoI head"
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' reads the {part} of two-stage (torchvision) "
                          "detectors; YOLO and RT-DETR have none")
    if entry.kind == "cross_head":
        who = next((w for w, m in (("teacher", teacher), ("student", student))
                    if _is_two_stage(m) or head_name(m) not in DETECT_HEADS), None)
        if who is not None:
            raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' runs the student's neck maps through "
                              f"the teacher's dense YOLO head, and the {who} has none")
        given = [f for f in ("student_layers", "teacher_layers", "strides") if getattr(spec, f) is not None]
        if given:
            raise RecipeError(f"{source}: distill.losses[{i}].{given[0]}: '{spec.name}' reads every level of both "
                              "heads' input maps; drop student_layers, teacher_layers and strides")
        return i, spec, entry, [len(student.model) - 1], [len(teacher.model) - 1]
    role = {"backbone": "backbone", "neck": "neck", "feature": "neck", "head": "head", "logit": "head"}.get(level)
    if role is None:
        raise RecipeError(f"{source}: distill.losses[{i}].level: '{level}' does not apply to YOLO detectors")
    s_layers, t_layers = _layer_pairs(i, spec, entry, role, student, teacher, imgsz, source)
    return i, spec, entry, s_layers, t_layers


def _layer_pairs(i: int, spec, entry, role: str, student: nn.Module, teacher: nn.Module, imgsz: int,
                 source: str) -> tuple[list, list]:
    """The student and teacher layers a feature or head loss taps at ``role``, paired one to one."""
    try:
        s_layers = resolve_layers(student, spec.student_layers, role, imgsz)
    except (IndexError, ValueError) as e:
        raise RecipeError(f"{source}: distill.losses[{i}].student_layers: {e}") from None
    if _is_two_stage(teacher):
        if entry.kind == "head":
            raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' needs a YOLO teacher's dense head; "
                              "a two-stage teacher distills a YOLO student at the backbone or neck level, or "
                              "through its final detections (det_kd)")
        from kdctl.detectors.torchvision_kd import stride_pairs

        try:
            s_layers, t_layers = stride_pairs(student, s_layers, teacher, spec.teacher_layers, role, imgsz,
                                              _dummy_maps)
        except ValueError as e:
            raise RecipeError(f"{source}: distill.losses[{i}].teacher_layers: {e}") from None
    else:
        try:
            t_layers = resolve_layers(teacher, spec.teacher_layers, role, imgsz)
        except (IndexError, ValueError) as e:
            raise RecipeError(f"{source}: distill.losses[{i}].teacher_layers: {e}") from None
    if (len(s_layers) != len(t_layers) and entry.kind == "feature"
            and not isinstance(spec.student_layers, list) and not isinstance(spec.teacher_layers, list)):
        # a role on both sides but pyramids of different depth (a P2 or P6 student, a P3-P5 teacher): pair the
        # levels of equal stride, as one would by hand
        s_layers, t_layers = _same_size_pairs(student, s_layers, teacher, t_layers, imgsz)
    if len(s_layers) != len(t_layers):
        raise RecipeError(f"{source}: distill.losses[{i}]: {len(s_layers)} student layers {s_layers} but "
                          f"{len(t_layers)} teacher layers {t_layers}; give pairs of equal length")
    if spec.strides is not None:
        try:
            s_layers, t_layers = keep_strides(s_layers, t_layers, _dummy_maps(student, s_layers, imgsz),
                                              spec.strides, imgsz)
        except ValueError as e:
            raise RecipeError(f"{source}: distill.losses[{i}].strides: {e}") from None
    return s_layers, t_layers


def _sized_term(plan: tuple, s_out: dict, t_out: dict, student: nn.Module, teacher: nn.Module, imgsz: int,
                source: str, seen: dict, dev):
    """The KD term of a planned loss, its adapters sized from the dummy forward pass's outputs at its sites."""
    i, spec, entry, s_layers, t_layers = plan
    s_ch, t_ch, anchor_index, levels = [], [], None, None
    if entry.kind in ("head", "cross_head"):
        if head_name(student) == "RTDETRDecoder" or head_name(teacher) == "RTDETRDecoder":
            to_yolo = ("; a YOLO student learns an RT-DETR teacher's predictions from its final detections "
                       "(det_kd)") if head_name(student) != "RTDETRDecoder" else ""
            raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' is a dense-head loss for YOLO "
                              "detectors; RT-DETR distills its predictions with detr_logit (both models RT-DETR) "
                              f"or its features (backbone, neck){to_yolo}")
        try:
            sh, th = head_outputs(s_out[s_layers[0]]), head_outputs(t_out[t_layers[0]])
        except ValueError as e:
            raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' needs the detection head: {e}") from None
        s_ch, t_ch, anchor_index, levels = _head_pair(i, spec, entry, sh, th, imgsz, source)
    elif entry.kind not in PSEUDO_KINDS:
        for si, ti in zip(s_layers, t_layers):
            so, to = s_out[si], t_out[ti]
            if not (isinstance(so, torch.Tensor) and so.ndim == 4 and isinstance(to, torch.Tensor) and to.ndim == 4):
                raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' is a feature loss, but layer pair "
                                  f"(student {si}, teacher {ti}) does not output feature maps")
            s_ch.append(so.shape[1])
            t_ch.append(to.shape[1])
    term = make_term(spec, seen, s_layers, t_layers, s_ch, t_ch, f"{source}: distill.losses[{i}]")
    if entry.kind == "cross_head":
        term.losses[0].levels = levels
    if anchor_index is not None:
        (s_idx, t_idx), a_s, a_t = anchor_index, sh["scores"].shape[2], th["scores"].shape[2]
        if len(t_idx) < a_t:
            term.anchor_index, term.teacher_anchors = t_idx.to(dev), a_t
        if len(s_idx) < a_s and entry.kind == "head":  # crosskd reads the student's maps, not its outputs
            term.student_anchor_index, term.student_anchors = s_idx.to(dev), a_s
    return term


def _head_pair(i: int, spec, entry, sh: dict, th: dict, imgsz: int, source: str) -> tuple:
    """``(student channels, teacher channels, anchor index, levels)`` of a head-level loss between the student's
    and the teacher's head outputs (:func:`head_outputs`), or the one-line refusal of a pair it cannot read: the
    channels and levels of CrossKD's same-size pyramid levels, the anchor index of heads over different pyramids."""
    s_ch, t_ch, anchor_index, levels = [], [], None, None
    if entry.kind == "cross_head":  # each student level goes to the teacher head's level of the same size
        s_sites, t_sites = ({k: tuple(m.shape[1:]) for k, m in enumerate(h["feats"])} for h in (sh, th))
        levels = pair_same_size(list(s_sites), s_sites, t_sites)  # a P2/P6 model on one side: the common ones
        if not levels[0]:
            sizes = [[tuple(m.shape[2:]) for m in h["feats"]] for h in (sh, th)]
            raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' feeds each student level to the "
                              "teacher head's level of the same size, but the student's head reads maps of "
                              f"{sizes[0]} and the teacher's {sizes[1]} at imgsz {imgsz}: none in common")
        s_ch = [sh["feats"][k].shape[1] for k in levels[0]]
        t_ch = [th["feats"][k].shape[1] for k in levels[1]]
    if sh["scores"].shape != th["scores"].shape:
        if sh["scores"].shape[1] == th["scores"].shape[1] and "feats" in sh and "feats" in th:
            anchor_index = level_anchor_index(sh["feats"], th["feats"])  # a P2/P6 model on one side
        if anchor_index is None:
            raise RecipeError(
                f"{source}: distill.losses[{i}]: '{spec.name}' needs matching heads, but student predicts "
                f"{tuple(sh['scores'].shape[1:])} (classes, anchors) and teacher "
                f"{tuple(th['scores'].shape[1:])}" + (OTHER_CLASSES if sh["scores"].shape[1] !=
                                                     th["scores"].shape[1] else
                                                     ", and their heads share no pyramid level"))
    if getattr(entry.cls, "uses_boxes", False):
        bins = {who: h["boxes"].shape[1] // 4 for who, h in (("student", sh), ("teacher", th))}
        if bins["student"] != bins["teacher"] or bins["student"] < 2:
            raise RecipeError(
                f"{source}: distill.losses[{i}]: '{spec.name}' distills box distributions (DFL bins), which "
                f"both heads need in equal number (> 1), but the student has {bins['student']} per side and "
                f"the teacher {bins['teacher']} (YOLO26 and reg_max=1 heads predict plain boxes); use "
                "kd_logit, crosskd (recipes/logit-crosskd.yaml) or a feature loss for this pair")
    return s_ch, t_ch, anchor_index, levels


def _is_two_stage(model: nn.Module) -> bool:
    from kdctl.detectors import family, torchvision

    return family(model) is torchvision


def teacher_forward(teacher: nn.Module, img: torch.Tensor):
    """Run the teacher on a batch for its taps: Ultralytics models predict; a two-stage (torchvision) teacher runs
    its transform and backbone + FPN only (what feature KD reads)."""
    if _is_two_stage(teacher):
        from kdctl.detectors.torchvision_kd import backbone_forward

        return backbone_forward(teacher, img)
    return teacher.predict(img)


def final_detections(teacher: nn.Module, img: torch.Tensor, raw) -> torch.Tensor:
    """The teacher's final detections in kdctl's dense layout ``(N, 4 + nc, K)`` (boxes ``cx, cy, w, h`` in input
    pixels, class probabilities), from ``raw``, what :func:`teacher_forward` returned: a YOLO head's eval output
    as it is, an end-to-end head's ``(N, k, 6)`` boxes with one class each, RT-DETR's queries scaled to pixels; a
    two-stage teacher (whose :func:`teacher_forward` stops at the FPN) runs whole, to its post-processed boxes."""
    if _is_two_stage(teacher):
        return teacher(img).float()
    h, w = img.shape[-2:]
    if head_name(teacher) == "RTDETRDecoder":  # the last decoder layer's queries, as kdctl's RT-DETR output reads
        boxes, logits = raw[1][0][-1].float(), raw[1][1][-1].float()  # (N, Q, 4) normalised, (N, Q, nc)
        return torch.cat([boxes * boxes.new_tensor([w, h, w, h]), logits.sigmoid()], -1).transpose(1, 2)
    y = (raw[0] if isinstance(raw, (tuple, list)) else raw).float()
    nc = num_classes(teacher)
    if y.shape[1] != 4 + nc and y.shape[-1] == 6:  # end-to-end: x1, y1, x2, y2, score, class per detection
        xyxy, conf, cls = y[..., :4], y[..., 4], y[..., 5].long().clamp(0, nc - 1)
        probs = torch.zeros(*conf.shape, nc, device=y.device).scatter(-1, cls[..., None], conf[..., None])
        cxcywh = torch.cat([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
        return torch.cat([cxcywh, probs], -1).transpose(1, 2)
    return y


def _same_size_pairs(student: nn.Module, s_layers: list, teacher: nn.Module, t_layers: list,
                     imgsz: int) -> tuple[list, list]:
    """The layers of equal map size paired (:func:`~kdctl.distill.taps.pair_same_size`); nothing in common: the
    lists come back unchanged (and are refused as unequal)."""
    ps, pt = pair_same_size(s_layers, _dummy_maps(student, s_layers, imgsz), _dummy_maps(teacher, t_layers, imgsz))
    return (ps, pt) if ps else (s_layers, t_layers)


def _dummy_maps(model: nn.Module, layers: list, imgsz: int) -> dict:
    """``{layer: (C, H, W)}`` of a YOLO/RT-DETR model's tapped outputs on a blank batch."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    shapes = map_shapes(model, layers, lambda: model.predict(torch.zeros(1, 3, imgsz, imgsz, device=p.device,
                                                                          dtype=p.dtype)))
    model.train(was)
    return shapes


def _check_detections_pair(student, teacher, spec, i: int, source: str) -> None:
    where = f"{source}: distill.losses[{i}]"
    if head_name(student) not in DETECT_HEADS:
        raise RecipeError(f"{where}: '{spec.name}' trains a dense (YOLO) student on the teacher's detections; an "
                          "RT-DETR student learns them with detr_logit")
    if (spec.level or "logit") != "logit":
        raise RecipeError(f"{where}.level: '{spec.level}' does not apply to '{spec.name}', a logit-level loss")
    if spec.student_layers is not None or spec.teacher_layers is not None:
        raise RecipeError(f"{where}: '{spec.name}' reads the teacher's final detections; drop "
                          "student_layers/teacher_layers")
    if _is_two_stage(teacher):
        from kdctl.detectors.torchvision import dense_classes

        t_nc = dense_classes(teacher)  # a teacher of more classes keeps the dataset's detections (keep_classes)
    else:
        t_nc = num_classes(teacher)
    if t_nc != num_classes(student):
        raise RecipeError(f"{where}: '{spec.name}' needs the same classes, but the student predicts "
                          f"{num_classes(student)} and the teacher {t_nc}{OTHER_CLASSES}")


# what to do about a teacher trained on other classes (a COCO teacher for a dataset of a few classes, say)
OTHER_CLASSES = ("; the teacher was trained on other classes: fine-tune it on this dataset first (kdctl train with "
                 "student.model: the teacher), or distill its features alone (backbone or neck losses); a teacher "
                 "whose class names include the dataset's has them selected by name (a Faster R-CNN's detections, "
                 "for det_kd; not its RoI classifier)")


def _check_detr_pair(student, teacher, spec, i: int, source: str, need_detr_teacher: bool = False) -> None:
    """``detr_logit``: an RT-DETR student, and an RT-DETR teacher (its queries) or a YOLO teacher (its detections
    after NMS, Teach-DETR's setting); ``detr_query``: both RT-DETR (both decoders answer the same queries)."""
    if head_name(student) != "RTDETRDecoder":
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' matches DETR decoder queries, but the "
                          "student is not an RT-DETR detector; a YOLO student learns from a YOLO teacher's head "
                          "(kd_logit, ld, crosskd), from any teacher's detections (det_kd) or features (pkd, cwd)")
    if _is_two_stage(teacher) or head_name(teacher) not in (*DETECT_HEADS, "RTDETRDecoder"):
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' needs an RT-DETR or YOLO teacher")
    if need_detr_teacher and head_name(teacher) != "RTDETRDecoder":
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' decodes the same queries in both models and "
                          "needs an RT-DETR teacher; with a YOLO teacher use detr_logit (its detections as targets)")
    if spec.student_layers is not None or spec.teacher_layers is not None:
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' reads the decoder's predictions; drop "
                          "student_layers/teacher_layers")
    if student.model[-1].nc != teacher.model[-1].nc:
        raise RecipeError(f"{source}: distill.losses[{i}]: '{spec.name}' needs the same classes, but the student "
                          f"predicts {student.model[-1].nc} and the teacher {teacher.model[-1].nc}{OTHER_CLASSES}")


class KDTrainer(DetectionTrainer):
    """Ultralytics' detection trainer with the student built as a :class:`KDDetectionModel`.

    ``distill`` must be given explicitly (``None`` means plain training), so a trainer rebuilt without it cannot
    silently train without KD.
    """

    _MISSING = object()
    kd_model = KDDetectionModel  # the student class with the KD loss (RT-DETR's trainer swaps in its own)

    def __init__(self, overrides: dict, distill: DistillSetup | None = _MISSING, callbacks=None):
        if distill is KDTrainer._MISSING:
            raise TypeError("KDTrainer needs distill=DistillSetup(...) or distill=None for plain training")
        self.distill = distill
        super().__init__(overrides=overrides, _callbacks=callbacks)
        self.add_callback("on_pretrain_routine_end", keep_adapters_float)
        if distill is not None and distill.cache:
            self.add_callback("on_train_epoch_start", _replay_epoch)
        from kdctl import distributed

        if distributed.under_torchrun():
            # a torchrun rank: Ultralytics skips its own launcher here (LOCAL_RANK is set), but sizes the job by the
            # local device count (0 on the CPU, this node's GPUs only across nodes); the job's size is WORLD_SIZE
            self.world_size, self.ddp = distributed.world_size(), False
        elif "," in str(self.args.device):
            raise RecipeError(f"{(distill.source if distill else 'recipe')}: train.device: '{self.args.device}': "
                              "several GPUs train on torchrun ranks (kdctl distill/train launches them); this "
                              "trainer runs in one process")

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """Ultralytics' loaders, except training under a teacher cache: the deterministic views the cache was built
        from (:class:`kdctl.distill.cache.ReplayViews`), handed out by epoch (this rank's share under DDP)."""
        if mode != "train" or self.distill is None or not self.distill.cache:
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        from ultralytics.utils.torch_utils import torch_distributed_zero_first

        from kdctl import distributed
        from kdctl.distill.cache import EpochSampler, ReplayLoader, ReplayViews

        with torch_distributed_zero_first(rank):
            dataset = self.build_dataset(dataset_path, mode, batch_size)
        views = ReplayViews(dataset, int(self.args.seed))
        world = self.world_size if rank != -1 and self.world_size > 1 else 1
        sampler = EpochSampler(len(views), int(self.args.seed), distributed.rank() if world > 1 else 0, world)
        return ReplayLoader(views, batch_size=min(batch_size, len(views)), sampler=sampler,
                            num_workers=self.args.workers, collate_fn=dataset.collate_fn,
                            pin_memory=self.device.type == "cuda")

    def _setup_ddp(self):
        """Join the torchrun job: gloo on the CPU (Ultralytics has no CPU path), NCCL on this rank's GPU."""
        from kdctl import distributed

        self.device = distributed.rank_device(self.args.device)
        distributed.init_process_group(self.device)
        if self.device.type == "cuda":
            from ultralytics.utils.torch_utils import get_torch_device_backend

            self.accelerator = get_torch_device_backend(self.device)
            os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"  # as Ultralytics: collective timeouts raise

    def _setup_train(self):
        """Ultralytics' set-up; on CPU ranks its ``DistributedDataParallel(device_ids=[None])`` (meant for GPUs)
        gets ``device_ids=None``, what torch requires for CPU modules."""
        if self.world_size > 1 and self.device.type == "cpu":
            with _cpu_ddp_wrap():
                return super()._setup_train()
        return super()._setup_train()

    def save_model(self):
        """Ultralytics' checkpoints, each written to a temporary name and renamed into place: it writes last.pt
        in place, so a kill or a full disk during the write left a truncated last.pt where the last epoch's good
        one was, and the run could not be resumed."""
        final = {"last": self.last, "best": self.best}
        temp = {k: p.with_name(f".{p.name}.partial") for k, p in final.items()}
        self.last, self.best = temp["last"], temp["best"]
        try:
            saved = super().save_model()
        except BaseException:
            for p in temp.values():
                p.unlink(missing_ok=True)
            raise
        finally:
            self.last, self.best = final["last"], final["best"]
        faults.point("train:checkpoint-written")
        for k in ("last", "best"):  # last first: a kill between the two leaves best.pt one epoch behind, whole
            if temp[k].exists():
                os.replace(temp[k], final[k])
        return saved

    def final_eval(self):
        """Ultralytics strips the checkpoints, then re-validates best.pt on a GPU it assumes every DDP rank has; on
        CPU ranks only the stripping runs (kdctl evaluates best.pt itself when it publishes the bundle)."""
        if not (self.world_size > 1 and self.device.type == "cpu"):
            return super().final_eval()
        best, self.best = self.best, self.best.with_name(".no-final-eval")
        try:
            return super().final_eval()
        finally:
            self.best = best

    def get_model(self, cfg=None, weights=None, verbose=False):
        if self.distill is None or not (self.distill.losses or self.distill.init):
            return super().get_model(cfg, weights, verbose)
        teacher = self.distill.teacher.to(self.device).float()
        if not self.distill.losses:  # distill.init alone: the teacher's weights as a start, then the labels only
            model = super().get_model(cfg, None, verbose)
            self._init_from_teacher(model, teacher, weights)
            return model
        model = self.set_model_names_for_load(
            self.kd_model(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=False))
        model.to(self.device)
        model.args = self.args
        model.attach(teacher, build_criterion(model, teacher, self.distill.losses, self.distill.balance,
                                              int(self.args.imgsz), self.distill.source,
                                              self.distill.balance_batches, self.distill.balance_cap))
        if self.distill.cache:
            from kdctl.distill.cache import TeacherCache

            cache = TeacherCache(Path(self.distill.cache), recipe=self.distill.source)
            heads = model.kd.teacher_head_layers()
            if heads != [cache.meta["head_layer"]]:
                raise RecipeError(f"{self.distill.source}: distill.cache: the cache holds the teacher's detection head "
                                  f"(layer {cache.meta['head_layer']}); head-level terms read teacher layer(s) {heads}")
            model.cache_ref = TeacherRef(cache)
        balance = Path(self.save_dir) / BALANCE_FILE
        if self.distill.balance and balance.is_file():  # resume: the scales (or the balancing so far) of the run
            model.kd.load_balance_state(json.loads(balance.read_text()))
        self._init_from_teacher(model, teacher, weights)
        return model

    def _init_from_teacher(self, model: nn.Module, teacher: nn.Module, weights) -> None:
        """``distill.init: teacher``: the student's weights selected from the teacher's, before ``weights`` (a
        resumed run's checkpoint, which replaces them) are loaded; the record goes beside the checkpoints."""
        if self.distill.init == "teacher":
            from kdctl.bundle.store import write_json_atomic
            from kdctl.detectors.weight_selection import select_weights
            from kdctl.distributed import rank

            done = select_weights(model, teacher, self.distill.source)
            # a fresh start writes the record (a resumed run keeps the first start's); under DDP rank 0 writes it
            if not weights and rank() <= 0:
                write_json_atomic(Path(self.save_dir) / INIT_FILE, {"from": "teacher", **done})
        if weights:
            model.load(weights)


def train_args(overrides: dict):
    """Ultralytics' resolved training settings for these overrides (defaults filled in), as its trainer sees them."""
    from ultralytics.cfg import get_cfg

    return get_cfg(overrides=overrides)


def train_dataset(args, data_yaml: Path, batch: int, stride: int):
    """Ultralytics' augmenting training dataset for ``args`` (from :func:`train_args`), as its trainer builds it."""
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    return build_yolo_dataset(args, data["train"], batch, data, mode="train", rect=False, stride=stride)


def library_version() -> str:
    import ultralytics

    return ultralytics.__version__


def _replay_epoch(trainer) -> None:
    """Callback: the replayed views of this epoch (also after --resume)."""
    sampler = getattr(trainer.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(trainer.epoch)


class _CpuDDPParallel:
    """``nn.parallel`` as Ultralytics' trainer module sees it inside :func:`_cpu_ddp_wrap`."""

    def __getattr__(self, name):
        return getattr(torch.nn.parallel, name)

    @staticmethod
    def DistributedDataParallel(module, device_ids=None, **kwargs):  # noqa: N802 (torch's name)
        if device_ids is not None and all(d is None for d in device_ids):
            device_ids = None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def _cpu_ddp_nn():
    """``torch.nn`` with only ``parallel`` swapped: a module whose namespace is torch.nn's (Ultralytics' optimizer
    set-up finds the normalisation layers it exempts from weight decay in ``nn.__dict__``)."""
    import types

    m = types.ModuleType("torch.nn")
    m.__dict__.update(torch.nn.__dict__)
    m.parallel = _CpuDDPParallel()
    return m


@contextlib.contextmanager
def _cpu_ddp_wrap():
    """Ultralytics wraps the model as ``nn.parallel.DistributedDataParallel(model, device_ids=[device.index])``
    (pinned by tests/test_ddp.py); ``device.index`` is None on the CPU. Swaps that one name in its trainer module's
    ``nn``, for the duration of its set-up only."""
    import ultralytics.engine.trainer as ut

    before = ut.nn
    ut.nn = _cpu_ddp_nn()
    try:
        yield
    finally:
        ut.nn = before


def trainer(overrides: dict, callbacks=None, distill: DistillSetup | None = None) -> KDTrainer:
    """Ultralytics' detection trainer as kdctl runs it (``distill=None``: plain training)."""
    return KDTrainer(overrides=overrides, distill=distill, callbacks=callbacks)


def kd_criterion(trainer):
    """The trainer's distillation criterion: on the student model (Ultralytics) or on the trainer (kdctl's loop)."""
    kd = getattr(trainer, "kd", None)
    return kd if kd is not None else getattr(getattr(trainer.model, "module", trainer.model), "kd", None)


def save_balance(trainer) -> None:
    """Callback: persist the auto-balance state after each batch until the scales are fixed (for --resume)."""
    from kdctl.bundle import write_json_atomic

    from kdctl.distributed import rank

    kd = kd_criterion(trainer)
    if kd is None or not kd.balance or rank() > 0:  # every rank holds the same state; rank 0 writes it
        return
    path = Path(trainer.save_dir) / BALANCE_FILE
    state = kd.balance_state()
    if kd.scales is None or not path.exists() or json.loads(path.read_text()).get("scales") is None:
        write_json_atomic(path, state)


# ---- quantization-aware training (NVIDIA ModelOpt through Ultralytics' ``quantize=8``) ------------------------------
# Ultralytics' trainer inserts ModelOpt's INT8 fake quantizers into every Conv/Linear of the model it trains (ranges
# calibrated on 8 training batches, then fixed), keeps the head's output convolutions and DFL in float, folds
# BatchNorm into the quantized convs at export and carries the quantizer state beside pickled checkpoints. kdctl's
# student additionally owns the KD adapters (``kd.*``): they are training-only and never exported, so their
# quantizers are switched off before the first step, and the published student carries the quantizer state of its
# own layers only.

KD_PREFIX = "kd."


def library_output_to_stderr():
    """Redirect ``print`` output of the libraries called inside (ModelOpt, Ultralytics) to stderr, so stdout
    carries only what kdctl prints (``--json`` stays parseable); where stdout is discarded (``--quiet`` points it at
    the null device) the libraries' prints go there too, not to stderr, which then carries errors alone."""
    import contextlib
    import os
    import sys

    try:
        discarded = os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (AttributeError, OSError, ValueError):  # a stdout without a file (a test runner's buffer)
        discarded = False
    return contextlib.nullcontext() if discarded else contextlib.redirect_stdout(sys.stderr)


@contextlib.contextmanager
def train_threads(threads: int | None):
    """``train.threads``: torch's CPU threads while training (any family), then the previous count again.
    Ultralytics sets its own (``NUM_THREADS``: cpu_count - 1, at most 8) each time it selects a device, for training
    and for every validation, so that is set too."""
    if threads is None:
        yield
        return
    from ultralytics.utils import torch_utils

    before, ultralytics_default = torch.get_num_threads(), torch_utils.NUM_THREADS
    torch_utils.NUM_THREADS = threads
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = ultralytics_default
        torch.set_num_threads(before)


def is_qat(model: nn.Module) -> bool:
    """True for a model carrying ModelOpt fake quantizers (a quantization-aware trained student)."""
    from ultralytics.utils.torch_utils import is_qat as _is_qat

    return _is_qat(model)


def keep_adapters_float(trainer) -> None:
    """Callback (``on_pretrain_routine_end``): no fake quantization on the KD adapters of the trained model or EMA."""
    for m in (getattr(trainer.model, "module", trainer.model), getattr(getattr(trainer, "ema", None), "ema", None)):
        if m is not None and getattr(m, "kd", None) is not None and is_qat(m):
            import modelopt.torch.quantization as mtq

            mtq.disable_quantizer(m, lambda n: n.startswith(KD_PREFIX))


def quantizer_state(model: nn.Module) -> dict | None:
    """A QAT model's fake quantizers as data (ModelOpt state and ranges) to store beside its weights; None for a float
    model. Ultralytics' checkpoint form, used by every family."""
    from ultralytics.utils.torch_utils import qat_state

    return qat_state(model)


def restore_quantizers(model: nn.Module, state: dict) -> None:
    """Put back the fake quantizers :func:`quantizer_state` recorded, in place (ModelOpt's chatter to stderr)."""
    from ultralytics.utils.torch_utils import restore_qat

    with library_output_to_stderr():
        restore_qat(model, state)


def _student_qat_state(model: nn.Module) -> dict:
    """``qat_state`` of a KD model without the adapters' quantizers, so it restores onto the plain student."""
    import copy

    state = copy.deepcopy(quantizer_state(model))
    for _mode, entry in state["modelopt"]["modelopt_state_dict"]:
        qs = entry.get("metadata", {}).get("quantizer_state")
        if isinstance(qs, dict):
            for k in [k for k in qs if k.startswith(KD_PREFIX)]:
                del qs[k]
    state["ranges"] = {k: v for k, v in state["ranges"].items() if not k.startswith(KD_PREFIX)}
    return state


def quantizer_summary(model: nn.Module) -> dict:
    """How many fake quantizers a QAT model has, and how many are on (for the bundle's metrics)."""
    qs = [m for m in model.modules() if type(m).__name__ == "TensorQuantizer"]
    return {"library": "nvidia-modelopt", "quantizers": len(qs), "enabled": sum(bool(q.is_enabled) for q in qs)}


def load_detector(path: str | Path) -> nn.Module:
    """A trained Ultralytics detector from a ``.pt`` checkpoint, FP32, eval mode."""
    with library_output_to_stderr():  # ModelOpt prints "Inserted N quantizers" when it restores a QAT model
        model, _ = load_checkpoint(str(path))
    return model.float().eval()


DETECT_HEADS = ("Detect", "v10Detect")  # the heads of the YOLO detection family (boxes + classes, dense)


def head_name(cfg_or_model) -> str:
    """The last layer's module type, from a model YAML (path, name or dict) or a built model."""
    if isinstance(cfg_or_model, nn.Module):
        return type(cfg_or_model.model[-1]).__name__ if hasattr(cfg_or_model, "model") else type(cfg_or_model).__name__
    from ultralytics.nn.tasks import yaml_model_load

    cfg = cfg_or_model if isinstance(cfg_or_model, dict) else yaml_model_load(str(cfg_or_model))
    return str(cfg["head"][-1][2])


def input_channels(cfg_or_model) -> object:
    """The image channels a model takes: its first convolution's, or a model YAML's ``channels`` (Ultralytics'
    default 3); as written where the YAML gives something else than a number."""
    if isinstance(cfg_or_model, nn.Module):
        conv = next((m for m in cfg_or_model.modules() if isinstance(m, nn.Conv2d)), None)
        return 3 if conv is None else conv.in_channels
    from ultralytics.nn.tasks import yaml_model_load

    cfg = cfg_or_model if isinstance(cfg_or_model, dict) else yaml_model_load(str(cfg_or_model))
    return cfg.get("channels", 3)


def check_family(cfg_or_model, field: str, source: str) -> None:
    """Refuse a model of another task (segmentation, pose, OBB, classification), or of other than 3 input channels
    (Ultralytics' grey ``channels: 1``), in one line. Ultralytics YOLO and RT-DETR detectors pass (the caller picks
    the family with :func:`kdctl.detectors.family`)."""
    head = head_name(cfg_or_model)
    if head not in DETECT_HEADS and head != "RTDETRDecoder":
        kind = {"Segment": "a segmentation model", "Pose": "a pose model", "OBB": "an oriented-box model",
                "Classify": "a classifier"}.get(head, f"a '{head}' model")
        raise RecipeError(f"{source}: {field}: is {kind}; kdctl trains and exports Ultralytics detection models "
                          f"(YOLO heads {' or '.join(DETECT_HEADS)}, or RT-DETR)")
    ch = input_channels(cfg_or_model)
    if type(ch) is not int or ch != 3:
        from kdctl.errors import shown

        raise RecipeError(f"{source}: {field}: takes images of {shown(ch)} channel{'s' * (ch != 1)}; kdctl trains, "
                          "scores and exports 3-channel (RGB) detectors")
    stride = getattr(cfg_or_model, "stride", None) if isinstance(cfg_or_model, nn.Module) else None
    if stride is not None and hasattr(stride, "max") and not float(stride.max()) >= 1:  # NaN too
        raise RecipeError(f"{source}: {field}: its largest stride is {float(stride.max()):g}, which no detector has "
                          "(the checkpoint is damaged or was edited)")


def build_detector(cfg: str | Path | dict, nc: int) -> nn.Module:
    return DetectionModel(str(cfg) if isinstance(cfg, Path) else cfg, nc=nc, verbose=False)


def plain_student(model: nn.Module, cls=DetectionModel) -> DetectionModel:
    """The student alone: a ``cls`` model (``DetectionModel``, or RT-DETR's) with the same weights, without KD
    criterion and adapters (and, for a quantization-aware trained student, with the same fake quantizers and
    ranges)."""
    model = model.float()
    student = cls(model.yaml, nc=model.model[-1].nc, verbose=False)
    qat = is_qat(model)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(KD_PREFIX) and not (qat and "_quantizer" in k)}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"student weights do not fit its architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if qat:
        restore_quantizers(student, _student_qat_state(model))
    for attr in ("names", "stride", "args", "nc", "class_weights"):
        if hasattr(model, attr):
            setattr(student, attr, getattr(model, attr))
    return student.eval()


def check_model_name(name: str, field: str, source: str) -> None:
    """A bare model YAML name (``yolov8n.yaml``) must be one Ultralytics ships."""
    from kdctl.detectors.ultralytics_env import ships_model

    if not ships_model(name):
        raise RecipeError(f"{source}: {field}: '{name}' is neither a file nor an Ultralytics model YAML "
                          "(e.g. yolov8n.yaml, yolo11s.yaml, or kdctl's yolov8-tiny.yaml)")


def _rows(layer: nn.Module, index: torch.Tensor) -> nn.Module:
    """A copy of a ``Conv2d`` or ``Linear`` layer that computes only its output channels ``index``, in that order.
    ValueError for any other layer, a quantization-aware one included (its per-channel quantizers are not cut)."""
    if type(layer) not in (nn.Conv2d, nn.Linear):
        raise ValueError(f"a {type(layer).__name__} layer")
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, len(index), layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None)
    else:
        new = nn.Linear(layer.in_features, len(index), layer.bias is not None)
    new = new.to(layer.weight)
    with torch.no_grad():
        new.weight.copy_(layer.weight[index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[index])
    return new.requires_grad_(layer.weight.requires_grad)


def keep_classes(model: nn.Module, index: list[int], names: list[str]) -> nn.Module:
    """A copy of a YOLO detector whose head predicts only its classes ``index``, in that order, named ``names``
    (a COCO teacher for a dataset of some of its classes, selected by name: :meth:`kdctl.data.resolve.Dataset.
    class_index`). Each class score is its own sigmoid, so the copy's scores are exactly the model's scores of
    those classes; its boxes and inner maps are the model's. The last convolution of each class branch keeps
    those output channels."""
    import copy

    head = model.model[-1]
    if type(head).__name__ not in DETECT_HEADS:
        raise ValueError(f"a {type(head).__name__} head")
    model = copy.deepcopy(model)
    head, idx = model.model[-1], torch.as_tensor(index, dtype=torch.long)
    for branch in ("cv3", "one2one_cv3"):
        for seq in getattr(head, branch, None) or []:
            last = seq[-1]
            if type(last) is not nn.Conv2d or last.out_channels != head.nc:
                raise ValueError(f"a class branch ending in {type(last).__name__}, not a {head.nc}-class convolution")
            seq[-1] = _rows(last, idx)
    head.nc, head.no = len(index), len(index) + head.reg_max * 4
    return _named(model, names)


def _named(model: nn.Module, names: list[str]) -> nn.Module:
    model.names = dict(enumerate(names))
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml = {**model.yaml, "nc": len(names)}
    if hasattr(model, "nc"):
        model.nc = len(names)
    return model


def num_classes(model: nn.Module) -> int:
    head = model.model[-1] if hasattr(model, "model") else None
    return int(getattr(head, "nc", None) or len(getattr(model, "names", {}) or {}))


def max_stride(model: nn.Module) -> int:
    s = getattr(model, "stride", None)
    return int(s.max()) if s is not None and hasattr(s, "max") else 32


def gflops(model: nn.Module, imgsz: int) -> float | None:
    """GFLOPs of one forward pass at ``imgsz``, as Ultralytics reports them (None if counting fails)."""
    try:
        from ultralytics.utils.torch_utils import get_flops

        return round(float(get_flops(model, imgsz)), 4)
    except Exception:  # FLOPs are informative; a counting failure must not fail an export
        return None


def save_checkpoint(student: nn.Module, path: Path, train_args: dict) -> None:
    """An Ultralytics-loadable checkpoint (``YOLO(path)`` works) holding only the plain student; a QAT student's
    quantizers travel beside the module as ModelOpt state (Ultralytics' own QAT checkpoint form)."""
    import copy
    import datetime as dt

    from ultralytics import __version__ as ul_version
    from ultralytics.utils.torch_utils import qat_state, strip_qat

    state = qat_state(student)
    module = copy.deepcopy(student)
    strip_qat(module)
    torch.save({"model": module.half(), "ema": None, "epoch": -1, "train_args": train_args, "modelopt": state,
                "date": dt.datetime.now().isoformat(), "version": ul_version, "kdctl": True}, path)


def export_module(model: nn.Module, imgsz: int, batch: int = 1, *, dynamic: bool = False,
                  fmt: str = "onnx") -> tuple[nn.Module, torch.Tensor]:
    """A copy of the detector ready to trace, and an example input: BatchNorm folded (into the fake-quantized
    convolutions too, for a QAT student), the head in export mode (decoded ``(N, 4+nc, A)`` output, NMS outside),
    anchors built for ``imgsz``, no gradients."""
    from kdctl.detectors import traceable_copy

    m = traceable_copy(model)
    head = m.model[-1]
    head.export, head.format, head.dynamic = True, fmt, dynamic
    x = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        m(x)  # builds anchors/strides for this input size
    return m, x


def float_tail(nodes: list[tuple[str, str | None]], model: nn.Module) -> list[str]:
    """Graph nodes INT8 quantization leaves in float: the detection head after its convolutions (DFL, decode
    arithmetic, sigmoid, concat), where quantizing costs box accuracy and saves almost no time. ``nodes`` are
    (name, op type) of an ONNX graph, or (OpenVINO friendly name, None); both names follow the traced module paths.
    The head's conv branches (``cv2``: boxes, ``cv3``: classes) stay quantizable, except their non-conv ops when the
    op type is known."""
    head = f"model.{len(model.model) - 1}"
    out = []
    for name, op in nodes:
        path = _module_path(name)
        if path != head and not path.startswith(head + "."):
            continue
        in_branch = path.startswith((f"{head}.cv2.", f"{head}.cv3."))
        if not in_branch or (op is not None and op not in ("Conv", "Relu", "Sigmoid", "Mul", "Add", "HardSwish")):
            out.append(name)
    return out


def _module_path(node_name: str) -> str:
    """The module path a graph node was traced from, for ONNX names (``/model.22/cv2.0/cv2.0.0/conv/Conv``) and
    OpenVINO names of a traced PyTorch model (``__module.model.22.cv2.0.0.conv/aten::_convolution/Convolution``,
    ``self.model.22.cv2.0.0.conv.weight``)."""
    if node_name.startswith("__module."):
        return node_name[len("__module."):].split("/", 1)[0]
    if node_name.startswith("self."):
        return node_name[len("self."):].rsplit(".", 1)[0]
    path: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:  # the last part is the op's own name
        if path and part.startswith(path[-1] + "."):  # ONNX repeats a container's name: cv2.0 / cv2.0.0
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)
