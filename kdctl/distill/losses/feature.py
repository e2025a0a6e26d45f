"""Feature-imitation losses for backbone and neck/FPN maps.

Every loss takes a student map ``s`` (N, Cs, Hs, Ws) and a teacher map ``t`` (N, Ct, Ht, Wt) and returns a
scalar. A student map whose channels or size differ is first aligned by the loss's own trainable adapter
(1×1 conv, bilinear resize), so the adapter is optimised with the student and dropped from the exported model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdctl.distill.losses.registry import register_loss


class Align(nn.Module):
    """1×1 conv (+BN) from student to teacher channels when they differ; resize when strides differ."""

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.proj = (nn.Identity() if s_channels == t_channels else
                     nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels)))

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.proj(s)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return s


def channel_standardise(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel to zero mean and unit variance over (N, H, W): a BatchNorm without affine parameters, as
    mmrazor's RTMDet/PP-YOLOE distillation configs put on both sides (PaddleDetection: ``normalize=True``)."""
    mean = f.mean((0, 2, 3), keepdim=True)
    var = f.var((0, 2, 3), keepdim=True, unbiased=False)
    return (f - mean) / (var + eps).sqrt()


class FeatureLoss(nn.Module):
    normalize = False  # standardise student (after its adapter) and teacher maps per channel first

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.align = Align(s_channels, t_channels)

    def forward(self, s: torch.Tensor, t: torch.Tensor, ctx=None) -> torch.Tensor:
        # Losses are computed in FP32 whatever autocast chose, so adapters and features never mix dtypes.
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, t = self.align(s.float(), t.float()), t.float()
            if self.normalize:
                s, t = channel_standardise(s), channel_standardise(t)
            return self.compute(s, t, ctx)

    def compute(self, s, t, ctx):  # pragma: no cover - abstract
        raise NotImplementedError


@register_loss("fitnet", levels=("backbone", "neck"), kind="feature")
class FitNet(FeatureLoss):
    """FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015): MSE between adapted student and teacher maps."""

    def compute(self, s, t, ctx):
        return F.mse_loss(s, t)


@register_loss("at", levels=("backbone", "neck"), kind="feature")
class AttentionTransfer(FeatureLoss):
    """Paying More Attention to Attention (Zagoruyko & Komodakis, ICLR 2017): match normalised spatial attention.

    Attention is ``mean_c |F|^p`` flattened and L2-normalised per image; the loss is the mean squared difference.
    Channel counts need not match, so no adapter is used.
    """

    def __init__(self, s_channels: int, t_channels: int, p: float = 2.0):
        super().__init__(s_channels, s_channels)  # attention is channel-free: only resize
        self.p = p

    def _attention(self, f):
        return F.normalize(f.abs().pow(self.p).mean(1).flatten(1), dim=1)

    def compute(self, s, t, ctx):
        return (self._attention(s) - self._attention(t)).pow(2).mean()


@register_loss("cwd", levels=("neck", "backbone"), kind="feature")
class ChannelWiseDistillation(FeatureLoss):
    """Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV 2021).

    Each channel is turned into a spatial distribution, ``softmax(F_c / tau)``; the loss is
    ``tau² · KL(teacher ‖ student)`` summed over positions and averaged over N·C channels.
    """

    def __init__(self, s_channels: int, t_channels: int, tau: float = 1.0, normalize: bool = False):
        super().__init__(s_channels, t_channels)
        self.tau, self.normalize = tau, normalize

    def compute(self, s, t, ctx):
        n, c = t.shape[:2]
        ls = F.log_softmax(s.flatten(2) / self.tau, dim=2)
        lt = F.log_softmax(t.flatten(2) / self.tau, dim=2)
        return (lt.exp() * (lt - ls)).sum() * self.tau ** 2 / (n * c)


@register_loss("mgd", levels=("neck", "backbone"), kind="feature")
class MaskedGenerativeDistillation(FeatureLoss):
    """Masked Generative Distillation (Yang et al., ECCV 2022).

    A random ``ratio`` of the student's positions is zeroed and a two-layer 3×3 generator must rebuild the teacher's
    full map from the rest; the loss is the MSE between generated and teacher maps. With ``normalize`` (default)
    both maps are standardised per channel first: raw neck activations are heavy-tailed (per-image mean square
    from 0.1 to 80), which makes the unnormalised loss swing 15-35x between batches.
    """

    def __init__(self, s_channels: int, t_channels: int, ratio: float = 0.65, normalize: bool = True):
        super().__init__(s_channels, t_channels)
        self.ratio, self.normalize = ratio, normalize
        self.generator = nn.Sequential(nn.Conv2d(t_channels, t_channels, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(t_channels, t_channels, 3, padding=1))

    def compute(self, s, t, ctx):
        n, _, h, w = s.shape
        keep = (torch.rand(n, 1, h, w, device=s.device) >= self.ratio).to(s.dtype)
        return F.mse_loss(self.generator(s * keep), t)


def box_masks(boxes: list[torch.Tensor], shape: tuple[int, int, int, int], stride: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground/background masks of FGD, as its reference code builds them: a box covers cells
    ``floor(x1/s) .. ceil(x2/s)`` inclusive (rows likewise), each getting ``1/area`` of that extent (largest where
    boxes overlap); the background cells share 1 in total. ``boxes[i]`` is (K, 4) xyxy in input pixels."""
    import math

    n, _, h, w = shape
    fg = torch.zeros(n, h, w)
    for i, b in enumerate(boxes):
        for x1, y1, x2, y2 in (b.detach().float().cpu() / stride).tolist():
            c1, r1, c2, r2 = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
            area = float((r2 + 1 - r1) * (c2 + 1 - c1))
            rs, cs = slice(max(r1, 0), max(min(r2 + 1, h), 0)), slice(max(c1, 0), max(min(c2 + 1, w), 0))
            fg[i, rs, cs] = torch.maximum(fg[i, rs, cs], torch.tensor(1.0 / area))
    bg = (fg == 0).float()
    bg = bg / bg.flatten(1).sum(1).clamp(min=1).view(n, 1, 1)
    return fg, bg


@register_loss("fgd", levels=("neck",), kind="feature")
class FocalGlobalDistillation(FeatureLoss):
    """Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022).

    Focal part: teacher spatial/channel attention weights the squared error separately on foreground (inside
    ground-truth boxes, weight ``alpha``) and background (``beta``), plus an L1 term tying student attention to the
    teacher's (``gamma``). Global part: the difference of GcBlock relation features (``lam``). Sums are per image,
    as in the paper, so the coefficients are the paper's. ``normalize`` (default) standardises both maps per channel
    first (see :class:`MaskedGenerativeDistillation`).
    """

    def __init__(self, s_channels: int, t_channels: int, temp: float = 0.5, alpha: float = 1e-3, beta: float = 5e-4,
                 gamma: float = 5e-4, lam: float = 5e-6, normalize: bool = True):
        super().__init__(s_channels, t_channels)
        self.temp, self.alpha, self.beta, self.gamma, self.lam = temp, alpha, beta, gamma, lam
        self.normalize = normalize
        c = t_channels
        self.context_s, self.context_t = nn.Conv2d(c, 1, 1), nn.Conv2d(c, 1, 1)
        mid = max(c // 2, 1)
        self.transform_s = nn.Sequential(nn.Conv2d(c, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(inplace=True),
                                         nn.Conv2d(mid, c, 1))
        self.transform_t = nn.Sequential(nn.Conv2d(c, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(inplace=True),
                                         nn.Conv2d(mid, c, 1))
        nn.init.zeros_(self.transform_s[-1].weight), nn.init.zeros_(self.transform_s[-1].bias)
        nn.init.zeros_(self.transform_t[-1].weight), nn.init.zeros_(self.transform_t[-1].bias)

    def attention(self, f):
        n, c, h, w = f.shape
        a = f.abs()
        spatial = h * w * F.softmax((a.mean(1).flatten(1) / self.temp), dim=1).view(n, h, w)
        channel = c * F.softmax(a.mean((2, 3)) / self.temp, dim=1)
        return spatial, channel

    def _relation(self, f, context, transform):
        n, c, h, w = f.shape
        weights = F.softmax(context(f).view(n, 1, h * w), dim=2)                 # N,1,HW
        pooled = torch.bmm(f.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)
        return f + transform(pooled)

    def compute(self, s, t, ctx):
        n = t.shape[0]
        stride = ctx.imgsz / t.shape[-1] if ctx is not None else 1.0
        boxes = ctx.boxes if ctx is not None else [torch.zeros(0, 4)] * n
        fg, bg = (m.to(t.device) for m in box_masks(boxes, tuple(t.shape), stride))
        sa_t, ca_t = self.attention(t)
        sa_s, ca_s = self.attention(s)
        weight = sa_t.unsqueeze(1) * ca_t.view(n, -1, 1, 1)                     # N,C,H,W
        err = (s - t).pow(2) * weight
        fg_loss = (err * fg.unsqueeze(1)).sum() / n
        bg_loss = (err * bg.unsqueeze(1)).sum() / n
        mask_loss = (F.l1_loss(sa_s, sa_t, reduction="sum") + F.l1_loss(ca_s, ca_t, reduction="sum")) / n
        rel = self._relation(s, self.context_s, self.transform_s) - self._relation(t, self.context_t, self.transform_t)
        global_loss = rel.pow(2).sum() / n
        return self.alpha * fg_loss + self.beta * bg_loss + self.gamma * mask_loss + self.lam * global_loss


@register_loss("pkd", levels=("neck", "backbone"), kind="feature")
class PearsonCorrelationDistillation(FeatureLoss):
    """PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient
    (Cao et al., NeurIPS 2022): MSE between per-channel standardised maps, i.e. ``1 - r`` up to a constant."""

    def compute(self, s, t, ctx):
        def standardise(f):
            c = f.shape[1]
            flat = f.transpose(0, 1).reshape(c, -1)
            return (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True, unbiased=False) + 1e-6)

        return F.mse_loss(standardise(s), standardise(t)) / 2


def fgfi_mask(boxes: list[torch.Tensor], shape: tuple, stride: float, scales=(8.0,), ratios=(0.5, 1.0, 2.0),
              psi: float = 0.5) -> torch.Tensor:
    """Fine-grained imitation mask (Wang et al., CVPR 2019) ``(N, H, W)``: for each ground-truth box, the IoU of every
    anchor at every location; locations with an anchor above ``psi`` × that box's best anchor IoU are 1 (union over
    boxes). Anchors are centred on the cells, ``scale·stride`` wide at aspect ratios ``ratios`` (h/w)."""
    n, _, h, w = shape
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride, indexing="ij")
    sizes = []
    for sc in scales:
        for r in ratios:
            side = sc * stride
            sizes.append((side / r ** 0.5, side * r ** 0.5))                     # (width, height), area side²
    wh = torch.tensor(sizes)                                                       # K, 2
    cx, cy = xs.reshape(-1, 1), ys.reshape(-1, 1)                                  # HW, 1
    anchors = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], -1)  # HW,K,4
    mask = torch.zeros(n, h * w)
    for i, b in enumerate(boxes):
        for box in b.float().reshape(-1, 4):
            lt = torch.max(anchors[..., :2], box[:2])
            rb = torch.min(anchors[..., 2:], box[2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            union = (anchors[..., 2:] - anchors[..., :2]).prod(-1) + (box[2:] - box[:2]).clamp(min=0).prod() - inter
            iou = inter / union.clamp(min=1e-9)                                    # HW, K
            best = iou.max()
            if best > 0:
                mask[i] = torch.maximum(mask[i], (iou > psi * best).any(1).float())
    return mask.view(n, h, w)


@register_loss("fgfi", levels=("neck", "backbone"), kind="feature")
class FineGrainedFeatureImitation(FeatureLoss):
    """Distilling Object Detectors with Fine-grained Feature Imitation (Wang et al., CVPR 2019): the adapted student
    map imitates the teacher's only near objects, ``L = 1/(2·N_p) Σ_(n,i,j) I_nij Σ_c (a(s)_ncij − t_ncij)²`` with the
    imitation mask ``I`` from anchor IoUs with the ground-truth boxes (:func:`fgfi_mask`, ``psi`` = 0.5) and ``N_p``
    its positive locations in the batch. The anchors are the Faster R-CNN FPN's per level by default (8× the map's
    stride, ratios 0.5/1/2); ``scale`` sets another multiple. 0 on a batch without boxes.

    ``a`` is the paper's adaptation layer, a 3×3 convolution on the student map at every level, used also when the
    channel counts match (the authors' code adapts VGG11's 512 channels to VGG16's 512; the FPN distillers built on
    it keep one 3×3 convolution per level, 256 → 256, without ReLU, since FPN maps are signed). ``adapt: false``
    leaves only the shared 1×1 projection where the counts differ (no adapter where they match): the form the
    two-stage table measured on 2026-12-04."""

    def __init__(self, s_channels: int, t_channels: int, psi: float = 0.5, scale: float = 8.0, adapt: bool = True):
        super().__init__(s_channels, t_channels)
        self.psi, self.scale = psi, scale
        if adapt:
            self.align.proj = nn.Conv2d(s_channels, t_channels, 3, padding=1)

    def compute(self, s, t, ctx):
        n = t.shape[0]
        stride = ctx.imgsz / t.shape[-1] if ctx is not None else 1.0
        boxes = ctx.boxes if ctx is not None else [torch.zeros(0, 4)] * n
        mask = fgfi_mask(boxes, tuple(t.shape), stride, scales=(self.scale,), psi=self.psi).to(t.device)
        positives = mask.sum()
        if positives == 0:
            return (s * 0).sum()
        return ((s - t).pow(2).sum(1) * mask).sum() / (2 * positives)
