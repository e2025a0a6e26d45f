"""Head-level losses on the dense outputs of YOLO-style heads.

Inputs are the head's raw training outputs: ``scores`` (N, nc, A) class logits (sigmoid, one per class, as in
YOLOv8/11) and ``boxes`` (N, 4·reg_max, A) box-side distribution logits (DFL). Teacher and student must share
the anchor grid (same strides and input size) and the class list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdctl.distill.losses.feature import channel_standardise
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


def sigmoid_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """(N, A): per anchor, the binary KL between ``sigmoid(t/T)`` and ``sigmoid(s/T)`` summed over the classes of
    (N, nc, A) logits, times ``T²``."""
    ps_log, ps_log_neg = F.logsigmoid(s / T), F.logsigmoid(-s / T)
    pt_log, pt_log_neg = F.logsigmoid(t / T), F.logsigmoid(-t / T)
    pt = pt_log.exp()
    return (pt * (pt_log - ps_log) + (1 - pt) * (pt_log_neg - ps_log_neg)).sum(1) * T * T


def side_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """(N, A): per anchor, ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` of (N, 4·bins, A) box-side distribution logits,
    the pointwise KL averaged over the bins, then over the four sides."""
    n, c, a = s.shape
    ls = F.log_softmax(s.view(n, 4, c // 4, a) / T, dim=2)
    lt = F.log_softmax(t.view(n, 4, c // 4, a) / T, dim=2)
    return (lt.exp() * (lt - ls)).mean(2).mean(1) * T * T


def ltrb_iou_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(N, A): ``1 − IoU`` of the boxes drawn around each anchor point by (N, 4, A) left, top, right, bottom distances
    (the raw box outputs of a reg_max=1 head, YOLO26's: no bins), distances under 0 read as 0 as FCOS clamps its
    own. Both boxes hold the anchor point, so they overlap by the smaller distance on each side. The IoU loss that the
    CrossKD reference puts on heads regressing boxes directly (its FCOS configuration), in its linear form."""
    s, t = s.clamp(min=0), t.clamp(min=0)
    inter = (torch.minimum(s[:, 0], t[:, 0]) + torch.minimum(s[:, 2], t[:, 2])) * \
        (torch.minimum(s[:, 1], t[:, 1]) + torch.minimum(s[:, 3], t[:, 3]))
    union = (s[:, 0] + s[:, 2]) * (s[:, 1] + s[:, 3]) + (t[:, 0] + t[:, 2]) * (t[:, 1] + t[:, 3]) - inter
    return 1 - inter / union.clamp(min=eps)


def align_channels(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``s`` (N, C, H, W) standardised per channel over the batch and positions, then given ``t``'s per-channel
    mean and standard deviation (same C): maps on the scale the layers that read ``t`` expect."""
    t = t.detach()
    return channel_standardise(s) * t.std((0, 2, 3), keepdim=True, correction=0) + t.mean((0, 2, 3), keepdim=True)


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
        return _anchor_mean(sigmoid_kl(s["scores"], t["scores"], self.temperature), t["scores"], self.conf_weight)


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
        kl = side_kl(s["boxes"], t["boxes"], self.temperature)              # N, A
        if not self.positives:
            return _anchor_mean(kl, t["scores"], self.conf_weight, t.get("mask"))
        known = t["mask"].float() if t.get("mask") is not None else torch.ones_like(kl)
        return (weighted_mean(kl, s["pos_weight"] * known)
                + self.vlr_weight * weighted_mean(kl, s["vlr"].float() * known))


@register_loss("crosskd", levels=("neck",), kind="cross_head")
class CrossHeadDistillation(nn.Module):
    """CrossKD: Cross-Head Knowledge Distillation for Object Detection (Wang et al., CVPR 2024), for dense YOLO heads.

    The student's neck maps (the inputs of its detection head, level by level; each mapped to the teacher's channels
    by a 1×1 convolution where they differ) go through the teacher's frozen head, and what the teacher's head predicts
    from them is distilled towards what it predicts from its own maps: per anchor, the class scores' binary KL at
    ``temperature`` (summed over classes, × T², as ``kd_logit``) plus ``box_weight`` times the box-side
    distributions' KL at ``box_temperature`` (averaged over bins and sides, × T², as ``ld``); averaged over anchors,
    weighted by the teacher's top class probability with ``conf_weight``. A teacher head without bins (reg_max=1,
    YOLO26) has its boxes compared by ``1 − IoU`` (:func:`ltrb_iou_loss`) in place of the side KL. With ``align``
    (the reference implementation's way to hand a student's maps to a teacher head of the same width, without an
    adapter), each adapted map is standardised per channel and given the per-channel mean and spread of the teacher's
    map at that level before the teacher's head reads it; off by default, since the adapter learns that mapping
    (measured both ways in docs/benchmarks.md, "CrossKD at the neck"). The gradient reaches the student's backbone
    and neck through the teacher's head (whose weights stay as they are); the student's own head learns from
    the task loss alone, so imitation never pulls on the predictions the student is scored on, the conflict the
    paper names in prediction mimicking. Both heads need the same classes; the student's box outputs are never read,
    so its DFL bins need not be the teacher's. With a P2 or P6 model on one side the levels both have are paired by
    map size and the teacher's outputs read at those levels' anchors.
    """

    uses_boxes = False  # the teacher head's boxes on both sides: the two heads' bins need not match

    def __init__(self, s_channels: list[int], t_channels: list[int], temperature: float = 2.0,
                 box_temperature: float = 10.0, box_weight: float = 1.0, conf_weight: bool = True, align: bool = False):
        super().__init__()
        self.temperature, self.box_temperature = temperature, box_temperature
        self.box_weight, self.conf_weight, self.align = box_weight, conf_weight, align
        self.adapters = nn.ModuleList(nn.Identity() if s == t else nn.Conv2d(s, t, 1, bias=False)
                                      for s, t in zip(s_channels, t_channels))
        # (student levels, teacher levels) paired by map size, one adapter each; None: level i to level i, all of them
        self.levels: tuple[list[int], list[int]] | None = None

    def cross_outputs(self, feats: list[torch.Tensor], head: nn.Module,
                      t_feats: list[torch.Tensor] | None = None) -> dict:
        """The teacher head's raw outputs (``scores`` N×nc×A, ``boxes`` N×4·bins×A over the paired levels' anchors, in
        the teacher's level order) from the student head's input maps; its one-to-many branch for an end-to-end head,
        the branch head-level KD reads. With ``t_feats`` (the teacher's own maps), each adapted map is first
        standardised per channel and given the teacher map's per-channel mean and spread."""
        s_levels, t_levels = self.levels or (range(len(feats)), range(len(feats)))
        maps = [a(feats[j]) for a, j in zip(self.adapters, s_levels)]
        if t_feats is not None:
            maps = [align_channels(m, t_feats[i]) for m, i in zip(maps, t_levels)]
        branch = head.one2many
        if branch["box_head"] is None or branch["cls_head"] is None:
            raise ValueError("the teacher's head has no one-to-many branch left (fused for inference)")
        return {k: torch.cat([branch[part][i](m).flatten(2) for i, m in zip(t_levels, maps)], 2)
                for k, part in (("boxes", "box_head"), ("scores", "cls_head"))}

    def forward(self, feats: list[torch.Tensor], t: dict, ctx) -> torch.Tensor:
        from kdctl.distill.taps import detect_head

        if ctx is None or getattr(ctx, "teacher", None) is None:
            raise ValueError("crosskd needs the teacher's head: no teacher was given with this batch")
        if self.align and t.get("feats") is None:
            raise ValueError("crosskd with align: true needs the teacher's own maps, and a teacher cache keeps only "
                             "its outputs; set align: false to distill from the cache")  # cache.check_recipe says so
        cross = self.cross_outputs(feats, detect_head(ctx.teacher), t["feats"] if self.align else None)
        with torch.autocast(device_type=feats[0].device.type, enabled=False):
            ts, cb, tb = t["scores"].float(), cross["boxes"].float(), t["boxes"].float()
            box = side_kl(cb, tb, self.box_temperature) if tb.shape[1] > 4 else ltrb_iou_loss(cb, tb)
            per_anchor = sigmoid_kl(cross["scores"].float(), ts, self.temperature) + self.box_weight * box
            # a teacher cache's mask: the anchors whose teacher outputs it kept
            return _anchor_mean(per_anchor, ts, self.conf_weight, t.get("mask"))
