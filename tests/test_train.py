"""`kdctl train` and `kdctl eval` through the CLI on tiny data."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from kdctl.bundle import verify_bundle
from kdctl.cli.main import app


def test_trained_bundle_contents(trained_bundle):
    m = json.loads((trained_bundle / "manifest.json").read_text())
    assert m["stage"] == "train" and m["recipe"]["student"]["model"] == "yolov8-tiny.yaml"
    assert {"weights", "data", "results", "recipe", "metrics"} <= set(m["outputs"])
    assert m["metrics"]["epochs"][0]["train/box_loss"] > 0 and 0 <= m["metrics"]["map50_95"] <= 1
    assert m["inputs"]["data"]["val_images"] == 8 and verify_bundle(trained_bundle).ok
    assert m["metrics"]["eval_device"] == "cpu"  # where the published mAP was computed (a CUDA run: its first GPU)
    assert m["metrics"]["train_device"] == "cpu"


@pytest.mark.parametrize("device,mps,where", [("cpu", False, "cpu"), (None, False, "cpu"), ("", True, "cpu"),
                                              ("mps", False, "cpu"), ("mps", True, "mps"), ("0", False, "cuda:0"),
                                              ("cuda", False, "cuda:0"), (" 2, 3 ", False, "cuda:2,3")])
def test_a_bundle_records_where_it_trained(device, mps, where, monkeypatch):
    """train.device 'mps' on a machine without Apple's GPU trains on the CPU (Ultralytics' fallback, kept), and the
    bundle said only 'mps' (the recipe's word): ``train_device`` records where it ran."""
    import torch

    from kdctl.distributed import trained_on

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert trained_on(device) == where


def test_eval_cli(trained_bundle, tiny_data, tmp_path):
    res = CliRunner().invoke(app, ["eval", str(trained_bundle), "--data", str(tiny_data), "--out", str(tmp_path / "e"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["images"] == 8 and set(d["per_class_ap50_95"]) == {"circle", "square", "triangle"}
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["stage"] == "eval" and m["parents"][0]["stage"] == "train"
    # the same model and data give the same mAP as the train bundle recorded
    tm = json.loads((trained_bundle / "manifest.json").read_text())["metrics"]
    assert d["map50_95"] == tm["map50_95"]


def test_eval_of_a_checkpoint_file(trained_bundle, tiny_data, tmp_path):
    """``kdctl eval best.pt --data data.yaml``, as Ultralytics' ``yolo val model=best.pt``: scored at the size it
    was trained at (its train_args), recorded with its hash; it was refused as 'a file, not a bundle directory'."""
    import shutil

    from kdctl.bundle import sha256_file

    pt = tmp_path / "best.pt"
    shutil.copy(trained_bundle / "weights.pt", pt)
    res = CliRunner().invoke(app, ["eval", str(pt), "--data", str(tiny_data), "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    tm = json.loads((trained_bundle / "manifest.json").read_text())["metrics"]
    assert d["map50_95"] == tm["map50_95"] and d["per_class_ap50_95"] == tm["per_class_ap50_95"]
    assert m["metrics"]["imgsz"] == tm["imgsz"] == 128  # the training's size, not Ultralytics' default 640
    assert m["parents"] == [] and m["inputs"]["model"] == str(pt) and m["inputs"]["model_sha256"] == sha256_file(pt)
    assert verify_bundle(tmp_path / "e").ok
    at96 = CliRunner().invoke(app, ["eval", str(pt), "--data", str(tiny_data), "--imgsz", "96", "--out",
                                    str(tmp_path / "e96"), "--json"])
    assert at96.exit_code == 0
    assert json.loads((tmp_path / "e96" / "manifest.json").read_text())["metrics"]["imgsz"] == 96
    assert CliRunner().invoke(app, ["report", str(tmp_path / "e"), "--out", str(tmp_path / "r")]).exit_code == 0
    upper = tmp_path / "BEST.PT"  # a name in capitals is a checkpoint too (it was "is a file, not a bundle directory")
    shutil.copy(pt, upper)
    res = CliRunner().invoke(app, ["eval", str(upper), "--data", str(tiny_data), "--out", str(tmp_path / "E"),
                                   "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["map50_95"] == tm["map50_95"], res.output
    for argv, says in ((["eval", str(pt)], "--data: required to score the checkpoint"),
                       (["eval", str(tmp_path / "none.pt"), "--data", str(tiny_data)],
                        "none.pt: checkpoint not found")):
        out = tmp_path / "x"
        res = CliRunner().invoke(app, [*argv, "--out", str(out)])
        assert res.exit_code == 2 and says in " ".join(res.output.split()) and not out.exists(), res.output
        assert "Traceback" not in res.output


def test_eval_split_scores_the_yaml_test_split(trained_bundle, tiny_data, tmp_path):
    """--split test scores the YAML's test: images, as Ultralytics' val split=test: the same mAP as a YAML whose val:
    is that folder; a YAML without test: is one line naming the field."""
    import shutil

    import yaml

    root = tmp_path / "d"
    for folder in ("images", "labels"):
        shutil.copytree(tiny_data.parent / folder / "train", root / folder / "test")
        shutil.copytree(tiny_data.parent / folder / "val", root / folder / "val")
    spec = {"path": str(root), "train": "images/val", "val": "images/val", "test": "images/test",
            "names": ["circle", "square", "triangle"]}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    (root / "as-val.yaml").write_text(yaml.safe_dump({**spec, "val": "images/test"}))
    run = [str(trained_bundle), "--data", str(root / "data.yaml"), "--json"]
    res = CliRunner().invoke(app, ["eval", *run, "--split", "test", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    test = json.loads(res.stdout)
    same = json.loads(CliRunner().invoke(app, ["eval", str(trained_bundle), "--data", str(root / "as-val.yaml"),
                                               "--out", str(tmp_path / "v"), "--json"]).stdout)
    val = json.loads(CliRunner().invoke(app, ["eval", *run, "--out", str(tmp_path / "v2")]).stdout)
    assert test["images"] == 24 and val["images"] == 8 and (test["split"], val["split"]) == ("test", "val")
    assert test["map50_95"] == same["map50_95"] and test["per_class_ap50_95"] == same["per_class_ap50_95"]
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["inputs"]["data"]["scored_split"] == "test" and m["metrics"]["split"] == "test"
    del spec["test"]
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["eval", *run, "--split", "test", "--out", str(tmp_path / "t2")])
    assert res.exit_code == 2 and "data.yaml: field 'test' is missing (the split to score)" in res.output
    assert not (tmp_path / "t2").exists()


def test_train_cli_bad_data(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("student: {model: yolov8-tiny.yaml}\ndata: {yolo: missing/data.yaml}\ntrain: {epochs: 1, imgsz: 64}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "dataset YAML not found" in res.output and "Traceback" not in res.output
    r.write_text("student: {model: yolov9000.yaml}\ndata: {synthetic: {train: 2, val: 1, imgsz: 64}}\n"
                 "train: {epochs: 1, imgsz: 64}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "student.model: 'yolov9000.yaml' is neither a file nor an Ultralytics model" in res.output


def test_train_with_relative_paths_keeps_everything_in_place(tmp_path, tiny_data, monkeypatch):
    """Users run from their project folder with relative --out: the run must land there, nowhere else."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(f"name: rel\nstudent: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                                     "train: {epochs: 1, imgsz: 64, batch: 8}\n")
    res = CliRunner().invoke(app, ["train", "r.yaml", "--out", "runs/train/rel", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "train" / "rel" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train"]      # no runs/detect/...
    assert [p.name for p in (tmp_path / "runs" / "train").iterdir()] == ["rel"]     # work dir cleaned up


def test_malformed_labels_are_one_line_naming_file_and_line(tmp_path, tiny_data):
    """Label files present but all malformed: kdctl's validation names file:line before Ultralytics sees them."""
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(tiny_data.parent / "images", root / "images")
    for split in ("train", "val"):
        (root / "labels" / split).mkdir(parents=True)
        for img in (root / "images" / split).glob("*.png"):
            (root / "labels" / split / f"{img.stem}.txt").write_text("7 not numbers\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    r = tmp_path / "r.yaml"
    r.write_text(f"student: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {root / 'data.yaml'}}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "train_000000.txt:1: has 3 columns" in res.output
    assert "Traceback" not in res.output and "\x1b" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_bias_warmup_default_and_override():
    """Ultralytics' warmup_bias_lr 0.1 stays the default (measured better than 0 with AdamW); the recipe sets it."""
    from kdctl.recipe.schema import TrainSpec
    from kdctl.training import _warmup_bias_lr

    assert _warmup_bias_lr(TrainSpec(optimizer="AdamW", lr0=0.003)) == 0.1
    assert _warmup_bias_lr(TrainSpec(optimizer="AdamW", warmup_bias_lr=0.0)) == 0.0


def _tiny_recipe(data, **train):
    """A one-student recipe on ``data`` at 64 px; ``train`` overrides the train section."""
    from kdctl.recipe.schema import Recipe

    return Recipe.model_validate({"student": {"model": "yolov8-tiny.yaml"}, "data": {"yolo": str(data)},
                                  "train": {"imgsz": 64, **train}})


def _ultralytics_trainer(recipe, data, work):
    """The Ultralytics trainer kdctl would build for ``recipe`` (not started)."""
    from kdctl.detectors.yolo import trainer
    from kdctl.models import resolve_model
    from kdctl.training import _overrides

    return trainer(_overrides(recipe, data, resolve_model("yolov8-tiny.yaml", "student.model", "test").ref, work))


@pytest.mark.slow
def test_nominal_batch_sets_optimizer_steps(tiny_data, tmp_path):
    """train.nbs is Ultralytics' nominal batch: unset, gradients of 64 images make one step (so 24 images at batch 4
    are 1 optimizer step an epoch); set to the batch, every batch is a step (6)."""
    from kdctl.training import _overrides

    def recipe(**train):
        return _tiny_recipe(tiny_data, epochs=1, batch=4, warmup_epochs=0, **train)

    assert "nbs" not in _overrides(recipe(), tiny_data, "yolov8-tiny.yaml", tmp_path)
    tr = _ultralytics_trainer(recipe(nbs=4), tiny_data, tmp_path)
    steps = []
    step = tr.optimizer_step
    tr.optimizer_step = lambda: (steps.append(1), step())
    tr.train()
    assert tr.args.nbs == 4 and len(steps) == 6


@pytest.mark.slow
def test_ultralytics_training_settings_reach_its_trainer(tiny_data, tmp_path):
    """train.fliplr, lrf, cos_lr, momentum, ... (Ultralytics' own settings, by its names): handed to its trainer
    when given, its defaults when left out; the dataset's flip is off at fliplr 0 (digits, text), and the run's
    checkpoint records them. kdctl's Faster R-CNN loop takes the three it applies and refuses the rest in one
    line, before any work."""
    import torch
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.augment import RandomFlip

    from kdctl.recipe.schema import ULTRALYTICS_TRAIN
    from kdctl.training import _overrides, run_training

    given = {"fliplr": 0.0, "flipud": 0.25, "lrf": 0.2, "cos_lr": True, "momentum": 0.8, "weight_decay": 0.001,
             "hsv_h": 0.0, "degrees": 5.0, "scale": 0.25, "box": 5.0}
    plain = _overrides(_tiny_recipe(tiny_data), tiny_data, "yolov8-tiny.yaml", tmp_path)
    assert not set(ULTRALYTICS_TRAIN) & set(plain)  # left out: Ultralytics' defaults
    tr = _ultralytics_trainer(_tiny_recipe(tiny_data, epochs=1, batch=8, **given), tiny_data, tmp_path / "u")
    assert {k: getattr(tr.args, k) for k in given} == given
    ds = build_yolo_dataset(tr.args, str(tiny_data.parent / "images" / "train"), 8, tr.data, mode="train", stride=32)
    flips = {t.direction: t.p for t in ds.transforms.transforms if isinstance(t, RandomFlip)}
    assert flips == {"horizontal": 0.0, "vertical": 0.25}, flips
    r = _tiny_recipe(tiny_data, epochs=1, batch=8, fliplr=0.0, momentum=0.8, lrf=0.2)
    b = run_training(r, stage="train", source="r.yaml", out=tmp_path / "b")
    args = torch.load(b.path / "weights.pt", map_location="cpu", weights_only=False)["train_args"]
    assert (args["fliplr"], args["momentum"], args["lrf"]) == (0.0, 0.8, 0.2)
    assert b.recipe["train"]["fliplr"] == 0.0 and b.recipe["train"]["cos_lr"] is None


@pytest.mark.slow
def test_val_off_validates_the_last_epoch_only(tiny_data, tmp_path):
    """train.val: false is Ultralytics' val=False: 3 epochs, one validation (after the last); the bundle's per-epoch
    rows keep only the training losses where no validation ran."""
    from kdctl.training import _summary

    r = _tiny_recipe(tiny_data, epochs=3, batch=8, val=False)
    tr = _ultralytics_trainer(r, tiny_data, tmp_path)
    calls = []
    validate = tr.validate
    tr.validate = lambda: (calls.append(tr.epoch), validate())[1]
    tr.train()
    assert calls == [2]
    rows = [{"epoch": e, "time": 1.0, "train/box_loss": 2.0, "val/box_loss": 0.0, "metrics/mAP50-95(B)": m}
            for e, m in ((1, 0.0), (2, 0.0), (3, 0.4))]
    m = {"map50_95": 0.4, "map50": 0.5, "map75": 0.4, "per_class_ap50_95": {}, "images": 8}
    got = _summary(m, rows, tr.model, 1.0, r)["epochs"]
    assert [sorted(e) for e in got[:2]] == [["epoch", "time_s", "train/box_loss"]] * 2
    assert got[2]["metrics/mAP50-95(B)"] == 0.4 and got[2]["val/box_loss"] == 0.0
    on = _summary(m, rows, tr.model, 1.0, r.model_copy(update={"train": r.train.model_copy(update={"val": True})}))
    assert "metrics/mAP50-95(B)" in on["epochs"][0]


@pytest.mark.slow
def test_threads_sets_torchs_cpu_threads_while_training(tiny_data, tmp_path, monkeypatch):
    """train.threads holds through training and each validation (Ultralytics resets torch to cpu_count - 1 at
    both), and the previous count is back afterwards; unset, Ultralytics' count stands."""
    import torch
    from ultralytics.utils import torch_utils

    from kdctl import training

    seen = []
    callbacks = training._callbacks

    def recording(trainer, *a, **k):
        callbacks(trainer, *a, **k)
        for event in ("on_train_epoch_start", "on_fit_epoch_end"):  # the latter after the epoch's validation
            trainer.add_callback(event, lambda tr: seen.append(torch.get_num_threads()))

    monkeypatch.setattr(training, "_callbacks", recording)
    before = torch.get_num_threads()
    want = torch_utils.NUM_THREADS + 1
    for threads, expect in ((want, want), (None, torch_utils.NUM_THREADS)):
        seen.clear()
        training.run_training(_tiny_recipe(tiny_data, epochs=1, batch=8, threads=threads), stage="train",
                              source="test", out=tmp_path / f"out{threads}")
        assert seen and set(seen) == {expect}, (threads, seen)
        assert torch_utils.NUM_THREADS == want - 1
        if threads:
            assert torch.get_num_threads() == before
        torch.set_num_threads(before)  # Ultralytics' own reset outlives an unset run, as without kdctl


def test_reuse_keeps_a_bundle_made_from_the_same_recipe(tmp_path, trained_bundle):
    import shutil

    from kdctl.bundle import load_bundle
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    out = tmp_path / "t"
    shutil.copytree(trained_bundle, out)
    recipe = load_recipe(trained_bundle / "recipe.yaml")
    b = run_training(recipe, stage="train", out=out, reuse=True)
    assert b.id == load_bundle(trained_bundle).id            # nothing retrained
    (out / "results.csv").write_text("tampered")            # a bundle that no longer verifies is not reused ...
    with pytest.raises(Exception, match="already exists"):  # ... and without --overwrite nothing replaces it
        run_training(recipe, stage="train", out=out, reuse=True)


def test_reuse_and_resume_read_a_recipe_recorded_by_an_earlier_kdctl(tmp_path, trained_bundle):
    """A bundle (or an interrupted run) recorded before a recipe field existed is still 'the same recipe' once the
    field takes its default: the demo's teacher is not retrained after an upgrade."""
    from kdctl.recipe import load_recipe
    from kdctl.training import _as_current, _check_same_recipe, recipe_difference

    recipe = load_recipe(trained_bundle / "recipe.yaml")
    old = recipe.model_dump(mode="json")
    del old["distill"]["cache"]  # a field this kdctl added
    assert old != recipe.model_dump(mode="json") and _as_current(old) == recipe.model_dump(mode="json")
    _check_same_recipe({"recipe": old}, recipe, "r.yaml", tmp_path)  # not refused
    changed = {**old, "train": {**old["train"], "epochs": old["train"]["epochs"] + 1}}
    with pytest.raises(Exception, match="train.epochs: differs"):
        _check_same_recipe({"recipe": changed}, recipe, "r.yaml", tmp_path)
    moved = {**old, "train": {**old["train"], "device": "cuda:0", "workers": 4}}  # a killed run moved to a GPU box
    _check_same_recipe({"recipe": moved}, recipe, "r.yaml", tmp_path)  # not refused
    assert recipe_difference(moved, recipe) == "train.device"  # but not the same finished result (--reuse, bench)
    assert recipe_difference(old, recipe) is None
    assert _as_current({"not": "a recipe"}) == {"not": "a recipe"}


def test_a_refused_resume_names_both_values(tmp_path, trained_bundle):
    """A resume refused for a changed field says what the interrupted run had and what this one has: a --set left
    off the resumed command (``--set train.epochs=3``) reads as "3 there, 1 here"."""
    from kdctl.errors import ResumeMismatch
    from kdctl.recipe import load_recipe
    from kdctl.training import _check_same_recipe

    recipe = load_recipe(trained_bundle / "recipe.yaml")
    old = recipe.model_dump(mode="json")
    epochs = {**old, "train": {**old["train"], "epochs": 3}}
    with pytest.raises(ResumeMismatch, match=r"r\.yaml: train\.epochs: differs from the recipe of the interrupted "
                                             r"run in .* \(3 there, 1 here\); .*the same --set"):
        _check_same_recipe({"recipe": epochs}, recipe, "r.yaml", tmp_path)
    init = {**old, "distill": {**old["distill"], "init": "teacher"}}
    with pytest.raises(ResumeMismatch, match=r"distill\.init: .* \(\"teacher\" there, null here\)"):
        _check_same_recipe({"recipe": init}, recipe, "r.yaml", tmp_path)


def test_time_of_the_processes_a_resumed_run_continues():
    """results.csv's time restarts with each process: a run killed after epoch 2 (at 7.5 s) and again after epoch 4
    (4.0 s into the second process) had spent 11.5 s before the third process; if that third one only published
    (killed after the last epoch), its own epochs' 3.0 s count too."""
    from kdctl.training import _earlier_processes_s

    rows = [{"epoch": 1, "time": 3.5}, {"epoch": 2, "time": 7.5}, {"epoch": 3, "time": 2.0}, {"epoch": 4, "time": 4.0},
            {"epoch": 5, "time": 1.5}, {"epoch": 6, "time": 3.0}]
    assert _earlier_processes_s(rows, trained_here=True) == pytest.approx(11.5)
    assert _earlier_processes_s(rows, trained_here=False) == pytest.approx(14.5)
    assert _earlier_processes_s(rows[:2], trained_here=True) == 0.0  # one process, not resumed
    assert _earlier_processes_s([{"epoch": 1}, {"epoch": 2, "time": 1.0}], trained_here=True) == 0.0  # no time column
    assert _earlier_processes_s([], trained_here=False) == 0.0


def test_a_teacher_of_other_classes_fine_tuned_on_this_dataset_then_teaches_its_head(tmp_path, trained_bundle):
    """What distill's 'trained on other classes' error advises: a train bundle of 3 classes given as the student of
    a 4-class dataset trains there (its head rebuilt for the new classes, the rest of its weights kept), and the
    fine-tuned model then teaches head-level KD on that dataset."""
    import torch

    from kdctl.data.synth import write_dataset

    data = write_dataset(tmp_path / "four", train=16, val=8, seed=5, imgsz=128, classes=4)
    (tmp_path / "ft.yaml").write_text(f"name: ft\nstudent: {{model: {trained_bundle}}}\ndata: {{yolo: {data}}}\n"
                                      "train: {epochs: 1, imgsz: 128, batch: 8, workers: 0}\n")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "ft.yaml"), "--out", str(tmp_path / "ft"), "-q"])
    assert res.exit_code == 0, res.output
    ft = torch.load(tmp_path / "ft" / "weights.pt", map_location="cpu", weights_only=False)["model"]
    old = torch.load(trained_bundle / "weights.pt", map_location="cpu", weights_only=False)["model"]
    assert ft.model[-1].nc == 4 and len(ft.names) == 4
    # the first convolution came from the 3-class bundle (fine-tuned one epoch, not started afresh)
    w_ft, w_old = ft.model[0].conv.weight.float(), old.model[0].conv.weight.float()
    assert torch.nn.functional.cosine_similarity(w_ft.flatten(), w_old.flatten(), 0) > 0.9
    (tmp_path / "kd.yaml").write_text(f"name: kd\nteacher: {{model: {tmp_path / 'ft'}}}\nstudent: {{model: "
                                      f"yolov8-tiny.yaml}}\ndata: {{yolo: {data}}}\ntrain: {{epochs: 1, imgsz: 128, "
                                      "batch: 8, workers: 0}\ndistill: {losses: [{name: kd_logit}]}\n")
    res = CliRunner().invoke(app, ["distill", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "kd"), "-q"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("device,where", [("cpu", "cpu"), (None, "cpu"), ("mps", "cpu"), ("cuda", "cuda:0"),
                                          ("0", "cuda:0"), ("2,3", "cuda:2"), (" 1 , 0", "cuda:1")])
def test_a_teacher_checkpoint_is_scored_on_the_first_gpu_the_run_trained_on(device, where, monkeypatch):
    import torch

    from kdctl.training import _first_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on the 4-GPU machine the run trained on
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _first_gpu(device) == where


def test_eval_device_is_checked_before_any_work(trained_bundle, tmp_path):
    """`kdctl eval --device`: cpu scores as before (and says so in the bundle); a GPU this machine lacks, or a word
    that is no device, is one line and writes nothing."""
    import torch

    from kdctl.evaluate import torch_device

    res = CliRunner().invoke(app, ["eval", str(trained_bundle), "--device", "cpu", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())["metrics"]
    assert m["device"] == "cpu" and m["map50_95"] == json.loads((trained_bundle / "manifest.json").read_text())[
        "metrics"]["map50_95"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [("tpu", "--device: 'tpu'; valid: cpu, cuda, or a GPU index such as 0"), (str(gpus), f"GPU {gpus} does not "
           "exist here" if gpus else "asks for a CUDA GPU, but this machine has none"),
           (f"cuda:{gpus}", f"GPU {gpus} does not exist here" if gpus else "asks for a CUDA GPU, but this machine "
            "has none"), ("cuda:x", "--device: 'cuda:x'; valid: cpu, cuda, or a GPU index such as 0")]
    for device, says in bad:
        res = CliRunner().invoke(app, ["eval", str(trained_bundle), "--device", device, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output
        assert not (tmp_path / "x").exists()
    assert torch_device("CPU") == "cpu"
    if gpus:
        assert torch_device("cuda") == "cuda:0" and torch_device(" 0 ") == "cuda:0" == torch_device("CUDA:0")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_a_gpu_scores_as_on_the_cpu(trained_bundle, tmp_path):
    cpu = CliRunner().invoke(app, ["eval", str(trained_bundle), "--json", "--out", str(tmp_path / "c")])
    gpu = CliRunner().invoke(app, ["eval", str(trained_bundle), "--device", "0", "--json", "--out",
                                   str(tmp_path / "g")])
    assert cpu.exit_code == gpu.exit_code == 0, gpu.output
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["metrics"]["device"] == "cuda:0"
    assert json.loads(gpu.stdout)["map50_95"] == pytest.approx(json.loads(cpu.stdout)["map50_95"], abs=2e-3)
