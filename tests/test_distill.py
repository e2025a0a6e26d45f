"""Distillation on real Ultralytics models built from YAML: taps, KD gradients, errors, end to end, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import superset_checkpoint
from kdctl.cli.main import app
from kdctl.detectors.yolo import KDDetectionModel, build_criterion, build_detector, plain_student
from kdctl.distill.losses.logit import LocalizationDistillation
from kdctl.distill.taps import resolve_layers
from kdctl.errors import RecipeError
from kdctl.recipe.schema import LossSpec


@pytest.fixture(scope="module")
def v8n():
    return build_detector("yolov8n.yaml", nc=3)


@pytest.fixture(scope="module")
def tiny():
    return build_detector(Path(__file__).resolve().parents[1] / "kdctl/assets/models/yolov8-tiny.yaml", nc=3)


def test_roles_resolve_on_real_models(v8n):
    assert resolve_layers(v8n, "neck", "neck", 128) == [15, 18, 21]
    assert resolve_layers(v8n, None, "backbone", 128) == [4, 6, 9]
    assert resolve_layers(v8n, "head", "neck", 128) == [22]
    y11 = build_detector("yolo11n.yaml", nc=3)
    assert resolve_layers(y11, "neck", "neck", 128) == [16, 19, 22]
    assert resolve_layers(y11, "backbone", "neck", 128) == [4, 6, 10]
    with pytest.raises(IndexError, match="out of range: the model has 23 layers"):
        resolve_layers(v8n, [4, 99], "neck", 128)


def test_bad_layer_index_is_a_recipe_error(v8n, tiny):
    with pytest.raises(RecipeError, match=r"r.yaml: distill.losses\[0\].student_layers: layer 40 is out of range"):
        build_criterion(tiny, v8n, [LossSpec(name="cwd", student_layers=[40], teacher_layers=[15])], None, 128, "r.yaml")
    with pytest.raises(RecipeError, match=r"distill.losses\[0\]: 2 student layers .* but 1 teacher layers"):
        build_criterion(tiny, v8n, [LossSpec(name="fitnet", student_layers=[4, 6], teacher_layers=[4])], None, 128)
    with pytest.raises(RecipeError, match="does not output feature maps"):
        build_criterion(tiny, v8n, [LossSpec(name="cwd", student_layers=[22], teacher_layers=[22])], None, 128)


def test_layers_by_module_path(v8n, tiny):
    """Taps by module path reach inside a layer (the first bottleneck of C2f 6), mixed with indices; the KD term
    sees exactly those modules' outputs; a path that is not there is one line naming the field."""
    from kdctl.distill.criterion import DistillContext
    from kdctl.distill.taps import FeatureTaps

    spec = LossSpec(name="fitnet", student_layers=["model.6.m.0", 9], teacher_layers=["model.6.m.0", "model.9"])
    crit = build_criterion(tiny, v8n, [spec], None, 128)
    term = crit.terms[0]
    assert term.s_layers == ["model.6.m.0", 9] and term.t_layers == ["model.6.m.0", "model.9"]
    x = torch.rand(2, 3, 128, 128)
    with FeatureTaps(tiny, crit.student_layers()) as st, FeatureTaps(v8n, crit.teacher_layers()) as tt:
        tiny.predict(x)
        v8n.predict(x)
    assert st.outputs["model.6.m.0"].shape[-1] == 128 // 16 and tt.outputs["model.9"].shape[-1] == 128 // 32
    kd = crit(st.outputs, tt.outputs, DistillContext(imgsz=128), 1.0)
    assert float(kd["fitnet"]) > 0
    with pytest.raises(RecipeError, match=r"distill.losses\[0\].teacher_layers: no module 'model.6.m.7'"):
        build_criterion(tiny, v8n, [LossSpec(name="fitnet", student_layers=["model.6"], teacher_layers=["model.6.m.7"])],
                        None, 128)


def test_cross_family_pair_yolo11_teacher(tiny):
    """YOLO11n teacher -> tiny YOLOv8 student: neck and head losses pair level by level through adapters."""
    y11 = build_detector("yolo11n.yaml", nc=3)
    crit = build_criterion(tiny, y11, [LossSpec(name="cwd"), LossSpec(name="kd_logit"), LossSpec(name="fitnet",
                                                                                                  level="backbone")],
                           None, 128)
    assert crit.terms[0].t_layers == [16, 19, 22] and crit.terms[0].s_layers == [15, 18, 21]
    assert crit.terms[2].t_layers == [4, 6, 10]
    assert any(not isinstance(loss.align.proj, torch.nn.Identity) for loss in crit.terms[0].losses)


def test_head_loss_needs_matching_heads(tiny):
    other = build_detector("yolov8n.yaml", nc=5)
    with pytest.raises(RecipeError, match="needs matching heads"):
        build_criterion(tiny, other, [LossSpec(name="kd_logit")], None, 128)


def test_crosskd_reads_both_heads_and_maps_the_students_levels_onto_the_teachers(tiny, v8n):
    """CrossKD taps the two heads (their input maps and outputs), with a 1×1 adapter per level from the tiny
    student's neck channels to YOLOv8n's; pairs whose heads cannot take each other's maps are one-line errors."""
    crit = build_criterion(tiny, v8n, [LossSpec(name="crosskd")], None, 128)
    term = crit.terms[0]
    assert term.kind == "cross_head" and term.s_layers == [len(tiny.model) - 1] and term.t_layers == [22]
    assert [(a.in_channels, a.out_channels) for a in term.losses[0].adapters] == [(32, 64), (64, 128), (128, 256)]
    assert crit.teacher_head_layers() == [22]  # a teacher cache serves its teacher outputs
    # a P2 student: its P3-P5 maps go to the teacher's head (its P2 map has no teacher level to go to); a P6 teacher:
    # the student's three levels go to its first three, and its outputs are read at those levels' anchors only
    from kdctl.distill.taps import FeatureTaps, head_outputs

    x = torch.rand(2, 3, 128, 128)
    for student, teacher, levels, anchors in ((build_detector("yolov8n-p2.yaml", nc=3), v8n, ([1, 2, 3], [0, 1, 2]),
                                               None),
                                              (tiny, build_detector("yolov8n-p6.yaml", nc=3), ([0, 1, 2], [0, 1, 2]),
                                               16 * 16 + 8 * 8 + 4 * 4)):
        term = build_criterion(student, teacher, [LossSpec(name="crosskd")], None, 128).terms[0]
        assert term.losses[0].levels == levels
        assert (term.anchor_index is None) if anchors is None else len(term.anchor_index) == anchors
        teacher.eval()
        with torch.no_grad(), FeatureTaps(student, term.s_layers) as st, FeatureTaps(teacher, term.t_layers) as tt:
            student.predict(x), teacher.predict(x)
        t = head_outputs(tt.outputs[term.t_layers[0]])
        cross = term.losses[0].cross_outputs(head_outputs(st.outputs[term.s_layers[0]])["feats"], teacher.model[-1])
        assert cross["scores"].shape[2] == (anchors or t["scores"].shape[2])
        from kdctl.distill.criterion import DistillContext

        value = term(dict(st.outputs), dict(tt.outputs), DistillContext(imgsz=128, teacher=teacher))
        assert torch.isfinite(value) and value > 0
    with pytest.raises(RecipeError, match=r"losses\[0\].student_layers: 'crosskd' reads every level"):
        build_criterion(tiny, v8n, [LossSpec(name="crosskd", student_layers=[15, 18, 21])], None, 128)
    rtdetr = build_detector(Path(__file__).resolve().parents[1] / "kdctl/assets/models/rtdetr-tiny.yaml", nc=3)
    with pytest.raises(RecipeError, match="through the teacher's dense YOLO head, and the teacher has none"):
        build_criterion(tiny, rtdetr, [LossSpec(name="crosskd")], None, 128)
    with pytest.raises(RecipeError, match="needs matching heads"):  # other classes
        build_criterion(tiny, build_detector("yolov8n.yaml", nc=5), [LossSpec(name="crosskd")], None, 128)
    # and what to do about it: a teacher of other classes (a COCO one) is fine-tuned first, or its features distilled
    with pytest.raises(RecipeError, match=r"teacher \(5, 336\); the teacher was trained on other classes: fine-tune "
                                          r"it on this dataset first \(kdctl train with student.model: the teacher\), "
                                          r"or distill its features alone"):
        build_criterion(tiny, build_detector("yolov8n.yaml", nc=5), [LossSpec(name="kd_logit")], None, 128)


def test_neck_role_pairs_levels_of_equal_stride_across_pyramid_depths(tiny):
    """A P2 (or P6) student has four neck outputs, a P3-P5 teacher three: with roles on both sides the levels of
    equal stride pair (P3-P5), where the recipe used to be refused as 'give pairs of equal length'."""
    p2 = build_detector("yolov8n-p2.yaml", nc=3)
    crit = build_criterion(p2, tiny, [LossSpec(name="cwd", level="neck")], None, 128)
    assert crit.terms[0].s_layers == [21, 24, 27] and crit.terms[0].t_layers == [15, 18, 21]
    with pytest.raises(RecipeError, match="give pairs of equal length"):  # layers given by hand are taken as given
        build_criterion(p2, tiny, [LossSpec(name="cwd", student_layers=[18, 21, 24, 27])], None, 128)


def test_strides_keep_the_pairs_at_those_strides(tiny, v8n):
    """``strides`` picks pairs by the student map's stride, whatever named the layers (a role, indices, a P2
    student's pairs made by size), in their order; a stride no pair has is one line listing the ones there are."""
    def pairs(spec, student=tiny, imgsz=128):
        t = build_criterion(student, v8n, [spec], None, imgsz, "r.yaml").terms[0]
        return t.s_layers, t.t_layers

    assert pairs(LossSpec(name="at", level="backbone", strides=[8])) == ([4], [4])
    assert pairs(LossSpec(name="at", level="backbone", strides=[32, 8])) == ([4, 9], [4, 9])
    assert pairs(LossSpec(name="cwd", level="neck", strides=[16])) == ([18], [18])
    assert pairs(LossSpec(name="cwd", level="neck", strides=[16]), imgsz=256) == ([18], [18])  # not a map width
    assert pairs(LossSpec(name="fitnet", student_layers=[6, 9], teacher_layers=[6, 9], strides=[32])) == ([9], [9])
    p2 = build_detector("yolov8n-p2.yaml", nc=3)
    assert pairs(LossSpec(name="cwd", level="neck", strides=[8]), student=p2) == ([21], [15])
    term = build_criterion(tiny, v8n, [LossSpec(name="at", level="backbone", strides=[8])], None, 128).terms[0]
    assert len(term.losses) == 1  # one loss module per kept pair: the term averages over what is left
    with pytest.raises(RecipeError, match=r"^r.yaml: distill.losses\[0\].strides: no student map of layers \[4, 6, 9\] "
                                          r"is at stride 4 at imgsz 128; their strides: 8, 16, 32$"):
        pairs(LossSpec(name="at", level="backbone", strides=[4]))
    with pytest.raises(RecipeError, match="does not output feature maps"):  # a layer without a map is not dropped
        pairs(LossSpec(name="cwd", student_layers=[9, 22], teacher_layers=[9, 22], strides=[32]))


@pytest.mark.parametrize("cfg,first,count", [("yolov8n-p2.yaml", 32 * 32, 336), ("yolov8n-p6.yaml", 0, 336)])
def test_head_losses_read_a_p2_or_p6_teacher_at_the_students_levels(tiny, cfg, first, count):
    """A P2 (or P6) teacher's head has one more level than a P3-P5 student's: head-level KD was refused as
    'needs matching heads'. It now reads the teacher's anchors of the student's levels (at 128 px: P2 is the
    first 32x32 block, P6 the last 2x2), so anchors of the extra level cannot change the loss."""
    from kdctl.distill.criterion import DistillContext

    teacher = build_detector(cfg, nc=3)
    crit = build_criterion(tiny, teacher, [LossSpec(name="kd_logit", params={"temperature": 2.0}),
                                           LossSpec(name="ld", params={"temperature": 3.0})], None, 128)
    for term in crit.terms:
        assert term.anchor_index.tolist() == list(range(first, first + count))
    g = torch.Generator().manual_seed(0)
    a_t = count + (32 * 32 if first else 2 * 2)
    s = {"scores": torch.randn(2, 3, count, generator=g), "boxes": torch.randn(2, 64, count, generator=g)}
    t = {"scores": torch.randn(2, 3, a_t, generator=g), "boxes": torch.randn(2, 64, a_t, generator=g)}
    t["scores"][..., first:first + count], t["boxes"][..., first:first + count] = s["scores"], s["boxes"]
    ctx = DistillContext(imgsz=128, boxes=[torch.zeros(0, 4)] * 2)
    for term in crit.terms:
        same = term({term.s_layers[0]: s}, {term.t_layers[0]: t}, ctx).item()
        assert abs(same) < 1e-8  # the extra level's random anchors are not read
        moved = {k: v.clone() for k, v in t.items()}
        moved["scores"][..., first:first + 40] += 3.0
        moved["boxes"][..., first:first + 40] += torch.linspace(0, 3, 64)[:, None]  # not one shift for every bin
        assert term({term.s_layers[0]: s}, {term.t_layers[0]: moved}, ctx).item() > 1e-5



def test_a_p2_student_takes_head_kd_at_the_levels_its_teacher_has(tiny):
    """The other way round: a P2 student (small objects) of a P3-P5 teacher gets head KD on its P3-P5 anchors; its
    P2 anchors, which the teacher does not predict, take none."""
    from kdctl.distill.criterion import DistillContext

    p2 = build_detector("yolov8n-p2.yaml", nc=3)
    (term,) = build_criterion(p2, tiny, [LossSpec(name="kd_logit", params={"temperature": 2.0})], None, 128).terms
    assert term.anchor_index is None and term.student_anchor_index.tolist() == list(range(1024, 1360))
    g = torch.Generator().manual_seed(1)
    t = {"scores": torch.randn(2, 3, 336, generator=g), "boxes": torch.randn(2, 64, 336, generator=g)}
    s = {"scores": torch.randn(2, 3, 1360, generator=g), "boxes": torch.randn(2, 64, 1360, generator=g)}
    s["scores"][..., 1024:] = t["scores"]
    ctx = DistillContext(imgsz=128, boxes=[torch.zeros(0, 4)] * 2)
    assert abs(term({term.s_layers[0]: s}, {term.t_layers[0]: t}, ctx).item()) < 1e-8  # P2 anchors not read
    s["scores"][..., 1100] += 2.0
    assert term({term.s_layers[0]: s}, {term.t_layers[0]: t}, ctx).item() > 1e-5


def test_box_distribution_loss_needs_dfl_bins_on_both_heads(tiny):
    """YOLO26 predicts plain boxes (reg_max 1): LD against a 16-bin teacher is refused in one line naming the bins;
    score-level KD between the two still pairs."""
    y26 = build_detector("yolo26n.yaml", nc=3)
    with pytest.raises(RecipeError, match=r"'ld' distills box distributions.*student has 1 per side and the "
                                          r"teacher 16"):
        build_criterion(y26, tiny, [LossSpec(name="ld")], None, 128)
    assert build_criterion(y26, tiny, [LossSpec(name="kd_logit")], None, 128).terms[0].name == "kd_logit"
    with pytest.raises(RecipeError, match=r"use kd_logit, crosskd \(recipes/logit-crosskd.yaml\) or a feature loss"):
        build_criterion(tiny, y26, [LossSpec(name="ld")], None, 128)


@pytest.mark.parametrize("student,teacher", [("yolo26n.yaml", "tiny"), ("tiny", "yolo26n.yaml"),
                                             ("yolo26n.yaml", "yolo26n.yaml")])
def test_crosskd_pairs_heads_of_any_bins_and_a_yolo26_teacher_compares_boxes_by_iou(tiny, student, teacher):
    """CrossKD never reads the student's box outputs, so a YOLO26 student (reg_max 1) takes it from a 16-bin
    teacher, and a YOLO26 teacher's plain boxes are compared by 1 − IoU: each pair builds, and its term is positive
    on real maps and reaches the student's maps (it was refused as 'distills box distributions' for all three)."""
    from kdctl.distill.criterion import DistillContext
    from kdctl.distill.taps import FeatureTaps

    s_model, t_model = (tiny if m == "tiny" else build_detector(m, nc=3) for m in (student, teacher))
    term = build_criterion(s_model, t_model, [LossSpec(name="crosskd")], None, 128).terms[0]
    x = torch.rand(2, 3, 128, 128)
    t_model.eval()
    with torch.no_grad(), FeatureTaps(t_model, term.t_layers) as tt:
        t_model.predict(x)
    with FeatureTaps(s_model, term.s_layers) as st:
        s_model.predict(x)
    value = term(dict(st.outputs), dict(tt.outputs), DistillContext(imgsz=128, teacher=t_model))
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_model.parameters())


def _batch(n=2, size=128):
    torch.manual_seed(0)
    return {"img": torch.rand(n, 3, size, size), "cls": torch.tensor([[0.0], [1.0], [2.0]]),
            "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]),
            "batch_idx": torch.tensor([0.0, 0.0, 1.0])}


def _kd_model(teacher, losses, balance=None):
    from ultralytics.cfg import get_cfg

    m = KDDetectionModel(str(Path(__file__).resolve().parents[1] / "kdctl/assets/models/yolov8-tiny.yaml"),
                         nc=3, verbose=False)
    m.args = get_cfg()
    m.attach(teacher, build_criterion(m, teacher, losses, balance, 128))
    return m.train()


@pytest.mark.parametrize("losses", [[LossSpec(name="cwd")], [LossSpec(name="fgd")], [LossSpec(name="kd_logit")],
                                    [LossSpec(name="ld")], [LossSpec(name="at", level="backbone")],
                                    [LossSpec(name="crosskd")]],
                         ids=["cwd", "fgd", "kd_logit", "ld", "at", "crosskd"])
def test_kd_term_is_nonzero_and_changes_student_gradients(v8n, losses):
    if losses[0].name == "crosskd":  # a fresh model's batch norms (mean 0, variance 1) leave its neck maps at 1e-6:
        import copy                  # give the teacher the statistics of real inputs, as training would

        v8n = copy.deepcopy(v8n)
        for bn in (mod for mod in v8n.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.momentum = 1.0
        with torch.no_grad():
            v8n.train().predict(_batch()["img"])
        v8n.eval()
    m = _kd_model(v8n, losses)
    batch = _batch()
    loss, items = m.loss(batch)
    kd_keys = [k for k in items if k.startswith("kd_")]
    assert kd_keys and all(items[k].item() > 0 for k in kd_keys)
    loss.sum().backward()
    g_kd = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and not n.startswith("kd.")}
    m.zero_grad()
    m.kd.scales = [0.0] * len(m.kd.terms)  # same forward, KD weighted to zero
    loss0, _ = m.loss(batch)
    loss0.sum().backward()
    diff = sum((g_kd[n] - p.grad).abs().sum().item() for n, p in m.named_parameters() if n in g_kd)
    assert diff > 0, "KD did not change the student's gradients"
    assert all(p.grad is None for p in v8n.parameters()), "teacher must stay frozen"


def test_auto_balance_sets_requested_fraction(v8n):
    m = _kd_model(v8n, [LossSpec(name="cwd"), LossSpec(name="kd_logit", weight=2.0)], balance=0.25)
    _, items = m.loss(_batch())
    task = sum(items[k].item() for k in ("box_loss", "cls_loss", "dfl_loss"))
    assert items["kd_cwd"].item() == pytest.approx(0.25 * task, rel=1e-4)
    assert items["kd_logit"].item() == pytest.approx(2 * 0.25 * task, rel=1e-4)


def test_eval_mode_loss_has_zero_kd_items_and_teacher_is_not_pickled(v8n, tmp_path):
    import copy

    m = _kd_model(v8n, [LossSpec(name="cwd")])
    m.eval()
    _, items = m.loss(_batch())
    assert items["kd_cwd"].item() == 0
    assert copy.deepcopy(m).teacher_ref is m.teacher_ref         # EMA copies share the teacher
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.teacher_ref.model is None and loaded.kd is not None
    plain = plain_student(m)
    assert type(plain).__name__ == "DetectionModel"
    assert not any(k.startswith("kd.") for k in plain.state_dict())


def _recipe(tmp_path, tiny_data, teacher, epochs=1, losses="[{name: cwd}, {name: kd_logit}]"):
    p = tmp_path / "distill.yaml"
    p.write_text(f"""
name: tinykd
teacher: {{model: {teacher}}}
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: {epochs}, imgsz: 128, batch: 8}}
distill: {{auto_balance: 0.5, balance_batches: 2, losses: {losses}}}
""")
    return p


@pytest.mark.slow
def test_distill_end_to_end_cli(tmp_path, tiny_data, trained_bundle):
    r = _recipe(tmp_path, tiny_data, trained_bundle)
    out = tmp_path / "kd"
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["kd_terms"]) == {"cwd", "kd_logit"} and all(v > 0 for v in data["kd_terms"].values())
    assert CliRunner().invoke(app, ["bundle", "verify", str(out)]).exit_code == 0
    shown = CliRunner().invoke(app, ["bundle", "show", str(out)], env={"COLUMNS": "160"})
    assert shown.exit_code == 0 and "KD term" in shown.output and "kd_logit" in shown.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["parents"][0]["path"] == str(trained_bundle.resolve())
    assert m["metrics"]["epochs"][0]["train/kd_cwd"] > 0 and "map50_95" in m["metrics"]
    from ultralytics import YOLO

    y = YOLO(str(out / "weights.pt"))                         # users can load the student with Ultralytics
    assert not any(k.startswith("kd.") for k in y.model.state_dict())
    rep = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0 and (tmp_path / "rep" / "losses-kd.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_teacher_assistant_chain_from_the_shipped_recipes(tmp_path, tiny_data, trained_bundle):
    """recipes/assistant.yaml then recipes/backbone-head-via-assistant.yaml, on small data: the assistant (kdctl's
    yolov8-ta) is distilled from the teacher, the student from the assistant's bundle; the student's manifest names
    the assistant as its parent and teacher, and its report compares it with the assistant (its own teacher)."""
    import yaml

    from kdctl.bundle import load_bundle, sha256_file
    from kdctl.report.kd_summary import compare

    root = Path(__file__).resolve().parents[1] / "recipes"
    ta_path, st_path = root / "assistant.yaml", root / "backbone-head-via-assistant.yaml"
    ta_out = tmp_path / "assistant"
    for path, teacher, out in ((ta_path, trained_bundle, ta_out), (st_path, ta_out, tmp_path / "student")):
        d = yaml.safe_load(path.read_text())
        shipped_losses = d["distill"]["losses"]
        d.update(teacher={"model": str(teacher)}, data={"yolo": str(tiny_data)})
        d["train"].update(epochs=1, batch=8)
        r = tmp_path / path.name
        r.write_text(yaml.safe_dump(d))
        res = CliRunner().invoke(app, ["distill", str(r), "--out", str(out), "--json", "--quiet"])
        assert res.exit_code == 0, res.output
        assert {t["name"] for t in shipped_losses} == set(json.loads(res.stdout)["kd_terms"]) == {"at", "kd_logit",
                                                                                                  "ld"}
    ta, st = load_bundle(ta_out), load_bundle(tmp_path / "student")
    assert ta.metrics["params"] > 1.9 * st.metrics["params"]  # yolov8-ta: 3/16 width against yolov8-tiny's 1/8
    assert [p["id"] for p in st.manifest["parents"]] == [ta.id]
    assert st.manifest["inputs"]["teacher"]["sha256"] == sha256_file(ta_out / "weights.pt")
    assert compare([load_bundle(trained_bundle), ta, st]).teacher.id == ta.id
    assert yaml.safe_load(st_path.read_text())["teacher"]["model"] == "runs/distill/assistant"  # where the first
    assert "--out runs/distill/assistant" in ta_path.read_text()                              # recipe writes


def test_distill_errors_cli(tmp_path, tiny_data, trained_bundle):
    bad = _recipe(tmp_path, tiny_data, trained_bundle, losses="[{name: cwd, student_layers: [77]}]")
    res = CliRunner().invoke(app, ["distill", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "student_layers: layer 77 is out of range" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output  # before any work: no progress bar drawn first
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()
    assert not (tmp_path / ".x.work").exists(), "a run that failed before its first epoch must leave nothing"
    missing = _recipe(tmp_path, tiny_data, tmp_path / "nope.pt")
    res = CliRunner().invoke(app, ["distill", str(missing), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "teacher.model: checkpoint" in res.output and "not found" in res.output


@pytest.mark.slow
def test_resume_after_kill(tmp_path, tiny_data, trained_bundle):
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=3)
    out = tmp_path / "kd"
    last = tmp_path / ".kd.work" / "train" / "weights" / "last.pt"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "kdctl.cli.main", "distill", str(r), "--out", str(out), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no epoch checkpoint appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a bundle"
    scales = json.loads((tmp_path / ".kd.work" / "train" / "kd_balance.json").read_text())["scales"]
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(out), "--resume", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert [e["epoch"] for e in m["metrics"]["epochs"]] == [1, 2, 3]
    assert [t["scale"] for t in m["metrics"]["kd_terms"]] == scales  # auto-balance scales survive the kill
    assert not (tmp_path / ".kd.work").exists()
    assert CliRunner().invoke(app, ["bundle", "verify", str(out)]).exit_code == 0


def test_trainer_requires_explicit_distill_setup(tiny_data, tmp_path):
    """A trainer rebuilt without its KD setup (the DDP failure mode) must refuse, not train without KD."""
    from kdctl.detectors.yolo import KDTrainer

    with pytest.raises(TypeError, match="needs distill="):
        KDTrainer(overrides={"model": "yolov8n.yaml", "data": str(tiny_data), "project": str(tmp_path)})


def test_kd_loss_under_autocast_keeps_fp32_losses(v8n):
    """Under autocast (bf16 on CPU here, fp16 on GPU) features arrive in low precision; adapters and KD terms
    run in FP32, so the step neither mixes dtypes nor loses the KD term."""
    m = _kd_model(v8n, [LossSpec(name="cwd"), LossSpec(name="fitnet", level="backbone"), LossSpec(name="ld")])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, items = m.loss(_batch())
    assert all(items[k].dtype == torch.float32 and items[k].item() > 0 for k in ("kd_cwd", "kd_fitnet", "kd_ld"))
    loss.sum().backward()
    adapter = m.kd.terms[0].losses[0].align.proj[0].weight
    assert adapter.dtype == torch.float32 and adapter.grad is not None and adapter.grad.abs().sum() > 0


def test_kd_part_of_the_loss_is_scaled_by_batch_size(v8n):
    """Ultralytics multiplies its per-image task loss by the batch size; the KD part must be too, or KD's share
    shrinks as the batch grows."""
    m = _kd_model(v8n, [LossSpec(name="cwd", params={"tau": 2.0}), LossSpec(name="kd_logit")])
    for n in (2, 4):
        loss, items = m.loss(_batch(n=n))
        kd = sum(v.item() for k, v in items.items() if k.startswith("kd_"))
        assert loss[-1].item() == pytest.approx(kd * n, rel=1e-5)


def test_stopped_distillation_trains_on_the_task_loss_without_running_the_teacher(v8n):
    """distill.stop_epoch: once the criterion is stopped, a training step's loss and gradients are the task loss's
    alone, every KD item reads 0 and the teacher does not run; before that, KD is on."""
    m = _kd_model(v8n, [LossSpec(name="cwd", params={"tau": 2.0}), LossSpec(name="kd_logit")])
    runs = []
    hook = v8n.model[0].register_forward_hook(lambda *a: runs.append(1))
    try:
        batch = _batch(n=2)
        m.kd.at_epoch(0, 1)
        assert not m.kd.stopped
        _, items = m.loss(batch)
        assert runs and items["kd_cwd"].item() > 0 and items["kd_logit"].item() > 0
        runs.clear()
        m.kd.at_epoch(1, 1)
        assert m.kd.stopped
        m.zero_grad()
        loss, items = m.loss(batch)
        assert not runs, "the teacher ran after distillation stopped"
        assert items["kd_cwd"].item() == 0 and items["kd_logit"].item() == 0
        loss.sum().backward()
        stopped = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad()
        task, _ = m.criterion(m.forward(batch["img"]), batch)
        assert torch.equal(loss, task)
        task.sum().backward()
        plain = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert stopped.keys() == plain.keys() and not any(n.startswith("kd.") for n in plain)
        assert all(torch.equal(stopped[n], plain[n]) for n in plain)
        m.kd.at_epoch(7, None)
        assert not m.kd.stopped  # unset: every epoch distills
    finally:
        hook.remove()


def test_warmup_ramps_every_kd_term_in_by_epoch(v8n):
    """distill.warmup_epochs: 4: epoch e (0-based) weighs every KD term (e + 1) / 4 of its full value (its weight
    times its auto-balance scale); from epoch 4 on the full value; the ramp is decided from the epoch number alone
    (as --resume needs) and stop_epoch still stops."""
    m = _kd_model(v8n, [LossSpec(name="cwd", params={"tau": 2.0}), LossSpec(name="kd_logit", weight=3.0)], balance=0.5)
    batch = _batch(n=2)
    m.kd.at_epoch(9, None)
    m.loss(batch)  # one balance batch of 8: running scales, fixed here so every epoch below sees the same ones
    m.kd.scales = list(m.kd.current)
    _, full = m.loss(batch)
    for epoch, share in ((0, 0.25), (2, 0.75), (3, 1.0), (12, 1.0), (1, 0.5)):
        m.kd.at_epoch(epoch, None, 4)
        assert m.kd.ramp == share
        _, items = m.loss(batch)
        for k in ("kd_cwd", "kd_logit"):
            assert items[k].item() == pytest.approx(share * full[k].item(), rel=1e-5), (epoch, k)
    m.kd.at_epoch(5, 5, 4)
    assert m.kd.stopped
    m.kd.at_epoch(0, None, None)
    assert m.kd.ramp == 1.0


STOP_RUNS = {  # family: (student, teacher, train section, losses, batches an epoch on tiny_data's 24 images)
    "yolo": ("yolov8-tiny.yaml", None, "imgsz: 128, batch: 8", "[{name: cwd}, {name: kd_logit}]", 3),
    "rtdetr": ("rtdetr-tiny.yaml", "rtdetr-tiny.yaml", "imgsz: 64, batch: 4",
               "[{name: detr_logit}, {name: pkd, level: neck}]", 6),
    "torchvision": ("'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'",
                    "'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'", "imgsz: 64, batch: 4, optimizer: SGD",
                    "[{name: rpn_kd}, {name: roi_kd}]", 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(STOP_RUNS))
def test_stop_epoch_distills_the_first_epochs_only(tmp_path, tiny_data, trained_bundle, family, monkeypatch):
    """Every family's trainer: with distill.stop_epoch 1 of 2 epochs the KD terms are computed on each batch of
    epoch 1 and on none of epoch 2 (logged as 0); the bundle records where KD stopped and shows that epoch's terms."""
    from kdctl.distill.criterion import DistillationCriterion
    from kdctl.distill.losses.registry import kd_item

    student, teacher, train, losses, batches = STOP_RUNS[family]
    calls = []
    forward = DistillationCriterion.forward
    monkeypatch.setattr(DistillationCriterion, "forward", lambda self, *a: (calls.append(1), forward(self, *a))[1])
    r = tmp_path / "stop.yaml"
    r.write_text(f"name: stop\nteacher: {{model: {teacher or trained_bundle}}}\nstudent: {{model: {student}}}\n"
                 f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 2, {train}}}\n"
                 f"distill: {{auto_balance: 0.25, balance_batches: 2, stop_epoch: 1, losses: {losses}}}\n")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(calls) == batches, f"KD computed on {len(calls)} batches, expected epoch 1's {batches}"
    m = json.loads((tmp_path / "kd" / "manifest.json").read_text())["metrics"]
    cols = {t["name"]: f"train/{kd_item(t['name'])}" for t in m["kd_terms"]}
    first, second = m["epochs"]
    assert all(first[c] > 0 for c in cols.values()) and all(second[c] == 0 for c in cols.values()), (first, second)
    assert m["kd_stop_epoch"] == 1
    shown = json.loads(res.stdout)["kd_terms"]  # the summary shows the last epoch that distilled, not the zeros
    assert shown == {n: first[c] for n, c in cols.items()}


@pytest.mark.slow
def test_warmup_epochs_ramp_kd_in_during_a_real_run(tmp_path, tiny_data, trained_bundle, monkeypatch):
    """distill.warmup_epochs: 2 of 3 epochs reaches the trainer: every batch of epoch 1 weighs KD at 1/2, of epochs
    2 and 3 at full weight (the epoch callback sets the ramp before each epoch's batches)."""
    from kdctl.distill.criterion import DistillationCriterion

    student, _, train, losses, batches = STOP_RUNS["yolo"]
    ramps = []
    forward = DistillationCriterion.forward
    monkeypatch.setattr(DistillationCriterion, "forward",
                        lambda self, *a: (ramps.append(self.ramp), forward(self, *a))[1])
    r = tmp_path / "warm.yaml"
    r.write_text(f"name: warm\nteacher: {{model: {trained_bundle}}}\nstudent: {{model: {student}}}\n"
                 f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 3, {train}}}\n"
                 f"distill: {{auto_balance: 0.25, balance_batches: 2, warmup_epochs: 2, losses: {losses}}}\n")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output
    assert ramps == [0.5] * batches + [1.0] * 2 * batches


def test_ld_positives_are_the_task_losss_own_assignment():
    """LD with positives: true reads the positives the student's task loss assigned in the same step (its
    task-aligned assigner, captured, not recomputed), weighted by their target scores, and the rest of the assigner's
    in-box candidates as the valuable localisation region; the term then equals that formula on those regions."""
    from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors

    torch.manual_seed(0)  # both models' initial weights: the numbers below do not hang on which tests ran before
    m = _kd_model(build_detector("yolov8n.yaml", nc=3),
                  [LossSpec(name="ld", params={"positives": True, "temperature": 3.0})])
    assert m.kd.needs_assignment
    captured = {}
    term = m.kd.terms[0].losses[0]
    original = term.compute
    term.compute = lambda s, t: captured.update(s=s, t=t) or original(s, t)
    batch = _batch()
    _, items = m.loss(batch)
    s, t = captured["s"], captured["t"]
    # the same assignment, recomputed here from the student's predictions the task loss saw
    crit = m.criterion
    assert isinstance(crit.assigner, TaskAlignedAssigner)
    with torch.no_grad():
        preds = m.predict(batch["img"])
    anchors, strides = make_anchors(preds["feats"], crit.stride, 0.5)
    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
    targets = crit.preprocess(targets, 2, scale_tensor=torch.tensor([128.0] * 4))
    labels, gt = targets.split((1, 4), 2)
    mask_gt = gt.sum(2, keepdim=True).gt_(0.0)
    pd = crit.bbox_decode(anchors, preds["boxes"].permute(0, 2, 1)) * strides
    _, _, scores, fg, _ = crit.assigner(preds["scores"].permute(0, 2, 1).sigmoid(), pd, anchors * strides, labels,
                                        gt, mask_gt)
    assert fg.any() and torch.equal(s["pos_weight"] > 0, fg)
    assert torch.allclose(s["pos_weight"], scores.sum(-1) * fg)
    inside = crit.assigner.select_candidates_in_gts(anchors * strides, gt, mask_gt).any(1)
    assert s["vlr"].any() and torch.equal(s["vlr"], inside & ~fg)
    # image 1 has one box: no anchor of image 1 outside it is in either region
    assert not (((s["pos_weight"][1] > 0) | s["vlr"][1]) & ~inside[1]).any()
    plain = LocalizationDistillation(temperature=3.0, positives=True)(
        {"scores": s["scores"], "boxes": s["boxes"], "pos_weight": s["pos_weight"], "vlr": s["vlr"]}, t)
    assert items["kd_ld"].item() == pytest.approx(plain.item(), rel=1e-5)
    # the plain (all-anchor) LD on the same step is another number: the regions matter
    all_anchors = LocalizationDistillation(temperature=3.0)({"scores": s["scores"], "boxes": s["boxes"]}, t)
    assert abs(all_anchors.item() - plain.item()) > 1e-3


@pytest.mark.slow
def test_yolo26_pair_distils_with_the_shipped_logit_crosskd_terms(tmp_path, tiny_data):
    """A trained yolo26n teacher (reg_max 1) and a yolo26n student, through the CLI, with recipes/logit-crosskd.yaml's
    terms: both KD terms logged and positive every epoch, the bundle verifies."""
    import json

    import yaml
    from typer.testing import CliRunner

    from kdctl.bundle import verify_bundle
    from kdctl.cli.main import app

    train = "{epochs: 2, imgsz: 128, batch: 8, workers: 0}"
    (tmp_path / "t.yaml").write_text(f"name: t\nstudent: {{model: yolo26n.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                                     f"train: {train}\n")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "t"), "-q"])
    assert res.exit_code == 0, res.output
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/logit-crosskd.yaml").read_text())
    recipe = {"name": "kd", "teacher": {"model": str(tmp_path / "t")}, "student": {"model": "yolo26n.yaml"},
              "data": {"yolo": str(tiny_data)}, "train": yaml.safe_load(train), "distill": shipped["distill"]}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["distill", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "kd"), "-q"])
    assert res.exit_code == 0, res.output
    epochs = json.loads((tmp_path / "kd" / "metrics.json").read_text())["epochs"]
    assert len(epochs) == 2 and all(e["train/kd_logit"] > 0 and e["train/kd_crosskd"] > 0 for e in epochs)
    assert verify_bundle(tmp_path / "kd").ok


def test_keep_classes_is_the_models_own_scores_of_those_classes():
    """A teacher's classes kept by name: the copy's class scores are the model's at those classes, in the order
    asked, in training (the raw head KD reads) and in eval; boxes unchanged; YOLO (one-to-many and end-to-end
    heads) and RT-DETR. A torchvision detector (a softmax over its classes) keeps its detections of those classes,
    the others' dropped: its classifier is not cut."""
    from kdctl.detectors import keep_classes
    from kdctl.detectors.rtdetr import DenseOutput
    from kdctl.detectors.rtdetr import build_detector as build_rtdetr
    from kdctl.detectors.torchvision import build_detector as build_tv

    x = torch.rand(2, 3, 64, 64)
    for cfg in ("yolov8n.yaml", "yolo26n.yaml"):
        m = build_detector(cfg, nc=5)
        m.names = dict(enumerate("a b c d e".split()))
        k = keep_classes(m, [3, 1], ["d", "b"])
        assert k.names == {0: "d", 1: "b"} and k.model[-1].nc == 2 and m.model[-1].nc == 5  # the model is not cut
        with torch.no_grad():
            full, part = m.train()(x), k.train()(x)
            full, part = full.get("one2many", full), part.get("one2many", part)
            torch.testing.assert_close(part["scores"], full["scores"][:, [3, 1]])
            torch.testing.assert_close(part["boxes"], full["boxes"])
            full, part = m.eval()(x)[0], k.eval()(x)[0]
        assert part.shape[1] == full.shape[1] - 3
        torch.testing.assert_close(part[:, 4:], full[:, 4:][:, [3, 1]])
    r = build_rtdetr("rtdetr-l.yaml", nc=5).eval()
    k = keep_classes(r, [4, 0, 2], ["e", "a", "c"])
    assert k.model[-1].nc == 3 and k.model[-1].denoising_class_embed.weight.shape[0] == 3
    with torch.no_grad():
        full, part = DenseOutput(r)(x), DenseOutput(k)(x)
    assert part.shape == (2, 7, full.shape[2])  # every query still there, three classes each
    kh, rh = k.model[-1], r.model[-1]  # the encoder's and every decoder layer's scores of those classes, in order
    for cut, whole in [(kh.enc_score_head, rh.enc_score_head), *zip(kh.dec_score_head, rh.dec_score_head)]:
        assert torch.equal(cut.weight, whole.weight[[4, 0, 2]]) and torch.equal(cut.bias, whole.bias[[4, 0, 2]])
    assert torch.equal(kh.denoising_class_embed.weight, rh.denoising_class_embed.weight[[4, 0, 2]])
    fr = build_tv("torchvision:fasterrcnn_mobilenet_v3_large_fpn", 5).eval()
    k = keep_classes(fr, [3, 0], ["d", "a"])
    with torch.no_grad():
        full, part = fr(x), k(x)
    assert k.nc == fr.nc == 5 and k.names == {0: "d", 1: "a"} and part.shape == (2, 6, full.shape[2])
    assert (full[:, 4:] > 0.001).any()  # detections to compare
    torch.testing.assert_close(part, full[:, [0, 1, 2, 3, 4 + 3, 4 + 0]])
    # names beyond the head's classes (a checkpoint of other code) are not taken for its classes
    from kdctl.data.resolve import Dataset
    from kdctl.models import dataset_classes

    m = build_detector("yolov8n.yaml", nc=3)
    m.names = dict(enumerate("a b c d e".split()))
    ds = Dataset(Path("d.yaml"), ["b", "e"], [], [])
    assert dataset_classes(m, ds) == (m, None)
    m.names = dict(enumerate("a e b".split()))
    kept, picked = dataset_classes(m, ds)
    assert picked == {"model_nc": 3, "index": {"b": 2, "e": 1}} and kept.names == {0: "b", 1: "e"}


def test_dataset_class_index_finds_the_teachers_classes_by_name(tiny_data):
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.errors import DataError

    ds = load_yolo_yaml(tiny_data)
    assert ds.names == ["circle", "square", "triangle"]
    coco = {0: "person", 1: "Triangle ", 2: "dog", 3: "circle", 4: "SQUARE"}
    assert ds.class_index(coco) == [3, 4, 1]
    assert ds.class_index(["triangle", "circle", "square"]) is None   # another order: refused, not guessed
    assert ds.class_index(["circle", "square", "triangle"]) is None               # these classes, in order
    assert ds.class_index(["0", "1", "2", "3"]) is None                           # built from a YAML: no names
    assert ds.class_index(["circle", "square", "star"]) is None                   # not all of them
    assert ds.class_index(["circle", "square", "triangle", "circle"]) is None     # one of them twice: no guess
    # what a checkpoint of other code may hold as names is compared as well as it can be, never an error
    assert ds.class_index({0: "circle", "1": "square", 2: 3, 3: "triangle"}) == [0, 1, 3]
    assert ds.class_index({"x": "triangle", "y": "circle", "z": "square", "w": None}) == [1, 2, 0]
    assert ds.class_index(7) is None and ds.check_model_names(7, "m") is None
    with pytest.raises(DataError, match="another order"):
        ds.check_model_names({"a": "square", "b": "circle", "c": "triangle"}, "m")


def test_a_teacher_of_more_classes_in_another_order_teaches_the_datasets_by_name(tmp_path, tiny_data,
                                                                                 trained_bundle):
    """A teacher trained on a superset of the dataset's classes, in another order (a COCO teacher for a person/car
    set): head-level KD reads its scores of the dataset's classes, found by name, so the run is the one its own
    three-class teacher gives, step for step (same student weights, same teacher mAP); the bundle records the
    selection. Before, it was refused ('the student predicts 3 and the teacher 5')."""
    big = superset_checkpoint(trained_bundle, tmp_path / "coco-like.pt", ["dog", "triangle", "circle", "cat", "square"])
    outs = {}
    for name, teacher in (("own", trained_bundle), ("superset", big)):
        r = tmp_path / f"{name}.yaml"
        r.write_text(f"""
name: {name}
teacher: {teacher}
student: {{model: yolov8-tiny.yaml}}
data: {tiny_data}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
distill:
  init: teacher
  losses: [{{name: kd_logit, params: {{temperature: 2.0}}}}, {{name: ld}}]
""")
        checked = CliRunner().invoke(app, ["recipe", "check", str(r), "--models", "--json"])
        assert checked.exit_code == 0, checked.output
        res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / name), "--json"])
        assert res.exit_code == 0, res.output
        outs[name] = json.loads((tmp_path / name / "manifest.json").read_text())
        picked = outs[name]["inputs"]["teacher"].get("classes")
        shown = [json.loads(r.stdout).get("teacher_classes") for r in (checked, res)]
        assert shown == [picked, picked]
    own, sup = outs["own"], outs["superset"]
    assert sup["inputs"]["teacher"]["classes"] == {"model_nc": 5, "index": {"circle": 2, "square": 4,
                                                                              "triangle": 1}}
    assert "classes" not in own["inputs"]["teacher"]
    assert sup["metrics"]["init"]["selected_params"] == own["metrics"]["init"]["selected_params"]
    ev = CliRunner().invoke(app, ["eval", str(trained_bundle), "--data", str(tiny_data), "--out",
                                  str(tmp_path / "ev"), "-q"])
    assert ev.exit_code == 0, ev.output
    teacher_map = json.loads((tmp_path / "ev" / "manifest.json").read_text())["metrics"]["map50_95"]
    assert sup["metrics"]["teacher"]["map50_95"] == pytest.approx(teacher_map, abs=1e-4)  # on its 3 classes
    # kdctl eval scores such a model on the dataset's classes too (it was refused: '3 classes but ... predicts 5')
    ev = CliRunner().invoke(app, ["eval", str(big), "--data", str(tiny_data), "--imgsz", "128", "--out",
                                  str(tmp_path / "ev-big"), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["map50_95"] == pytest.approx(teacher_map, abs=1e-4)
    assert json.loads(ev.stdout)["classes"] == sup["inputs"]["teacher"]["classes"]
    for k in ("train/kd_logit", "train/kd_ld", "train/cls_loss"):
        assert sup["metrics"]["epochs"][0][k] == pytest.approx(own["metrics"]["epochs"][0][k], rel=1e-4)
    # the same up to float rounding (a 5-channel convolution sums in another order than a 3-channel one)
    assert sup["metrics"]["map50_95"] == pytest.approx(own["metrics"]["map50_95"], abs=1e-3)
    # the report draws the teacher as the run read it (it stopped at a class index past the dataset's names)
    rep = CliRunner().invoke(app, ["report", str(tmp_path / "superset"), "--out", str(tmp_path / "rep"), "--json"])
    assert rep.exit_code == 0 and (tmp_path / "rep" / "predictions.png").stat().st_size > 1000, rep.output
    assert "coco-like.pt | " in (md := (tmp_path / "rep" / "report.md").read_text())
    assert "read for the dataset's 3 of its 5 classes, by name" in md


def test_a_student_checkpoint_of_more_classes_is_checked_as_it_trains(tmp_path, tiny_data, trained_bundle):
    """A student checkpoint of other classes (a COCO model fine-tuned on a person/car set) is judged as its trainer
    starts it: Ultralytics loads it into a model of the dataset's classes, its class rows matched by name (YOLO and
    RT-DETR alike). ``recipe check --models`` refused head KD for a run ``distill`` took ('student predicts (5, 84)
    ... the teacher was trained on other classes'). Where each class started is shown and recorded."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors import load_detector
    from kdctl.detectors.rtdetr import build_detector as build_rtdetr
    from kdctl.models import ASSET_MODELS, as_started, model_classes

    big = superset_checkpoint(trained_bundle, tmp_path / "big.pt", ["dog", "triangle", "circle", "cat", "square"])
    r = tmp_path / "kd.yaml"
    r.write_text(f"name: kd\nstudent: {{model: big.pt}}\nteacher: {{model: {trained_bundle}}}\ndata: {tiny_data}\n"
                 "train: {epochs: 1, imgsz: 128, batch: 8}\n"
                 "distill: {losses: [{name: kd_logit, params: {temperature: 2.0}}, {name: cwd}]}\n")
    res = CliRunner().invoke(app, ["recipe", "check", str(r), "--models", "--json"])
    assert res.exit_code == 0, res.output
    assert [t["name"] for t in json.loads(res.stdout)["kd_terms"]] == ["kd_logit", "cwd"]
    start = {"model_nc": 5, "index": {"circle": 2, "square": 4, "triangle": 1}}
    assert json.loads(res.stdout)["student_classes"] == start

    ds = load_yolo_yaml(tiny_data)
    own, (started, record) = load_detector(trained_bundle / "weights.pt"), as_started(load_detector(big), ds)
    assert model_classes(started) == 3 and started.names == dict(enumerate(ds.names)) and record == start
    for a, b in zip(own.model[-1].cv3, started.model[-1].cv3):  # the trained rows, back in the dataset's order
        assert torch.equal(a[-1].weight, b[-1].weight) and torch.equal(a[-1].bias, b[-1].bias)
    torch.manual_seed(0)
    rt = build_rtdetr(ASSET_MODELS / "rtdetr-tiny.yaml", 5)
    rt.names = dict(enumerate(["dog", ds.names[2], "cat", ds.names[0], ds.names[1]]))
    started, record = as_started(rt, ds)
    assert model_classes(started) == 3 and model_classes(rt) == 5 and record["index"] == dict(zip(ds.names, [3, 4, 1]))
    for name in ("enc_score_head", "dec_score_head.0", "denoising_class_embed"):
        w0, w1 = (dict(m.model[-1].named_modules())[name].weight for m in (rt, started))
        assert torch.equal(w1, w0[[3, 4, 1]]), name
    # the same classes in another order: Ultralytics moves the rows, and so does the student checked here
    swapped = load_detector(trained_bundle / "weights.pt")
    swapped.names = {0: ds.names[2], 1: ds.names[0], 2: ds.names[1]}
    started, record = as_started(swapped, ds)
    assert record == {"model_nc": 3, "index": {ds.names[0]: 1, ds.names[1]: 2, ds.names[2]: 0}}
    for a, b in zip(own.model[-1].cv3, started.model[-1].cv3):
        assert torch.equal(b[-1].weight, a[-1].weight[[1, 2, 0]])
    assert as_started(load_detector(trained_bundle / "weights.pt"), ds)[1] is None  # its own classes: as it is


def test_the_prediction_panel_draws_a_teacher_of_other_classes(tmp_path, tiny_data, trained_bundle):
    """A teacher bundle of other classes (feature KD from a model trained elsewhere) in the report's prediction
    panel: its classes past the dataset's are drawn as 'class N' (an IndexError stopped the report); one of more
    classes whose names include the dataset's is drawn for those, as distill read it."""
    from PIL import Image

    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.report.predictions import prediction_grid

    ds = load_yolo_yaml(tiny_data)
    others = superset_checkpoint(trained_bundle, tmp_path / "others.pt", ["dog", "cat", "bird", "fish", "cow"])
    more = superset_checkpoint(trained_bundle, tmp_path / "more.pt", ["dog", "triangle", "circle", "cat", "square"])
    out = prediction_grid([("others", others), ("more", more), ("own", trained_bundle / "weights.pt")],
                          ds.val_images[:2], ds, 128, tmp_path / "p.png")
    with Image.open(out) as im:
        assert im.size == (3 * 240, 22 + 2 * 240)
        more_col, own_col = (im.crop((x, 22, x + 240, 22 + 480)).tobytes() for x in (240, 480))
    assert more_col == own_col  # the dataset's three classes of five are its own teacher's, box for box
