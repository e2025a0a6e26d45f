"""distill.init: teacher — a YOLO student whose first weights are a selection of its teacher's (Xu et al. 2024)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.detectors.weight_selection import select_weights, sel
from kdctl.detectors.yolo import build_detector
from kdctl.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "kdctl/assets/models/yolov8-tiny.yaml"


def _layout(tmp_path: Path, width: float, max_channels: int, name: str, depth: float = 0.33) -> Path:
    """kdctl's yolov8-tiny layout at another width / channel cap / depth."""
    text = TINY.read_text().replace("t: [0.33, 0.125, 1024]", f"t: [{depth}, {width}, {max_channels}]")
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def _widen(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Make ``teacher`` (twice the student's width) compute exactly what ``student`` computes, written without the
    code under test: student channel j lives at teacher channel 2j of every tensor; the odd channels are random
    and every weight reading them is zero, so a layer that reads a wrong channel picks up noise."""
    g = torch.Generator().manual_seed(0)
    t_state = teacher.state_dict()
    for key, s in student.state_dict().items():
        t = t_state[key]
        if s.dim() == 0:
            t.copy_(s)
            continue
        new = torch.rand(t.shape, generator=g) + 0.5  # positive: valid as a running variance too
        out_idx = torch.arange(s.shape[0]) * (t.shape[0] // s.shape[0])
        assert t.shape[0] in (s.shape[0], 2 * s.shape[0]), key
        if s.dim() == 1:
            new[out_idx] = s
        else:
            assert t.shape[1] in (s.shape[1], 2 * s.shape[1]) and t.shape[2:] == s.shape[2:], key
            in_idx = torch.arange(s.shape[1]) * (t.shape[1] // s.shape[1])
            if t.shape[1] != s.shape[1]:
                new[:, 1::2] = 0  # reads of the odd (noise) channels
            new[out_idx.unsqueeze(1), in_idx.unsqueeze(0)] = s
        t.copy_(new)


def test_selection_evenly_spaced():
    assert sel(8, 4).tolist() == [0, 2, 4, 6] and sel(6, 4).tolist() == [0, 1, 3, 4] and sel(5, 5).tolist() == [
        0, 1, 2, 3, 4] and sel(4, 0).tolist() == []


def test_selection_recovers_a_student_embedded_in_its_teacher():
    """A yolov8n teacher that embeds a yolov8-tiny student (channel j at 2j, zero weights from the other channels)
    computes the student's outputs; weight selection from it must give back that student, tensor for tensor."""
    torch.manual_seed(1)
    student = build_detector(TINY, nc=3).eval()
    teacher = build_detector("yolov8n.yaml", nc=3).eval()
    _widen(student, teacher)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x)[0], student(x)[0], atol=1e-4)  # the oracle is right
    fresh = build_detector(TINY, nc=3).eval()
    info = select_weights(fresh, teacher)
    for key, v in student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], v), key
    with torch.no_grad():
        assert torch.allclose(fresh(x)[0], student(x)[0], atol=1e-5)
    assert info["kept"] == pytest.approx(sum(p.numel() for p in fresh.parameters()) /
                                         sum(p.numel() for p in teacher.parameters()), abs=1e-4)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov5n.yaml", "yolov8n-p6.yaml",
                                 "yolov8n-ghost.yaml"])
def test_selecting_a_model_from_its_own_twin_copies_it(cfg):
    """Same architecture on both sides: every selection is the identity, so the student becomes the teacher
    (all module kinds weight selection knows: C2f, C3k2/C3k, C2PSA attention, C2, C3, Ghost blocks, DWConv heads)."""
    torch.manual_seed(0)
    teacher = build_detector(cfg, nc=3).eval()
    student = build_detector(cfg, nc=3).eval()
    select_weights(student, teacher)
    for key, v in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], v), key


def test_concatenated_layers_of_different_widths_are_cut_part_by_part(tmp_path):
    """A teacher whose P5 layers are capped to the student's width (ratio 1) while P3/P4 are twice as wide: the
    neck's Concat of an upsampled P5 and a P4 map must be cut per part (all 128 P5 channels, every other P4 one),
    which a cut of the whole 256 → 192 channels would not give."""
    teacher = build_detector(_layout(tmp_path, 0.25, 512, "capped"), nc=3)
    student = build_detector(TINY, nc=3)
    select_weights(student, teacher)
    tw, sw = teacher.model[12].cv1.conv.weight, student.model[12].cv1.conv.weight
    assert tuple(tw.shape[:2]) == (128, 256) and tuple(sw.shape[:2]) == (64, 192)
    rows = torch.arange(64) * 2
    cols = torch.cat([torch.arange(128), 128 + torch.arange(64) * 2])
    assert torch.equal(sw, tw[rows][:, cols])
    # layer 21 (128 channels on both sides) reads [Conv P4→P5 (128 → 64), SPPF (128 → 128)]
    tw, sw = teacher.model[21].cv1.conv.weight, student.model[21].cv1.conv.weight
    assert tuple(tw.shape[:2]) == (128, 256) and tuple(sw.shape[:2]) == (128, 192)
    assert torch.equal(sw, tw[:, torch.cat([torch.arange(64) * 2, 128 + torch.arange(128)])])
    # C2f's last convolution reads (2 + n) chunks: chunk k of the student is every other channel of chunk k
    tw, sw = teacher.model[2].cv2.conv.weight, student.model[2].cv2.conv.weight
    assert tw.shape[1] == 2 * sw.shape[1]
    assert torch.equal(sw, tw[torch.arange(sw.shape[0]) * 2][:, torch.arange(sw.shape[1]) * 2])


def test_a_shallower_student_keeps_the_teachers_first_blocks(tmp_path):
    """Teacher at depth 0.67 (C2f with 2 and 4 blocks), student at 0.33 (1 and 2), same width: each student block
    is the teacher's block of the same index, and C2f's last convolution reads the split chunks and the kept
    blocks' outputs (the dropped blocks' chunks are left out)."""
    teacher = build_detector(_layout(tmp_path, 0.125, 1024, "deep", depth=0.67), nc=3)
    student = build_detector(TINY, nc=3)
    select_weights(student, teacher)
    for layer in (2, 4, 6, 12):
        t, s = teacher.model[layer], student.model[layer]
        assert len(t.m) == 2 * len(s.m)
        for a, b in zip(t.m, s.m):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        keep = (2 + len(s.m)) * t.c
        assert torch.equal(s.cv2.conv.weight, t.cv2.conv.weight[:, :keep]), layer
        assert torch.equal(s.cv1.conv.weight, t.cv1.conv.weight)
    with pytest.raises(RecipeError, match=r"layer 2 \(C2f\): 1 blocks in the teacher, 2 in the student"):
        select_weights(build_detector(_layout(tmp_path, 0.125, 1024, "deep", depth=0.67), nc=3), student)


def test_attention_keeps_whole_heads():
    """yolo11s → yolo11n: the C2PSA attention has 4 heads in the teacher and 2 in the student (head_dim 64, key_dim
    32): the student's query/key/value rows are heads 0 and 2 of the teacher's, and ``proj`` reads their values."""
    teacher, student = build_detector("yolo11s.yaml", nc=3), build_detector("yolo11n.yaml", nc=3)
    select_weights(student, teacher)
    ta, sa = teacher.model[10].m[0].attn, student.model[10].m[0].attn
    assert (ta.num_heads, sa.num_heads, ta.head_dim, ta.key_dim) == (4, 2, 64, 32)
    per_head = 2 * 32 + 64
    rows = torch.cat([torch.arange(per_head), 2 * per_head + torch.arange(per_head)])
    cols = torch.arange(128) * 2  # the block's input: every other one of the teacher's 256 channels
    assert torch.equal(sa.qkv.conv.weight, ta.qkv.conv.weight[rows][:, cols])
    values = torch.cat([torch.arange(64), 128 + torch.arange(64)])
    assert torch.equal(sa.proj.conv.weight, ta.proj.conv.weight[cols][:, values])
    assert torch.equal(sa.pe.conv.weight, ta.pe.conv.weight[values])  # depthwise over the kept values
    assert torch.equal(sa.qkv.bn.running_var, ta.qkv.bn.running_var[rows])


@pytest.mark.parametrize("t_cfg, s_cfg", [("yolov8n.yaml", "rtdetr-tiny.yaml"),
                                          ("rtdetr-tiny.yaml", "yolov8-tiny.yaml"),
                                          ("yolov8n.yaml", "rtdetr-small.yaml")])
def test_across_yolo_and_rtdetr_the_backbone_and_neck_are_selected_and_the_head_is_not(t_cfg, s_cfg):
    """kdctl's tiny RT-DETR has the YOLOv8 layout up to its head: layers 0-21 are selected from a YOLO teacher (or
    give a YOLO student its start), the decoder / Detect head keeps its random initialisation. kdctl's rtdetr-small
    (the RT-DETR teacher of recipes/rtdetr-teacher.yaml) has YOLOv8n's widths there, so it gets an exact copy."""
    assets = ROOT / "kdctl/assets/models"
    teacher = build_detector(t_cfg if t_cfg.startswith("yolov8n") else assets / t_cfg, nc=3)
    student = build_detector(assets / s_cfg, nc=3)
    head_before = {k: v.clone() for k, v in student.model[-1].state_dict().items()}
    info = select_weights(student, teacher)
    assert info["head"].startswith(type(student.model[-1]).__name__ + " (random start")
    for k, v in student.model[-1].state_dict().items():
        assert torch.equal(v, head_before[k]), k
    ratio = teacher.model[0].conv.out_channels // student.model[0].conv.out_channels
    if s_cfg == "rtdetr-small.yaml":
        assert ratio == 1 and all(torch.equal(v, teacher.model[:-1].state_dict()[k])
                                  for k, v in student.model[:-1].state_dict().items())
    assert torch.equal(student.model[0].conv.weight, teacher.model[0].conv.weight[::ratio])
    assert torch.equal(student.model[21].cv2.bn.running_mean, teacher.model[21].cv2.bn.running_mean[::ratio])
    assert info["selected_params"] == sum(p.numel() for p in student.model[:-1].parameters())


@pytest.mark.parametrize("teacher, student, message", [
    ("yolov8n.yaml", "yolo11n.yaml", "the teacher has 23 layers and the student 24"),
    ("yolo11m.yaml", "yolo11n.yaml", "layer 2 (C3k2): C3k in the teacher, Bottleneck in the student"),
    ("yolov8n.yaml", "yolov8m.yaml", "layer 0 (Conv): the student has 48 channels where the teacher has 16"),
    (TINY, "yolov8n.yaml", "layer 0 (Conv): the student has 16 channels where the teacher has 8"),
])
def test_pairs_that_cannot_be_matched_are_one_line_errors(teacher, student, message):
    with pytest.raises(RecipeError) as e:
        select_weights(build_detector(student, nc=3), build_detector(teacher, nc=3), "r.yaml")
    assert str(e.value).startswith("r.yaml: distill.init: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_class_count_must_match():
    with pytest.raises(RecipeError, match="22 .Detect.: a head with 4 classes"):
        select_weights(build_detector(TINY, nc=3), build_detector("yolov8n.yaml", nc=4))


def _recipe(tmp_path, tiny_data, teacher, student="yolov8-tiny.yaml", init="teacher", extra="") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"""
name: inherit
teacher: {{model: {teacher}}}
student: {{model: {student}}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
distill: {{init: {init}, auto_balance: 0.25, losses: [{{name: kd_logit}}]{extra}}}
""")
    return p


def test_the_trainer_starts_the_student_from_the_selection(tmp_path, tiny_data, trained_bundle):
    """KDTrainer.get_model applies the selection to the student it builds (and a resumed checkpoint's weights
    would replace it after)."""
    from kdctl.detectors.yolo import DistillSetup, KDTrainer, load_detector
    from kdctl.recipe.schema import LossSpec

    teacher = load_detector(trained_bundle / "weights.pt")
    narrow = _layout(tmp_path, 0.0625, 1024, "narrow")
    setup = DistillSetup(teacher, [LossSpec(name="kd_logit")], 0.25, init="teacher")
    tr = KDTrainer(overrides={"model": str(narrow), "data": str(tiny_data), "project": str(tmp_path), "imgsz": 128,
                              "device": "cpu"}, distill=setup)
    tr.data = {"nc": 3, "channels": 3, "names": {0: "a", 1: "b", 2: "c"}}
    model = tr.get_model(cfg=str(narrow))
    expected = build_detector(narrow, nc=3)
    select_weights(expected, teacher)
    got = model.state_dict()
    for key, v in expected.state_dict().items():
        assert torch.equal(got[key], v), key


def test_distill_with_init_end_to_end(tmp_path, tiny_data, trained_bundle):
    narrow = _layout(tmp_path, 0.0625, 1024, "narrow")
    r = _recipe(tmp_path, tiny_data, trained_bundle, student=narrow)
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "kd" / "manifest.json").read_text())
    n = {k: sum(p.numel() for p in build_detector(c, nc=3).parameters()) for k, c in (("s", narrow), ("t", TINY))}
    assert m["metrics"]["init"]["from"] == "teacher"
    assert m["metrics"]["init"]["kept"] == pytest.approx(n["s"] / n["t"], abs=1e-4) and n["s"] < n["t"]
    assert m["recipe"]["distill"]["init"] == "teacher"


def test_init_errors_cli(tmp_path, tiny_data, trained_bundle):
    def run(*args):
        res = CliRunner().invoke(app, list(args))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        return " ".join(res.output.split())

    out = run("distill", str(_recipe(tmp_path, tiny_data, trained_bundle, student="yolov8n.yaml")), "--out",
              str(tmp_path / "a"))
    assert "distill.init: layer 0 (Conv): the student has 16 channels where the teacher has 8" in out
    assert not (tmp_path / "a").exists()
    out = run("distill", str(_recipe(tmp_path, tiny_data, trained_bundle, student=trained_bundle)), "--out",
              str(tmp_path / "b"))
    assert "distill.init: the student" in out and "already has weights" in out
    out = run("distill", str(_recipe(tmp_path, tiny_data, trained_bundle, init="random")), "--out",
              str(tmp_path / "c"))
    assert "distill.init" in out
    out = run("train", str(_recipe(tmp_path, tiny_data, trained_bundle)), "--out", str(tmp_path / "d"))
    assert "distill.init: 'teacher' starts the student from a teacher; run `kdctl distill`" in out
    p = tmp_path / "noteacher.yaml"
    p.write_text(f"student: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\ndistill: {{init: teacher}}\n")
    out = run("recipe", "check", str(p))
    assert "teacher: required field is missing (distill.init: teacher needs a teacher)" in out
    tv = _recipe(tmp_path, tiny_data, "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                 student="torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    out = run("recipe", "check", str(tv), "--models")
    assert "distill.init: weight selection is available for Ultralytics YOLO and RT-DETR pairs only" in out


def test_init_alone_trains_on_the_labels_from_the_teachers_weights(tmp_path, tiny_data, trained_bundle):
    """distill.init without losses: the student starts from the selection and trains on the labels only."""
    narrow = _layout(tmp_path, 0.0625, 1024, "narrow")
    r = tmp_path / "alone.yaml"
    r.write_text(f"""
teacher: {{model: {trained_bundle}}}
student: {{model: {narrow}}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0}}
distill: {{init: teacher}}
""")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "alone"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "alone" / "manifest.json").read_text())["metrics"]
    assert m["kd_terms"] == [] and m["init"]["from"] == "teacher"
    assert not any(k.startswith("train/kd_") for k in m["epochs"][0])


def test_init_auto_falls_back_to_a_random_start_and_says_why(tmp_path, tiny_data, trained_bundle):
    """init: auto on a pair weight selection cannot match (a student wider than its teacher) trains from a random
    start; the bundle and the command's output carry the reason. On a pair it can match, it selects."""
    r = _recipe(tmp_path, tiny_data, trained_bundle, student="yolov8n.yaml", init="auto")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "wide"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["init"] == "random" and "the student has 16 channels where the teacher has 8" in doc["init_note"]
    m = json.loads((tmp_path / "wide" / "manifest.json").read_text())["metrics"]
    assert m["init"]["from"] == "random" and m["init"]["reason"] == doc["init_note"]
    narrow = _layout(tmp_path, 0.0625, 1024, "narrow")
    r = _recipe(tmp_path, tiny_data, trained_bundle, student=narrow, init="auto")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "narrow"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["init"] == "teacher", res.output


def test_recipe_check_models_says_how_the_student_starts(tmp_path, tiny_data, trained_bundle):
    narrow = _layout(tmp_path, 0.0625, 1024, "narrow")
    res = CliRunner().invoke(app, ["recipe", "check", str(_recipe(tmp_path, tiny_data, trained_bundle, student=narrow)),
                                   "--models", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["student_init"] == {"from": "teacher"}, res.output
    wide = _recipe(tmp_path, tiny_data, trained_bundle, student="yolov8n.yaml", init="auto")
    res = CliRunner().invoke(app, ["recipe", "check", str(wide), "--models"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "student starts at random: layer 0 (Conv): the student has 16 channels" in res.output


def test_a_fused_teacher_is_refused_in_one_line():
    teacher = build_detector("yolov8n.yaml", nc=3).fuse()
    with pytest.raises(RecipeError, match=r"layer 0 \(Conv\): a fused convolution"):
        select_weights(build_detector(TINY, nc=3), teacher)
