"""Ultralytics RT-DETR as a kdctl detector family (train, distill, eval, export, profile).

RT-DETR shares Ultralytics' checkpoint format and model-YAML parsing with YOLO (:mod:`kdctl.detectors.yolo` loads
and saves both); what differs lives here: the trainer (Ultralytics' ``RTDETRTrainer``: Hungarian matching,
denoising queries), the output and its export, and which graph nodes INT8 quantization leaves in float.

Output: kdctl's evaluator, parity checks and runtimes take one dense layout for every family, ``(N, 4 + nc, Q)``
with ``cx, cy, w, h`` in input pixels and class probabilities. :class:`DenseOutput` turns RT-DETR's last decoder
layer (normalised boxes, class logits per query) into it, in PyTorch and in every exported graph, so the same
post-processing runs everywhere (RT-DETR is NMS-free; the evaluator's class-aware NMS at IoU 0.7 only removes
near-duplicate queries).
"""

from __future__ import annotations

import torch
from torch import nn

from kdctl.detectors.ultralytics_env import prepare

prepare()

from ultralytics.models.rtdetr.train import RTDETRTrainer  # noqa: E402
from ultralytics.nn.tasks import RTDETRDetectionModel  # noqa: E402

from kdctl.detectors.yolo import KDTrainer, TeacherRef, final_detections, head_name, teacher_forward  # noqa: E402
from kdctl.distill.criterion import DistillContext  # noqa: E402
from kdctl.distill.losses.registry import kd_item  # noqa: E402
from kdctl.distill.taps import FeatureTaps  # noqa: E402

LABEL = "RT-DETR"
MIN_OPSET = 16  # grid_sample in the deformable attention
SET_OUTPUT = True  # queries are a set: parity pairs them first (kdctl.export.base.align_sets)


class DenseOutput(nn.Module):
    """RT-DETR in eval mode -> ``(N, 4 + nc, Q)``: boxes ``cx, cy, w, h`` in input pixels, class probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, raw = self.model(x)
        boxes, logits = raw[0][-1], raw[1][-1]  # last decoder layer: (N, Q, 4) normalised, (N, Q, nc)
        scale = torch.tensor([x.shape[3], x.shape[2], x.shape[3], x.shape[2]], dtype=boxes.dtype, device=boxes.device)
        return torch.cat([boxes * scale, logits.sigmoid()], -1).transpose(1, 2)


def build_detector(cfg, nc: int) -> nn.Module:
    return RTDETRDetectionModel(cfg if isinstance(cfg, dict) else str(cfg), nc=nc, verbose=False)


def keep_classes(model: nn.Module, index: list[int], names: list[str]) -> nn.Module:
    """A copy of an RT-DETR detector that predicts only its classes ``index``, in that order, named ``names``
    (:func:`kdctl.detectors.yolo.keep_classes` for a YOLO head). Class scores are per-class sigmoids, so every
    decoder layer's scores are the model's for those classes; the encoder then picks its top queries by those
    classes alone, as a model trained on them would."""
    import copy

    from kdctl.detectors.yolo import _named, _rows

    model = copy.deepcopy(model)
    head, idx = model.model[-1], torch.as_tensor(index, dtype=torch.long)
    head.enc_score_head = _rows(head.enc_score_head, idx)
    head.dec_score_head = nn.ModuleList(_rows(m, idx) for m in head.dec_score_head)
    emb = head.denoising_class_embed  # the denoising queries' class embeddings (training only)
    head.denoising_class_embed = nn.Embedding.from_pretrained(emb.weight.detach()[idx].clone(),
                                                              freeze=not emb.weight.requires_grad)
    head.nc = len(index)
    return _named(model, names)


class KDRTDETRModel(RTDETRDetectionModel):
    """An RT-DETR student whose training loss adds ``Σ w·KD`` against a frozen teacher: feature terms through taps
    (an RT-DETR or YOLO teacher), ``detr`` terms on the decoder's queries (an RT-DETR teacher: every student
    decoder layer's predictions, denoising queries split off, against the teacher's final ones)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd = None  # a class attribute here would hide the registered submodule
        self.teacher_ref = TeacherRef(None)

    def attach(self, teacher: nn.Module, criterion) -> None:
        teacher.eval().requires_grad_(False)
        self.teacher_ref = TeacherRef(teacher)
        self.kd = criterion

    def loss(self, batch, preds=None):
        # validation while training, or training after distill.stop_epoch: the task loss alone, KD items at zero
        # (the teacher does not run)
        if not self.training or self.kd is None or self.kd.stopped:
            loss, items = super().loss(batch, preds)
            zero = torch.zeros((), device=batch["img"].device)
            return loss, {**items, **{kd_item(n): zero for n in (self.kd.names if self.kd else [])}}
        teacher = self.teacher_ref.model
        if teacher is None:
            raise RuntimeError("distillation model has no teacher attached; refusing to train without KD")
        kinds = self.kd.kinds()
        with torch.no_grad(), FeatureTaps(teacher, self.kd.teacher_layers()) as t_taps, \
                _HeadInputs(teacher, "detr_query" in kinds) as t_in:
            t_raw = teacher_forward(teacher, batch["img"])
        head = len(self.model) - 1
        with FeatureTaps(self, [*self.kd.student_layers(), head]) as s_taps, \
                _HeadInputs(self, "detr_query" in kinds) as s_in:
            task, items = super().loss(batch)  # Ultralytics' own targets, denoising and matching
        s_out, t_out = dict(s_taps.outputs), dict(t_taps.outputs)
        if "detr_query" in kinds:
            q = next(t.losses[0] for t in self.kd.terms if t.kind == "detr_query")
            boxes = distillation_boxes(t_raw[1][0][-1], t_raw[1][1][-1], q.teacher_queries, q.random_queries)
            sb, sl = decode_queries(self.model[-1], s_in.x, boxes)
            with torch.no_grad():
                tb, tl = decode_queries(teacher.model[-1], t_in.x, boxes)
            s_out["distill_queries"] = {"boxes": sb, "logits": sl}
            t_out["distill_queries"] = {"boxes": tb[-1], "logits": tl[-1]}
        if "detr" in kinds:
            boxes, logits, _, _, dn_meta = s_taps.outputs[head]
            if dn_meta is not None:
                boxes = boxes.split(dn_meta["dn_num_split"], dim=2)[1]
                logits = logits.split(dn_meta["dn_num_split"], dim=2)[1]
            s_out["query"] = {"boxes": boxes, "logits": logits}
            t_out["query"] = (teacher_detections(final_detections(teacher, batch["img"], t_raw),
                                                 batch["img"].shape[-2:])
                              if head_name(teacher) != "RTDETRDecoder" else
                              {"boxes": t_raw[1][0][-1], "logits": t_raw[1][1][-1]})
        kd = self.kd(s_out, t_out, DistillContext.from_batch(batch), float(task.detach()))
        kd_total = torch.stack(list(kd.values())).sum()
        return task + kd_total, {**items, **{kd_item(n): v.detach() for n, v in kd.items()}}


class _HeadInputs:
    """While open (and ``on``), keeps the list of maps the RT-DETR head receives (``x``)."""

    def __init__(self, model: nn.Module, on: bool):
        self.head, self.on, self.x, self._h = model.model[-1], on, None, None

    def __enter__(self) -> "_HeadInputs":
        if self.on:
            self._h = self.head.register_forward_pre_hook(lambda m, args: setattr(self, "x", args[0]))
        return self

    def __exit__(self, *exc) -> None:
        if self._h is not None:
            self._h.remove()


def distillation_boxes(t_boxes: torch.Tensor, t_logits: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """KD-DETR's distillation points as reference boxes ``(N, k + r, 4)`` (normalised ``cx, cy, w, h``): the
    teacher's ``k`` most confident final boxes and ``r`` boxes drawn uniformly (centres in [0.05, 0.95], sides in
    [0.05, 0.5]) — redrawn every step."""
    n, q = t_boxes.shape[:2]
    idx = t_logits.sigmoid().amax(-1).topk(min(k, q), dim=1).indices
    top = t_boxes.gather(1, idx[..., None].expand(-1, -1, 4))
    rnd = torch.rand(n, r, 4, device=t_boxes.device)
    rnd = torch.cat([rnd[..., :2] * 0.9 + 0.05, rnd[..., 2:] * 0.45 + 0.05], -1)
    return torch.cat([top, rnd], 1).clamp(1e-4, 1 - 1e-4)


def decode_queries(head: nn.Module, x: list[torch.Tensor], boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an RT-DETR head's decoder on given reference boxes (``(N, K, 4)``, normalised): each query's content is
    the encoder feature at the anchor nearest its box (how RT-DETR forms its own queries; the learnt embeddings
    where the model uses those). Returns ``(L, N, K, 4)`` boxes and ``(L, N, K, nc)`` logits (L = 1 in eval mode)."""
    from ultralytics.nn.modules.utils import inverse_sigmoid

    feats, shapes = head._get_encoder_input(x)
    if head.dynamic or head.shapes != shapes:
        head.anchors, head.valid_mask = head._generate_anchors(shapes, feats)
        head.shapes = shapes
    n, k = boxes.shape[:2]
    if head.learnt_init_query:
        content = head.tgt_embed.weight[:k].unsqueeze(0).repeat(n, 1, 1)
    else:
        features = head.enc_output(head.valid_mask * feats)                        # N, HW, hd
        anchors = head.anchors.sigmoid()[0]                                         # HW, 4 (invalid: 1)
        nearest = torch.cdist(boxes.reshape(-1, 4), anchors, p=1).argmin(-1).view(n, k)
        content = features.gather(1, nearest[..., None].expand(-1, -1, features.shape[-1])).detach()
    return head.decoder(content, inverse_sigmoid(boxes), feats, shapes, head.dec_bbox_head, head.dec_score_head,
                        head.query_pos_head, attn_mask=None)


TEACHER_DETECTIONS = 100   # a YOLO teacher's top detections per image that the student's queries are matched to
TEACHER_MIN_SCORE = 0.01   # below this a detection weighs (almost) nothing in the loss: not worth matching
TEACHER_NMS_IOU = 0.7


def teacher_detections(y: torch.Tensor, hw) -> dict:
    """A YOLO teacher's final detections as DETR "queries" per image: boxes normalised ``cx, cy, w, h`` and per-class
    logits, after class-aware NMS, the best :data:`TEACHER_DETECTIONS` scoring at least :data:`TEACHER_MIN_SCORE`.
    ``y`` is kdctl's dense layout ``(N, 4 + nc, K)`` (boxes ``cx, cy, w, h`` in pixels, class probabilities), as
    :func:`~kdctl.detectors.yolo.final_detections` gives it for any YOLO head (an end-to-end head's rows one-hot)."""
    from torchvision.ops import batched_nms

    h, w = (float(v) for v in hw)
    scale = y.new_tensor([w, h, w, h])
    boxes_out, logits_out = [], []
    for yi in y:
        cxcywh, probs = yi[:4].T, yi[4:].T
        conf, cls = probs.max(1)
        cand = (conf >= TEACHER_MIN_SCORE).nonzero().flatten()
        cand = cand[conf[cand].argsort(descending=True)[:10 * TEACHER_DETECTIONS]]
        xyxy = torch.cat([cxcywh[cand, :2] - cxcywh[cand, 2:] / 2, cxcywh[cand, :2] + cxcywh[cand, 2:] / 2], 1)
        keep = cand[batched_nms(xyxy, conf[cand], cls[cand], TEACHER_NMS_IOU)[:TEACHER_DETECTIONS]]
        boxes_out.append(cxcywh[keep] / scale)
        logits_out.append(torch.logit(probs[keep].clamp(1e-4, 1 - 1e-4)))
    return {"boxes": boxes_out, "logits": logits_out}


class KDRTDETRTrainer(KDTrainer, RTDETRTrainer):
    """Ultralytics' RT-DETR trainer (its dataset, validator, denoising) with the student built as a
    :class:`KDRTDETRModel` and the frozen teacher attached, as :class:`~kdctl.detectors.yolo.KDTrainer` does for
    YOLO."""

    kd_model = KDRTDETRModel


def trainer(overrides: dict, callbacks=None, distill=None):
    """Ultralytics' RT-DETR trainer; with ``distill`` (a ``DistillSetup``) the student learns from the teacher too."""
    if distill is not None:
        return KDRTDETRTrainer(overrides=overrides, distill=distill, callbacks=callbacks)
    return RTDETRTrainer(overrides=overrides, _callbacks=callbacks)


def plain_student(model: nn.Module) -> nn.Module:
    """The student alone: an ``RTDETRDetectionModel`` with the same weights, without KD criterion and adapters."""
    from kdctl.detectors import yolo

    model = model.float()
    if not isinstance(model, KDRTDETRModel):
        return model.eval()
    return yolo.plain_student(model, RTDETRDetectionModel)  # the same, QAT quantizers included


def export_module(model: nn.Module, imgsz: int, batch: int = 1, *, dynamic: bool = False,
                  fmt: str = "onnx") -> tuple[nn.Module, torch.Tensor]:
    """A copy ready to trace: BatchNorm folded, the dense output, no gradients; anchors built for ``imgsz``."""
    from kdctl.detectors import traceable_copy

    net = DenseOutput(traceable_copy(model)).eval()
    x = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        net(x)
    return net, x


def float_tail(nodes: list[tuple[str, str | None]], model: nn.Module) -> list[str]:
    """Graph nodes INT8 quantization leaves in float: the whole transformer decoder (query selection, deformable
    attention, box refinement), where INT8 costs accuracy out of proportion to its share of the time; the CNN
    backbone and neck are quantized. ``nodes`` are (name, op type) of an ONNX graph or OpenVINO names."""
    from kdctl.detectors.yolo import _module_path

    head = f"model.{len(model.model) - 1}"
    out = []
    for name, _op in nodes:
        path = _module_path(name)
        if path.startswith("model.model."):  # traced through DenseOutput: model.model.<i>
            path = path[len("model."):]
        if path == head or path.startswith(head + ".") or not path.startswith("model."):
            out.append(name)  # the decoder, and DenseOutput's own arithmetic
    return out
