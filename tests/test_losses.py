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
from kdctl.distill.losses.logit import LocalizationDistillation, SigmoidLogitDistillation

ROOT = Path(__file__).resolve().parents[1]
TESTED = {"fitnet", "at", "cwd", "mgd", "fgd", "pkd", "kd_logit", "ld"}
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
    loss = MaskedGenerativeDistillation(2, 2, ratio=0.0)
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
    s, t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    ctx = DistillContext(imgsz=2, boxes=[torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    fg_only = FocalGlobalDistillation(1, 1, alpha=1, beta=0, gamma=0, lam=0)
    bg_only = FocalGlobalDistillation(1, 1, alpha=0, beta=1, gamma=0, lam=0)
    glob = FocalGlobalDistillation(1, 1, alpha=0, beta=0, gamma=0, lam=1)
    assert fg_only(s, t, ctx).item() == pytest.approx(1.0)    # 1 fg cell, weight 1/area = 1, error 1
    assert bg_only(s, t, ctx).item() == pytest.approx(1.0)    # 3 bg cells sharing weight 1
    assert glob(s, t, ctx).item() == pytest.approx(4.0)       # zero-initialised transforms: sum (s - t)^2
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 2.0, 1.0]])], (1, 1, 2, 2), 1.0)
    assert fg.tolist() == [[[0.5, 0.5], [0.0, 0.0]]] and bg.sum().item() == pytest.approx(1.0)


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
    assert LocalizationDistillation(temperature=1, conf_weight=False)(s, t).item() == pytest.approx(KL_QUARTER, abs=1e-6)


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
