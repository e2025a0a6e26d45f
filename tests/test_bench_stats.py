"""The benchmark's paired interval: the one statistic in bench/ a verdict rests on, checked by hand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import paired_interval  # noqa: E402


def test_paired_interval_by_hand():
    # mean 2, sample sd 1, n 3: 2 ± t(0.975, 2 df) · 1/√3 = 2 ± 4.303 / 1.732
    lo, hi = paired_interval([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 4.303 / 3 ** 0.5) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5)
    # 5 seeds: t(0.975, 4 df) = 2.776; sample sd (n - 1), not the population's
    d = [4.0, -1.0, 3.0, 2.0, 7.0]
    sd = (sum((x - 3.0) ** 2 for x in d) / 4) ** 0.5
    assert paired_interval(d) == pytest.approx((3.0 - 2.776 * sd / 5 ** 0.5, 3.0 + 2.776 * sd / 5 ** 0.5))
    assert paired_interval([2.5]) is None
    lo, hi = paired_interval([1.0] * 40 + [3.0] * 40)  # beyond the table: the normal quantile
    assert hi - lo == pytest.approx(2 * 1.96 * (80 / 79) ** 0.5 / 80 ** 0.5)


def test_a_screen_override_reaches_into_the_loss_list(monkeypatch):
    """``--set distill.losses.0.level=backbone`` changes the first loss only; a dotted key makes missing sections."""
    import distill_families as bench

    monkeypatch.setattr(bench, "OVERRIDES", {"distill.losses.0.level": "backbone", "distill.auto_balance": 0.1,
                                             "distill.cache.top_k": 8})
    d = {"distill": {"losses": [{"name": "cwd", "level": "neck"}, {"name": "kd_logit", "level": "head"}]}}
    bench.apply_overrides(d)
    assert d["distill"]["losses"] == [{"name": "cwd", "level": "backbone"}, {"name": "kd_logit", "level": "head"}]
    assert d["distill"]["auto_balance"] == 0.1 and d["distill"]["cache"] == {"top_k": 8}
    assert bench.override_tag() == "-level=backbone-auto_balance=0.1-top_k=8"


def test_a_screen_of_some_families_gets_its_own_section(monkeypatch):
    """``--families pkd-head fitnet-head`` alone must not replace the families table (its section and results file),
    nor may a --set screen of some families replace one of other families with the same --set (the second wrote over
    the first's section and results file); every family keeps the name it had."""
    import distill_families as bench

    monkeypatch.setattr(bench, "OVERRIDES", {})
    assert bench.screen_tag(["pkd-head", "fitnet-head"]) == "-pkd-head-fitnet-head"
    assert bench.screen_tag(list(bench.FAMILIES)) == ""
    monkeypatch.setattr(bench, "OVERRIDES", {"distill.auto_balance": 0.1})
    assert bench.screen_tag(["head"]) == "-head"
    assert bench.screen_tag(["backbone-head"]) != bench.screen_tag(["distill-at"])
    assert bench.screen_tag(list(bench.FAMILIES)) == ""


def test_another_teacher_on_the_built_in_data_gets_its_own_folders_and_section():
    """``--teacher`` (or ``--student``, ``--train``) on a built-in scene wrote its table over the built-in teacher's
    section of the same families, under a heading that did not name the teacher; both now carry it."""
    import argparse

    import distill_families as bench

    plain = argparse.Namespace(teacher=None, student=None, train_fields=[])
    assert bench.variant_tag(plain) == "" and bench.variant_title(plain) == ""
    other = argparse.Namespace(teacher="runs/train/teacher-otherdata", student="yolov8n.yaml",
                               train_fields=[("imgsz", 96)])
    assert bench.variant_tag(other) == "-teacher-teacher-otherdata-student-yolov8n-imgsz=96"
    assert bench.variant_title(other) == ", teacher runs/train/teacher-otherdata, student yolov8n.yaml, imgsz=96"


def test_a_teacher_assistant_is_the_assistant_model_distilled_for_the_teachers_epochs(monkeypatch, tmp_path):
    """``--assistant``: the assistant model, from the teacher, with backbone-head's losses, for the teacher's epochs;
    a screen's --set fields reach the students only, and are back in place after."""
    import distill_families as bench

    monkeypatch.setattr(bench, "OVERRIDES", {"distill.auto_balance": 0.1})
    monkeypatch.setattr(bench, "EPOCHS", {"students": 40, "teacher": None})
    seen = {}
    monkeypatch.setattr(bench, "run_kdctl", lambda name, stage, seed, teacher, out: seen.setdefault(
        "recipe", bench._recipe(name, seed, teacher)) and {"map50_95": 0.5, "train_s": 1.0})
    assert bench.train_assistant("yolov8-ta.yaml", tmp_path / "teacher", tmp_path / "ta") == {"map50_95": 0.5,
                                                                                                "train_s": 1.0}
    r = seen["recipe"]
    assert r.student.model == "yolov8-ta.yaml" and r.teacher.model == str(tmp_path / "teacher")
    assert r.train.epochs == 30 and r.train.seed == 0 and r.distill.auto_balance == 0.25
    assert [(x.name, x.level) for x in r.distill.losses] == [("at", "backbone"), ("kd_logit", "head"), ("ld", "head")]
    assert bench.OVERRIDES == {"distill.auto_balance": 0.1}
    assert bench._recipe("backbone-head", 1, tmp_path / "ta").distill.auto_balance == 0.1
    bench.EPOCHS["teacher"] = 80  # --teacher-epochs: the assistant trains as long as its teacher
    seen.clear()
    bench.train_assistant("yolov8-ta.yaml", tmp_path / "teacher", tmp_path / "ta")
    assert seen["recipe"].train.epochs == 80


def test_the_rtdetr_teacher_starts_from_the_yolo_teacher_and_each_teacher_gets_its_own_table(tmp_path):
    """bench/detr_kd.py: the RT-DETR teacher is distilled (init only) from the YOLOv8n teacher, which is trained
    first; the RT-DETR-teacher rows and the YOLO-teacher rows go to separate doc sections, each with its teacher,
    its baselines and its gap closed per seed."""
    import detr_kd

    a = detr_kd.parse(["--seeds", "0", "1", "--runs", "logit", "yolo-to-rtdetr", "--root", str(tmp_path)])
    jobs = detr_kd.plan(a)
    teachers = [(j.recipe, j.stage, j.teacher) for j in jobs if j.row is None]
    assert teachers == [("quickstart-teacher", "train", None), ("rtdetr-teacher", "distill", "quickstart-teacher")]
    assert {(j.row, j.seed, j.teacher) for j in jobs if j.stage == "distill" and j.row} == {
        ("logit", 0, "rtdetr-teacher"), ("logit", 1, "rtdetr-teacher"),
        ("yolo-to-rtdetr", 0, "quickstart-teacher"), ("yolo-to-rtdetr", 1, "quickstart-teacher")}

    def r(m):
        return {"map50_95": m, "train_s": 100.0, "epoch_s": 10.0}

    tv = {"quickstart-teacher": (tmp_path, r(0.6)), "rtdetr-teacher": (tmp_path, r(0.4))}
    res = {"rtdetr-student": {0: r(0.10), 1: r(0.20)}, "logit": {0: r(0.25), 1: r(0.30)},
           "yolo-to-rtdetr": {0: r(0.35), 1: r(0.20)}}
    out = detr_kd.tables(a, tv, res)
    assert set(out) == {"detr-kd-rtdetr-teacher", "detr-kd"}
    rt = out["detr-kd-rtdetr-teacher"]
    assert "| rtdetr-teacher | teacher (starts from quickstart-teacher) | 0.4000 |" in rt
    assert "| quickstart-teacher | teacher | 0.6000 |" in rt and "yolo-to-rtdetr" not in rt
    assert "50 % (50 / 50)" in rt  # (0.25 - 0.10) / (0.4 - 0.10), (0.30 - 0.20) / (0.4 - 0.20)
    yo = out["detr-kd"]
    assert "rtdetr-teacher" not in yo and "| logit |" not in yo
    assert "25 % (50 / 0), not above baseline on every seed" in yo  # (0.35 - 0.1) / 0.5, (0.2 - 0.2) / 0.4


def test_a_finished_run_is_reused_only_for_its_own_recipe(tmp_path):
    """A benchmark reads a finished bundle instead of training again only when it was made from the very recipe the
    row asks for; another recipe's bundle in the folder (the recipe changed since, or two screens tagging their
    folders alike) stops it, naming the field, instead of filling the row with another run's result."""
    import json

    from _common import finished_run

    from kdctl.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "backbone-head.yaml")
    out = tmp_path / "backbone-head-s0"
    assert finished_run(out, r) is None  # nothing there yet: train it

    out.mkdir()
    recorded = r.model_dump(mode="json")
    del recorded["distill"]["balance_cap"]  # recorded by an earlier kdctl, before the field existed: its default
    head = {"schema_version": 1, "stage": "distill", "id": "x", "files": {}, "content_sha256": ""}
    (out / "manifest.json").write_text(json.dumps({**head, "recipe": recorded}))
    assert finished_run(out, r).recipe == recorded  # the bundle it read, for the row

    d = r.model_dump()
    d["distill"]["losses"][2]["params"] = {"positives": True}  # the screen that set a loss's field
    with pytest.raises(SystemExit, match=r"backbone-head-s0: a finished run of another recipe \(distill\.losses "):
        finished_run(out, type(r).model_validate(d))
    d = r.model_dump()
    d["train"]["device"] = "cuda"  # a GPU row is not a CPU run, though --resume may move devices
    with pytest.raises(SystemExit, match=r"\(train\.device differs"):
        finished_run(out, type(r).model_validate(d))
    # the same recipe from a teacher folder trained again since (the teacher's recipe changed): not this row's run
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "manifest.json").write_text(json.dumps({**head, "stage": "train", "id": "t1"}))
    parents = [{"id": "t1", "stage": "train", "path": str(teacher)}]
    (out / "manifest.json").write_text(json.dumps({**head, "recipe": recorded, "parents": parents}))
    assert finished_run(out, r).recipe == recorded
    (teacher / "manifest.json").write_text(json.dumps({**head, "stage": "train", "id": "t2"}))
    with pytest.raises(SystemExit, match=rf"backbone-head-s0: a finished run from an earlier {teacher} \(trained "):
        finished_run(out, r)
    (out / "manifest.json").write_text(json.dumps(head))  # no recipe recorded at all
    with pytest.raises(SystemExit, match=r"\(recipe differs"):
        finished_run(out, r)


def test_an_interrupted_run_starts_over_only_for_another_recipe(monkeypatch, tmp_path):
    """recipe_run resumes an interrupted run; only where kdctl says it was begun from another recipe does it start
    over (its work folder removed). Any other error (bad data, a non-finite loss) stops the benchmark with the work
    kept, instead of training the run from scratch a second time."""
    import _common

    from kdctl.errors import DataError, ResumeMismatch

    out = tmp_path / "base-s0"
    work = tmp_path / ".base-s0.work"
    calls = []

    def training(recipe, *, stage, source, out, resume=False):
        calls.append(resume)
        if resume:
            raise failure
        raise SystemExit("trained from scratch")

    monkeypatch.setattr("kdctl.training.run_training", training)
    for failure, kept in ((DataError("data.yaml: val: broken"), True),
                          (ResumeMismatch("x: train.epochs: differs from the recipe of the interrupted run"), False)):
        calls.clear()
        work.mkdir(exist_ok=True)
        with pytest.raises(SystemExit if not kept else DataError):
            _common.recipe_run("quickstart-student", "train", 0, None, out)
        assert calls == ([True] if kept else [True, False]) and work.exists() == kept


def fresh_settings(monkeypatch, bench) -> None:
    """bench.main() fills the module's settings (scene, epochs, --set, --data...): each test gets its own copies."""
    for name in ("SCENE", "EPOCHS", "OVERRIDES", "USER"):
        monkeypatch.setattr(bench, name, {k: (dict(v) if isinstance(v, dict) else v)
                                          for k, v in getattr(bench, name).items()})


@pytest.mark.slow
def test_the_families_table_on_a_users_dataset_with_a_given_teacher(monkeypatch, tmp_path, tiny_data, trained_bundle):
    """``--data`` / ``--teacher`` / ``--train``: every run trains on the user's dataset with the train fields given,
    distils from the given (verified) bundle, which is scored by kdctl's evaluator on the validation images; the
    table goes beside the runs, not into docs/benchmarks.md."""
    import distill_families as bench

    from kdctl.bundle import load_bundle
    from kdctl.evaluate.stage import evaluate_bundle

    fresh_settings(monkeypatch, bench)
    scored = []
    real = bench.score_model

    def spy(model, ds, imgsz, name):  # the real evaluation, then a teacher score a 1-epoch model cannot reach
        scored.append((name, imgsz, [p.name for p in ds.val_images], real(model, ds, imgsz, name)))
        return 0.4321

    monkeypatch.setattr(bench, "score_model", spy)
    doc = bench.ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes()
    bench.main(["--data", str(tiny_data), "--teacher", str(trained_bundle), "--families", "distill-at", "--seeds",
                "0", "1", "--epochs", "1", "--no-ultralytics", "--root", str(tmp_path), "--train", "imgsz=96",
                "--train", "batch=8"])
    assert doc.read_bytes() == before
    teacher = evaluate_bundle(trained_bundle, data=tiny_data, imgsz=96, out=tmp_path / "eval").metrics["map50_95"]
    val = sorted(p.name for p in (tiny_data.parent / "images" / "val").iterdir())
    assert [(n, i, sorted(v), m) for n, i, v, m in scored] == [(str(trained_bundle), 96, val, teacher)]
    root = tmp_path / f"data-{tiny_data.parent.name}-teacher-{trained_bundle.name}-imgsz=96-batch=8"
    table = (root / "families-e1.md").read_text()
    assert "| teacher | 0.4321 |" in table and f"Dataset {tiny_data} (24 train / 8 val images" in table
    for row, prefix in (("baseline student", "base"), ("distill-at", "distill-at")):
        maps = []
        for seed in (0, 1):
            b = load_bundle(root / f"{prefix}-e1-s{seed}")
            assert b.recipe["data"]["yolo"] == str(tiny_data)
            assert {k: b.recipe["train"][k] for k in ("imgsz", "batch", "epochs", "seed")} == {
                "imgsz": 96, "batch": 8, "epochs": 1, "seed": seed}
            assert b.recipe.get("teacher") == ({"model": str(trained_bundle), "nc": None} if prefix != "base" else None)
            maps.append(b.metrics["map50_95"])
        assert f"| {row} | {maps[0]:.4f} / {maps[1]:.4f} |" in table


def test_the_families_table_refuses_a_teacher_that_does_not_fit_the_users_data(monkeypatch, tmp_path, trained_bundle):
    """A teacher of other classes than the dataset, a model to train given as --teacher, a --train field the recipe
    does not have: one line naming it, before anything trains; --scene beside --data: a usage error."""
    import distill_families as bench

    from kdctl.data.synth import write_dataset

    fresh_settings(monkeypatch, bench)
    # cross and ring: the teacher (circle, square, triangle) names neither
    two = write_dataset(tmp_path / "two", train=2, val=2, seed=0, imgsz=64, classes=2, scene="dense")
    common = ["--families", "distill-at", "--seeds", "0", "--epochs", "1", "--root", str(tmp_path / "bench")]
    cases = [(["--data", str(two), "--teacher", str(trained_bundle)], "the dataset has 2 classes but the model of"),
             (["--data", str(two), "--teacher", "yolov8n.yaml"], "give a trained teacher (a .pt checkpoint or"),
             (["--data", str(two), "--teacher", str(tmp_path / "none.pt")], "none.pt' not found"),
             (["--data", str(two), "--train", "bogus=1"], "train.bogus: unknown field")]
    for args, says in cases:
        with pytest.raises(SystemExit) as e:
            bench.main(args + common)
        assert says in str(e.value) and "\n" not in str(e.value), (args, e.value)
    with pytest.raises(SystemExit) as e:
        bench.main(["--data", str(two), "--scene", "dense"] + common)
    assert e.value.code == 2
    assert not any((tmp_path / "bench").glob("*/*"))  # nothing trained
    # a teacher of more classes whose names include the dataset's (circle, square) is scored on those, as distill
    # reads it
    from kdctl.data.resolve import load_yolo_yaml

    sub = load_yolo_yaml(write_dataset(tmp_path / "sub", train=2, val=2, seed=0, imgsz=64, classes=2))
    assert sub.names == ["circle", "square"]
    assert 0 <= bench.given_teacher_map(str(trained_bundle), sub, 64, False) <= 1


def test_the_families_table_refuses_the_ultralytics_row_for_a_teacher_it_cannot_load(monkeypatch, tmp_path, tiny_data,
                                                                                     rtdetr_bundle):
    """Ultralytics' distill_model= takes a YOLO teacher: an RT-DETR one is refused before anything trains, with the
    flag that leaves that row out."""
    import distill_families as bench

    fresh_settings(monkeypatch, bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--data", str(tiny_data), "--teacher", str(rtdetr_bundle), "--families", "distill-at", "--seeds",
                    "0", "--epochs", "1", "--root", str(tmp_path)])
    assert "distill_model= takes a YOLO teacher, not this rtdetr one; add --no-ultralytics" in str(e.value)
    assert not any(tmp_path.glob("*/*"))


def test_val_noise_sets_each_run_against_its_seeds_baseline(monkeypatch, tmp_path, kd_chain):
    """bench/val_noise.py on a families bench's folders: each run against the baseline of its seed with the
    report's paired-bootstrap interval; a bundle without records (written before kdctl kept them) is scored once
    by ``kdctl eval``, and that eval is reused on a rerun."""
    import shutil

    import _common
    import val_noise

    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.evaluate.coco import paired_bootstrap
    from kdctl.report.kd_summary import paired_records

    runs = tmp_path / "runs"
    shutil.copytree(kd_chain["baseline"], runs / "base-s1")
    shutil.copytree(kd_chain["distilled"], runs / "kd-s1")
    src = load_bundle(kd_chain["distilled"])
    with BundleWriter(runs / "old-s1", stage="distill", recipe=src.recipe) as w:  # the same run, no records
        for role in ("weights", "data"):
            shutil.copy(src.file(role), w.path / src.file(role).name)
            w.add_output(role, src.file(role).name)
        w.metrics.update({k: v for k, v in src.metrics.items()})
    monkeypatch.setattr(_common, "DOC", tmp_path / "benchmarks.md")
    val_noise.main(["--runs", str(runs), "--families", "kd", "old", "--seeds", "1", "--resamples", "200"])
    doc = (tmp_path / "benchmarks.md").read_text()
    base, kd = load_bundle(runs / "base-s1"), load_bundle(runs / "kd-s1")
    lo, hi = paired_bootstrap(*paired_records(base, kd), resamples=200)
    gain = kd.metrics["map50_95"] - base.metrics["map50_95"]
    row = f"| s1 | {100 * gain:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {int(lo > 0 or hi < 0)}/1 |"
    assert f"| kd {row}" in doc and f"| old {row}" in doc and "<!-- bench:val-noise-runs -->" in doc
    evaluated = load_bundle(runs / "eval-records" / "old-s1", verify=True)
    assert evaluated.stage == "eval" and [p.name for p in (runs / "eval-records").iterdir()] == ["old-s1"]
    stamp = (evaluated.path / "manifest.json").stat().st_mtime_ns
    val_noise.main(["--runs", str(runs), "--families", "old", "--seeds", "1", "--resamples", "200"])
    assert (evaluated.path / "manifest.json").stat().st_mtime_ns == stamp


def test_every_distillation_run_trains_the_baselines_student(monkeypatch, tmp_path):
    """A family's recipe may name another student (recipes/logit-crosskd.yaml: a YOLO26 one); the families bench
    compares every run with the baseline, so each distils the baseline's student, or the one --student gives."""
    import distill_families as bench

    assert bench._recipe("logit-crosskd", 1, tmp_path / "t").student.model == bench.baseline_student() \
        == "yolov8-tiny.yaml"
    monkeypatch.setitem(bench.USER, "student", "yolo26n.yaml")
    assert bench._recipe("logit-crosskd", 1, tmp_path / "t").student.model == "yolo26n.yaml"
    assert bench._recipe("quickstart-student", 1, None).student.model == "yolo26n.yaml"
    assert bench._recipe("quickstart-teacher", 0, None).student.model == "yolov8n.yaml"


def test_every_bench_script_answers_help_without_running(tmp_path):
    """`python bench/X.py --help` prints its usage and runs nothing: bench/run_all.py took no arguments and started
    every benchmark (an RT-DETR training, docs/benchmarks.md rewritten) when asked for help. Run from a copy of
    bench/, so a script that does start writes beside the copy, not into this checkout's docs."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "bench", repo / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    scripts = sorted(p for p in (repo / "bench").glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 15
    for script in scripts:
        res = subprocess.run([sys.executable, str(script), "--help"], cwd=repo, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "YOLO_OFFLINE": "1"})
        assert res.returncode == 0 and res.stdout.startswith("usage:"), (script.name, res.stdout, res.stderr)
    assert sorted(p.name for p in repo.iterdir()) == ["bench"]  # no runs/, no docs/


def test_the_glyph_set_is_a_valid_dataset_of_its_own_and_the_same_each_time(tmp_path):
    """bench/glyph_data.py, the held-out set off kdctl's generator: every label line boxes a digit inside its
    image, kdctl's data check passes it, images are not square, and the same counts give the same bytes."""
    sys.path.insert(0, str(ROOT / "bench"))
    import glyph_data

    from kdctl.data.check import check_dataset

    data = glyph_data.write(tmp_path / "a", 12, 4)
    glyph_data.write(tmp_path / "b", 12, 4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 16 + 1
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files if f.name != "data.yaml")
    report = check_dataset(data)
    assert report["ok"] and report["names"] == list("0123456789") and not report["notes"], report
    from PIL import Image

    sizes = {Image.open(p).size for p in (tmp_path / "a" / "images").rglob("*.jpg")}
    assert any(w != h for w, h in sizes)
    rows = [line.split() for p in (tmp_path / "a" / "labels").rglob("*.txt") for line in p.read_text().splitlines()]
    assert len(rows) >= 16 and {r[0] for r in rows} <= set("0123456789")
    assert all(0 < float(v) <= 1 for r in rows for v in r[1:])
