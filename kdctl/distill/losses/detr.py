"""Logit-level distillation for DETR-family detectors (Ultralytics RT-DETR).

``detr`` losses take the decoder's predictions: for the student every decoder layer's, ``{"boxes": (L, N, Q, 4),
"logits": (L, N, Q, nc)}``, and for the teacher its final layer's, ``{"boxes": (N, Qt, 4), "logits": (N, Qt, nc)}``
(or per-image lists of ``(Qt_n, ...)``: a YOLO teacher's detections after NMS, Teach-DETR's setting);
boxes are normalised ``cx, cy, w, h``, logits per class (sigmoid, as RT-DETR's varifocal head), denoising queries
already split off (they are never matched).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdctl.distill.losses.registry import register_loss, weighted_mean


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al., 2019) of xyxy boxes ``a`` (P, 4) and ``b`` (R, 4) -> (P, R)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def _binary_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-class ``p log(p/q) + (1−p) log((1−p)/(1−q))`` with ``p = σ(t/T)``, ``q = σ(s/T)`` (broadcasting)."""
    p_log, p_log_neg = F.logsigmoid(t_logits / T), F.logsigmoid(-t_logits / T)
    q_log, q_log_neg = F.logsigmoid(s_logits / T), F.logsigmoid(-s_logits / T)
    p = p_log.exp()
    return p * (p_log - q_log) + (1 - p) * (p_log_neg - q_log_neg)


def hungarian(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(cost.detach().cpu().numpy())


@register_loss("detr_logit", levels=("logit",), kind="detr")
class DETRLogitDistillation(nn.Module):
    """Hungarian-matched logit distillation for DETR-family detectors (DETRDistill, Chang et al., ICCV 2023;
    D3ETR): each student decoder layer's queries are matched one-to-one to the teacher's final-layer queries by the
    Hungarian algorithm on ``cls_weight·C_cls + l1_weight·‖b_s − b_t‖₁ − giou_weight·GIoU(b_s, b_t)`` (1 / 5 / 2, DETR's
    matching costs), with ``C_cls`` the class-averaged binary KL between the teacher's and the student's sigmoid
    scores at temperature T. Every matched pair then contributes
    ``cls_weight·T²·mean_c KL + l1_weight·‖b_s − b_t‖₁ + giou_weight·(1 − GIoU)``, weighted by the teacher's top class
    probability (teacher queries on background count little), normalised by the weights' sum per layer and image,
    and averaged over layers and images. The teacher's intermediate layers are not used (Ultralytics' decoder
    returns only its last layer in eval mode), so every student layer learns the teacher's final answer. With a
    YOLO teacher the "queries" are its detections after NMS (Teach-DETR, Huang et al., ICCV 2023: the teacher's
    boxes as extra Hungarian-matched targets, weighted by their scores).
    """

    def __init__(self, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 temperature: float = 1.0):
        super().__init__()
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.temperature = temperature

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        t_nc = t["logits"][0].shape[-1] if len(t["logits"]) else s["logits"].shape[-1]
        if s["logits"].shape[-1] != t_nc:
            raise ValueError(f"student predicts {s['logits'].shape[-1]} classes, teacher {t_nc}; "
                             "logit-level KD needs the same classes")
        with torch.autocast(device_type=s["logits"].device.type, enabled=False):
            sb, sl = s["boxes"].float(), s["logits"].float()
            # per image: a tensor (N, Qt, ...) or a list of (Qt_n, ...) when the teacher's query count varies
            tb, tl = [b.float().detach() for b in t["boxes"]], [x.float().detach() for x in t["logits"]]
            T = self.temperature
            vals = []
            for layer in range(sb.shape[0]):
                for n in range(sb.shape[1]):
                    if not len(tb[n]):  # the teacher found nothing here: nothing to match
                        vals.append(sl[layer, n].sum() * 0.0)
                        continue
                    kl = _binary_kl(tl[n][None], sl[layer, n][:, None], T).mean(-1)     # Q, Qt
                    l1 = torch.cdist(sb[layer, n], tb[n], p=1)
                    giou = generalized_iou(_xyxy(sb[layer, n]), _xyxy(tb[n]))
                    cost = self.cls_weight * kl + self.l1_weight * l1 - self.giou_weight * giou
                    i, j = hungarian(cost)
                    i, j = torch.as_tensor(i, device=sb.device), torch.as_tensor(j, device=sb.device)
                    w = tl[n][j].sigmoid().amax(-1)
                    pair = (self.cls_weight * T * T * kl[i, j] + self.l1_weight * l1[i, j] +
                            self.giou_weight * (1 - giou[i, j]))
                    vals.append(weighted_mean(pair, w))
            return torch.stack(vals).mean()


def _giou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding cx, cy, w, h boxes (same shapes, ``(..., 4)``)."""
    a, b = _xyxy(a), _xyxy(b)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9)


@register_loss("detr_query", levels=("query",), kind="detr_query")
class DETRQueryDistillation(nn.Module):
    """Query-level DETR distillation, KD-DETR (Wang et al., "KD-DETR: Knowledge Distillation for Detection
    Transformer with Consistent Distillation Points Sampling", CVPR 2024): one set of *distillation queries* is
    decoded by both models — the teacher's ``teacher_queries`` most confident final boxes (specific sampling) plus
    ``random_queries`` boxes drawn uniformly each step (general sampling) as reference boxes, each model taking its own
    encoder feature at the nearest anchor as the content (RT-DETR's own query form) — so every query has a
    teacher answer without any matching. Per student decoder layer and query:
    ``cls_weight·T²·mean_c KL(σ(t/T) ‖ σ(s/T)) + l1_weight·‖b_s − b_t‖₁ + giou_weight·(1 − GIoU)``, weighted by the
    teacher's top class probability and normalised by the weights' sum per layer and image (the paper's foreground
    weighting), averaged over layers and images. The teacher's answer is its final decoder layer.
    """

    def __init__(self, teacher_queries: int = 30, random_queries: int = 20, cls_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, temperature: float = 1.0):
        super().__init__()
        self.teacher_queries, self.random_queries = int(teacher_queries), int(random_queries)
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.temperature = temperature

    def forward(self, s: dict, t: dict, ctx=None) -> torch.Tensor:
        with torch.autocast(device_type=s["logits"].device.type, enabled=False):
            sb, sl = s["boxes"].float(), s["logits"].float()                   # L, N, K, 4 / nc
            tb, tl = t["boxes"].float().detach(), t["logits"].float().detach()  # N, K, 4 / nc
            T = self.temperature
            kl = _binary_kl(tl[None], sl, T).mean(-1)                            # L, N, K
            l1 = (sb - tb[None]).abs().sum(-1)
            giou = _giou_pairs(sb, tb[None].expand_as(sb))
            per = self.cls_weight * T * T * kl + self.l1_weight * l1 + self.giou_weight * (1 - giou)
            w = tl.sigmoid().amax(-1)[None]                                      # 1, N, K
            return ((per * w).sum(-1) / w.sum(-1).clamp(min=1e-6)).mean()
