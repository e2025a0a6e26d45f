"""Prediction-level distillation from the teacher's final detections, for any teacher family (YOLO, RT-DETR,
Faster R-CNN) and a dense (YOLO) student: the teacher's boxes and class probabilities become soft targets of the
student's own detection loss."""

from __future__ import annotations

import torch
from torch import nn

from kdctl.distill.losses.registry import register_loss

MAX_DETECTIONS = 100  # per image: what the teacher keeps after NMS, at most
NMS_IOU = 0.7


def pseudo_labels(dense: torch.Tensor, imgsz_hw, min_score: float) -> list[dict]:
    """A teacher's final output in kdctl's dense layout ``(N, 4 + nc, K)`` (boxes ``cx, cy, w, h`` in input pixels,
    class probabilities) -> per image ``{"boxes": (M, 4) cx, cy, w, h normalised, "probs": (M, nc)}``: class-agnostic
    NMS at IoU 0.7 (one target per object, carrying the teacher's whole class distribution), boxes whose best class
    probability is at least ``min_score``, at most 100 per image, most confident first."""
    from torchvision.ops import nms

    h, w = (float(v) for v in imgsz_hw)
    scale = dense.new_tensor([w, h, w, h])
    out = []
    for d in dense.detach().float():
        boxes, probs = d[:4].T, d[4:].T
        conf = probs.amax(1)
        keep = ((conf >= min_score) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)).nonzero().flatten()
        xyxy = torch.cat([boxes[keep, :2] - boxes[keep, 2:] / 2, boxes[keep, :2] + boxes[keep, 2:] / 2], 1)
        keep = keep[nms(xyxy, conf[keep], NMS_IOU)[:MAX_DETECTIONS]]
        out.append({"boxes": (boxes[keep] / scale).clamp(0, 1), "probs": probs[keep].clamp(0, 1)})
    return out


class SoftTargets:
    """While open, the student's task-aligned assigner hands out the teacher's soft targets: on each positive anchor
    the assigner's target score (its normalised alignment with the box it was given, one-hot in that box's class)
    becomes that score times the teacher's class probabilities for the box, ``t·p_d``. A box the teacher holds at
    0.3 teaches 0.3, and the other classes the teacher saw in it teach too; the box and DFL terms, which the loss
    weights by the summed target score, weigh each box by the teacher's confidence in the same way."""

    def __init__(self, assigner: nn.Module, probs: torch.Tensor):
        self.assigner, self.probs = assigner, probs  # probs: (N, M, nc), in the order of the padded targets

    def _hook(self, _module, _args, output):
        labels, bboxes, scores, fg, gt_idx = output
        nc = self.probs.shape[-1]
        p = self.probs.gather(1, gt_idx.clamp(max=max(0, self.probs.shape[1] - 1))[..., None].expand(-1, -1, nc)) \
            if self.probs.shape[1] else torch.zeros_like(scores)
        soft = scores.sum(-1, keepdim=True) * p.to(scores.dtype) * fg[..., None].to(scores.dtype)
        return labels, bboxes, soft, fg, gt_idx

    def __enter__(self):
        self._handle = self.assigner.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def pseudo_batch(labels: list[dict], device) -> tuple[dict, torch.Tensor]:
    """Ultralytics' target layout for these pseudo-labels (``batch_idx``, ``cls``: each box's most likely class,
    ``bboxes``: normalised ``cx, cy, w, h``) and their class probabilities padded to ``(N, M, nc)`` in the order the
    loss pads its targets (image by image, in the given order)."""
    n = len(labels)
    nc = labels[0]["probs"].shape[1] if n else 0
    m = max((len(x["boxes"]) for x in labels), default=0)
    probs = torch.zeros(n, m, nc, device=device)
    idx, cls, boxes = [], [], []
    for i, x in enumerate(labels):
        k = len(x["boxes"])
        probs[i, :k] = x["probs"].to(device)
        idx.append(torch.full((k,), float(i), device=device))
        cls.append(x["probs"].argmax(1).float().to(device) if k else torch.zeros(0, device=device))
        boxes.append(x["boxes"].to(device))
    batch = {"batch_idx": torch.cat(idx) if idx else torch.zeros(0, device=device),
             "cls": (torch.cat(cls) if cls else torch.zeros(0, device=device)).view(-1, 1),
             "bboxes": torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)}
    return batch, probs


@register_loss("det_kd", levels=("logit",), kind="detections")
class TeacherDetectionKD(nn.Module):
    """Prediction-level KD from the teacher's final detections as soft targets (Chen et al., "Learning Efficient
    Object Detection Models with Knowledge Distillation", NeurIPS 2017, distil the teacher's final outputs;
    Teach-DETR, Huang et al., ICCV 2023, takes a teacher's boxes as extra training targets whatever its family):
    the teacher's detections after class-agnostic NMS (best class probability ≥ ``min_score``) are given to the
    student's own detection loss as targets, assigned by the student's task-aligned assigner, with soft class
    targets ``t·p_d`` (:class:`SoftTargets`), so the loss is the student's task loss with the teacher as the
    annotator: ``box·(1 − CIoU) + cls·BCE + dfl·DFL``, Ultralytics' gains. Works across families (a Faster R-CNN
    or RT-DETR teacher and a YOLO student), the teacher's and the student's classes must be the same. 0 where the
    teacher keeps nothing but BCE towards background."""

    def __init__(self, min_score: float = 0.1):
        super().__init__()
        self.min_score = min_score

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        """``s``: ``{"preds": the student head's training output, "criterion": its detection loss}``; ``t``:
        ``{"dense": the teacher's final output (N, 4 + nc, K)}``."""
        crit = getattr(s["criterion"], "one2many", s["criterion"])  # an end-to-end head: its one-to-many branch
        preds = s["preds"][1] if isinstance(s["preds"], tuple) else s["preds"]  # (inference, training outputs)
        preds = preds.get("one2many", preds)
        imgsz = preds["feats"][0].shape[2:]
        hw = [int(v * crit.stride[0]) for v in imgsz]
        labels = pseudo_labels(t["dense"], hw, self.min_score)
        batch, probs = pseudo_batch(labels, preds["scores"].device)
        with SoftTargets(crit.assigner, probs):
            _, loss, _ = crit.get_assigned_targets_and_loss(preds, batch)
        return loss.sum()
