"""RPN- and RoI-level losses for two-stage detectors, at T != 1 on batches of several images, levels and RoIs,
against loops written out by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from kdctl.distill.losses.two_stage import RoICrossKD, RoIDistillation, RoIFeatureMimic, RPNDistillation


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _rpn(seed: int, sizes=((2, 2), (1, 1)), a: int = 3, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"objectness": [torch.randn(n, a, h, w, generator=g) * 2 for h, w in sizes],
            "deltas": [torch.randn(n, 4 * a, h, w, generator=g) for h, w in sizes]}


def test_rpn_kd_at_temperature_two_by_hand():
    s, t = _rpn(1), _rpn(2)
    T, kls, wsum, wse = 2.0, [], 0.0, 0.0
    for n in range(2):
        for lvl in range(2):
            _, a, h, w = s["objectness"][lvl].shape
            for ai in range(a):
                for y in range(h):
                    for x in range(w):
                        so, to = s["objectness"][lvl][n, ai, y, x].item(), t["objectness"][lvl][n, ai, y, x].item()
                        p, q = _sig(to / T), _sig(so / T)
                        kls.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
                        wt = _sig(to)
                        se = sum((s["deltas"][lvl][n, ai * 4 + k, y, x].item() -
                                  t["deltas"][lvl][n, ai * 4 + k, y, x].item()) ** 2 for k in range(4))
                        wsum, wse = wsum + wt, wse + wt * se
    expected = T * T * sum(kls) / len(kls) + 0.7 * wse / wsum
    got = RPNDistillation(temperature=T, box_weight=0.7)(s, t).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert RPNDistillation(temperature=T, box_weight=0.7)(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_rpn_kd_refuses_other_anchor_layouts():
    with pytest.raises(ValueError, match="anchor layouts differ.*distill at the RoI level"):
        RPNDistillation()(_rpn(1, a=15), _rpn(2, a=3))


def _roi(seed: int, r: int = 5, classes: int = 4, channels: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"class_logits": torch.randn(r, classes, generator=g) * 2,
            "box_regression": torch.randn(r, 4 * classes, generator=g),
            "pooled": torch.randn(r, channels, 3, 3, generator=g)}


def test_roi_kd_weighted_soft_ce_and_teacher_bounded_regression_by_hand():
    s, t = _roi(3), _roi(4)
    labels = torch.tensor([0, 2, 1, 0, 3])
    y = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    s.update(labels=labels, regression_targets=y)
    # RoI 1: the teacher is exact (its error 0 < the student's: bounded term counts); RoI 2: the teacher is far off
    # (student better than the teacher: no bound term); RoI 4: as drawn
    t["box_regression"][1, 8:12] = y[1]
    t["box_regression"][2, 4:8] = y[2] + 50.0
    T, bg, nu = 2.5, 1.5, 0.5
    cls = []
    for r in range(5):
        p = _softmax([v / T for v in t["class_logits"][r].tolist()])
        q = _softmax([v / T for v in s["class_logits"][r].tolist()])
        cls.append(-sum((bg if c == 0 else 1.0) * p[c] * math.log(q[c]) for c in range(4)))
    bounded = []
    for r in (1, 2, 4):
        c = int(labels[r])
        es = sum((s["box_regression"][r, 4 * c + k].item() - y[r, k].item()) ** 2 for k in range(4))
        et = sum((t["box_regression"][r, 4 * c + k].item() - y[r, k].item()) ** 2 for k in range(4))
        bounded.append(es if es > et else 0.0)
    assert bounded[0] > 0 and bounded[1] == 0.0
    expected = T * T * sum(cls) / 5 + nu * sum(bounded) / 3
    got = RoIDistillation(temperature=T, background_weight=bg, bound_weight=nu)(s, t).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_roi_kd_without_foreground_rois_is_the_class_term():
    s, t = _roi(3), _roi(4)
    s.update(labels=torch.zeros(5, dtype=torch.long), regression_targets=torch.zeros(5, 4))
    loss = RoIDistillation(temperature=1.0, bound_weight=0.5)
    only_cls = RoIDistillation(temperature=1.0, bound_weight=0.0)
    assert loss(s, t).item() == pytest.approx(only_cls(s, t).item(), rel=1e-6)


def test_roi_crosskd_by_hand():
    s, t = _roi(6), _roi(7)
    T, cw, bw = 3.0, 0.5, 1.0
    kls, msum, ml1 = [], 0.0, 0.0
    for r in range(5):
        p = _softmax([v / T for v in t["class_logits"][r].tolist()])
        q = _softmax([v / T for v in s["class_logits"][r].tolist()])
        kls.append(sum(p[c] * math.log(p[c] / q[c]) for c in range(4)))
        p1 = _softmax(t["class_logits"][r].tolist())
        c = max(range(1, 4), key=lambda k: p1[k])
        l1 = sum(abs(s["box_regression"][r, 4 * c + k].item() - t["box_regression"][r, 4 * c + k].item())
                 for k in range(4))
        msum, ml1 = msum + p1[c], ml1 + p1[c] * l1
    expected = cw * T * T * sum(kls) / 5 + bw * ml1 / msum
    assert RoICrossKD(temperature=T, cls_weight=cw, box_weight=bw)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_roi_mimic_by_hand_and_its_adapter_trains():
    s, t = _roi(8), _roi(9)
    diffs = (s["pooled"] - t["pooled"]).flatten().tolist()
    expected = 0.5 * sum(d * d for d in diffs) / len(diffs)
    assert RoIFeatureMimic(2, 2)(s, t).item() == pytest.approx(expected, rel=1e-5)
    wide = {"pooled": torch.randn(5, 4, 3, 3)}
    loss = RoIFeatureMimic(2, 4)
    out = loss({"pooled": s["pooled"].requires_grad_()}, wide)
    out.backward()
    assert loss.align.proj[0].weight.grad is not None and s["pooled"].grad.abs().sum() > 0


def test_fgfi_mask_and_value_by_hand():
    """One 16x16 box on an 8x8 map at stride 8 (anchors 16 px, ratios 0.5/1/2): the mask is every cell with an anchor
    whose IoU exceeds half the best anchor IoU, found here by looping over cells and anchors."""
    from kdctl.distill.criterion import DistillContext
    from kdctl.distill.losses.feature import FineGrainedFeatureImitation

    box = [4.0, 6.0, 20.0, 22.0]
    stride, scale, psi = 8.0, 2.0, 0.5

    def iou(a, b):
        iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    ious = {}
    for y in range(8):
        for x in range(8):
            cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
            for r in (0.5, 1.0, 2.0):
                w, h = scale * stride / math.sqrt(r), scale * stride * math.sqrt(r)
                ious.setdefault((y, x), []).append(iou([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], box))
    best = max(max(v) for v in ious.values())
    cells = {k for k, v in ious.items() if max(v) > psi * best}
    assert 1 < len(cells) < 16
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    ctx = DistillContext(imgsz=64, boxes=[torch.tensor([box]), torch.zeros(0, 4)])  # image 2: no boxes
    total = sum((s[0, c, y, x] - t[0, c, y, x]).item() ** 2 for (y, x) in cells for c in range(3))
    expected = total / (2 * len(cells))
    plain = FineGrainedFeatureImitation(3, 3, psi=psi, scale=scale, adapt=False)  # no adapter at equal channels
    assert plain(s, t, ctx).item() == pytest.approx(expected, rel=1e-5)
    empty = DistillContext(imgsz=64, boxes=[torch.zeros(0, 4), torch.zeros(0, 4)])
    assert FineGrainedFeatureImitation(3, 3)(s, t, empty).item() == 0.0

    # the paper's adaptation layer, also at equal channels: a 3x3 convolution (zero padding) on the student map,
    # written out here as a sum over the kernel's taps
    loss = FineGrainedFeatureImitation(3, 3, psi=psi, scale=scale)
    conv = loss.align.proj
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)
    w, b = conv.weight.detach(), conv.bias.detach()
    pad = torch.nn.functional.pad(s, (1, 1, 1, 1))

    def adapted(c, y, x):
        return b[c].item() + sum(w[c, k, dy, dx].item() * pad[0, k, y + dy, x + dx].item()
                                 for k in range(3) for dy in range(3) for dx in range(3))

    total = sum((adapted(c, y, x) - t[0, c, y, x].item()) ** 2 for (y, x) in cells for c in range(3))
    s_grad = s.clone().requires_grad_()
    value = loss(s_grad, t, ctx)
    assert value.item() == pytest.approx(total / (2 * len(cells)), rel=1e-4)
    value.backward()
    assert conv.weight.grad.abs().sum() > 0 and s_grad.grad.abs().sum() > 0
