"""Every distillation loss against a value computed by hand on small tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kdctl.distill.criterion import DistillContext
from kdctl.distill.losses import LOSSES
from kdctl.distill.losses.feature import (AttentionTransfer, ChannelWiseDistillation, FitNet,
                                          FocalGlobalDistillation, MaskedGenerativeDistillation,
                                          PearsonCorrelationDistillation, box_masks)
from kdctl.distill.losses.logit import CrossHeadDistillation, LocalizationDistillation, SigmoidLogitDistillation

ROOT = Path(__file__).resolve().parents[1]
TESTED = {"fitnet", "at", "cwd", "mgd", "fgd", "pkd", "kd_logit", "ld", "crosskd",
          "rpn_kd", "roi_kd", "roi_crosskd", "roi_mimic",  # the two-stage ones in test_two_stage_losses.py
          "detr_logit", "detr_query",  # in test_detr_kd.py
          "fgfi",  # in test_two_stage_losses.py
          "det_kd"}  # in test_det_kd.py
KL_QUARTER = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL([.25,.75] || [.5,.5]) = 0.1308


def test_fitnet_value_and_adapter_gradient():
    assert FitNet(2, 2)(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).item() == pytest.approx(1.0)
    loss = FitNet(3, 5)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = loss(s, torch.randn(2, 5, 8, 8))  # channel and stride mismatch handled by the adapter
    out.backward()
    assert s.grad.abs().sum() > 0 and loss.align.proj[0].weight.grad.abs().sum() > 0


def test_attention_transfer_value():
    s = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([[[[2.0, 1.0]]]])
    assert AttentionTransfer(1, 1)(s, t).item() == pytest.approx(9 / 17)
    assert AttentionTransfer(4, 7)(torch.ones(1, 4, 2, 2), torch.ones(1, 7, 2, 2)).item() == pytest.approx(0)


def test_cwd_value():
    t = torch.tensor([[[[0.0, math.log(3.0)]]]])
    s = torch.zeros(1, 1, 1, 2)
    assert ChannelWiseDistillation(1, 1)(s, t).item() == pytest.approx(KL_QUARTER, abs=1e-6)
    assert ChannelWiseDistillation(1, 1, tau=2.0)(t, t).item() == pytest.approx(0, abs=1e-7)


def test_mgd_value_with_identity_free_generator():
    loss = MaskedGenerativeDistillation(2, 2, ratio=0.0, normalize=False)
    for m in loss.generator:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)
    assert loss(torch.randn(1, 2, 3, 3), torch.full((1, 2, 3, 3), 2.0)).item() == pytest.approx(4.0)


def test_mgd_masks_the_requested_fraction():
    torch.manual_seed(0)
    loss = MaskedGenerativeDistillation(1, 1, ratio=1.0)  # everything masked: generator sees zeros
    gen_in = {}
    loss.generator[0].register_forward_hook(lambda m, i, o: gen_in.setdefault("x", i[0]))
    loss(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert gen_in["x"].abs().sum() == 0


def test_fgd_parts():
    s, t = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    ctx = DistillContext(imgsz=4, boxes=[torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    raw = dict(normalize=False)
    fg_only = FocalGlobalDistillation(1, 1, alpha=1, beta=0, gamma=0, lam=0, **raw)
    bg_only = FocalGlobalDistillation(1, 1, alpha=0, beta=1, gamma=0, lam=0, **raw)
    glob = FocalGlobalDistillation(1, 1, alpha=0, beta=0, gamma=0, lam=1, **raw)
    assert fg_only(s, t, ctx).item() == pytest.approx(1.0)    # cells 0..1 x 0..1, each 1/4, error 1
    assert bg_only(s, t, ctx).item() == pytest.approx(1.0)    # 12 bg cells sharing weight 1
    assert glob(s, t, ctx).item() == pytest.approx(16.0)      # zero-initialised transforms: sum (s - t)^2
    # the reference's extent: floor(x1/s)..ceil(x2/s) inclusive, 1/area of that (unclipped) extent
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 2.0, 1.0]])], (1, 1, 3, 4), 1.0)
    assert torch.allclose(fg[0, :2, :3], torch.full((2, 3), 1 / 6)) and fg.sum().item() == pytest.approx(1.0)
    assert torch.allclose(bg[0, 2], torch.full((4,), 1 / 6)) and bg.sum().item() == pytest.approx(1.0)
    fg, _ = box_masks([torch.tensor([[3.5, 2.5, 9.0, 9.0]])], (1, 1, 3, 4), 1.0)  # clipped at the border
    assert fg[0, 2, 3].item() == pytest.approx(1 / (8 * 7)) and fg[0, :2].sum() == 0


def test_fgd_attention_temperature():
    """Spatial attention is H·W·softmax(mean_c|F| / temp): at temp 0.5 a cell with mean |F| 1 against 0 gets
    2·e²/(e²+1); a flipped temperature (× instead of /) gives 2·e^0.5/(e^0.5+1)."""
    f = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    spatial, channel = FocalGlobalDistillation(2, 2, temp=0.5).attention(f)
    e2 = math.exp(2.0)
    assert spatial[0, 0, 0].item() == pytest.approx(2 * e2 / (e2 + 1), rel=1e-6)
    assert channel[0].tolist() == pytest.approx([1.0, 1.0])


def test_mgd_and_fgd_normalise_channels():
    """With normalize (the default), scaling or shifting a teacher channel changes nothing."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loud = t * torch.tensor([1.0, 50.0, 0.1]).view(1, 3, 1, 1) + 7.0
    for loss in (MaskedGenerativeDistillation(3, 3, ratio=0.0), FocalGlobalDistillation(3, 3)):
        torch.manual_seed(1)
        a = loss(s, t, DistillContext(imgsz=4, boxes=[torch.zeros(0, 4)] * 2))
        torch.manual_seed(1)
        b = loss(s, loud, DistillContext(imgsz=4, boxes=[torch.zeros(0, 4)] * 2))
        assert a.item() == pytest.approx(b.item(), rel=1e-4)
    plain = MaskedGenerativeDistillation(3, 3, ratio=0.0, normalize=False)
    assert plain(s, loud).item() > 10 * plain(s, t).item()


def test_pkd_value():
    t = torch.randn(2, 3, 4, 4)
    assert PearsonCorrelationDistillation(3, 3)(t * 5 + 1, t).item() == pytest.approx(0, abs=1e-5)  # scale-free
    assert PearsonCorrelationDistillation(3, 3)(-t, t).item() == pytest.approx(2.0, abs=1e-4)


def head(scores, boxes=None):
    return {"scores": scores, "boxes": boxes if boxes is not None else torch.zeros(scores.shape[0], 8, scores.shape[2])}


def test_kd_logit_value_and_confidence_weighting():
    t = head(torch.tensor([[[0.0]]]))
    s = head(torch.tensor([[[math.log(3.0)]]]))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert SigmoidLogitDistillation(temperature=1)(s, t).item() == pytest.approx(expected, abs=1e-6)
    # two anchors: the first disagrees, the teacher is confident only on the second
    t2 = head(torch.tensor([[[0.0, 10.0]]]))
    s2 = head(torch.tensor([[[math.log(3.0), 10.0]]]))
    plain = SigmoidLogitDistillation(temperature=1)(s2, t2).item()
    weighted = SigmoidLogitDistillation(temperature=1, conf_weight=True)(s2, t2).item()
    w0, w1 = 0.5, 1 / (1 + math.exp(-10))
    assert plain == pytest.approx(expected / 2, abs=1e-6)
    assert weighted == pytest.approx(expected * w0 / (w0 + w1), abs=1e-6)


def test_ld_value():
    side_t = torch.tensor([0.0, math.log(3.0)])
    t = head(torch.zeros(1, 1, 1), side_t.repeat(4).view(1, 8, 1))
    s = head(torch.zeros(1, 1, 1), torch.zeros(1, 8, 1))
    # mean over the 2 bins of the pointwise KL, as mmdet/PaddleDetection reduce it
    assert LocalizationDistillation(temperature=1, conf_weight=False)(s, t).item() == pytest.approx(KL_QUARTER / 2, abs=1e-6)


def test_head_loss_rejects_mismatched_heads():
    with pytest.raises(ValueError, match="same classes and anchor grid"):
        SigmoidLogitDistillation()(head(torch.zeros(1, 2, 5)), head(torch.zeros(1, 3, 5)))


def test_every_registered_loss_has_a_test_and_a_recipe():
    assert set(LOSSES) == TESTED, "add a value test here for each new loss"
    used = set()
    for p in (ROOT / "recipes").glob("*.yaml"):
        for spec in (yaml.safe_load(p.read_text()).get("distill") or {}).get("losses", []):
            used.add(spec["name"])
    assert set(LOSSES) <= used, f"losses without a recipe in recipes/: {sorted(set(LOSSES) - used)}"


def test_losses_run_in_fp32_under_autocast():
    loss = ChannelWiseDistillation(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(torch.randn(1, 2, 4, 4).bfloat16(), torch.randn(1, 3, 4, 4).bfloat16())
    assert out.dtype == torch.float32


# --- values at T != 1 on several channels, images and anchors, against loops written out by hand -------------------

def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_cwd_at_temperature_two_by_hand():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    tau, total = 2.0, 0.0
    for n in range(2):
        for c in range(3):
            ps = _softmax([v / tau for v in s[n, c].flatten().tolist()])
            pt = _softmax([v / tau for v in t[n, c].flatten().tolist()])
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = tau ** 2 * total / (2 * 3)
    assert ChannelWiseDistillation(3, 3, tau=tau)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_normalised_at_temperature_two_by_hand():
    """``params: {normalize: true}`` (screened in docs/benchmarks.md, "CWD on standardised channels"; the recipes
    keep the paper's raw maps): each channel standardised over the batch and positions (population variance) on
    both sides before the spatial softmax; a teacher channel's scale and offset then change nothing."""
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 2, 3) * 2 + 1, torch.randn(2, 3, 2, 3) * 4 - 3

    def standardised(f, c):
        v = [x for n in range(2) for x in f[n, c].flatten().tolist()]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v) + 1e-6)
        return [[(x - mean) / sd for x in f[n, c].flatten().tolist()] for n in range(2)]

    tau, total = 2.0, 0.0
    for c in range(3):
        zs, zt = standardised(s, c), standardised(t, c)
        for n in range(2):
            ps, pt = _softmax([v / tau for v in zs[n]]), _softmax([v / tau for v in zt[n]])
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = tau ** 2 * total / (2 * 3)
    loss = ChannelWiseDistillation(3, 3, tau=tau, normalize=True)
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    loud = t * torch.tensor([0.1, 30.0, 2.0]).view(1, 3, 1, 1) + 5.0
    assert loss(s, loud).item() == pytest.approx(expected, rel=1e-4)
    assert ChannelWiseDistillation(3, 3, tau=tau)(s, t).item() != pytest.approx(expected, rel=1e-2)


def test_kd_logit_at_temperature_three_by_hand():
    torch.manual_seed(4)
    s, t = torch.randn(2, 2, 3) * 3, torch.randn(2, 2, 3) * 3
    T, per_anchor = 3.0, []
    for n in range(2):
        for a in range(3):
            kl = 0.0
            for c in range(2):
                p, q = 1 / (1 + math.exp(-t[n, c, a].item() / T)), 1 / (1 + math.exp(-s[n, c, a].item() / T))
                kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
            per_anchor.append(kl)
    expected = T * T * sum(per_anchor) / len(per_anchor)
    got = SigmoidLogitDistillation(temperature=T)(head(s), head(t)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_ld_at_temperature_five_by_hand():
    torch.manual_seed(5)
    n, bins, a = 2, 4, 3
    sb, tb = torch.randn(n, 4 * bins, a) * 4, torch.randn(n, 4 * bins, a) * 4
    T, per_anchor = 5.0, []
    for i in range(n):
        for k in range(a):
            sides = []
            for side in range(4):
                ps = _softmax([sb[i, side * bins + j, k].item() / T for j in range(bins)])
                pt = _softmax([tb[i, side * bins + j, k].item() / T for j in range(bins)])
                sides.append(sum(q * math.log(q / p) for p, q in zip(ps, pt)) / bins)
            per_anchor.append(sum(sides) / 4)
    expected = T * T * sum(per_anchor) / len(per_anchor)
    got = LocalizationDistillation(temperature=T, conf_weight=False)(head(torch.zeros(n, 1, a), sb),
                                                                     head(torch.zeros(n, 1, a), tb)).item()
    assert got == pytest.approx(expected, rel=1e-5)


class _HeadOnly(torch.nn.Module):
    """A teacher reduced to its detection head (what crosskd runs of it), as ``model[-1]`` like a YOLO model's."""

    def __init__(self, head):
        super().__init__()
        head.f = list(range(head.nl))
        self.model = torch.nn.ModuleList([head])


def _through_head(t_head, maps):
    """The raw class and box logits, (N, C, anchors), of a YOLO head's layers on ``maps``, level by level."""
    with torch.no_grad():
        return (torch.cat([t_head.cv3[i](x).flatten(2) for i, x in enumerate(maps)], 2),
                torch.cat([t_head.cv2[i](x).flatten(2) for i, x in enumerate(maps)], 2))


def _sigmoid_kl_by_hand(t_logits: list[float], s_logits: list[float], T: float) -> float:
    """Summed over the classes: the binary KL between sigmoid(t/T) and sigmoid(s/T), written out."""
    out = 0.0
    for tl, sl in zip(t_logits, s_logits):
        p, q = 1 / (1 + math.exp(-tl / T)), 1 / (1 + math.exp(-sl / T))
        out += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return out


def test_crosskd_through_the_teacher_head_at_two_temperatures_by_hand():
    """Two levels whose channels differ from the teacher's (1×1 adapters), 2 images, 2 classes, 4 DFL bins,
    T = 3 for the scores and 5 for the boxes, box weight 0.7, confidence-weighted: the adapters' products and both
    KLs written out anchor by anchor; the teacher head's own layers give the cross-head logits."""
    from ultralytics.nn.modules.head import Detect

    torch.manual_seed(11)
    t_head = Detect(nc=2, reg_max=4, ch=(6, 10)).eval().requires_grad_(False)
    for branch in (*t_head.cv2, *t_head.cv3):  # logits of a few units, not a fresh head's near-zero ones
        branch[-1].weight.data.mul_(20)
    teacher = _HeadOnly(t_head)
    s_feats = [torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 5, 2, 2) * 3]
    t_feats = [torch.randn(2, 6, 4, 4), torch.randn(2, 10, 2, 2)]
    t = t_head.forward_head(t_feats, **t_head.one2many)
    loss = CrossHeadDistillation([3, 5], [6, 10], temperature=3.0, box_temperature=5.0, box_weight=0.7, align=True)
    adapted = [torch.einsum("oc,nchw->nohw", a.weight[:, :, 0, 0], f) for a, f in zip(loss.adapters, s_feats)]
    for i, (x, tf) in enumerate(zip(adapted, t_feats)):  # per channel: the student's standard score, the teacher's
        for c in range(x.shape[1]):                      # mean and spread (population std over images and cells)
            z = (x[:, c] - x[:, c].mean()) / (x[:, c].var(correction=0) + 1e-6).sqrt()
            x[:, c] = z * tf[:, c].std(correction=0) + tf[:, c].mean()
    cs, cb = _through_head(t_head, adapted)
    T, Tb, bins = 3.0, 5.0, 4
    num = den = 0.0
    for n in range(2):
        for k in range(4 * 4 + 2 * 2):
            cls = _sigmoid_kl_by_hand([t["scores"][n, c, k].item() for c in range(2)],
                                      [cs[n, c, k].item() for c in range(2)], T)
            sides = []
            for side in range(4):
                ps = _softmax([cb[n, side * bins + j, k].item() / Tb for j in range(bins)])
                pt = _softmax([t["boxes"][n, side * bins + j, k].item() / Tb for j in range(bins)])
                sides.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)) / bins)
            w = max(1 / (1 + math.exp(-t["scores"][n, c, k].item())) for c in range(2))
            num += w * (T * T * cls + 0.7 * Tb * Tb * sum(sides) / 4)
            den += w
    feats = [f.requires_grad_() for f in s_feats]
    got = loss(feats, t, DistillContext(imgsz=32, teacher=teacher))
    assert got.item() == pytest.approx(num / den, rel=1e-5) and got.item() > 0.02
    got.backward()  # into the student's maps and the adapters, never the teacher's head
    assert all(f.grad.abs().sum() > 0 for f in feats)
    assert all(a.weight.grad.abs().sum() > 0 for a in loss.adapters)
    assert all(p.grad is None for p in t_head.parameters())
    # the teacher's own maps through its own head: nothing to distill (adapters at equal channels are identities)
    same = CrossHeadDistillation([6, 10], [6, 10], align=True)
    assert same(t_feats, t, DistillContext(imgsz=32, teacher=teacher)).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="needs the teacher's head"):
        loss(s_feats, t, DistillContext(imgsz=32))
    with pytest.raises(ValueError, match="a teacher cache keeps only its outputs; set align: false"):
        loss(s_feats, {k: v for k, v in t.items() if k != "feats"}, DistillContext(imgsz=32, teacher=teacher))
    # without the alignment the teacher's head reads the adapted maps as they are: another value
    raw = CrossHeadDistillation([3, 5], [6, 10], temperature=3.0, box_temperature=5.0, box_weight=0.7)  # the default
    raw.load_state_dict(loss.state_dict())
    assert raw(s_feats, t, DistillContext(imgsz=32, teacher=teacher)).item() != pytest.approx(num / den, rel=1e-2)
    # a teacher cache's mask (the anchors it kept): the mean over those anchors alone
    plain = CrossHeadDistillation([3, 5], [6, 10], conf_weight=False)
    ctx = DistillContext(imgsz=32, teacher=teacher)
    plain.load_state_dict(loss.state_dict())
    at = []
    for k in range(20):
        one = torch.zeros(2, 20, dtype=torch.bool)
        one[:, k] = True
        at.append(plain(s_feats, {**t, "mask": one}, ctx).item())  # anchor k, averaged over the 2 images
    kept = torch.zeros(2, 20, dtype=torch.bool)
    kept[:, [0, 5, 17, 19]] = True
    assert plain(s_feats, {**t, "mask": kept}, ctx).item() == pytest.approx(sum(at[k] for k in (0, 5, 17, 19)) / 4,
                                                                           rel=1e-5)


def test_ltrb_iou_loss_by_hand():
    """Boxes around one anchor point from (left, top, right, bottom) distances: the overlap takes the smaller distance
    on each side; a negative distance counts as 0 (FCOS's clamp); identical boxes give 0."""
    from kdctl.distill.losses.logit import ltrb_iou_loss

    s = torch.tensor([[2.0, 1.0, 3.0, 4.0], [1.0, -2.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]).T[None]  # (1, 4, 3)
    t = torch.tensor([[1.0, 2.0, 4.0, 2.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]).T[None]
    # anchor 0: s is 5 wide, 5 high (25); t 5 × 4 (20); overlap (1 + 3) × (1 + 2) = 12; union 33
    # anchor 1: s's top of -2 reads as 0: 2 × 1 (2); t 2 × 2 (4); overlap 2 × 1 = 2; union 4
    expected = [1 - 12 / 33, 1 - 2 / 4, 0.0]
    assert ltrb_iou_loss(s, t)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_crosskd_through_a_yolo26_teacher_head_compares_boxes_by_iou_by_hand():
    """A reg_max=1 teacher head (YOLO26's plain boxes), 2 images, 2 classes, T = 3, box weight 0.7, confidence-
    weighted: per anchor the scores' binary KL × T² plus 0.7 × (1 − IoU) of the boxes the teacher's head draws from
    the adapted student maps and from its own, written out by hand."""
    from ultralytics.nn.modules.head import Detect

    torch.manual_seed(5)
    t_head = Detect(nc=2, reg_max=1, ch=(6, 10)).eval().requires_grad_(False)
    for branch in (*t_head.cv2, *t_head.cv3):
        branch[-1].weight.data.mul_(20)
    for branch in t_head.cv2:  # distances of a few cells, most of them positive (a trained head's)
        branch[-1].bias.data.add_(3.0)
    teacher = _HeadOnly(t_head)
    s_feats = [torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 5, 2, 2) * 3]
    t_feats = [torch.randn(2, 6, 4, 4), torch.randn(2, 10, 2, 2)]
    t = t_head.forward_head(t_feats, **t_head.one2many)
    assert t["boxes"].shape[1] == 4
    loss = CrossHeadDistillation([3, 5], [6, 10], temperature=3.0, box_weight=0.7)
    adapted = [torch.einsum("oc,nchw->nohw", a.weight[:, :, 0, 0], f) for a, f in zip(loss.adapters, s_feats)]
    cs, cb = _through_head(t_head, adapted)
    T = 3.0
    num = den = 0.0
    for n in range(2):
        for k in range(4 * 4 + 2 * 2):
            cls = _sigmoid_kl_by_hand([t["scores"][n, c, k].item() for c in range(2)],
                                      [cs[n, c, k].item() for c in range(2)], T)
            a = [max(0.0, cb[n, j, k].item()) for j in range(4)]          # l, t, r, b from the student's maps
            b = [max(0.0, t["boxes"][n, j, k].item()) for j in range(4)]  # and from the teacher's own
            inter = (min(a[0], b[0]) + min(a[2], b[2])) * (min(a[1], b[1]) + min(a[3], b[3]))
            union = (a[0] + a[2]) * (a[1] + a[3]) + (b[0] + b[2]) * (b[1] + b[3]) - inter
            w = max(1 / (1 + math.exp(-t["scores"][n, c, k].item())) for c in range(2))
            num += w * (T * T * cls + 0.7 * (1 - inter / max(union, 1e-7)))
            den += w
    feats = [f.requires_grad_() for f in s_feats]
    got = loss(feats, t, DistillContext(imgsz=32, teacher=teacher))
    assert got.item() == pytest.approx(num / den, rel=1e-5) and got.item() > 0.02
    got.backward()
    assert all(f.grad.abs().sum() > 0 for f in feats)
    same = CrossHeadDistillation([6, 10], [6, 10])
    assert same(t_feats, t, DistillContext(imgsz=32, teacher=teacher)).item() == pytest.approx(0.0, abs=1e-5)


def test_feature_losses_do_not_grow_with_batch_size():
    """Doubling the batch with copies leaves every per-image-normalised loss unchanged."""
    torch.manual_seed(6)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ctx1 = DistillContext(imgsz=8, boxes=[torch.tensor([[0.0, 0.0, 4.0, 4.0]])] * 2)
    ctx2 = DistillContext(imgsz=8, boxes=[torch.tensor([[0.0, 0.0, 4.0, 4.0]])] * 4)
    for loss in (FitNet(3, 3), AttentionTransfer(3, 3), ChannelWiseDistillation(3, 3, tau=2.0),
                 PearsonCorrelationDistillation(3, 3), FocalGlobalDistillation(3, 3)):
        one = loss(s, t, ctx1).item()
        two = loss(torch.cat([s, s]), torch.cat([t, t]), ctx2).item()
        assert two == pytest.approx(one, rel=1e-4), type(loss).__name__


def test_a_term_averages_its_layer_pairs():
    from kdctl.distill.criterion import DistillTerm

    torch.manual_seed(7)
    term = DistillTerm("cwd", "cwd", [1, 2], [1, 2], 1.0, {"tau": 2.0}, [2, 2], [2, 2])
    s = {1: torch.randn(2, 2, 3, 3), 2: torch.randn(2, 2, 2, 2)}
    t = {1: torch.randn(2, 2, 3, 3), 2: torch.randn(2, 2, 2, 2)}
    each = [ChannelWiseDistillation(2, 2, tau=2.0)(s[i], t[i]).item() for i in (1, 2)]
    assert term(s, t, None).item() == pytest.approx(sum(each) / 2, rel=1e-6)


class _Const(torch.nn.Module):
    """A term whose raw value is whatever the test feeds it."""

    def __init__(self):
        super().__init__()
        self.name, self.loss_name, self.weight, self.s_layers, self.t_layers = "x", "x", 1.0, [0], [0]
        self.value = torch.tensor(1.0)

    def forward(self, s, t, ctx):
        return self.value


def test_auto_balance_uses_the_median_of_the_first_batches_and_caps_outliers():
    from kdctl.distill.criterion import DistillationCriterion

    term = _Const()
    crit = DistillationCriterion([term], balance=0.5, balance_batches=3, cap=4.0)
    for raw in (1.0, 100.0, 2.0):  # one heavy-tailed batch among three
        term.value = torch.tensor(raw)
        crit({}, {}, None, task_loss=2.0)
    # median raw 2.0, median task 2.0: scale 0.5 * 2 / 2 = 0.5 (the first batch alone would say 1.0; the mean 0.03)
    assert crit.scales == [pytest.approx(0.5)]
    term.value = torch.tensor(2.0)
    assert crit({}, {}, None, task_loss=2.0)["x"].item() == pytest.approx(1.0)   # = 0.5 x task
    term.value = torch.tensor(1000.0, requires_grad=True)
    out = crit({}, {}, None, task_loss=2.0)["x"]
    assert out.item() == pytest.approx(4.0 * 0.5 * 2.0)  # capped at 4x its share of the task loss
    out.backward()
    assert term.value.grad.item() > 0                     # scaled down, not cut off
    state = crit.balance_state()
    fresh = DistillationCriterion([term], balance=0.5, balance_batches=3)
    fresh.load_balance_state(state)
    assert fresh.scales == crit.scales


def test_kd_logit_gradient_does_not_vanish_with_temperature():
    """With T², the logit gradient tends to (s - t)/4 at high T; without it, it would fall as 1/T²."""
    grads = []
    for T in (4.0, 8.0, 16.0):
        s = torch.tensor([[[1.0]]], requires_grad=True)
        SigmoidLogitDistillation(temperature=T)(head(s), head(torch.tensor([[[-1.0]]]))).backward()
        grads.append(s.grad.item())
    assert grads == pytest.approx([0.5] * 3, rel=0.05)


@pytest.mark.parametrize("params,message", [({"temperature": 0}, "temperature: 0 must be a number above 0"),
                                            ({"teacher_queries": -1}, "teacher_queries: -1 must be a whole number"),
                                            ({"box_weight": -0.5}, "box_weight: -0.5 must be a number, 0 or more"),
                                            ({"psi": 1.5}, r"psi: 1.5 must be a number in \(0, 1\]"),
                                            ({"p": 0}, "p: 0 must be a number above 0"),
                                            ({"alpha": -1.0}, "alpha: -1.0 must be a number, 0 or more")])
def test_loss_parameters_out_of_range_are_refused(params, message):
    from kdctl.distill.criterion import check_params

    with pytest.raises(ValueError, match=message):
        check_params(params)
    check_params({"conf_weight": True, "temperature": 2.0, "random_queries": 0})  # flags and sane values pass


def test_ld_on_the_assigned_regions_by_hand():
    """positives: true — the weighted mean over the student's positives (weights: their target scores) plus
    vlr_weight times the mean over the other in-box anchors; anchors in neither region do not count, a teacher
    cache's unknown anchors are left out, and a batch without ground truth gives 0."""
    torch.manual_seed(7)
    n, bins, a, T = 2, 3, 4, 4.0
    sb, tb = torch.randn(n, 4 * bins, a) * 3, torch.randn(n, 4 * bins, a) * 3

    def per_anchor(i, k):
        sides = []
        for side in range(4):
            ps = _softmax([sb[i, side * bins + j, k].item() / T for j in range(bins)])
            pt = _softmax([tb[i, side * bins + j, k].item() / T for j in range(bins)])
            sides.append(sum(q * math.log(q / p) for p, q in zip(ps, pt)) / bins)
        return T * T * sum(sides) / 4

    pos_weight = torch.tensor([[0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])
    vlr = torch.tensor([[False, True, True, False], [False, False, False, True]])
    s = {**head(torch.zeros(n, 1, a), sb), "pos_weight": pos_weight, "vlr": vlr}
    t = head(torch.zeros(n, 1, a), tb)
    main = (0.8 * per_anchor(0, 0) + 0.2 * per_anchor(1, 2)) / 1.0
    vlr_mean = (per_anchor(0, 1) + per_anchor(0, 2) + per_anchor(1, 3)) / 3
    loss = LocalizationDistillation(temperature=T, positives=True, vlr_weight=0.5)
    assert loss(s, t).item() == pytest.approx(main + 0.5 * vlr_mean, rel=1e-5)
    # a teacher cache that only knows image 0's anchors
    t_cached = {**t, "mask": torch.tensor([[True] * a, [False] * a])}
    expected = per_anchor(0, 0) + 0.5 * (per_anchor(0, 1) + per_anchor(0, 2)) / 2
    assert loss(s, t_cached).item() == pytest.approx(expected, rel=1e-5)
    empty = {**s, "pos_weight": torch.zeros(n, a), "vlr": torch.zeros(n, a, dtype=torch.bool)}
    sb.requires_grad_(True)
    out = loss({**empty, "boxes": sb}, t)
    assert out.item() == 0 and out.requires_grad
    # and positives: false is the plain anchor mean whatever regions are passed
    assert LocalizationDistillation(temperature=T, conf_weight=False)(s, t).item() == pytest.approx(
        sum(per_anchor(i, k) for i in range(n) for k in range(a)) / (n * a), rel=1e-5)
