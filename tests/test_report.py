"""The report renders: HTML and Markdown written, PNGs non-empty and decodable, lineage followed."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.errors import BundleError


def test_report_renders(profile_cpu, tmp_path):
    res = CliRunner().invoke(app, ["report", str(profile_cpu), "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    r = tmp_path / "r"
    html = (r / "report.html").read_text()
    assert "<table>" in html and "onnx-int8" in html and "<h2>Lineage</h2><svg" in html
    md = (r / "report.md").read_text()
    assert "| profile |" in md and "![" in md
    from kdctl.bundle import delta_interval, load_bundle

    exported = load_bundle(load_bundle(profile_cpu).manifest["parents"][0]["path"])
    for a in exported.metrics["artifacts"]:  # each export row: the change and its interval over the validation images
        assert f"{-a['metrics']['map50_95_drop']:+.4f} {delta_interval(a['metrics']['map50_95_drop_ci95'])} |" in md
    pngs = sorted(r.glob("*.png"))
    assert {"pareto.png"} <= {p.name for p in pngs} and any(p.name.startswith("latency-") for p in pngs)
    for p in pngs:
        assert p.stat().st_size > 1000
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"


def test_a_bundle_named_twice_is_one_input(profile_cpu, tmp_path):
    """``kdctl report B B`` (or B by two paths) listed B twice among the report's parents."""
    import json

    other_path = str(profile_cpu) + "/."
    res = CliRunner().invoke(app, ["report", str(profile_cpu), other_path, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert len(m["parents"]) == 1 and m["inputs"]["bundles"] == [str(profile_cpu)]


def test_files_beside_the_bundles_of_a_glob_are_left_out_and_listed(profile_cpu, tmp_path):
    """``kdctl report runs/*/*`` after ``make demo`` also names the gate's JUnit and summary beside its bundle and a
    training log: they were refused (the JUnit file even called an exported model); among bundles such plain files
    are left out, listed in the report's inputs and said; given alone, or with no bundle, they are one line."""
    import json

    junit, md, log = tmp_path / "g.junit.xml", tmp_path / "g.md", tmp_path / "t.log"
    junit.write_text("<testsuites/>")
    md.write_text("# gate\n")
    log.write_text("epoch 1\n")
    res = CliRunner().invoke(app, ["report", str(junit), str(profile_cpu), str(md), str(log), "--out",
                                   str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"Left out, not bundles: {junit}, {md}, {log}"
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["inputs"]["bundles"] == [str(profile_cpu)]
    assert m["inputs"]["not_bundles"] == [str(junit), str(md), str(log)]
    for argv, says in (([str(junit)], f"Error: {junit}: is a file, not a bundle directory"),
                       ([str(junit), str(md)], f"Error: report: none of the 2 paths given is a bundle directory "
                                               f"(first: {junit})"),
                       ([str(profile_cpu), str(tmp_path / "nowhere")], f"Error: {tmp_path / 'nowhere'}: bundle "
                                                                        "directory not found")):
        res = CliRunner().invoke(app, ["report", *argv, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and " ".join(res.output.split()) == says, res.output
    assert not (tmp_path / "x").exists()


def test_report_answers_did_kd_help(kd_chain, tmp_path):
    import json

    res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(kd_chain["distilled"]),
                                   "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())["metrics"]["kd"]
    assert m["teacher"] == str(kd_chain["teacher"]) and m["baseline"] == str(kd_chain["baseline"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("## Did distillation help?") < md.index("## Lineage") < md.index("## Models")
    assert ("**Yes: distillation raised" in md) or ("**No: the distilled student is" in md)
    assert "```mermaid" in md and "-->" in md
    assert (tmp_path / "r" / "predictions.png").stat().st_size > 5000
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<svg class=\"lineage\"" in html and html.count("<rect") == 3  # teacher, baseline, distilled


def test_gap_closed_and_roles(tmp_path):
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.kd_summary import compare

    def bundle(name, stage, m, parents=(), model="s.yaml", inputs=None, data="d.yaml"):
        with BundleWriter(tmp_path / name, stage=stage, parents=parents, inputs=inputs or {},
                          recipe={"student": {"model": model}, "data": {"yolo": data}}) as w:
            (w.path / "weights.pt").write_bytes(name.encode())
            w.add_output("weights", "weights.pt")
            w.metrics.update(map50_95=m, map50=m + 0.1, params=10)
        return load_bundle(tmp_path / name)

    t = bundle("t", "train", 0.50, model="big.yaml")
    b = bundle("b", "train", 0.30)
    from kdctl.bundle import sha256_file

    d = bundle("d", "distill", 0.40, parents=[t], inputs={"teacher": {"sha256": sha256_file(t.path / "weights.pt")}})
    c = compare([b, t, d])
    assert c.teacher.id == t.id and c.baseline.id == b.id and c.gap_closed == pytest.approx(0.5)
    assert c.verdict().startswith("Yes: distillation raised mAP50-95 by +10.00 points") and "50%" in c.verdict()
    above = bundle("a", "distill", 0.53, parents=[t])
    assert compare([b, t, above]).verdict() == ("Yes: distillation raised mAP50-95 by +23.00 points over the "
                                                "baseline, 3.00 points above the teacher itself.")
    assert c.gap_line() == "Gap closed: 50% of the teacher–baseline mAP50-95 gap."
    # under the verdict: the gap closed where the verdict does not say it already, then the interval's line
    assert c.notes() == [c.interval_line()] and "No interval for the gain" in c.interval_line()
    past = compare([b, t, above])  # past the teacher: the verdict says by how much, the gap line the share
    assert past.notes() == [past.gap_line(), past.interval_line()]
    assert compare([b, t, above]).gap_line() == ("Gap closed: 115% of the teacher–baseline mAP50-95 gap (over 100%: "
                                                 "the distilled student passes its teacher).")
    worse = bundle("w", "distill", 0.25, parents=[t])
    assert compare([b, t, worse]).notes()[0] == compare([b, t, worse]).gap_line()  # "No: ...": the gap line says it
    assert compare([b, t, worse]).verdict().startswith("No: the distilled student is -5.00")
    assert compare([t, worse]).baseline is None and compare([t, worse]).gap_line() is None
    # the student's model trained on another dataset is no baseline, and the verdict says why it was passed over
    elsewhere = bundle("elsewhere", "train", 0.10, data="other.yaml")
    assert compare([elsewhere, t, d]).baseline is None and compare([elsewhere, b, t, d]).baseline.id == b.id
    assert compare([elsewhere, t, d]).verdict() == (
        "No baseline (the student trained alone) was given: pass its train bundle to compare. Passed over, as trained "
        f"on other data (recipe data:) than the distilled student: {tmp_path / 'elsewhere'}.")
    assert compare([t, d]).verdict() == "No baseline (the student trained alone) was given: pass its train bundle to " \
        "compare."
    assert "stronger teacher" not in compare([b, t, worse]).verdict()
    # a teacher below the student trained alone (a weaker detector of another family): no gap to close, said so
    weak = bundle("weak", "train", 0.20, model="big.yaml")
    hurt = bundle("h", "distill", 0.15, parents=[weak])
    assert compare([b, weak, hurt]).verdict() == (
        "No: the distilled student is -15.00 mAP50-95 points against the baseline. The teacher (0.2000) is not above "
        "the baseline (0.3000): there is no gap for distillation to close; distil from a stronger teacher.")
    helped = bundle("hp", "distill", 0.32, parents=[weak])
    assert compare([b, weak, helped]).verdict() == (
        "Yes: distillation raised mAP50-95 by +2.00 points over the baseline. The teacher (0.2000) is not above the "
        "baseline (0.3000): there is no gap for distillation to close; distil from a stronger teacher.")
    assert compare([b, weak, hurt]).gap_line() is None
    # recipe and input sections of another shape (a manifest written so and resealed): no baseline or teacher found
    # through them, and no error
    with BundleWriter(tmp_path / "odd", stage="distill", parents=[t], inputs={"teacher": "t.pt"},
                      recipe={"student": "s.yaml", "train": 3, "data": {"yolo": "d.yaml"}}) as w:
        w.metrics.update(map50_95=0.4)
    odd = compare([b, t, load_bundle(tmp_path / "odd")])
    assert odd.teacher.id == t.id and odd.baseline is None
    assert odd.verdict().startswith("No baseline")


def test_a_teacher_checkpoint_is_compared_as_the_distill_run_scored_it(tmp_path):
    """A teacher that is the user's own .pt has no bundle with its mAP: the distill run records it (metrics.teacher)
    and the comparison takes it from there, unless a teacher bundle is given."""
    from kdctl.bundle import BundleWriter, load_bundle, sha256_file
    from kdctl.report.kd_summary import TeacherRecord, compare, model_row, side_by_side

    pt = tmp_path / "best.pt"
    pt.write_bytes(b"the user's teacher")

    def bundle(name, stage, m, teacher=None, parents=()):
        with BundleWriter(tmp_path / name, stage=stage, parents=parents,
                          recipe={"student": {"model": "s.yaml"}, "data": {"yolo": "d.yaml"}}) as w:
            w.metrics.update(map50_95=m, map50=m + 0.1, params=10, per_class_ap50_95={"a": m})
            if teacher is not None:
                w.metrics["teacher"] = teacher
        return load_bundle(tmp_path / name)

    rec = {"model": str(pt), "sha256": sha256_file(pt), "map50_95": 0.6, "map50": 0.8, "params": 99,
           "per_class_ap50_95": {"a": 0.6}}
    b = bundle("b", "train", 0.30)
    d = bundle("d", "distill", 0.45, rec)
    c = compare([b, d])
    assert isinstance(c.teacher, TeacherRecord) and c.teacher.path == pt
    assert c.gap_closed == pytest.approx(0.5) and "closing 50% of the gap to the teacher" in c.verdict()
    assert model_row("teacher", c.teacher) == ["teacher", "best.pt", "0.6000", "0.8000", "99", "—",
                                               "outside kdctl (its checkpoint, scored by the distill run)"]
    rows, head, per_class = side_by_side([c])
    assert [r[0] for r in rows] == ["teacher", "baseline (student alone)", "distilled student"]
    assert head == ["class", "teacher", "baseline", "distilled"] and per_class == [["a", "0.6000", "0.3000",
                                                                                    "0.4500"]]
    assert c.teacher.file("weights") == pt  # for the predictions panel, while it is the file the run read
    # an Ultralytics run's best.pt is named with its run: every run's checkpoint is best.pt
    ul = TeacherRecord(tmp_path / "runs" / "detect" / "train3" / "weights" / "best.pt", rec, "x", "outside")
    assert model_row("teacher", ul)[1] == "train3/weights/best.pt"
    pt.write_bytes(b"retrained since")
    with pytest.raises(BundleError, match="not here as the distill run read it"):
        c.teacher.file("weights")
    # a teacher bundle in the chain is the teacher; a record of another shape is no teacher
    t = bundle("t", "train", 0.7)
    assert compare([b, t, bundle("d2", "distill", 0.45, rec, parents=[t])]).teacher.id == t.id
    assert compare([b, bundle("d3", "distill", 0.45, "best.pt")]).teacher is None
    assert compare([b, bundle("d4", "distill", 0.45, {**rec, "map50_95": None})]).teacher is None


@pytest.mark.slow
def test_distilling_from_a_checkpoint_scores_the_teacher_for_the_report(kd_chain, trained_bundle, tiny_data,
                                                                         tmp_path, monkeypatch):
    import shutil

    from conftest import write_recipe
    from kdctl.bundle import load_bundle
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    pt = tmp_path / "teacher.pt"  # the teacher bundle's weights as a user's own checkpoint
    shutil.copy(trained_bundle / "weights.pt", pt)
    r = write_recipe(tmp_path / "kd-pt.yaml", f"""
name: kd-pt
teacher: {{model: {pt}}}
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
distill: {{auto_balance: 0.25, losses: [{{name: at}}]}}
""")
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd-pt"), "--json"])
    assert res.exit_code == 0, res.output
    d = tmp_path / "kd-pt"
    rec = load_bundle(d).metrics["teacher"]
    assert json.loads(res.stdout)["teacher_map50_95"] == rec["map50_95"]  # said beside the student's mAP
    # the same weights, data and image size as the teacher bundle's own evaluation: the same numbers
    own = load_bundle(trained_bundle).metrics
    assert {k: rec[k] for k in ("map50_95", "map50", "per_class_ap50_95", "params", "imgsz")} == \
        {k: own[k] for k in ("map50_95", "map50", "per_class_ap50_95", "params", "imgsz")}
    assert rec["model"] == str(pt) and rec["eval_images"] == own["eval_images"] == 8
    assert "teacher" not in load_bundle(kd_chain["distilled"]).metrics  # a teacher bundle has its own mAP
    res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(d), "--out", str(tmp_path / "r"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kd"]["teacher"] == str(pt)
    md = (tmp_path / "r" / "report.md").read_text()
    row = f"| teacher | teacher.pt | {own['map50_95']:.4f} | {own['map50']:.4f} | {own['params']:,} | — | outside"
    assert row in md, md
    with Image.open(tmp_path / "r" / "predictions.png") as im:
        assert im.width == 3 * 240  # teacher, baseline, distilled
    # a teacher of other classes (feature-level KD from a COCO-80 checkpoint) is not scored on this dataset
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").save(tmp_path / "coco80.pt")
    r80 = write_recipe(tmp_path / "kd-80.yaml", r.read_text().replace(str(pt), str(tmp_path / "coco80.pt"))
                       .replace("name: kd-pt", "name: kd-80"))
    d80 = run_training(load_recipe(r80), stage="distill", source=str(r80), out=tmp_path / "kd-80").path
    assert "teacher" not in load_bundle(d80).metrics
    # a teacher bundle scored at another size than the distillation's (trained at 128 px, distilled at 96): the
    # distill run scores it again, and its row takes those numbers
    r96 = write_recipe(tmp_path / "kd-96.yaml", r.read_text().replace(str(pt), str(trained_bundle))
                       .replace("imgsz: 128", "imgsz: 96").replace("name: kd-pt", "name: kd-96"))
    d96 = run_training(load_recipe(r96), stage="distill", source=str(r96), out=tmp_path / "kd-96").path
    rec96 = load_bundle(d96).metrics["teacher"]
    assert rec96["imgsz"] == 96 and rec96["model"] == str(trained_bundle / "weights.pt")
    ev96 = CliRunner().invoke(app, ["eval", str(trained_bundle), "--imgsz", "96", "--json", "--out",
                                    str(tmp_path / "t96")])
    assert ev96.exit_code == 0 and json.loads(ev96.stdout)["map50_95"] == rec96["map50_95"]  # the same scoring
    res = CliRunner().invoke(app, ["report", str(d96), "--out", str(tmp_path / "r96")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r96" / "report.md").read_text()
    assert (f"| teacher | {trained_bundle.name} | {rec96['map50_95']:.4f} |" in md
            and "scored again by the distill run on its validation images at 96 px" in md), md
    assert "No baseline (the student trained alone) was given" in md, md  # the teacher is not its own baseline

    # a distill bundle without the record (written before kdctl kept it): a `kdctl eval` of the checkpoint on the
    # same validation images at the same size, given beside it, is its teacher row; one at another size is not
    import kdctl.training

    monkeypatch.setattr(kdctl.training, "_evaluate_teacher", lambda *a, **k: None)
    old = run_training(load_recipe(r), stage="distill", source=str(r), out=tmp_path / "kd-old").path
    assert "teacher" not in load_bundle(old).metrics
    for size in ("128", "96"):
        res = CliRunner().invoke(app, ["eval", str(pt), "--data", str(tiny_data), "--imgsz", size, "--out",
                                       str(tmp_path / f"ev{size}")])
        assert res.exit_code == 0, res.output
    for given, row in (("ev128", "| teacher | teacher.pt | "), ("ev96", None)):
        res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(old), str(tmp_path / given),
                                       "--out", str(tmp_path / f"r-{given}"), "--json"])
        assert res.exit_code == 0, res.output
        md = (tmp_path / f"r-{given}" / "report.md").read_text()
        if row:
            assert f"{row}{own['map50_95']:.4f} |" in md and "scored by kdctl eval" in md, md
            assert json.loads(res.stdout)["kd"]["teacher"] == str(pt)
        else:
            assert "| teacher |" not in md and json.loads(res.stdout)["kd"]["teacher"] is None, md


def test_several_distilled_students_side_by_side(tmp_path):
    """Two students of one teacher: each gets its own verdict against the shared teacher and baseline, which appear
    once in the table, and the per-class table has a column per student (the report showed only the last one)."""
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.kd_summary import compare, compare_all, side_by_side

    def bundle(name, stage, m, parents=(), model="s.yaml"):
        with BundleWriter(tmp_path / name, stage=stage, parents=parents, inputs={},
                          recipe={"student": {"model": model}, "data": {"yolo": "d.yaml"}}) as w:
            (w.path / "weights.pt").write_bytes(name.encode())
            w.add_output("weights", "weights.pt")
            w.metrics.update(map50_95=m, map50=m + 0.1, params=10, per_class_ap50_95={"a": m, "b": m / 2})
        return load_bundle(tmp_path / name)

    t, b = bundle("t", "train", 0.50, model="big.yaml"), bundle("b", "train", 0.30)
    d1, d2 = bundle("kd-a", "distill", 0.40, parents=[t]), bundle("kd-b", "distill", 0.25, parents=[t])
    cmps = compare_all([b, t, d1, d2])
    assert [c.distilled.id for c in cmps] == [d1.id, d2.id] and compare([b, t, d1, d2]).distilled.id == d2.id
    assert all(c.teacher.id == t.id and c.baseline.id == b.id for c in cmps)
    assert cmps[0].gap_closed == pytest.approx(0.5) and cmps[1].verdict().startswith("No: the distilled student is -5.00")
    rows, head, per_class = side_by_side(cmps)
    assert [r[:3] for r in rows] == [["teacher", "t", "0.5000"], ["baseline (student alone)", "b", "0.3000"],
                                     ["distilled student", "kd-a", "0.4000"], ["distilled student", "kd-b", "0.2500"]]
    assert head == ["class", "teacher", "baseline", "kd-a", "kd-b"]
    assert per_class == [["a", "0.5000", "0.3000", "0.4000", "0.2500"], ["b", "0.2500", "0.1500", "0.2000", "0.1250"]]
    # students in folders of one name, each from its own teacher: no two per-class columns share a heading
    t2 = bundle("t2", "train", 0.60, model="big.yaml")
    s1, s2 = bundle("x/kd", "distill", 0.40, parents=[t]), bundle("y/kd", "distill", 0.45, parents=[t2])
    _, head, per_class = side_by_side(compare_all([b, t, t2, s1, s2]))
    assert head == ["class", "teacher t", "teacher t2", "baseline", "x/kd", "y/kd"]
    assert per_class[0] == ["a", "0.5000", "0.6000", "0.3000", "0.4000", "0.4500"]


@pytest.mark.slow
def test_report_with_two_distilled_students(kd_chain, tiny_data, tmp_path):
    import json

    from conftest import write_recipe
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    r = write_recipe(tmp_path / "kd-logit.yaml", f"""
name: kd-logit
teacher: {{model: {kd_chain["teacher"]}}}
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
distill: {{auto_balance: 0.25, losses: [{{name: kd_logit, params: {{temperature: 2.0}}}}]}}
""")
    second = run_training(load_recipe(r), stage="distill", source=str(r), out=tmp_path / "kd-logit").path
    res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(kd_chain["distilled"]), str(second),
                                   "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [s["distilled"] for s in out["kd_students"]] == [str(kd_chain["distilled"]), str(second)]
    assert all(s["baseline"] == str(kd_chain["baseline"]) for s in out["kd_students"]) and out["kd"]["distilled"] == str(second)
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"- **{kd_chain['distilled'].name}: " in md and "- **kd-logit: " in md
    assert f"| class | teacher | baseline | {kd_chain['distilled'].name} | kd-logit |" in md
    with Image.open(tmp_path / "r" / "predictions.png") as im:
        assert im.width == 4 * 240  # teacher, baseline and both students


@pytest.mark.slow
def test_report_renders_in_a_real_browser(kd_chain, profile_cpu, tmp_path):
    """Headless Chromium opens the report and its first screen is not blank."""
    import shutil
    import subprocess

    import numpy as np

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(kd_chain["distilled"]), str(profile_cpu),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
                    f"--screenshot={shot}", (tmp_path / "r" / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=np.float32)
    assert px.shape == (900, 1280)
    assert (px < 200).mean() > 0.02 and px.std() > 20  # text, tables and the lineage graph, not a blank page


def test_trained_as_says_how_each_model_was_trained():
    from kdctl.report.kd_summary import trained_as

    assert trained_as({}) == "1 process"
    assert trained_as({"distributed": {"world_size": 4}, "teacher_cache": {"k": 256, "anchors": 8400},
                       "qat": {"quantize": "int8"}}) == \
        "4 DDP ranks, teacher cache (top 256 of 8400 anchors), QAT int8"
    assert trained_as({"init": {"from": "teacher"}}) == \
        "1 process, started from the teacher's weights (weight selection)"
    assert trained_as({"train_device": "cpu"}) == "1 process on cpu"  # where it ran (a recipe's mps may be the CPU)
    assert trained_as({"distributed": {"world_size": 2}, "train_device": "cuda:0,1"}) == "2 DDP ranks on cuda:0,1"


def test_one_recipe_on_several_seeds_gets_a_verdict_over_them(tmp_path):
    """Baselines and distilled students on seeds 0-2: each student is compared with the baseline of its own seed,
    and the three with the benchmark's rule: "Yes" only above the baseline on every seed with a mean gain above the
    baselines' half-range. Hand values: gains 5, 4, 6 points, mean 5, sd 1, t(0.975, 2) = 4.303: 5 ± 2.48."""
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.kd_summary import compare_all, seed_groups

    def bundle(name, stage, m, seed, parents=(), model="s.yaml", distill=None):
        recipe = {"name": name.split("/")[-1], "student": {"model": model}, "data": {"yolo": "d.yaml"},
                  "train": {"epochs": 20, "seed": seed}}
        if distill:
            recipe["distill"] = distill
        with BundleWriter(tmp_path / name, stage=stage, parents=parents, recipe=recipe) as w:
            (w.path / "weights.pt").write_bytes(name.encode())
            w.add_output("weights", "weights.pt")
            w.metrics.update(map50_95=m, map50=m, params=10)
        return load_bundle(tmp_path / name)

    t = bundle("t", "train", 0.6, 0, model="big.yaml")
    bases = [bundle(f"base-s{s}", "train", m, s) for s, m in zip((0, 1, 2), (0.30, 0.32, 0.34))]
    head = {"losses": [{"name": "kd_logit"}]}

    def students(prefix, maps, distill=head):
        return [bundle(f"{prefix}-s{s}", "distill", m, s, parents=[t], distill=distill)
                for s, m in zip((0, 1, 2), maps)]

    kd = students("kd", (0.35, 0.36, 0.40))
    cmps = compare_all([t, *bases, *kd])
    assert [c.baseline.path.name for c in cmps] == ["base-s0", "base-s1", "base-s2"]  # each its own seed's
    (g,) = seed_groups(cmps)
    assert g.verdict() == ("Over 3 seeds (kd-s0 / kd-s1 / kd-s2): Yes: +5.00 points on average (+5.00 / +4.00 / "
                           "+6.00), above the baseline of the same seed on 3 of 3; the baselines' own spread "
                           "(half-range) 2.00 points; 95% interval of the mean gain +2.52 to +7.48 (Student's t over "
                           "the seeds).")
    assert g.to_dict()["seeds"] == [0, 1, 2] and g.to_dict()["seeds_above"] == 3
    below = students("below", (0.35, 0.31, 0.40))  # seed 1 under its baseline
    (g,) = seed_groups(compare_all([t, *bases, *below]))
    assert g.verdict().startswith("Over 3 seeds (below-s0 / below-s1 / below-s2): Not shown: +3.33 points on "
                                  "average (+5.00 / -1.00 / +6.00), above the baseline of the same seed on 2 of 3")
    small = students("small", (0.31, 0.33, 0.35))  # above on every seed, by less than the baselines' spread
    (g,) = seed_groups(compare_all([t, *bases, *small]))
    assert g.verdict().startswith("Over 3 seeds (small-s0 / small-s1 / small-s2): Not shown: +1.00 points")
    worse = students("worse", (0.29, 0.30, 0.35))
    assert seed_groups(compare_all([t, *bases, *worse]))[0].verdict().startswith("Over 3 seeds (worse-s0 / worse-s1 "
                                                                                 "/ worse-s2): No: -0.67 points")
    # two recipes on the same seeds: a group each; a student whose recipe differs beyond name and seed: none
    other = students("ld", (0.33, 0.35, 0.37), distill={"losses": [{"name": "ld"}]})
    assert [len(x.cmps) for x in seed_groups(compare_all([t, *bases, *kd, *other]))] == [3, 3]
    lone = bundle("lone-s0", "distill", 0.5, 0, parents=[t], distill={"losses": [{"name": "at"}]})
    assert [len(x.cmps) for x in seed_groups(compare_all([t, *bases, kd[0], lone]))] == []
    # without a baseline of their seeds (one baseline only): no group
    assert seed_groups(compare_all([t, bases[0], *kd])) == []
    res = CliRunner().invoke(app, ["report", *[str(b.path) for b in (*bases, *kd)], "--out", str(tmp_path / "r"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [x["verdict"] for x in out["kd_seed_groups"]] == [seed_groups(cmps)[0].verdict()]
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("**Over 3 seeds (kd-s0 / kd-s1 / kd-s2): Yes:") < md.index("- **kd-s0: Yes")


def test_rows_show_a_dash_for_what_a_bundle_did_not_measure(tmp_path):
    """The models and performance tables read what each bundle recorded; a value it left out or recorded as not
    measured (None) is a dash, never an error or "nan"."""
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.stage import _rows

    def bundle(name, stage, **metrics):
        with BundleWriter(tmp_path / name, stage=stage) as w:
            w.metrics.update(metrics)
        return load_bundle(tmp_path / name)

    lat = {"p50": 1.0, "p90": 2.0, "p99": 3.0}
    chain = [bundle("t", "train", map50_95=0.5, params=None),
             bundle("e", "export", artifacts=[{"name": "onnx-fp32", "metrics": {"map50_95": 0.5}, "runtime": None}]),
             bundle("p", "profile", results=[{"artifact": "onnx-fp32", "latency_ms": lat, "runtime": None,
                                              "size_mb": None, "map50_95": None, "throughput": None},
                                             {"artifact": "onnx-int8", "latency_ms": {"p50": None}}])]
    stage_rows, perf_rows = _rows(chain)
    assert stage_rows == [["train", "t", "0.5000", "—", "—", "—"]]
    assert perf_rows == [["export", "e/onnx-fp32", "0.5000", "+0.0000", "—", "0.00 MB", "", ""],
                         ["profile", "p/onnx-fp32", "—", "", "—", "—", "1.00 / 2.00 / 3.00", "—"]]


def test_an_eval_row_says_which_artifact_and_split_it_scored(tmp_path):
    """An eval of an exported artifact, or of the test split, is another measurement than the PyTorch model's on the
    validation images: its row in the models table says which (it read as a plain eval of the model); so is a model
    scored on some of its classes."""
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.stage import _rows

    def bundle(name, **metrics):
        with BundleWriter(tmp_path / name, stage="eval") as w:
            w.metrics.update(metrics)
        return load_bundle(tmp_path / name)

    chain = [bundle("v", map50_95=0.5, split="val", runtime="pytorch"),
             bundle("a", map50_95=0.4, split="val", runtime="onnxruntime", artifact="onnx-int8"),
             bundle("t", map50_95=0.3, split="test", runtime="openvino", artifact="openvino-int8"),
             bundle("s", map50_95=0.2, split="train")]
    assert [r[1] for r in _rows(chain)[0]] == ["v", "a (onnx-int8)", "t (openvino-int8, test split)",
                                               "s (train split)"]
    # a model of more classes scored on the dataset's (a COCO one on a person/car set): its rows say so
    picked = {"classes": {"model_nc": 80, "index": {"person": 0, "car": 2}}}
    with BundleWriter(tmp_path / "c", stage="eval", inputs=picked) as w:
        w.metrics.update(map50_95=0.6, split="val", runtime="onnxruntime", artifact="onnx-fp32")
    with BundleWriter(tmp_path / "x", stage="export", inputs=picked) as w:
        w.metrics.update(artifacts=[{"name": "onnx-fp32", "metrics": {"map50_95": 0.6}}])
    stage_rows, perf_rows = _rows([load_bundle(tmp_path / "c"), load_bundle(tmp_path / "x")])
    assert stage_rows[0][1] == "c (onnx-fp32, the dataset's 2 of its 80 classes)"
    assert perf_rows[0][1] == "x/onnx-fp32 (the dataset's 2 of its 80 classes)"


def test_user_names_are_literal_in_the_markdown(tmp_path):
    """Class names and bundle folders are the user's: a ``|`` split its table row into an extra column, ``<img …>``
    went into report.md as HTML, a ``"`` ended the lineage graph's Mermaid label early, and a pair of ``$`` in a
    bundle's name (its loss plot's title) was Matplotlib mathtext: the report stopped in a ValueError."""
    import re

    from kdctl.bundle import BundleWriter, load_bundle, sha256_file
    from kdctl.gate.junit import markdown_summary
    from kdctl.gate.rules import Check

    odd = {"a|b": 0.1, "<img src=x onerror=alert(1)>": 0.2, "x*y*`z`": 0.3}

    def bundle(name, stage, m, parents=(), model="s.yaml", inputs=None, data="d.yaml"):
        with BundleWriter(tmp_path / name, stage=stage, parents=parents, inputs=inputs or {},
                          recipe={"student": {"model": model}, "data": {"yolo": data}}) as w:
            (w.path / "weights.pt").write_bytes(name.encode())
            w.add_output("weights", "weights.pt")
            epochs = [{"epoch": e, "train/box_loss": 1.0 / e, "train/kd_logit": 0.5 / e} for e in (1, 2)]
            w.metrics.update(map50_95=m, map50=m + 0.1, params=10, per_class_ap50_95=odd, epochs=epochs)
        return load_bundle(tmp_path / name)

    t = bundle("t", "train", 0.50, model="big.yaml")
    b = bundle("b", "train", 0.30)
    teacher = {"teacher": {"sha256": sha256_file(t.path / "weights.pt")}}
    d = bundle('d|"x"$\\x{$', "distill", 0.40, parents=[t], inputs=teacher)
    res = CliRunner().invoke(app, ["report", str(b.path), str(d.path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r" / "report.md").read_text()
    cells = re.compile(r"(?<!\\)\|")  # column separators: a | not escaped

    def table(title):
        lines = md.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
        return [len(cells.findall(x)) for x in lines]

    per_class = table("Per-class AP50-95")
    assert per_class == [5] * 5 and "| a\\|b |" in md and "| x\\*y\\*\\`z\\` |" in md
    assert table("Models") == [7] * 5 and '| distill | d\\|"x"$\\\\x{$ |' in md
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert '["distill: d|#quot;x#quot;$\\x{$"]' in md
    assert (tmp_path / "r" / 'losses-d|"x"$\\x{$.png').stat().st_size > 1000
    assert "(losses-d%7C%22x%22%24%5Cx%7B%24.png)" in md  # the image link percent-encoded
    check = Check("min_map50_95", 0.3, 0.2, False, "mAP50-95 0.2 below budget 0.3 for <artifact|x>")
    summary = markdown_summary([check], "kdctl gate", {"profile": "runs/a|b", "artifact": "onnx-*int8*"})
    assert "- **profile**: runs/a\\|b" in summary and "- **artifact**: onnx-\\*int8\\*" in summary
    assert "for &lt;artifact\\|x&gt;" in summary


def test_latencies_nested_too_deeply_are_one_line(tmp_path):
    """A profile bundle's latencies.json that Python's JSON parser cannot descend (RecursionError was an internal
    error), sealed as kdctl would have sealed it: one line naming the file."""
    from kdctl.bundle import BundleWriter

    with BundleWriter(tmp_path / "p", stage="profile") as w:
        (w.path / "latencies.json").write_text("[" * 100_000 + "]" * 100_000)
        w.add_output("latencies", "latencies.json")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "p"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "latencies.json:notvalidJSON(nestedtoodeeply)" in "".join(res.output.split()), res.output  # Rich wraps
    assert not (tmp_path / "r").exists()


def test_the_baseline_is_one_scored_at_the_distilled_students_size(tmp_path):
    """A baseline at 640 px beside a student distilled at 320 px compared two sizes as if they were one: the
    same-size baseline is taken where there is one, and the verdict says when there is none."""
    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.report.kd_summary import compare

    def bundle(name, stage, m, imgsz, parents=()):
        with BundleWriter(tmp_path / name, stage=stage, parents=parents,
                          recipe={"student": {"model": "s.yaml"}, "data": {"yolo": "d.yaml"}}) as w:
            w.metrics.update(map50_95=m, map50=m + 0.1, imgsz=imgsz)
        return load_bundle(tmp_path / name)

    t = bundle("t", "train", 0.6, 320)
    big, small = bundle("b640", "train", 0.5, 640), bundle("b320", "train", 0.3, 320)
    d = bundle("d", "distill", 0.4, 320, parents=[t])
    for chain in ([big, small, t, d], [small, big, t, d]):  # whichever comes first
        c = compare(chain)
        assert c.baseline.id == small.id and c.gap_closed == pytest.approx(1 / 3) and "px" not in c.verdict()
    c = compare([big, t, d])
    assert c.baseline.id == big.id and c.verdict() == (
        "No: the distilled student is -10.00 mAP50-95 points against the baseline. The baseline was scored at 640 px "
        "and the distilled student at 320 px: train the baseline at the student's size for a like-for-like "
        "comparison.")
    # and a baseline trained on another schedule
    with BundleWriter(tmp_path / "long", stage="train", recipe={"student": {"model": "s.yaml"}, "data": {
            "yolo": "d.yaml"}, "train": {"epochs": 100}}) as w:
        w.metrics.update(map50_95=0.3, imgsz=320)
    with BundleWriter(tmp_path / "short", stage="distill", parents=[t], recipe={
            "student": {"model": "s.yaml"}, "data": {"yolo": "d.yaml"}, "train": {"epochs": 20}}) as w:
        w.metrics.update(map50_95=0.4, imgsz=320)
    assert compare([load_bundle(tmp_path / "long"), t, load_bundle(tmp_path / "short")]).verdict().endswith(
        " The baseline trained 100 epochs and the distilled student 20: part of the difference is the schedule's.")
