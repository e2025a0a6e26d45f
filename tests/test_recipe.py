"""Recipe validation: shipped recipes load; malformed ones fail with one line naming file and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.errors import RecipeError
from kdctl.recipe import load_recipe, recipe_json_schema
from kdctl.training import run_training

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

GOOD = """
name: ok
teacher: {model: yolov8s.yaml}
student: {model: yolov8n.yaml}
data: {synthetic: {train: 10, val: 5}}
train: {epochs: 1, imgsz: 128}
distill:
  losses:
    - {name: cwd, weight: 2.0, params: {tau: 2.0}}
"""


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.student.model


def test_recipes_folder_is_not_empty():
    names = {p.name for p in RECIPES}
    assert "quickstart.yaml" in names and len(names) >= 5


def test_good_recipe_defaults_filled(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    r = load_recipe(p)
    assert r.train.batch == 16 and r.distill.losses[0].params == {"tau": 2.0}
    assert r.export.target == "cpu" and r.gate.min_map50_95 is None


# (yaml text, the field path expected in the message, a word from the reason)
BAD = [
    ("# nothing but a comment\n", "<root>", "got nothing (the file is empty)"),
    ("student: {model: yolov8n.yaml}\n", "data", "required field is missing"),
    ("data: {synthetic: {}}\n", "student", "required field is missing"),
    (GOOD.replace("imgsz: 128", "imgsz: 100"), "train.imgsz", "multiple of 32"),
    (GOOD.replace("epochs: 1", "epochs: 0"), "train.epochs", "greater than or equal to 1"),
    (GOOD.replace("epochs: 1", "epochs: ten"), "train.epochs", "valid integer"),
    # a section given as one value: its fields, not pydantic's class name ('or instance of CacheSpec')
    (GOOD + "  cache: runs/cache/c\n", "distill.cache",
     'Input should be a valid dictionary of its fields (path, top_k), got "runs/cache/c"'),
    (GOOD.replace("- {name: cwd, weight: 2.0, params: {tau: 2.0}}", "- cwd"), "distill.losses[0]",
     'Input should be a valid dictionary of its fields (name, level, student_layers, teacher_layers, strides, '
     'weight, params), got "cwd"'),
    (GOOD.replace("train: {epochs: 1, imgsz: 128}", "train: 5"), "train", "Input should be a valid dictionary of its "
     "fields (epochs, imgsz, batch, lr0, optimizer"),
    (GOOD.replace("data: {synthetic: {train: 10, val: 5}}", "data: 3"), "data", "Input should be a valid dictionary "
     "of its fields (yolo, coco, synthetic, skip_invalid) or one string, short for its 'yolo', got 3"),
    (GOOD.replace("train: {", "train: {lr: 0.1, "), "train.lr", "unknown field 'lr'; valid fields: epochs"),
    # Ultralytics' own settings in Ultralytics' ranges (its cfg check would stop the run at the trainer's start)
    (GOOD.replace("train: {", "train: {fliplr: 1.5, "), "train.fliplr", "less than or equal to 1"),
    (GOOD.replace("train: {", "train: {scale: 1.0, "), "train.scale", "less than 1"),
    (GOOD.replace("train: {", "train: {cos_lr: maybe, "), "train.cos_lr", "valid boolean"),
    (GOOD.replace("name: ok", "name: ok\ntypo_section: 1"), "typo_section", "unknown field"),
    # a required field misspelt: the unknown key and the valid ones, not only "required field is missing"
    (GOOD.replace("student:", "studnet:"), "studnet", "unknown field 'studnet'; valid fields: name, teacher, student"),
    (GOOD.replace("{model: yolov8s.yaml}", "{bundle: runs/train/t}"), "teacher.bundle",
     "unknown field 'bundle'; valid fields: model"),
    (GOOD.replace("name: cwd", "name: cwdd"), "distill.losses[0].name", "unknown loss 'cwdd'; valid:"),
    (GOOD.replace("tau: 2.0", "tow: 2.0"), "distill.losses[0].params", "unknown parameter 'tow'"),
    (GOOD.replace("weight: 2.0", "weight: -1"), "distill.losses[0].weight", "greater than or equal to 0"),
    # a term over no layer pair passed the check and failed at the first training step
    (GOOD.replace("weight: 2.0", "student_layers: [], weight: 2.0"), "distill.losses[0].student_layers",
     "is empty; name at least one layer"),
    (GOOD.replace("weight: 2.0", "student_layers: [true, 9], teacher_layers: [4, 9], weight: 2.0"),
     "distill.losses[0].student_layers", "got true; give a layer index (4) or a module path"),
    # strides: which feature-map pairs a term keeps (8 is P3)
    (GOOD.replace("weight: 2.0", "strides: [], weight: 2.0"), "distill.losses[0].strides", "is empty"),
    (GOOD.replace("weight: 2.0", "strides: [8, 8], weight: 2.0"), "distill.losses[0].strides", "names a stride twice"),
    (GOOD.replace("weight: 2.0", "strides: [0], weight: 2.0"), "distill.losses[0].strides[0]",
     "greater than or equal to 1"),
    # pydantic's lax mode would read true as 1 and "8" as 8
    (GOOD.replace("weight: 2.0", "strides: [true], weight: 2.0"), "distill.losses[0].strides[0]",
     "valid integer, got true"),
    (GOOD.replace("weight: 2.0", "strides: ['8'], weight: 2.0"), "distill.losses[0].strides[0]",
     "valid integer, got \"8\""),
    (GOOD.replace("{name: cwd, weight: 2.0, params: {tau: 2.0}}", "{name: kd_logit, strides: [8]}"),
     "distill.losses[0].strides", "'kd_logit' is not a feature-map loss; strides picks the map pairs of at, cwd"),
    # parameter values: a temperature of 0 would divide by zero in training, a string would fail mid-epoch
    (GOOD.replace("tau: 2.0", "tau: 0"), "distill.losses[0].params.tau", "must be > 0, got 0"),
    (GOOD.replace("tau: 2.0", "tau: -0.5"), "distill.losses[0].params.tau", "must be > 0, got -0.5"),
    (GOOD.replace("tau: 2.0", "tau: hot"), "distill.losses[0].params.tau", "must be a number, got \"hot\""),
    (GOOD.replace("tau: 2.0", "tau: .nan"), "distill.losses[0].params.tau", "must be finite"),
    (GOOD.replace("tau: 2.0", "tau: true"), "distill.losses[0].params.tau", "must be a number, got true"),
    # values are quoted as the YAML gave them, and pydantic's union branch ("float") is not part of the field
    (GOOD.replace("tau: 2.0", "tau: [1, 2]"), "distill.losses[0].params.tau:", "valid number, got [1, 2]"),
    (GOOD.replace("tau: 2.0", "normalize: 2"), "distill.losses[0].params.normalize", "must be true or false"),
    (GOOD.replace("{name: cwd, weight: 2.0, params: {tau: 2.0}}", "{name: mgd, params: {ratio: 1.0}}"),
     "distill.losses[0].params.ratio", "must be in [0, 1)"),
    (GOOD.replace("{name: cwd, weight: 2.0, params: {tau: 2.0}}", "{name: fgd, params: {alpha: -1}}"),
     "distill.losses[0].params.alpha", "must be ≥ 0"),
    (GOOD.replace("{name: cwd, weight: 2.0, params: {tau: 2.0}}", "{name: detr_query, params: {teacher_queries: 2.5}}"),
     "distill.losses[0].params.teacher_queries", "whole number ≥ 1"),
    (GOOD.replace("{name: cwd,", "{name: cwd, level: query,"), "distill.losses[0].level", "applies at"),
    (GOOD.replace("{name: cwd,", "{name: cwd, level: torso,"), "distill.losses[0].level", '"torso"'),
    (GOOD.replace("data: {synthetic: {train: 10, val: 5}}", "data: {}"), "data", "exactly one of"),
    (GOOD.replace("data: {synthetic: {train: 10, val: 5}}", "data: {yolo: a.yaml, synthetic: {}}"), "data",
     "got yolo, synthetic"),
    (GOOD.replace("model: yolov8s.yaml", "model: resnet50"), "teacher.model", "is not a model YAML"),
    (GOOD.replace("{model: yolov8n.yaml}", "{model: ''}"), "student.model", "must not be empty"),
    (GOOD.replace("teacher: {model: yolov8s.yaml}\n", ""), "teacher", "needs a teacher"),
    (GOOD.replace("name: ok", "name: 'bad name!'"), "name", "should match pattern"),
    # the name is the default output folder's name: 300 characters were accepted, then failed to be created
    (GOOD.replace("name: ok", "name: " + "a" * 129), "name", "at most 128 characters"),
    (GOOD.replace("train: {", "train: {device: gpu9, "), "train.device", "is not a device"),
    (GOOD.replace("train: {", "train: {device: '0,1,0', "), "train.device", "names GPU 0 twice"),
    (GOOD.replace("train: {", "train: {device: 'cuda:', "), "train.device", "is not a device"),
    (GOOD.replace("train: {", "train: {device: 'cuda:x', "), "train.device", "is not a device"),
    # pydantic's lax mode would read true as 1 and false as 0
    (GOOD.replace("epochs: 1", "epochs: true"), "train.epochs", "got true; give a number"),
    (GOOD.replace("train: {", "train: {lr0: false, "), "train.lr0", "got false; give a number"),
    # Ultralytics refuses lr0 above 1 once training starts: "training failed", not the field
    (GOOD.replace("train: {", "train: {lr0: 10, "), "train.lr0", "less than or equal to 1"),
    (GOOD.replace("weight: 2.0", "weight: true"), "distill.losses[0].weight", "got true; give a number"),
    (GOOD + "export: {max_map_drop: -1}\n", "export.max_map_drop", "greater than or equal to 0"),
    (GOOD + "gate: {min_map50_95: 5}\n", "gate.min_map50_95", "less than or equal to 1"),
    (GOOD + "profile: {runs: 0}\n", "profile.runs", "greater than or equal to 1"),
    # the profile measures latency at batch 1 only: a batch here was accepted and silently ignored
    (GOOD + "profile: {batch: 4}\n", "profile.batch", "got 4; latency is measured at batch 1"),
    (GOOD + "export: {target: tpu}\n", "export.target", "'tpu' does not exist; valid: cpu"),
    (GOOD + "export: {artifacts: [onnx-int4]}\n", "export.artifacts", "unknown artifact 'onnx-int4'"),
    (GOOD.replace("losses:", "losses: 3\n  x:"), "distill", ""),
    ("- just\n- a list\n", "<root>", "expected a mapping"),
    ("name: [unclosed\n", "line 2", "invalid YAML"),
    # PyYAML keeps the last of two equal keys: a second train section would silently replace the first
    (GOOD + "train: {epochs: 3}\n", "line 7", "key 'train' is given twice"),
    (GOOD.replace("epochs: 1", "epochs: 1, epochs: 2"), "line 3", "key 'epochs' is given twice"),
    # NumPy (which Ultralytics seeds with the training seed) refuses seeds outside [0, 2**32 - 1] mid-run
    (GOOD.replace("train: {", "train: {seed: -1, "), "train.seed", "greater than or equal to 0"),
    (GOOD.replace("train: {", "train: {seed: 4294967296, "), "train.seed", "less than or equal to 4294967295"),
    (GOOD.replace("{train: 10, val: 5}", "{train: 10, val: 5, seed: -3}"), "data.synthetic.seed",
     "greater than or equal to 0"),
    # the dense scene draws its classes from the last 9 shapes
    (GOOD.replace("{train: 10, val: 5}", "{train: 10, val: 5, scene: dense, classes: 10}"), "data.synthetic.classes",
     "scene 'dense' has 9 shapes"),
    (GOOD.replace("{train: 10, val: 5}", "{train: 10, val: 5, scene: foggy}"), "data.synthetic.scene",
     "'cluttered', 'clear' or 'dense'"),
    # distill.stop_epoch: KD must stop before the last epoch, and there must be KD to stop
    (GOOD.replace("distill:", "distill:\n  stop_epoch: 1"), "distill.stop_epoch", "must be below train.epochs (1)"),
    (GOOD.replace("distill:", "distill:\n  stop_epoch: 0"), "distill.stop_epoch", "greater than or equal to 1"),
    (GOOD.replace("epochs: 1", "epochs: 5").replace("losses:\n    - {name: cwd, weight: 2.0, params: {tau: 2.0}}",
                                                    "stop_epoch: 3"),
     "distill.stop_epoch", "without distill.losses"),
    # distill.warmup_epochs: the ramp must end before training (and distillation) does, and ramp some KD term
    (GOOD.replace("distill:", "distill:\n  warmup_epochs: 1"), "distill.warmup_epochs",
     "must be below train.epochs (1)"),
    (GOOD.replace("epochs: 1", "epochs: 9").replace("distill:", "distill:\n  warmup_epochs: 4\n  stop_epoch: 4"),
     "distill.warmup_epochs", "must be below distill.stop_epoch (4)"),
    (GOOD.replace("distill:", "distill:\n  warmup_epochs: 0"), "distill.warmup_epochs", "greater than or equal to 1"),
    (GOOD.replace("epochs: 1", "epochs: 5").replace("losses:\n    - {name: cwd, weight: 2.0, params: {tau: 2.0}}",
                                                    "warmup_epochs: 3"),
     "distill.warmup_epochs", "without distill.losses"),
]


def _laughs(levels: int) -> str:
    """A "billion laughs" YAML: each anchor a list of ten aliases of the one before (10**levels values)."""
    lines = ["  - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "name: ok\nstudent: {model: yolov8n.yaml}\nlaughs:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,reason", [
    (_laughs(10), "its aliases expand to more than 1,000,000 values"),  # 10**10: this hung, then ran out of memory
    ("name: &a [*a]\nstudent: {model: yolov8n.yaml}\n", "an alias refers to the value it is in"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),  # was a RecursionError: 'internal error'
    ("name: " + "[" * 300 + "]" * 300 + "\n", "nested too deeply"),
])
def test_yaml_that_would_not_fit_in_memory_is_refused_before_it_is_expanded(tmp_path, text, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(p))}: invalid YAML: {reason}"):
        load_recipe(p)


def test_yaml_aliases_within_reason_still_load(tmp_path):
    """Anchors are how a recipe shares settings: 10**5 values behind aliases are read (and the recipe's own
    problem is what is reported: the unknown section holding them, beside the data: it lacks)."""
    p = tmp_path / "ok.yaml"
    p.write_text(_laughs(5))
    with pytest.raises(RecipeError, match="laughs: unknown field 'laughs'; valid fields: name, teacher, student, data"):
        load_recipe(p)


def test_a_huge_file_is_not_read(tmp_path):
    p = tmp_path / "big.yaml"
    with open(p, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: 17 MB on paper, nothing on disk
    with pytest.raises(RecipeError, match=r"big.yaml: is 17 MB; a YAML file kdctl reads is a few KB \(at most 16 MB\)"):
        load_recipe(p)


@pytest.mark.parametrize("text,field,reason", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_recipe_one_line_error(tmp_path, text, field, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ") or msg.startswith(f"{p} ") or str(p) in msg
    if field != "<root>" and not field.startswith("line "):
        assert f": {field}" in msg, msg
    else:
        assert field in msg or "mapping" in msg
    assert reason in msg, msg


def test_a_file_of_another_kind_given_as_the_recipe_says_what_it_is(tmp_path):
    """``kdctl train data.yaml`` (Ultralytics' data= where kdctl takes a recipe) said "student: required field is
    missing", a target preset or a model YAML the same; each says what it is and how that kind is given. The same
    rule reads --data and --target files (tests/test_data.py, below)."""
    from kdctl.models import ASSET_MODELS

    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    preset = ROOT / "deploy" / "targets" / "cpu.yaml"
    for path, says in ((data, "a dataset YAML, not a kdctl recipe; a recipe names it as data: PATH, a command takes "
                              "it as --data"),
                       (preset, "a target preset, not a kdctl recipe; kdctl export takes it as --target PATH, a "
                                "recipe as export.target"),
                       (ASSET_MODELS / "yolov8-tiny.yaml", "an Ultralytics model YAML, not a kdctl recipe; a recipe "
                                                           "names it as student: PATH or teacher: PATH")):
        for argv in (["train", str(path)], ["distill", str(path)], ["recipe", "check", str(path)]):
            res = CliRunner().invoke(app, argv)
            assert res.exit_code == 2 and " ".join(res.output.split()) == f"Error: {path}: {says}", (argv, res.output)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    from kdctl.export.targets import load_target  # export --target PATH reads it so

    with pytest.raises(RecipeError, match=re.escape(f"{recipe}: a kdctl recipe, not a target preset; give it to "
                                                    "kdctl train or distill")):
        load_target(str(recipe))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    # a bundle folder or a device given where the recipe goes says what it is, not "not found"
    with pytest.raises(RecipeError, match=f"^{tmp_path}: is a directory; give a recipe YAML file$"):
        load_recipe(tmp_path)
    with pytest.raises(RecipeError, match="^/dev/null: not a regular file"):
        load_recipe("/dev/null")


@pytest.mark.parametrize("given,kept", [("cuda:0", "0"), ("CUDA:1,2", "1,2"), ("0, 1", "0,1"), ("cuda", "cuda")])
def test_torch_device_spellings_read_as_ultralytics_reads_them(tmp_path, given, kept):
    # Ultralytics' select_device takes torch's 'cuda:0'; the schema refused it as "not a device"
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("train: {", f"train: {{device: '{given}', "))
    assert load_recipe(p).train.device == kept


def test_cli_check_bad_recipe_exit_2_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace("imgsz: 128", "imgsz: 100"))
    res = CliRunner().invoke(app, ["recipe", "check", str(p)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.imgsz" in lines[0] and str(p) in lines[0]


def test_cli_check_good_recipe_json(tmp_path):
    import json

    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["train"]["imgsz"] == 128



def test_cli_check_says_which_command_takes_the_recipe(tmp_path):
    """A teacher with an empty loss list validates (kdctl train takes it, the teacher unused), but kdctl distill
    refuses it; ``recipe check`` says so, with distill's own words, where it used to print OK and nothing else."""
    import json

    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("  losses:\n    - {name: cwd, weight: 2.0, params: {tau: 2.0}}", "  losses: []"))
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--json"])
    assert res.exit_code == 0, res.output
    stages = json.loads(res.stdout)["stages"]
    assert stages["train"] == {"accepted": True}
    assert stages["distill"] == {"accepted": False, "refused": f"{p}: distill.losses: empty; list at least one loss "
                                 "(`kdctl list losses`) or set distill.init: teacher, or use `kdctl train` for "
                                 "training without a teacher"}
    res = CliRunner().invoke(app, ["recipe", "check", str(p)], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and "kdctl distill refuses it: " + stages["distill"]["refused"] in res.output
    with pytest.raises(RecipeError, match="^" + re.escape(stages["distill"]["refused"]) + "$"):
        run_training(load_recipe(p), stage="distill", source=str(p), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the GOOD recipe distils; a distill.init recipe only distils; neither gets the note
    p.write_text(GOOD)
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--json"])
    assert json.loads(res.stdout)["stages"] == {"train": {"accepted": True}, "distill": {"accepted": True}}
    assert "refuses" not in CliRunner().invoke(app, ["recipe", "check", str(p)]).output
    p.write_text(GOOD + "  init: teacher\n")
    stages = json.loads(CliRunner().invoke(app, ["recipe", "check", str(p), "--json"]).stdout)["stages"]
    assert stages["distill"] == {"accepted": True} and "kdctl train has no teacher" in stages["train"]["refused"]
    assert "refuses" not in CliRunner().invoke(app, ["recipe", "check", str(p)]).output

def test_cli_check_notes_inputs_not_there_yet(tmp_path):
    """``recipe check`` printed OK for a teacher checkpoint or dataset that is not there, which train and distill
    then refuse: each is now a note (an earlier stage of a pipeline may still write it), and a model that is there
    but unusable is an error, as it is for distill."""
    import json

    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("yolov8s.yaml", "runs/train/teacher").replace("{synthetic: {train: 10, val: 5}}",
                                                                          "{yolo: data/none.yaml}"))
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["missing"] == [
        f"teacher.model: '{tmp_path / 'runs/train/teacher'}' does not exist yet (a relative path is looked for "
        "beside the recipe, then in the working directory)",
        f"data.yolo: '{tmp_path / 'data/none.yaml'}' does not exist yet (a relative path is looked for beside the "
        "recipe, then in the working directory)"]
    res = CliRunner().invoke(app, ["recipe", "check", str(p)], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and res.output.count("note: ") == 2 and "note: teacher.model: " in res.output
    p.write_text(GOOD)
    assert json.loads(CliRunner().invoke(app, ["recipe", "check", str(p), "--json"]).stdout)["missing"] == []
    # there but not a bundle: the error distill gives
    (tmp_path / "runs" / "train" / "teacher").mkdir(parents=True)
    p.write_text(GOOD.replace("yolov8s.yaml", "runs/train/teacher"))
    res = CliRunner().invoke(app, ["recipe", "check", str(p)])
    assert res.exit_code == 2 and "teacher.model" in res.output and "not a kdctl bundle" in res.output, res.output


def test_schema_is_json_schema():
    import json

    s = json.loads(recipe_json_schema())
    assert s["type"] == "object" and "student" in s["required"] and "distill" in s["properties"]


def test_a_bundle_folder_named_without_a_slash_is_a_model(tmp_path, monkeypatch):
    """``teacher: {model: my-teacher}`` with ``my-teacher/`` beside the recipe was refused as a mistyped model name
    (the schema wants a slash); a folder of that name is now taken as the path, a word that is none still is not."""
    (tmp_path / "my-teacher").mkdir()
    r = tmp_path / "r.yaml"
    r.write_text(GOOD.replace("{model: yolov8s.yaml}", "{model: my-teacher}"))
    monkeypatch.chdir(tmp_path.parent)  # found beside the recipe, not only in the working directory
    assert load_recipe(r).teacher.model == str((tmp_path / "my-teacher").resolve())
    r.write_text(GOOD.replace("{model: yolov8s.yaml}", "{model: my-teachr}"))
    with pytest.raises(RecipeError, match="teacher.model: 'my-teachr' is not a model YAML"):
        load_recipe(r)


def test_a_teacher_bundle_not_trained_yet_is_named_as_missing(tmp_path, tiny_data):
    """recipes/quickstart.yaml's teacher on a fresh checkout: the path is not there at all, so the line says 'not
    found' and how a teacher gets there, where it said the path was 'not a .yaml, a .pt or a bundle directory'."""
    r = tmp_path / "kd.yaml"
    r.write_text(f"name: kd\nteacher: {{model: runs/train/my-teacher}}\nstudent: {{model: yolov8-tiny.yaml}}\n"
                 f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 128}}\n"
                 "distill: {losses: [{name: kd_logit}]}\n")
    from conftest import refused_in_one_line

    line = refused_in_one_line(["distill", str(r), "--out", str(tmp_path / "x")], tmp_path / "x")
    assert f"teacher.model: '{tmp_path / 'runs/train/my-teacher'}' not found: no bundle directory, .pt or model " \
           "YAML there (a relative path is read beside the recipe, then from the working directory); train the " \
           "teacher first (kdctl train <its recipe>)" in line


def test_set_changes_fields_of_the_file_before_validation(tmp_path):
    """``--set KEY=VALUE`` (Ultralytics' ``epochs=5``, mmdet's ``--cfg-options``): values read as YAML, a number in
    the key indexes a list, a section the file leaves out is made, a later --set of the same field wins."""
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    r = load_recipe(p, ["train.epochs=7", "distill.losses.0.params.tau=4.5", "distill.losses.0.weight=0.5",
                        "distill.cache.top_k=5", "train.imgsz=160", "train.imgsz=192", "student.model=yolov8s.yaml"])
    assert (r.train.epochs, r.train.imgsz, r.student.model) == (7, 192, "yolov8s.yaml")
    assert r.distill.losses[0].params == {"tau": 4.5} and r.distill.losses[0].weight == 0.5
    assert r.distill.cache is not None and r.distill.cache.top_k == 5
    assert load_recipe(p).train.epochs == 1  # the file is not changed
    # a field as kdctl's errors name it (distill.losses[0].weight) is the same field: it was "unknown field 'distill'"
    assert load_recipe(p, ["distill.losses[0].params.tau=3"]).distill.losses[0].params == {"tau": 3}


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """``1e-3`` without a decimal point is a float (YAML 1.2, and how people write small weights: FGD's alpha,
    MGD's 2e-5); PyYAML reads it as a string, so a loss's params refused it ('must be a number, got "1e-3"'),
    in the file and in --set alike."""
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("tau: 2.0", "tau: 2e0") + "  auto_balance: 5E-2\n")
    r = load_recipe(p, ["distill.losses.0.weight=25e-2", "train.lr0=1e-4"])
    assert r.distill.losses[0].params == {"tau": 2.0} and r.distill.losses[0].weight == 0.25
    assert (r.train.lr0, r.distill.auto_balance) == (1e-4, 0.05)
    assert load_recipe(p, ["distill.losses.0.params.tau=3E+0"]).distill.losses[0].params == {"tau": 3.0}
    assert load_recipe(p, ["name='1e-4'"]).name == "1e-4"  # quoted: a string, as YAML says
    with pytest.raises(RecipeError, match=r"params.tau: must be finite, got inf"):  # past float's range: refused
        load_recipe(p, ["distill.losses.0.params.tau=1e400"])


@pytest.mark.parametrize("overrides,expected", [
    (["train.epochs=abc"], "r.yaml: --set train.epochs=abc: train.epochs: Input should be a valid integer"),
    (["train.epochs=2", "train.imgsz=100"], "r.yaml: --set train.imgsz=100: train.imgsz: "),
    (["distill.losses.0.params.tau=-1"], "r.yaml: --set distill.losses.0.params.tau=-1: distill.losses[0].params.tau:"),
    (["distill.losses.0.name=nope"], "--set distill.losses.0.name=nope: distill.losses[0].name: unknown loss 'nope'"),
    (["nope=1"], "r.yaml: --set nope=1: nope: unknown field 'nope'; valid fields: name,"),
    (["export.target=nope"], "--set export.target=nope: export.target: 'nope' does not exist"),
    (["distill.losses.3.weight=1"], "--set distill.losses.3.weight: distill.losses is a list of 1; index it with 0..0"),
    (["distill.losses.x.weight=1"], "--set distill.losses.x.weight: distill.losses is a list of 1; index it with 0..0, "
                                    "got 'x'"),
    (["distill.losses[3].weight=1"], "--set distill.losses.3.weight: distill.losses is a list of 1; index it"),
    # an entry of a list the recipe leaves out: there is nothing to index (it was "Input should be a valid list")
    (["export.artifacts.0=onnx-fp32"], "--set export.artifacts.0: the recipe has no export.artifacts list to change "
                                       "an entry of; give the whole list (--set export.artifacts='[...]')"),
    (["train.epochs.x=1"], "--set train.epochs.x: train.epochs is 1, not a section with fields"),
    (["train.epochs"], "--set 'train.epochs': expected KEY=VALUE with a dotted recipe field"),
    (["train..epochs=1"], "--set 'train..epochs=1': expected KEY=VALUE"),
    (["train.imgsz=[1"], "--set train.imgsz: the value '[1' is not valid YAML"),
    # an error at the section a --set changed: the --set made it
    (["data.synthetic=null"], "r.yaml: --set data.synthetic=null: data: give exactly one of yolo, coco, synthetic "
                              "(got none)"),
    (["data=d.json"], "r.yaml: --set data=d.json: data.yolo: 'd.json' is not a dataset YAML (.yaml) (a COCO dataset "
                      "is data.coco: train_images"),
    (["distill.losses.0.params.beta.x=1"], "--set distill.losses.0.params.beta.x=1: distill.losses[0].params.beta: "
                                           "Input should be a valid number"),
])
def test_a_bad_set_is_one_line_naming_the_set(tmp_path, overrides, expected):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)
    # a field the file itself gets wrong is still the file's, even with a --set elsewhere
    p.write_text(GOOD.replace("imgsz: 128", "imgsz: 100"))
    with pytest.raises(RecipeError, match=r"r\.yaml: train\.imgsz: "):
        load_recipe(p, ["train.epochs=2"])


def test_cli_set_on_train_records_the_recipe_as_run(tmp_path, tiny_data):
    """The bundle's recipe (and --reuse, --resume) is the recipe with its base and --set applied; the files read and
    the --set texts are recorded."""
    import json

    from kdctl.bundle import load_bundle

    p, base = tmp_path / "r.yaml", tmp_path / "base.yaml"
    base.write_text(f"name: b\nstudent: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                    "train: {epochs: 5, imgsz: 128, batch: 8, workers: 0}\n")
    p.write_text("base: base.yaml\nname: s\n")
    argv = ["train", str(p), "--set", "train.epochs=1", "--set", "train.batch=4", "--out", str(tmp_path / "b"),
            "--json"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "b")
    assert (b.recipe["train"]["epochs"], b.recipe["train"]["batch"]) == (1, 4)
    assert len((tmp_path / "b" / "results.csv").read_text().strip().splitlines()) == 2  # a header and one epoch
    import hashlib

    def sha(f):
        return hashlib.sha256(f.read_bytes()).hexdigest()

    assert b.manifest["inputs"]["recipe_file"] == {"file": str(p.resolve()), "set": ["train.epochs=1", "train.batch=4"],
                                                    "sha256": sha(p),
                                                    "bases": [{"file": str(base.resolve()), "sha256": sha(base)}]}
    import os
    import subprocess
    import sys

    show = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "bundle", "show", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert "--set train.epochs=1  --set train.batch=4" in show.stdout and str(p.resolve()) in show.stdout
    assert f"base  {base.resolve()}  sha256={sha(base)[:12]}" in show.stdout
    assert json.loads(res.stdout)["kept"] is False  # trained by this command
    res = CliRunner().invoke(app, argv + ["--reuse"])  # the same recipe as run: kept, nothing retrained
    assert res.exit_code == 0 and load_bundle(tmp_path / "b").id == b.id and json.loads(res.stdout)["kept"] is True
    res = CliRunner().invoke(app, argv[:-1] + ["--resume"])  # finished: nothing to resume, and the user is told so
    assert res.exit_code == 0 and load_bundle(tmp_path / "b").id == b.id
    assert "finished earlier from this recipe; kept as it is, nothing trained (--resume: nothing to resume)" in \
        " ".join(res.stdout.split())
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--set", "train.epochs=3", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["train"]["epochs"] == 3


@pytest.mark.parametrize("command", [["distill"], ["recipe", "check", "--models"], ["cache", "build"]])
def test_a_run_refusing_a_set_field_names_the_set(tmp_path, command):
    """The run's own checks (a checkpoint that is not there, a layer the model lacks) name the --set that gave the
    field, not the file alone, which holds another value there."""
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("losses:", "cache: {}\n  losses:").replace("cwd, weight: 2.0, params: {tau: 2.0}",
                                                                          "kd_logit"))
    res = CliRunner().invoke(app, [*command, str(p), "--set", "teacher.model=nope.pt", "--set", "train.epochs=2"])
    assert res.exit_code == 2, res.output
    assert " ".join(res.output.split()) == (f"Error: {p}: --set teacher.model=nope.pt: teacher.model: checkpoint "
                                            "'nope.pt' not found")
    p.write_text(p.read_text().replace("yolov8s.yaml", "gone.pt"))  # the file's own field, with a --set elsewhere
    res = CliRunner().invoke(app, [*command, str(p), "--set", "train.epochs=2"])
    assert res.exit_code == 2 and " ".join(res.output.split()) == (f"Error: {p}: teacher.model: checkpoint "
                                                                   "'gone.pt' not found")
    p.write_text(p.read_text().replace("gone.pt", "GONE.PT"))  # a name in capitals is a checkpoint's too
    res = CliRunner().invoke(app, [*command, str(p)])
    assert res.exit_code == 2 and " ".join(res.output.split()) == (f"Error: {p}: teacher.model: checkpoint "
                                                                   "'GONE.PT' not found")


def test_a_bare_ultralytics_weights_name_says_kdctl_downloads_nothing(tmp_path, tiny_data):
    """``yolov8n.pt`` by name, which Ultralytics downloads: the error says what to give instead (a copy on this
    machine; in a recipe also the model's YAML); a name Ultralytics does not know gets no such hint."""
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--models", "--set", "teacher.model=yolo11s.pt"])
    assert res.exit_code == 2 and " ".join(res.output.split()) == (
        f"Error: {p}: --set teacher.model=yolo11s.pt: teacher.model: checkpoint 'yolo11s.pt' not found; kdctl "
        "downloads no weights (Ultralytics fetches 'yolo11s.pt' by name): give the path to a copy on this machine, "
        "or build the model untrained from 'yolo11s.yaml'")
    res = CliRunner().invoke(app, ["recipe", "check", str(p), "--models", "--set", "teacher.model=teacher.pt"])
    assert res.exit_code == 2 and "downloads" not in res.output and "'teacher.pt' not found" in res.output
    res = CliRunner().invoke(app, ["eval", "rtdetr-l.pt", "--data", str(tiny_data), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and " ".join(res.output.split()) == (
        "Error: rtdetr-l.pt: checkpoint not found; kdctl downloads no weights (Ultralytics fetches 'rtdetr-l.pt' by "
        "name): give the path to a copy on this machine"), res.output


def test_set_suggestion_finds_the_section_of_a_bare_key():
    from kdctl.recipe.loader import set_suggestion

    assert set_suggestion(["epochs=5", "name=x", "auto_balance=0.1", "target=intel", "min_map50_95=0.3",
                           "distill.losses.0.weight=2", "nosuch=1", "plain"]) == (
        "--set train.epochs=5 --set name=x --set distill.auto_balance=0.1 --set export.target=intel "
        "--set gate.min_map50_95=0.3 --set distill.losses.0.weight=2 --set nosuch=1")
    assert set_suggestion(["plain", "=1"]) is None
    # Ultralytics' model= is the model it trains: the student's (it was teacher.model, the first section with one)
    assert set_suggestion(["model=yolov8n.pt", "nc=3", "teacher=t.pt", "student=s.yaml", "data=d.yaml"]) == (
        "--set student.model=yolov8n.pt --set student.nc=3 --set teacher.model=t.pt --set student.model=s.yaml "
        "--set data=d.yaml")


def _base_tree(tmp_path):
    """common/setup.yaml (its data YAML beside it, relative) <- common/kd.yaml <- run.yaml."""
    common = tmp_path / "common"
    common.mkdir()
    (common / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a, b]\n")
    (common / "setup.yaml").write_text(
        "name: setup\nstudent: {model: yolov8-tiny.yaml}\ndata: {yolo: data.yaml}\n"
        "train: {epochs: 20, imgsz: 128, batch: 16, lr0: 0.003, optimizer: AdamW}\n"
        "export: {target: cpu, max_map_drop: 0.02}\n")
    (common / "kd.yaml").write_text(
        "base: setup.yaml\nname: kd\nteacher: {model: yolov8s.yaml}\n"
        "distill:\n  auto_balance: 0.25\n  losses:\n    - {name: kd_logit, params: {temperature: 2.0}}\n"
        "    - {name: ld}\n")
    run = tmp_path / "run.yaml"
    run.write_text("base: common/kd.yaml\nname: run\ntrain: {epochs: 5}\n"
                   "distill: {losses: [{name: cwd, level: neck}]}\n")
    return common, run


def test_base_merges_mappings_replaces_lists_and_keeps_a_bases_paths(tmp_path):
    import hashlib

    common, run = _base_tree(tmp_path)
    r = load_recipe(run)
    assert r.name == "run" and r.teacher.model == "yolov8s.yaml"
    assert (r.train.epochs, r.train.imgsz, r.train.batch, r.train.lr0) == (5, 128, 16, 0.003)  # merged key by key
    assert [x.name for x in r.distill.losses] == ["cwd"] and r.distill.auto_balance == 0.25  # the list replaced
    assert r.data.yolo == str((common / "data.yaml").resolve())  # relative to the base's folder, not run.yaml's
    assert r.export.max_map_drop == 0.02
    assert r._origin["bases"] == [{"file": str((common / n).resolve()),
                                   "sha256": hashlib.sha256((common / n).read_bytes()).hexdigest()}
                                  for n in ("setup.yaml", "kd.yaml")]
    assert r._inherited["train.imgsz"] == str((common / "setup.yaml").resolve())
    assert "train.epochs" not in r._inherited and "distill.losses" not in r._inherited
    # several bases: the later one wins where both set a field; --set comes last of all
    (tmp_path / "two.yaml").write_text("base: [common/kd.yaml, common/setup.yaml]\nname: two\n")
    two = load_recipe(tmp_path / "two.yaml", ["train.batch=4"])
    assert two.train.epochs == 20 and two.teacher.model == "yolov8s.yaml" and two.train.batch == 4
    assert two.distill.losses[1].name == "ld"
    schema = json.loads(recipe_json_schema())
    assert "base" in schema["properties"]
    res = CliRunner().invoke(app, ["recipe", "check", str(run), "--json"])
    assert json.loads(res.stdout)["bases"] == [str((common / n).resolve()) for n in ("setup.yaml", "kd.yaml")]
    with pytest.raises(RecipeError, match=r"^--set base=x.yaml: base is read with the recipe file, before any --set"):
        load_recipe(run, ["base=x.yaml"])


def test_a_dataset_yaml_is_named_as_ultralytics_data_is(tmp_path, monkeypatch):
    """``data: data.yaml`` is short for ``data: {yolo: data.yaml}`` (in a file, a base, a --set), and a dataset a
    --set gives replaces the recipe's own source: ``--set data.yolo=mine.yaml`` on a shipped recipe with synthetic
    data was "give exactly one of yolo, coco, synthetic (got yolo, synthetic)"."""
    common, run = _base_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("path: .\ntrain: images\nval: images\nnames: [a]\n")
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    for sets in (["data.yolo=mine.yaml"], ["data=mine.yaml"], ["data=mine.yaml", "data.skip_invalid=true"]):
        r = load_recipe(p, sets)
        assert r.data.yolo == str(mine.resolve()) and r.data.synthetic is None and r.data.coco is None, sets
        assert r.data.skip_invalid == (len(sets) == 2)
    p.write_text(GOOD.replace("data: {synthetic: {train: 10, val: 5}}", "data: mine.yaml"))
    assert load_recipe(p).data.yolo == str(mine.resolve())
    r = load_recipe(p, ["data.skip_invalid=true"])
    assert r.data.yolo == str(mine.resolve()) and r.data.skip_invalid
    assert load_recipe(p, ["data.synthetic.train=7"]).data.synthetic.train == 7  # another source given: it is used
    # in a base, relative to the base's folder; a recipe's own shorthand replaces a base's source
    (common / "setup.yaml").write_text((common / "setup.yaml").read_text().replace("data: {yolo: data.yaml}",
                                                                                   "data: data.yaml"))
    assert load_recipe(run).data.yolo == str((common / "data.yaml").resolve())
    run.write_text(run.read_text() + "data: mine.yaml\n")
    assert load_recipe(run).data.yolo == str(mine.resolve())
    for bad, says in (("data: d.json", "data.yolo: 'd.json' is not a dataset YAML (.yaml) (a COCO dataset is"),
                      ("data: {yolo: images}", "data.yolo: 'images' is not a dataset YAML (.yaml)"),
                      ("data: 3", "data: Input should be a valid dictionary")):
        p.write_text(GOOD.replace("data: {synthetic: {train: 10, val: 5}}", bad))
        with pytest.raises(RecipeError, match=re.escape(f"{p}: {says}")):
            load_recipe(p)
    # the JSON Schema takes the short form too
    data = json.loads(recipe_json_schema())["properties"]["data"]
    assert {"type": "string"}.items() <= data["anyOf"][1].items() and "$ref" in json.dumps(data["anyOf"][0])


def test_a_model_alone_is_short_for_its_section(tmp_path, monkeypatch):
    """``teacher: best.pt`` is short for ``teacher: {model: best.pt}`` (it was "Input should be a valid dictionary"):
    in a file, a base (its paths relative to its own folder), beside a --set inside the section, for a bundle folder
    named without a slash."""
    common, run = _base_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"")
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("teacher: {model: yolov8s.yaml}", "teacher: best.pt")
                 .replace("student: {model: yolov8n.yaml}", "student: yolov8n.yaml"))
    r = load_recipe(p)
    assert r.teacher.model == str(tmp_path / "best.pt") and r.student.model == "yolov8n.yaml"
    r = load_recipe(p, ["teacher.nc=3", "student.nc=3"])
    assert (r.teacher.model, r.teacher.nc, r.student.nc) == (str(tmp_path / "best.pt"), 3, 3)
    (common / "kd.yaml").write_text((common / "kd.yaml").read_text().replace("teacher: {model: yolov8s.yaml}",
                                                                             "teacher: ../best.pt"))
    assert load_recipe(run).teacher.model == str(tmp_path / "best.pt")  # relative to the base's folder
    (tmp_path / "my-teacher").mkdir()  # a bundle folder named bare: the run's check says it is no bundle
    p.write_text(GOOD.replace("teacher: {model: yolov8s.yaml}", "teacher: my-teacher"))
    res = CliRunner().invoke(app, ["recipe", "check", str(p)])
    assert res.exit_code == 2 and "teacher.model" in res.output and "not a kdctl bundle" in res.output, res.output
    p.write_text(GOOD.replace("teacher: {model: yolov8s.yaml}", "teacher: 3"))
    with pytest.raises(RecipeError, match=re.escape(f"{p}: teacher: Input should be a valid dictionary")):
        load_recipe(p)


def test_shipped_family_recipes_share_the_baselines_setup():
    """recipes/distill-*.yaml start from quickstart-student.yaml: the baseline and every family train alike."""
    base = load_recipe(ROOT / "recipes" / "quickstart-student.yaml")
    for p in sorted((ROOT / "recipes").glob("distill-*.yaml")):
        r = load_recipe(p)
        assert r._origin["bases"][0]["file"] == str((ROOT / "recipes" / "quickstart-student.yaml").resolve())
        assert r.train == base.train and r.data == base.data and r.student == base.student and r.distill.losses


@pytest.mark.parametrize("text, expected", [
    ("base: nope.yaml\nname: x\n", "run.yaml: base: 'nope.yaml' not found (looked for "),
    ("base: common/loop-a.yaml\nname: x\n", "run.yaml: base: 'common/loop-a.yaml' not found (looked for "),  # links
    ("base: common\nname: x\n", "run.yaml: base: 'common' is a directory"),
    ("base: 3\nname: x\n", "run.yaml: base: must be a recipe file or a list of recipe files"),
    ("base: []\nname: x\n", "run.yaml: base: must be a recipe file or a list of recipe files"),
    ("base: run.yaml\nname: x\n", "run.yaml: base: 'run.yaml' inherits from itself (run.yaml -> run.yaml)"),
    ("base: common/loop.yaml\nname: x\n", "loop.yaml: base: '../run.yaml' inherits from itself "
                                          "(run.yaml -> loop.yaml -> run.yaml)"),
    ("base: common/list.yaml\nname: x\n", "list.yaml: expected a mapping of recipe fields at the top level (it is "
                                          "a base of"),
    ("base: common/empty.yaml\nname: x\n", "empty.yaml: expected a mapping of recipe fields at the top level (it is "
                                           "a base of run.yaml), got nothing (the file is empty)"),
    ("base: common/bad.yaml\nname: x\n", "common/bad.yaml: train.epochs: Input should be greater than or equal to 1 "
                                         "(a base of"),
    ("base: common/kd.yaml\nname: x\ndata: {synthetic: {train: 10, val: 5}}\n",
     "run.yaml: data: give exactly one of yolo, coco, synthetic (got yolo, synthetic) (data.yolo from"),
])
def test_a_bad_base_is_one_line_naming_the_file_to_edit(tmp_path, text, expected):
    common, run = _base_tree(tmp_path)
    (common / "loop.yaml").write_text("base: ../run.yaml\nname: loop\n")
    (common / "list.yaml").write_text("- a\n- b\n")
    (common / "empty.yaml").write_text("# a comment, no fields\n")
    (common / "loop-a.yaml").symlink_to("loop-b.yaml")  # a symbolic link loop: resolving it raised RuntimeError
    (common / "loop-b.yaml").symlink_to("loop-a.yaml")
    (common / "bad.yaml").write_text((common / "setup.yaml").read_text().replace("epochs: 20", "epochs: 0"))
    run.write_text(text)
    res = CliRunner().invoke(app, ["recipe", "check", str(run)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert expected in " ".join(res.output.split()).replace(f"{tmp_path}/", ""), res.output
    if "bad.yaml" in text:  # the recipe's own value of the base's bad field: accepted
        run.write_text(text + "train: {epochs: 3}\n")
        assert CliRunner().invoke(app, ["recipe", "check", str(run)]).exit_code == 0


def test_a_runs_own_check_of_an_inherited_field_names_the_base(tmp_path):
    common, run = _base_tree(tmp_path)
    setup = common / "setup.yaml"
    setup.write_text(setup.read_text().replace("batch: 16", "batch: 16, device: '5'"))
    run.write_text("base: common/setup.yaml\nname: x\n")
    res = CliRunner().invoke(app, ["train", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    line = " ".join(res.output.split())
    assert f"{(common / 'setup.yaml').resolve()}: train.device: '5'" in line and "a base of" in line
    assert not (tmp_path / "out").exists()


def test_train_of_a_distillation_recipe_says_it_leaves_the_teacher_out(tmp_path):
    """`kdctl train recipes/quickstart.yaml` (distill meant, or its baseline wanted) trained the student alone and
    said nothing, so a student that learned from no teacher sat in runs/train/<name> like a distilled one."""
    from kdctl.cli.train import _no_teacher_here

    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    assert _no_teacher_here(load_recipe(p), "r.yaml") == (
        "r.yaml: kdctl train leaves out teacher and distill.losses: it trains the student alone (the baseline); "
        "kdctl distill r.yaml trains it with them")
    p.write_text(GOOD.split("distill:")[0])  # a teacher, no KD terms
    assert "kdctl train leaves out teacher: it trains" in _no_teacher_here(load_recipe(p), "r.yaml")
    p.write_text(GOOD.split("distill:")[0].replace("teacher: {model: yolov8s.yaml}\n", ""))
    assert _no_teacher_here(load_recipe(p), "r.yaml") is None
