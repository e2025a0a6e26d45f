"""Every command has --help with an example; errors are one line; --version works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app

COMMANDS = [[], ["recipe"], ["recipe", "check"], ["recipe", "schema"], ["data"], ["data", "synth"], ["train"],
            ["distill"], ["eval"], ["export"], ["profile"], ["gate"], ["report"], ["bundle"], ["bundle", "show"],
            ["bundle", "verify"], ["list"], ["list", "losses"], ["list", "targets"], ["cache"], ["cache", "build"],
            ["cache", "info"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "kdctl")
def test_help_has_example(cmd):
    """Every command and command group (kdctl data, kdctl bundle, ...: they had none) shows an example; a group's
    stays out of the listing of its parent, which shows its first line."""
    res = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Example:" in res.output and "kdctl" in res.output
    if len(cmd) == 1:
        listing = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
        assert "Example" not in next(ln for ln in listing.splitlines() if f"│ {cmd[0]} " in ln)


def test_version():
    from kdctl import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == __version__


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from kdctl.cli.main import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_reader_that_goes_away_is_not_an_internal_error(monkeypatch):
    """`kdctl list losses | head -1`: the closed pipe ends the command quietly (Click's exit 1), not as a kdctl bug."""
    import kdctl.cli.listing as listing

    def closed(*a, **k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(listing, "emit", closed)
    res = CliRunner().invoke(app, ["list", "losses"])
    assert res.exit_code == 1 and "internal error" not in res.output and "Error" not in res.output, res.output


def test_list_losses_json():
    import json

    res = CliRunner().invoke(app, ["list", "losses", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert {"fitnet", "at", "cwd", "mgd", "fgd", "pkd", "crosskd", "kd_logit", "ld", "rpn_kd", "roi_kd", "roi_crosskd",
            "roi_mimic", "detr_logit", "detr_query", "fgfi", "det_kd"} == set(rows)
    assert "rpn" in json.dumps(rows["rpn_kd"]) and "roi" in json.dumps(rows["roi_mimic"])
    import re

    for r in rows.values():  # every loss names its paper: a citation with a year, closed
        assert re.search(r"(19|20)\d\d", r["paper"]) and r["paper"].endswith(")"), r


def test_list_targets_json():
    import json

    res = CliRunner().invoke(app, ["list", "targets", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert {"cpu", "intel", "jetson", "rpi"} <= set(rows) and rows["intel"]["runtime"] == "openvino"


def test_an_error_message_with_brackets_is_printed_as_text(tmp_path):
    """Errors are printed through Rich: a path or a library message with '[/...]' (gloo's '[.../pair.cc:561]') must
    come out as text in one line, not crash the error handler with a markup error and a traceback."""
    import subprocess
    import sys

    bad = tmp_path / "x[/y].yaml"
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "recipe", "check", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"Error: {bad}: recipe not found"]


def test_control_characters_in_a_quoted_name_keep_the_error_on_one_line(tmp_path):
    """A file name (or a dataset list's line) holding a newline or a terminal escape sequence, quoted in an error:
    written as escapes, so the error stays one line and cannot recolour the terminal; --json keeps the name as it
    is (JSON escapes it)."""
    bad = tmp_path / "a\nb\x1b[31m.yaml"
    res = CliRunner().invoke(app, ["recipe", "check", str(bad)])
    assert res.exit_code == 2
    assert res.output.splitlines() == [f"Error: {tmp_path}/a\\nb\\x1b[31m.yaml: recipe not found"]
    res = CliRunner().invoke(app, ["recipe", "check", str(bad), "--json"])
    assert json.loads(res.stdout.splitlines()[0])["error"] == f"{bad}: recipe not found"


def test_user_names_with_brackets_are_printed_as_text(tmp_path, tiny_data, monkeypatch):
    """Class names and folders are the user's: printed as Rich markup, a class '[/]' ended ``data check`` (and a
    training that had already published its bundle) in "internal error: MarkupError", exit 1, and a bundle folder
    'b[bold]' restyled ``bundle show``'s lines."""
    import shutil

    import yaml

    from kdctl.bundle import BundleWriter

    root = tmp_path / "data"
    for sub in ("images", "labels"):
        shutil.copytree(tiny_data.parent / sub, root / sub)
    names = ["[/]", "[bold red]x", "[link=file:///etc]y"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "names": dict(enumerate(names))}))
    res = CliRunner().invoke(app, ["data", "check", str(root / "data.yaml")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert all(f"{i} {n} " in res.output for i, n in enumerate(names)) and "OK: every image" in res.output
    monkeypatch.chdir(tmp_path)  # a short path: Rich wraps the tree's first line at 80 columns
    b = Path("b[bold][/]")
    with BundleWriter(b, stage="eval") as w:
        w.metrics.update(map50_95=0.5, per_class_ap50_95={n: 0.5 for n in names})
    res = CliRunner().invoke(app, ["bundle", "show", str(b)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{b}  stage=eval  id=") and "per_class_ap50_95.[/]" in res.output
    res = CliRunner().invoke(app, ["bundle", "verify", str(b)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and res.output.startswith(f"OK {b}: "), res.output


@pytest.mark.parametrize("argv,option", [
    (["export", "{b}", "--imgsz", "100000"], "--imgsz"),  # before: traced at that size until the OOM killer came
    (["eval", "{b}", "--imgsz", "8192"], "--imgsz"),
    (["data", "synth", "{b}/new", "--seed", "-1"], "--seed"),  # NumPy refuses it only after the output was begun
    (["data", "synth", "{b}/new", "--seed", str(2**32)], "--seed"),
    (["data", "synth", "{b}/new", "--scene", "dense", "--classes", "10"], "--classes"),  # dense has 9 shapes
])
def test_out_of_range_options_refused_before_any_work(tmp_path, argv, option):
    res = CliRunner().invoke(app, [a.format(b=tmp_path) for a in argv])
    assert res.exit_code == 2 and option in res.output, res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_an_error_under_json_is_also_a_json_document_on_stdout(tmp_path):
    """A CI script that parses ``--json`` got an empty stdout on an error; it now gets ok/error/exit_code (and the
    one-line error stays on stderr)."""
    import json

    bad = tmp_path / "r.yaml"
    bad.write_text("name: a\nname: b\n")
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "recipe", "check", str(bad), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    doc = json.loads(p.stdout)
    assert doc == {"ok": False, "exit_code": 2,
                   "error": f"{bad}: invalid YAML (line 2, column 1): key 'name' is given twice in one mapping"}
    assert p.stderr.strip().splitlines() == [f"Error: {doc['error']}"]
    plain = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "recipe", "check", str(bad)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""  # without --json, stdout stays clean


@pytest.mark.parametrize("argv,expected", [
    (["distill"], "Error: kdctl distill: Missing argument 'recipe'. (see 'kdctl distill --help')"),
    (["gate", "x", "--bogus"], "Error: kdctl gate: No such option: --bogus"),
    (["profile", "x", "--runs", "abc"], "Error: kdctl profile: Invalid value for '--runs' / '-n': Input should be a "
                                        "valid integer, unable to parse string as an integer"),
    (["nosuch"], "Error: kdctl: No such command 'nosuch'."),
    (["--bogus"], "Error: kdctl: No such option: --bogus"),
    (["recipe", "check"], "Error: kdctl recipe check: Missing argument 'recipe'."),
    # an option given last without its value: Click raises it without a context, and it came boxed
    (["gate", "x", "--min-map"], "Error: kdctl gate: Option '--min-map' requires an argument. (see 'kdctl gate "
                                 "--help')"),
    (["bundle", "verify", "x", "--bogus"], "Error: kdctl bundle verify: No such option: --bogus"),
    (["recipe", "check", "r.yaml", "--set"], "Error: kdctl recipe check: Option '--set' requires an argument."),
    # Ultralytics' way of changing a setting: the --set that does it
    (["train", "r.yaml", "epochs=5", "batch=4"], "Error: kdctl train: Got unexpected extra argument(s) (epochs=5 "
                                                 "batch=4); a recipe field is changed with --set train.epochs=5 --set "
                                                 "train.batch=4 (see 'kdctl train --help')"),
    (["gate", "x", "epochs=5"], "Error: kdctl gate: Got unexpected extra argument(s) (epochs=5) (see 'kdctl gate "
                                "--help')"),
])
def test_usage_errors_are_one_line_naming_the_command(argv, expected):
    """Click's usage errors came as a boxed block of five lines (usage, hint, a frame around the message, wrapped at
    80 columns); now they are one line like every other kdctl error, naming the command and its --help, exit 2."""
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "COLUMNS": "60"})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), p.stderr
    assert p.stdout == ""


def test_usage_error_under_json_is_a_json_document_and_no_arguments_still_show_help():
    import json

    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "gate", "x", "--json", "--bogus"],
                       capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stdout)
    assert p.returncode == 2 and doc["ok"] is False and doc["exit_code"] == 2
    assert doc["error"].startswith("kdctl gate: No such option: --bogus")
    for argv in ([], ["recipe"]):  # a group called bare prints its help, as before
        res = CliRunner().invoke(app, argv)
        assert "Usage:" in res.output and "Error" not in res.output


def test_every_command_summary_is_one_paragraph_line():
    """The first paragraph of a command's docstring is its line in the group's command list: a hard line break
    there showed up as a broken sentence in `kdctl cache --help`. The other paragraphs of its --help too (Typer's
    rich markup mode keeps a docstring's line breaks: `kdctl export --help` printed "(its path and" alone on a line);
    each paragraph reaches Rich as one line, which it wraps to the terminal."""
    import typer

    def walk(c, path):
        for name, sub in getattr(c, "commands", {}).items():
            paragraphs = (sub.help or "").strip().split("\n\n")
            assert paragraphs[0], f"{' '.join(path + [name])}: no help"
            for p in paragraphs:
                assert "\n" not in p or p.startswith("\b"), f"{' '.join(path + [name])}: {p!r}"
            walk(sub, path + [name])

    walk(typer.main.get_command(app), ["kdctl"])


def test_every_stage_that_writes_a_bundle_has_json_and_quiet():
    """eval and report had --json but no --quiet (a CI step wanting silence got the per-class table)."""
    import typer

    cmd = typer.main.get_command(app)
    for name in ("train", "distill", "eval", "export", "profile", "gate", "report"):
        opts = {o for p in cmd.commands[name].params for o in getattr(p, "opts", [])}
        assert {"--json", "--quiet", "-q"} <= opts, name


@pytest.mark.parametrize("argv", [["eval", "{t}/none"], ["profile", "{t}/none"], ["export", "{t}/none", "--target", "cpu"]])
def test_an_error_before_any_work_is_the_only_line_on_stderr(tmp_path, argv):
    """A command whose progress display had started printed an empty line above the error when stderr is not a
    terminal (a CI log, a script): Rich's Progress ends every display with a newline there, even one with no bar."""
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *[a.format(t=tmp_path) for a in argv]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == f"Error: {tmp_path}/none: bundle directory not found\n", repr(p.stderr)


def test_onnx_runtime_telemetry_is_off_unless_the_user_set_it(tmp_path):
    """ONNX Runtime writes a device id and an event database under ~/.cache/Microsoft (and uploads them) unless
    ORT_DISABLE_TELEMETRY is set before it loads: with kdctl imported first, an inference session leaves nothing
    there; a value the user set is kept."""
    script = ("import os, sys, numpy as np, kdctl, onnx, onnx.helper as h, onnxruntime as ort\n"
              "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', 1, [1])],"
              " [h.make_tensor_value_info('y', 1, [1])])\n"
              "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); m.ir_version = 8\n"
              "ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])"
              ".run(None, {'x': np.ones(1, np.float32)})\n"
              "print(os.environ['ORT_DISABLE_TELEMETRY'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS")}
    out = subprocess.run([sys.executable, "-c", script], env={**env, "HOME": str(tmp_path)}, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "1" and not (tmp_path / ".cache" / "Microsoft").exists()
    out = subprocess.run([sys.executable, "-c", script], env={**env, "HOME": str(tmp_path),
                                                              "ORT_DISABLE_TELEMETRY": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


def test_a_teacher_built_from_its_config_is_warned_about(tmp_path, tiny_data, trained_bundle):
    """``teacher: {model: yolov8n.yaml}`` distilled from random weights without a word (Ultralytics' ``yolov8n.pt``
    comes pretrained; kdctl downloads nothing): the run goes on, with a warning on stderr and in ``--json``."""
    import json

    from kdctl.recipe import load_recipe
    from kdctl.training import untrained_teacher

    def recipe(teacher: str) -> Path:
        p = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        p.write_text(f"name: w\nteacher: {{model: '{teacher}'}}\nstudent: {{model: yolov8-tiny.yaml}}\n"
                     f"data: {{yolo: {tiny_data}}}\ntrain: {{epochs: 1, imgsz: 128, batch: 8, workers: 0}}\n"
                     "distill: {losses: [{name: kd_logit, level: head}]}\n")
        return p

    for teacher in ("yolov8n.yaml", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"):
        r = recipe(teacher)
        assert untrained_teacher(load_recipe(r), "r.yaml") == (
            f"r.yaml: teacher.model: '{teacher}' is a model config: the teacher is built with random weights and has "
            "learnt nothing to teach; name a trained .pt or a train bundle (kdctl train <teacher recipe>)")
    assert untrained_teacher(load_recipe(recipe(str(trained_bundle)))) is None
    assert untrained_teacher(load_recipe(recipe(str(trained_bundle / "weights.pt")))) is None
    r = recipe("yolov8n.yaml")
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "distill", str(r), "--out", str(tmp_path / "d"),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    said = f"{r}: teacher.model: 'yolov8n.yaml' is a model config"
    assert json.loads(p.stdout)["warnings"][0].startswith(said) and f"Warning: {said}" in p.stderr
    assert "Traceback" not in p.stderr


LOOP = "a loop of symbolic links (each points on to another, never to a file); give the file itself"


@pytest.mark.parametrize("error, code, expected", [
    (RuntimeError("Symlink loop from '/data/a.yaml'"), 2, f"Error: /data/a.yaml: {LOOP}"),
    (OSError(40, "Too many levels of symbolic links", "/data/b.yaml"), 2, f"Error: /data/b.yaml: {LOOP}"),
    (RuntimeError("something else"), 1, "Error: internal error: RuntimeError: something else"),
])
def test_a_loop_of_symbolic_links_anywhere_is_one_line_naming_it(monkeypatch, tmp_path, error, code, expected):
    """pathlib's resolve() raised RuntimeError('Symlink loop from ...') on such a path (a recipe's data.yolo): it read
    as an internal error, exit 1. Wherever a path is first resolved, it is the user's input: exit 2, named."""
    import errno

    import kdctl.recipe

    assert errno.ELOOP == 40

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(kdctl.recipe, "load_recipe", boom)
    res = CliRunner().invoke(app, ["recipe", "check", str(tmp_path / "r.yaml")])
    assert res.exit_code == code and " ".join(res.output.split()).startswith(expected), res.output


def test_a_recipe_path_that_is_a_loop_of_links_names_the_field(tmp_path):
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    r = tmp_path / "r.yaml"
    for field, text in (("data.yolo", "student: {model: yolov8n.yaml}\ndata: {yolo: ./a.yaml}\n"),
                        ("student.model", "student: {model: ./a.yaml}\ndata: {synthetic: {train: 9, val: 3}}\n")):
        r.write_text(f"name: x\n{text}")
        res = CliRunner().invoke(app, ["recipe", "check", str(r)])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert f"r.yaml: {field}: " in res.output and "a loop of symbolic links" in " ".join(res.output.split())
    (tmp_path / "b.yaml").unlink()  # now a link to a file that is not there (yet): a missing file, as before
    r.write_text("name: x\nstudent: {model: yolov8n.yaml}\ndata: {yolo: ./a.yaml}\n")
    res = CliRunner().invoke(app, ["recipe", "check", str(r), "--json"])
    assert res.exit_code == 0 and "a.yaml" in json.loads(res.stdout)["missing"][0]


DOCS = ["README.md", "examples/walkthrough.md", "examples/github-actions.yml"]


def _doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Each ``kdctl ...`` command line of a document's code blocks (a workflow: all of it), continuation lines joined,
    as its arguments (:func:`_arguments`)."""
    import re

    text = path.read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S) if path.suffix == ".md" else [text]
    out = []
    for line in (ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()):
        i = line.find("kdctl ")
        if i < 0 or not re.search(r"(^|[\s;&|(]|do)$", line[:i]):
            continue
        out.append((line.strip(), _arguments(line[i:])))
    return out


def _arguments(command: str) -> list[str]:
    """``kdctl ARGS ...`` as ARGS: comments, shell variables and what follows ``;``/``&&``/``|``/``>`` left out."""
    import shlex

    words = shlex.split(command, comments=True)[1:]
    stop = next((j for j, w in enumerate(words) if w[:1] in ";&|>" or w.endswith(";")), len(words))
    words = words[:stop] + ([words[stop][:-1]] if stop < len(words) and len(words[stop]) > 1
                            and words[stop].endswith(";") else [])
    return [w for w in words if not w.startswith("$")]


def _help_examples() -> list[tuple[str, list[str]]]:
    """The ``kdctl ...`` examples of every command's --help (``[bold]...[/bold]`` in its docstring)."""
    import re

    import typer

    out, todo = [], [typer.main.get_command(app)]
    while todo:
        cmd = todo.pop()
        todo += list(getattr(cmd, "commands", {}).values())
        for ex in re.findall(r"\[bold\](kdctl [^\[]*)\[/bold\]", cmd.help or ""):
            out.append((ex, _arguments(ex)))
    return out


@pytest.mark.parametrize("doc", [*DOCS, "--help"])
def test_every_kdctl_command_in_the_docs_parses(doc):
    """The README's, the walkthrough's, the CI example's and every --help's commands name commands and options that
    exist, with values of their type: parsed as the CLI parses them, not run (a renamed option left them stale
    unnoticed). The CI example installs the train extra its train and distill steps need (it installed the core)."""
    import typer

    root = Path(__file__).resolve().parents[1]
    commands = _help_examples() if doc == "--help" else _doc_commands(root / doc)
    assert len(commands) >= 5, commands
    group = typer.main.get_command(app)
    for line, args in commands:
        ctx = group.make_context("kdctl", list(args))
        cmd, rest = group, ctx._protected_args + ctx.args
        try:
            while hasattr(cmd, "resolve_command") and rest:
                name, cmd, rest = cmd.resolve_command(ctx, rest)
                ctx = cmd.make_context(name, rest, parent=ctx)
                rest = ctx._protected_args + ctx.args if hasattr(cmd, "resolve_command") else []
        except Exception as e:  # Typer's click exceptions: usage errors
            pytest.fail(f"{doc}: {line}: {getattr(e, 'format_message', e.__str__)()}")
        assert not hasattr(cmd, "resolve_command"), f"{doc}: {line}: names a command group, no command"
    if doc.endswith(".yml"):
        assert "pip install -e '.[train]'" in (root / doc).read_text()
