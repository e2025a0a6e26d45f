"""Distillation for torchvision's two-stage detectors: tap sites per taxonomy level, the KD criterion, and what one
training step captures from the student and computes with the frozen teacher.

Levels and where they read (both models see the same letterboxed batch):

- ``backbone``: the stages the backbone hands to the FPN (``net.backbone.body[<key>]``);
- ``neck``: the FPN levels (``net.backbone[<key>]``), paired student↔teacher by stride;
- ``rpn``: the RPN head's objectness and box deltas at every anchor (``rpn_kd``; same anchor layout needed);
- ``roi``: the RoI head on the **student's** sampled proposals — the student's class logits, box regression,
  sampler labels/targets and pooled features, and the teacher's RoI head run on the same proposals (``roi_kd``,
  ``roi_crosskd``, ``roi_mimic``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdctl.distill.taps import FeatureTaps, keep_strides, map_shapes, pair_same_size, split_key
from kdctl.errors import RecipeError

TWO_STAGE_LOSSES = "rpn_kd, roi_kd, roi_crosskd, roi_mimic"
PSEUDO_LAYERS = ("rpn", "roi")  # the two-stage kinds of term: they read StudentCapture's outputs, not module taps


def tap_sites(model: nn.Module, role: str, imgsz: int) -> dict[str, tuple[int, int, int]]:
    """``{tap key: (channels, H, W)}`` of the maps at a role (``backbone`` or ``neck``), from one forward pass."""
    if role == "backbone":
        return _shapes(model, [f"net.backbone.body[{k}]" for k in model.net.backbone.body.return_layers.values()],
                       imgsz)
    with torch.no_grad():
        feats = _blank_fpn(model, imgsz)
    return {f"net.backbone[{k}]": tuple(v.shape[1:]) for k, v in feats.items() if k != "pool"}


def _blank_fpn(model: nn.Module, imgsz: int) -> dict:
    """The backbone + FPN maps of a blank ``imgsz`` canvas (for shapes and layouts)."""
    p = next(model.parameters())
    return model.net.backbone(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))


def _shapes(model: nn.Module, keys: list, imgsz: int) -> dict:
    return map_shapes(model, keys, lambda: _blank_fpn(model, imgsz))


def _check_keys(model: nn.Module, keys: list, field: str) -> None:
    for k in keys:
        path, _ = split_key(k)
        if not isinstance(path, str):
            raise ValueError(f"{k}: torchvision detectors are tapped by module path (e.g. net.backbone[0] or "
                             "net.backbone.body[1]), not by layer index")
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"no module '{path}' in the {model.builder} model; FPN levels are net.backbone[<key>], "
                             "backbone stages net.backbone.body[<key>]") from None


def _pair_by_size(s_sites: dict, t_sites: dict) -> tuple[list, list]:
    """Each student map with a teacher map of the same size (stride); among several (MobileNetV3 hands the FPN two
    stride-32 maps), the one with the same key, else the first not yet paired."""
    s_layers, t_layers = [], []
    for sk, (_, h, w) in s_sites.items():
        match = [tk for tk, v in t_sites.items() if v is not None and v[1:] == (h, w)]
        if match:
            same = [tk for tk in match if split_key(tk)[1] == split_key(sk)[1]]
            free = [tk for tk in match if tk not in t_layers]
            s_layers.append(sk)
            t_layers.append((same or free or match)[0])
    return s_layers, t_layers


def build_criterion(student: nn.Module, teacher: nn.Module, losses, balance, imgsz: int, source: str = "recipe",
                    balance_batches: int = 8, balance_cap: float | None = 4.0):
    """Resolve every recipe loss to its tap sites (or to the RPN/RoI outputs), size adapters, check pairs."""
    from kdctl.distill.criterion import DistillationCriterion, make_term
    from kdctl.distill.losses import LOSSES
    from kdctl.distill.losses.two_stage import check_rpn_layouts

    terms, seen = [], {}
    for i, spec in enumerate(losses):
        entry = LOSSES[spec.name]
        level = spec.level or entry.default_level
        where = f"{source}: distill.losses[{i}]"
        s_ch: list[int] = []
        t_ch: list[int] = []
        if entry.kind == "detections":
            raise RecipeError(f"{where}: '{spec.name}' trains a dense (YOLO) student on the teacher's detections; a "
                              f"two-stage student learns its teacher's predictions at the rpn or roi level "
                              f"({TWO_STAGE_LOSSES})")
        if entry.kind in ("head", "cross_head"):
            raise RecipeError(f"{where}: '{spec.name}' is a dense-head loss for YOLO detectors; two-stage detectors "
                              f"distill at the rpn or roi level ({TWO_STAGE_LOSSES}) or on features")
        if entry.kind in PSEUDO_LAYERS:
            if level != entry.kind:
                raise RecipeError(f"{where}.level: '{level}' does not apply to '{spec.name}', an {entry.kind}-level "
                                  "loss")
            if spec.student_layers is not None or spec.teacher_layers is not None:
                raise RecipeError(f"{where}: '{spec.name}' reads the {entry.kind.upper()} outputs; drop "
                                  "student_layers/teacher_layers")
            if entry.kind == "rpn":
                try:
                    check_rpn_layouts(_rpn_outputs(student, imgsz), _rpn_outputs(teacher, imgsz))
                except ValueError as e:
                    raise RecipeError(f"{where}: '{spec.name}': {e}") from None
            elif student.nc != teacher.nc and not getattr(entry.cls, "class_free", False):
                from kdctl.detectors.yolo import OTHER_CLASSES

                raise RecipeError(f"{where}: '{spec.name}' needs the same classes, but the student predicts "
                                  f"{student.nc} and the teacher {teacher.nc}{OTHER_CLASSES}")
            if spec.name == "roi_mimic":
                s_ch, t_ch = [student.net.backbone.out_channels], [teacher.net.backbone.out_channels]
            s_layers = t_layers = [entry.kind]
        else:
            role = {"backbone": "backbone", "neck": "neck", "feature": "neck"}.get(level)
            if role is None:
                raise RecipeError(f"{where}.level: '{level}' does not apply to '{spec.name}' on a two-stage "
                                  "detector; use backbone or neck")
            s_layers, t_layers = _layers(student, teacher, spec, role, imgsz, where)
            s_sh, t_sh = _shapes(student, s_layers, imgsz), _shapes(teacher, t_layers, imgsz)
            try:
                s_layers, t_layers = keep_strides(s_layers, t_layers, s_sh, spec.strides, imgsz)
            except ValueError as e:
                raise RecipeError(f"{where}.strides: {e}") from None
            for sk, tk in zip(s_layers, t_layers):
                if s_sh[sk] is None or t_sh[tk] is None:
                    raise RecipeError(f"{where}: '{spec.name}' is a feature loss, but layer pair (student {sk}, "
                                      f"teacher {tk}) does not output feature maps")
                s_ch.append(s_sh[sk][0])
                t_ch.append(t_sh[tk][0])
        terms.append(make_term(spec, seen, s_layers, t_layers, s_ch, t_ch, where))
    return DistillationCriterion(terms, balance, balance_batches, balance_cap).to(next(student.parameters()).device)


def _layers(student, teacher, spec, role: str, imgsz: int, where: str) -> tuple[list, list]:
    given = [(spec.student_layers, student, "student_layers"), (spec.teacher_layers, teacher, "teacher_layers")]
    for layers, model, field in given:
        if isinstance(layers, str) and layers not in ("backbone", "neck"):
            raise RecipeError(f"{where}.{field}: role '{layers}' does not apply to two-stage detectors; use "
                              "backbone, neck or module paths like net.backbone[0]")
        if isinstance(layers, list):
            try:
                _check_keys(model, layers, field)
            except ValueError as e:
                raise RecipeError(f"{where}.{field}: {e}") from None
    s_role = spec.student_layers if isinstance(spec.student_layers, str) else role
    t_role = spec.teacher_layers if isinstance(spec.teacher_layers, str) else role
    if isinstance(spec.student_layers, list) and isinstance(spec.teacher_layers, list):
        s_layers, t_layers = list(spec.student_layers), list(spec.teacher_layers)
    elif isinstance(spec.student_layers, list) or isinstance(spec.teacher_layers, list):
        raise RecipeError(f"{where}: give module paths for both student_layers and teacher_layers, or for neither")
    else:
        s_layers, t_layers = _pair_by_size(tap_sites(student, s_role, imgsz), tap_sites(teacher, t_role, imgsz))
        if not s_layers:
            raise RecipeError(f"{where}: no student {s_role} map has the size of a teacher {t_role} map at "
                              f"imgsz {imgsz}; give student_layers/teacher_layers as module paths")
    if len(s_layers) != len(t_layers):
        raise RecipeError(f"{where}: {len(s_layers)} student layers {s_layers} but {len(t_layers)} teacher layers "
                          f"{t_layers}; give pairs of equal length")
    return s_layers, t_layers


def backbone_forward(model: nn.Module, x: torch.Tensor):
    """The detector's transform and backbone + FPN on a batch of letterboxed canvases (0..1): what feature taps of
    a two-stage teacher read when it teaches a one-stage student."""
    return _transformed_fpn(model, x)[1]


def _transformed_fpn(model: nn.Module, x: torch.Tensor):
    """``(ImageList, FPN maps)``: the detector's own transform of the batch, then its backbone + FPN."""
    images, _ = model.net.transform(list(x.unbind(0)))
    return images, model.net.backbone(images.tensors)


def stride_pairs(student: nn.Module, s_layers: list, teacher: nn.Module, teacher_layers, role: str, imgsz: int,
                 student_maps) -> tuple[list, list]:
    """A one-stage student's tapped layers paired with a two-stage teacher's maps of the same size (stride): the
    teacher's sites at ``role`` (or the module paths given), each student layer with the first unused teacher map of
    its size; student layers without one are left out. ``student_maps(model, layers, imgsz)`` gives the student's
    ``{layer: (C, H, W)}``. Raises ``ValueError`` (one line) when nothing pairs."""
    teacher.pin_input_size(imgsz)
    if isinstance(teacher_layers, list):
        _check_keys(teacher, teacher_layers, "teacher_layers")
        t_sites = _shapes(teacher, teacher_layers, imgsz)
    else:
        t_role = teacher_layers if isinstance(teacher_layers, str) else role
        if t_role not in ("backbone", "neck"):
            raise ValueError(f"role '{t_role}' does not apply to a two-stage teacher; use backbone, neck or module "
                             "paths like net.backbone[0]")
        t_sites = tap_sites(teacher, t_role, imgsz)
    pairs_s, pairs_t = pair_same_size(s_layers, student_maps(student, s_layers, imgsz), t_sites)
    if not pairs_s:
        raise ValueError(f"no teacher map has the size of a student layer {s_layers} at imgsz {imgsz} (teacher "
                         f"maps {[(k, v[1:]) for k, v in t_sites.items() if v]}); give teacher_layers as module "
                         "paths and student_layers to match")
    return pairs_s, pairs_t


def _rpn_outputs(model: nn.Module, imgsz: int) -> dict:
    with torch.no_grad():
        obj, deltas = model.net.rpn.head(list(_blank_fpn(model, imgsz).values()))
    return {"objectness": obj, "deltas": deltas}


class StudentCapture:
    """While open, records what the student's training forward computes at the RPN and RoI levels: the RPN head's
    outputs, the input sizes after its transform, the RoI sampler's proposals, labels and regression targets, the
    pooled RoI features and the RoI predictions. ``outputs`` then holds ``{"rpn": ..., "roi": ...}``."""

    def __init__(self, model: nn.Module, rpn: bool, roi: bool):
        self.net, self.rpn, self.roi = model.net, rpn, roi
        self.outputs: dict = {}
        self.image_sizes: list | None = None
        self._handles: list = []

    def __enter__(self) -> "StudentCapture":
        net, out = self.net, self.outputs
        self._handles.append(net.transform.register_forward_hook(
            lambda m, i, o: setattr(self, "image_sizes", list(o[0].image_sizes))))
        if self.rpn:
            self._handles.append(net.rpn.head.register_forward_hook(
                lambda m, i, o: out.__setitem__("rpn", {"objectness": o[0], "deltas": o[1]})))
        if self.roi:
            heads, sample = net.roi_heads, net.roi_heads.select_training_samples

            def select_training_samples(proposals, targets):
                proposals, matched, labels, reg_targets = sample(proposals, targets)
                out.setdefault("roi", {}).update(labels=torch.cat(labels), regression_targets=torch.cat(reg_targets))
                return proposals, matched, labels, reg_targets

            heads.select_training_samples = select_training_samples
            self._handles.append(heads.box_roi_pool.register_forward_hook(
                lambda m, i, o: out.setdefault("roi", {}).update(proposals=list(i[1]), pooled=o)))
            self._handles.append(heads.box_predictor.register_forward_hook(
                lambda m, i, o: out.setdefault("roi", {}).update(class_logits=o[0], box_regression=o[1])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.net.roi_heads.__dict__.pop("select_training_samples", None)


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, capture: StudentCapture) -> dict:
    """The teacher's RPN outputs on the batch and its RoI head on the student's sampled proposals (rescaled from
    the student's input size to the teacher's), for the levels ``capture`` recorded. Call under ``no_grad``; feature
    taps open on the teacher see its backbone and FPN run here."""
    net = teacher.net
    images, feats = _transformed_fpn(teacher, x)
    out: dict = {}
    if "rpn" in capture.outputs:
        obj, deltas = net.rpn.head(list(feats.values()))
        out["rpn"] = {"objectness": obj, "deltas": deltas}
    if "roi" in capture.outputs:
        props = []
        for p, (sh, sw), (th, tw) in zip(capture.outputs["roi"]["proposals"], capture.image_sizes,
                                         images.image_sizes):
            props.append(p.detach() * p.new_tensor([tw / sw, th / sh, tw / sw, th / sh]))
        pooled = net.roi_heads.box_roi_pool(feats, props, images.image_sizes)
        cls, reg = net.roi_heads.box_predictor(net.roi_heads.box_head(pooled))
        out["roi"] = {"class_logits": cls, "box_regression": reg, "pooled": pooled}
    return out


class Distiller:
    """One KD step for :class:`~kdctl.detectors.torchvision.Trainer`: the student's task losses and the weighted KD
    terms against the frozen teacher, on the same batch."""

    def __init__(self, teacher: nn.Module, criterion, imgsz: int):
        self.teacher = teacher.eval().requires_grad_(False)
        teacher.pin_input_size(imgsz)  # the teacher sees the batch at the student's input size
        self.kd, self.imgsz = criterion, imgsz
        kinds = criterion.kinds()
        self.rpn, self.roi = "rpn" in kinds, "roi" in kinds
        self.s_taps, self.t_taps = criterion.student_layers(), criterion.teacher_layers()  # module taps only

    def step(self, student: nn.Module, x: torch.Tensor, targets: list[dict]) -> tuple[dict, dict]:
        from kdctl.distill.criterion import DistillContext

        if self.kd.stopped:  # distill.stop_epoch reached: the task losses alone, the teacher does not run
            return student(x, targets), {n: x.new_zeros(()) for n in self.kd.names}
        with FeatureTaps(student, self.s_taps) as st, StudentCapture(student, self.rpn, self.roi) as cap:
            losses = student(x, targets)
        with torch.no_grad(), FeatureTaps(self.teacher, self.t_taps) as tt:
            t_out = {**teacher_outputs(self.teacher, x, cap), **tt.outputs}
        ctx = DistillContext(imgsz=self.imgsz, boxes=[t["boxes"].detach().cpu() for t in targets])
        task = float(sum(float(v.detach()) for v in losses.values()))
        kd = self.kd({**st.outputs, **cap.outputs}, t_out, ctx, task)
        return losses, kd
