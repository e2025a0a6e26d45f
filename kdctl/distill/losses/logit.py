"""Head-level losses on the dense outputs of YOLO-style heads.

Inputs are the head's raw training outputs: ``scores`` (N, nc, A) class logits (sigmoid, one per class, as in
YOLOv8/11) and ``boxes`` (N, 4·reg_max, A) box-side distribution logits (DFL). Teacher and student must share
the anchor grid (same strides and input size) and the class list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdctl.distill.losses.registry import register_loss, weighted_mean


def _anchor_mean(per_anchor: torch.Tensor, t_scores: torch.Tensor, conf_weight: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (N, A), or weighted by the teacher's top class probability so confident regions dominate; ``mask``
    (N, A) keeps only the anchors where the teacher's output is known (a teacher cache's stored anchors)."""
    if not conf_weight:
        return per_anchor.mean() if mask is None else weighted_mean(per_anchor, mask.float())
    w = t_scores.sigmoid().amax(1)
    if mask is not None:
        w = w * mask.float()
    return weighted_mean(per_anchor, w)


class HeadLoss(nn.Module):
    uses_boxes = False  # True: needs the two heads' box distributions (DFL bins) to match too

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        if s["scores"].shape != t["scores"].shape:
            raise ValueError(f"head outputs differ: student scores {tuple(s['scores'].shape)} vs teacher "
                             f"{tuple(t['scores'].shape)}; head-level KD needs the same classes and anchor grid")
        with torch.autocast(device_type=s["scores"].device.type, enabled=False):
            tt = {k: v.float() for k, v in t.items() if k in ("scores", "boxes")}
            if t.get("mask") is not None:  # from a teacher cache: where the teacher's boxes are known
                tt["mask"] = t["mask"]
            ss = {k: v.float() for k, v in s.items() if k in ("scores", "boxes", "pos_weight")}
            if s.get("vlr") is not None:  # the student's own label assignment (LD's distillation regions)
                ss["vlr"] = s["vlr"]
            return self.compute(ss, tt)


@register_loss("kd_logit", levels=("head", "logit"), kind="head")
class SigmoidLogitDistillation(HeadLoss):
    """Distilling the Knowledge in a Neural Network (Hinton et al., 2015), for per-class sigmoid detection heads.

    For every anchor and class, the binary KL between ``sigmoid(t/T)`` and ``sigmoid(s/T)``, times ``T²``, summed
    over classes and averaged over anchors — or, with ``conf_weight``, averaged with the teacher's top class
    probability as the weight (the teacher-confidence variant).

    Why ``T²`` for sigmoid scores too: ``∂/∂s = T·(σ(s/T) − σ(t/T))`` and ``σ(s/T) − σ(t/T) ≈ (s − t)/(4T)`` once
    ``T`` is large, so the gradient tends to ``(s − t)/4`` whatever ``T`` is, as in Hinton et al.'s softmax case;
    without it, raising ``T`` would shrink the KD gradient as ``1/T²`` (tested).
    """

    def __init__(self, temperature: float = 2.0, conf_weight: bool = False):
        super().__init__()
        self.temperature, self.conf_weight = temperature, conf_weight

    def compute(self, s, t):
        T = self.temperature
        ps_log, ps_log_neg = F.logsigmoid(s["scores"] / T), F.logsigmoid(-s["scores"] / T)
        pt_log, pt_log_neg = F.logsigmoid(t["scores"] / T), F.logsigmoid(-t["scores"] / T)
        pt = pt_log.exp()
        kl = pt * (pt_log - ps_log) + (1 - pt) * (pt_log_neg - ps_log_neg)   # N, nc, A
        return _anchor_mean(kl.sum(1), t["scores"], self.conf_weight) * T * T


@register_loss("ld", levels=("head", "logit"), kind="head")
class LocalizationDistillation(HeadLoss):
    """Localization Distillation for Dense Object Detection (Zheng et al., CVPR 2022).

    Each box side is a distribution over ``reg_max`` bins (DFL); per anchor the loss is ``T² · KL(softmax(t/T) ‖
    softmax(s/T))`` with the pointwise KL averaged over the bins (as mmdet's and PaddleDetection's
    ``KnowledgeDistillationKLDivLoss`` reduce it), then over the four sides. Where it is taken:

    - ``positives: true`` — the paper's regions. The *main distillation region* is the student's positives as its
      own task loss assigned them this batch (YOLOv8/11's task-aligned assigner), each weighted by its target score,
      as the DFL term it shadows is; the *valuable localisation region* is the rest of the assigner's candidate
      region (anchor points inside a ground-truth box). The loss is the weighted mean over the first plus
      ``vlr_weight`` times the mean over the second (0.25, as the reference implementation divides the first
      region's sum by 4 and the second's by 16). Anchors a teacher cache did not keep are left out of both; a batch
      without ground truth gives 0.
    - ``positives: false`` — every anchor, weighted by the teacher's confidence when ``conf_weight`` is set (needs
      neither ground truth nor an assigner).
    """

    uses_boxes = True

    def __init__(self, temperature: float = 10.0, conf_weight: bool = True, positives: bool = False,
                 vlr_weight: float = 0.25):
        super().__init__()
        self.temperature, self.conf_weight = temperature, conf_weight
        self.positives, self.vlr_weight = positives, vlr_weight

    @property
    def uses_assignment(self) -> bool:
        return self.positives

    def compute(self, s, t):
        n, c, a = s["boxes"].shape
        T = self.temperature
        ls = F.log_softmax(s["boxes"].view(n, 4, c // 4, a) / T, dim=2)
        lt = F.log_softmax(t["boxes"].view(n, 4, c // 4, a) / T, dim=2)
        kl = (lt.exp() * (lt - ls)).mean(2).mean(1) * T * T                 # N, A
        if not self.positives:
            return _anchor_mean(kl, t["scores"], self.conf_weight, t.get("mask"))
        known = t["mask"].float() if t.get("mask") is not None else torch.ones_like(kl)
        return (weighted_mean(kl, s["pos_weight"] * known)
                + self.vlr_weight * weighted_mean(kl, s["vlr"].float() * known))
