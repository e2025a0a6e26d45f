"""RPN- and RoI-level losses for two-stage detectors (torchvision's Faster R-CNN).

``rpn`` losses take the RPN head's outputs of both models, ``{"objectness": [(N, A, H, W)] per level,
"deltas": [(N, 4A, H, W)] per level}``: they need the same anchor layout (levels, anchors per location, map sizes).

``roi`` losses take what the RoI head saw on the **student's** sampled proposals: for the student
``class_logits`` (R, C + 1, background first), ``box_regression`` (R, 4·(C + 1)), the sampler's ``labels`` (R,)
(0 = background) and ``regression_targets`` (R, 4), and the RoI-pooled features ``pooled`` (R, Cs, 7, 7); for the
teacher the same ``class_logits``, ``box_regression`` and ``pooled`` from running its own RoI head on those
proposals (rescaled to its input when it differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdctl.distill.losses.feature import Align
from kdctl.distill.losses.registry import register_loss, weighted_mean


def _fp32(d: dict) -> dict:
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                [x.float() for x in v] if isinstance(v, list) else v) for k, v in d.items()}


def check_rpn_layouts(s: dict, t: dict) -> None:
    """Raise ``ValueError`` (one line) unless both RPN heads predict at the same anchors."""
    ss = [tuple(o.shape[1:]) for o in s["objectness"]]
    ts = [tuple(o.shape[1:]) for o in t["objectness"]]
    if ss != ts:
        raise ValueError(f"the RPN anchor layouts differ (student (anchors, H, W) per level {ss}, teacher {ts}), so "
                         "RPN-level KD has no anchor pairs; distill at the RoI level instead (roi_kd, roi_crosskd, "
                         "roi_mimic)")


def _per_image_mean(per_anchor: torch.Tensor) -> torch.Tensor:
    return per_anchor.flatten(1).mean(1).mean() if per_anchor.numel() else per_anchor.sum()


@register_loss("rpn_kd", levels=("rpn",), kind="rpn")
class RPNDistillation(nn.Module):
    """RPN-level distillation after Chen et al., "Learning Efficient Object Detection Models with Knowledge
    Distillation" (NeurIPS 2017): the student's objectness learns the teacher's soft objectness, and its box deltas
    the teacher's where the teacher sees an object.

    Objectness: per anchor the binary KL ``T²·[p log(p/q) + (1−p) log((1−p)/(1−q))]`` with ``p = σ(t/T)``,
    ``q = σ(s/T)`` — the soft binary cross-entropy against the teacher's objectness less its own entropy (a
    constant), so it is 0 at a perfect match; averaged over all anchors of all levels. Box deltas:
    ``box_weight · Σ_a σ(t_a)·‖d_s,a − d_t,a‖² / Σ_a σ(t_a)`` (squared error summed over the 4 deltas, weighted by the
    teacher's objectness at T = 1). Both models must predict at the same anchors.
    """

    def __init__(self, temperature: float = 1.0, box_weight: float = 1.0):
        super().__init__()
        self.temperature, self.box_weight = temperature, box_weight

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        check_rpn_layouts(s, t)
        with torch.autocast(device_type=s["objectness"][0].device.type, enabled=False):
            s, t = _fp32(s), _fp32(t)
            T = self.temperature
            so = torch.cat([o.flatten(1) for o in s["objectness"]], 1)      # N, anchors
            to = torch.cat([o.flatten(1) for o in t["objectness"]], 1)
            p_log, p_log_neg = F.logsigmoid(to / T), F.logsigmoid(-to / T)
            q_log, q_log_neg = F.logsigmoid(so / T), F.logsigmoid(-so / T)
            p = p_log.exp()
            kl = (p * (p_log - q_log) + (1 - p) * (p_log_neg - q_log_neg)).mean() * T * T
            if not self.box_weight:
                return kl

            def deltas(maps):  # (N, 4A, H, W) per level -> (N, anchors, 4) in the objectness order
                out = []
                for d in maps:
                    n, a4, h, w = d.shape
                    out.append(d.view(n, a4 // 4, 4, h, w).permute(0, 1, 3, 4, 2).reshape(n, -1, 4))
                return torch.cat(out, 1)

            w = torch.sigmoid(to)
            se = (deltas(s["deltas"]) - deltas(t["deltas"])).pow(2).sum(-1)
            return kl + self.box_weight * weighted_mean(se, w)


def _class_weights(n_classes: int, background_weight: float, like: torch.Tensor) -> torch.Tensor:
    w = torch.ones(n_classes, dtype=like.dtype, device=like.device)
    w[0] = background_weight
    return w


def _class_boxes(box_regression: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The 4 regression values each RoI predicts for its class ``cls`` (R,) from (R, 4·(C + 1))."""
    r = box_regression.view(box_regression.shape[0], -1, 4)
    return r[torch.arange(r.shape[0], device=r.device), cls]


@register_loss("roi_kd", levels=("roi",), kind="roi")
class RoIDistillation(nn.Module):
    """RoI-level distillation of Chen et al. (NeurIPS 2017) on the student's sampled proposals, the teacher's RoI
    head run on the same proposals.

    Classification: the class-weighted soft cross-entropy ``−Σ_c w_c·p_c·log q_c`` with ``p = softmax(t/T)``,
    ``q = softmax(s/T)``, ``w_0 = background_weight`` (1.5 in the paper: the background class dominates the
    proposals) and ``w_c = 1`` otherwise, times ``T²``, averaged over RoIs. (Not the weighted KL: with unequal
    weights that can go negative, which no auto-balance can scale.) Regression: the
    teacher-bounded L2 loss ``L_b = ‖R_s − y‖²`` if ``‖R_s − y‖² + margin > ‖R_t − y‖²`` else 0, on the foreground
    RoIs with ``R`` each model's regression for the RoI's ground-truth class and ``y`` the sampler's regression
    target, averaged over foreground RoIs and weighted by ``bound_weight`` (ν = 0.5 in the paper).
    """

    def __init__(self, temperature: float = 1.0, background_weight: float = 1.5, bound_weight: float = 0.5,
                 margin: float = 0.0):
        super().__init__()
        self.temperature, self.background_weight = temperature, background_weight
        self.bound_weight, self.margin = bound_weight, margin

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        with torch.autocast(device_type=s["class_logits"].device.type, enabled=False):
            s, t = _fp32(s), _fp32(t)
            T = self.temperature
            ls, lt = F.log_softmax(s["class_logits"] / T, 1), F.log_softmax(t["class_logits"] / T, 1)
            w = _class_weights(ls.shape[1], self.background_weight, ls)
            cls = -(w * lt.exp() * ls).sum(1).mean() * T * T
            fg = s["labels"] > 0
            if not self.bound_weight or not bool(fg.any()):
                return cls + 0.0 * s["box_regression"].sum()
            y = s["regression_targets"][fg]
            es = (_class_boxes(s["box_regression"][fg], s["labels"][fg]) - y).pow(2).sum(1)
            et = (_class_boxes(t["box_regression"][fg], s["labels"][fg]) - y).pow(2).sum(1)
            bounded = torch.where(es + self.margin > et, es, torch.zeros_like(es))
            return cls + self.bound_weight * bounded.mean()


@register_loss("roi_crosskd", levels=("roi",), kind="roi")
class RoICrossKD(nn.Module):
    """The CrossKD-style RoI prediction mimic (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object
    Detection", CVPR 2024, whose two-stage setting uses KL at T = 3 weighted 0.5 and L1 weighted 1), on the
    student's sampled proposals with the teacher's RoI head run on them.

    ``cls_weight · T² · mean_r KL(softmax(t_r/T) ‖ softmax(s_r/T))`` plus
    ``box_weight · Σ_r m_r·|R_s,r − R_t,r|₁ / Σ_r m_r``, where ``R`` is each model's regression for the teacher's most
    likely foreground class of the RoI and ``m_r`` that class's teacher probability (T = 1): boxes the teacher is
    sure of dominate.
    """

    def __init__(self, temperature: float = 3.0, cls_weight: float = 0.5, box_weight: float = 1.0):
        super().__init__()
        self.temperature, self.cls_weight, self.box_weight = temperature, cls_weight, box_weight

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        with torch.autocast(device_type=s["class_logits"].device.type, enabled=False):
            s, t = _fp32(s), _fp32(t)
            T = self.temperature
            ls, lt = F.log_softmax(s["class_logits"] / T, 1), F.log_softmax(t["class_logits"] / T, 1)
            cls = (lt.exp() * (lt - ls)).sum(1).mean() * T * T
            pt = F.softmax(t["class_logits"], 1)[:, 1:]
            m, c = pt.max(1)
            l1 = (_class_boxes(s["box_regression"], c + 1) - _class_boxes(t["box_regression"], c + 1)).abs().sum(1)
            return self.cls_weight * cls + self.box_weight * weighted_mean(l1, m)


@register_loss("roi_mimic", levels=("roi",), kind="roi")
class RoIFeatureMimic(nn.Module):
    """Mimicking Very Efficient Network for Object Detection (Li et al., CVPR 2017): the student's RoI-pooled
    features on its sampled proposals imitate the teacher's pooled on the same proposals,
    ``½·mean_r mean_(c,i,j) (a(s_r) − t_r)²`` — the paper's ``1/(2N) Σ_r ‖a(s_r) − t_r‖²`` divided by the feature
    size, with ``a`` a trainable 1×1 convolution when the channel counts differ (the paper's adaptation layer).
    Features only: a teacher of other classes than the student's teaches it as well."""

    class_free = True  # no class scores are compared (the RoI-level check of equal classes does not apply)

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.align = Align(s_channels, t_channels)

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        with torch.autocast(device_type=s["pooled"].device.type, enabled=False):
            ps, pt = s["pooled"].float(), t["pooled"].float()
            if not ps.shape[0]:
                return ps.sum()
            return 0.5 * (self.align(ps, pt) - pt).pow(2).mean()
