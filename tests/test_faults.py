"""Killed runs: a SIGKILL at each phase of distill (and export mid-write), then ``--resume`` or a rerun, ends
with a verified bundle and no temporary folder left behind.

The kill is real (``kill -9`` of the process); ``KDCTL_FAULT`` only chooses the moment, so the phase is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdctl.bundle import load_bundle, verify_bundle
from conftest import kill_at
from kdctl.cli.main import app


def _recipe(tmp_path: Path, tiny_data: Path, teacher: Path, epochs: int = 2) -> Path:
    r = tmp_path / "kd.yaml"
    r.write_text(f"""
name: kd
teacher: {{model: {teacher}}}
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: {epochs}, imgsz: 64, batch: 8}}
distill: {{auto_balance: 0.5, losses: [{{name: at}}]}}
""")
    return r


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _finish(argv: list[str]) -> dict:
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    return res


PHASES = [
    ("train:started", "before the first checkpoint"),
    ("train:epoch-saved@1", "mid-run, after epoch 1 of 2"),
    ("train:checkpoint-written@2", "while saving epoch 2's checkpoint (written, not yet in place of epoch 1's)"),
    ("train:finished", "after the last epoch, before publishing"),
    ("publish:sealed", "while publishing: bundle sealed, not yet renamed"),
    ("train:published", "after publishing, before cleaning the work folder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fault,when", PHASES, ids=[p[0] for p in PHASES])
def test_distill_killed_then_resumed(tmp_path, tiny_data, trained_bundle, fault, when):
    r = _recipe(tmp_path, tiny_data, trained_bundle)
    out = tmp_path / "kd"
    argv = ["distill", str(r), "--out", str(out)]
    kill_at(argv, fault)
    if fault != "train:published":
        assert not out.exists(), f"a run killed {when} must not leave a bundle"
    _finish(argv + ["--resume", "--json"])
    assert verify_bundle(out).ok
    m = load_bundle(out).manifest
    assert [e["epoch"] for e in m["metrics"]["epochs"]] == [1, 2]
    assert m["metrics"]["kd_terms"][0]["name"] == "at" and m["metrics"]["kd_terms"][0]["scale"] > 0
    # the training time counts the killed process's epochs too (it was only the resuming process's share: ~0 s
    # for a run killed after its last epoch)
    t = [e["time_s"] for e in m["metrics"]["epochs"]]
    assert m["metrics"]["train_seconds"] >= max(t) - 0.005  # train_seconds is rounded to 10 ms
    if fault == "train:epoch-saved@1":  # epoch 1 by the killed process, epoch 2 by the resuming one
        assert m["metrics"]["train_seconds"] >= t[0] + t[1] - 0.005
    assert _leftovers(tmp_path, "kd") == [], "no .work, .partial or .lock left"


@pytest.mark.slow
def test_resume_with_overwrite_continues_the_same_recipe_and_starts_a_changed_one_over(tmp_path, tiny_data):
    """``--resume --overwrite`` (make demo's training commands): an interrupted run of this recipe is continued (the
    bundle it publishes has the killed run's id), and stopped again it does not ask to add the --resume it has; one
    of a changed recipe is discarded and trained from the start, as --overwrite alone would, where --resume alone
    refuses it."""
    import os
    import subprocess
    import sys

    r = tmp_path / "t.yaml"
    r.write_text(f"name: t\nstudent: yolov8-tiny.yaml\ndata: {tiny_data}\ntrain: {{epochs: 3, imgsz: 64, batch: 8}}\n")
    out = tmp_path / "t"
    argv = ["train", str(r), "--out", str(out)]
    both = argv + ["--resume", "--overwrite"]
    run_file = tmp_path / ".t.work" / "run.json"
    kill_at(argv, "train:epoch-saved@1")
    killed = json.loads(run_file.read_text())["bundle_id"]
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *both, "-q"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "KDCTL_FAULT": "train:epoch-saved@2:TERM"})
    assert p.returncode == 143 and p.stderr.strip().splitlines()[-1] == (
        "Terminated (nothing half-written was published; the same command continues from the last saved epoch)")
    assert json.loads(run_file.read_text())["bundle_id"] == killed
    _finish(both)
    m = load_bundle(out).manifest
    assert m["id"] == killed and [e["epoch"] for e in m["metrics"]["epochs"]] == [1, 2, 3]
    kill_at(argv + ["--overwrite"], "train:epoch-saved@1")
    killed = json.loads(run_file.read_text())["bundle_id"]
    r.write_text(r.read_text().replace("epochs: 3", "epochs: 2"))
    res = CliRunner().invoke(app, argv + ["--resume"])
    assert res.exit_code == 2 and "train.epochs: differs from the recipe of the interrupted run" in res.output
    _finish(both)
    m = load_bundle(out).manifest
    assert m["id"] != killed and [e["epoch"] for e in m["metrics"]["epochs"]] == [1, 2]
    assert m["recipe"]["train"]["epochs"] == 2 and verify_bundle(out).ok
    assert _leftovers(tmp_path, "t") == []


@pytest.mark.slow
def test_killed_before_first_checkpoint_can_simply_be_rerun(tmp_path, tiny_data, trained_bundle):
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1)
    argv = ["distill", str(r), "--out", str(tmp_path / "kd")]
    kill_at(argv, "train:started")
    assert _leftovers(tmp_path, "kd") == [".kd.lock", ".kd.work"]
    _finish(argv)  # no --resume needed: there was nothing to keep
    assert verify_bundle(tmp_path / "kd").ok and _leftovers(tmp_path, "kd") == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,rc,word", [("TERM", 143, "Terminated"), ("INT", 130, "Interrupted"),
                                         ("HUP", 129, "Terminated")])
def test_terminated_run_says_so_releases_its_lock_and_resumes(tmp_path, tiny_data, trained_bundle, sig, rc, word):
    """SIGTERM (a cancelled CI job, ``docker stop``) used to end the run silently and leave its lock behind (SIGHUP,
    a closed terminal, still did until stop 61); now it unwinds like Ctrl-C: one line saying how to continue, the
    work folder kept for --resume, nothing else."""
    import os
    import subprocess
    import sys

    r = _recipe(tmp_path, tiny_data, trained_bundle)
    out = tmp_path / "kd"
    argv = ["distill", str(r), "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv, "-q"], capture_output=True, text=True,
                       env={**os.environ, "KDCTL_FAULT": f"train:epoch-saved@1:{sig}"}, timeout=600)
    assert p.returncode == rc, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith(word)
    assert "--resume" in p.stderr and not out.exists()
    assert _leftovers(tmp_path, "kd") == [".kd.work"]
    _finish(argv + ["--resume"])
    assert [e["epoch"] for e in load_bundle(out).manifest["metrics"]["epochs"]] == [1, 2]
    assert verify_bundle(out).ok and _leftovers(tmp_path, "kd") == []


@pytest.mark.parametrize("ignored", [False, True])
def test_a_closed_terminal_unwinds_the_stage_unless_nohup_ignores_it(tmp_path, profile_cpu, ignored):
    """SIGHUP at the last step of publishing a gate bundle: one line, exit 129, nothing at --out, no lock left; under
    ``nohup`` (SIGHUP ignored by the caller) the run carries on and publishes."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "g"
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignored else None
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "gate", str(profile_cpu), "--min-map", "0",
                        "--out", str(out), "-q"], capture_output=True, text=True, preexec_fn=ignore,
                       env={**os.environ, "KDCTL_FAULT": "publish:sealed:HUP"}, timeout=300)
    if ignored:
        assert p.returncode == 0 and verify_bundle(out).ok, p.stderr[-2000:]
    else:
        assert p.returncode == 129 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines() == ["Terminated (nothing half-written was published)"]
        assert not out.exists()
    assert _leftovers(tmp_path, "g") == []


@pytest.mark.slow
def test_resume_with_a_changed_recipe_is_refused_and_the_run_kept(tmp_path, tiny_data, trained_bundle):
    """The checkpoint, KD adapters and balance of a killed run belong to its recipe: resuming it with other losses
    is one line naming the field (the run stays resumable); another device or worker count is fine."""
    r = _recipe(tmp_path, tiny_data, trained_bundle)
    argv = ["distill", str(r), "--out", str(tmp_path / "kd")]
    kill_at(argv, "train:epoch-saved@1")
    r.write_text(r.read_text().replace("[{name: at}]", "[{name: at}, {name: cwd}]"))
    res = CliRunner().invoke(app, argv + ["--resume"])
    assert res.exit_code == 2 and "distill.losses: differs from the recipe of the interrupted run" in res.output
    assert "Traceback" not in res.output and (tmp_path / ".kd.work").is_dir()
    r.write_text(r.read_text().replace("[{name: at}, {name: cwd}]", "[{name: at}]")
                 .replace("batch: 8}", "batch: 8, workers: 1}"))
    _finish(argv + ["--resume"])
    assert verify_bundle(tmp_path / "kd").ok


@pytest.mark.slow
def test_interrupted_overwrite_keeps_the_old_bundle(tmp_path, export_cpu):
    """Killed after moving the old bundle aside: the next run puts it back before doing anything else."""
    out = tmp_path / "prof"
    argv = ["profile", str(export_cpu), "--runs", "3", "--warmup", "1", "-a", "onnx-fp32", "--out", str(out)]
    _finish(argv)
    old_id = load_bundle(out).id
    kill_at(argv + ["--overwrite"], "publish:old-moved-aside")
    assert not out.exists() and any(n.startswith(".prof.old-") for n in _leftovers(tmp_path, "prof"))
    res = CliRunner().invoke(app, ["gate", str(export_cpu), "--max-p90-ms", "1", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2  # unrelated command, refused (an export measures no latency): nothing touched
    _finish(argv + ["--overwrite"])
    b = load_bundle(out, verify=True)
    assert b.id != old_id and _leftovers(tmp_path, "prof") == []


@pytest.mark.slow
def test_export_killed_mid_write_then_rerun(tmp_path, trained_bundle):
    out = tmp_path / "exp"
    argv = ["export", str(trained_bundle), "--target", "cpu", "-a", "onnx-fp32", "--out", str(out)]
    kill_at(argv, "publish:before-rename")
    assert not out.exists() and any(n.startswith(".exp.partial-") for n in _leftovers(tmp_path, "exp"))
    _finish(argv)
    assert verify_bundle(out).ok and _leftovers(tmp_path, "exp") == []


def test_partial_restore_needs_a_real_bundle(tmp_path):
    """A stale ``.NAME.old-*`` that is not a kdctl bundle is removed, never renamed into place."""
    from kdctl.bundle import BundleWriter

    junk = tmp_path / ".b.old-0123abcd"
    junk.mkdir()
    (junk / "x").write_text("x")
    with BundleWriter(tmp_path / "b", stage="train") as w:
        (w.path / "m.json").write_text(json.dumps({}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and load_bundle(tmp_path / "b").stage == "train"


def test_killed_dataset_build_leaves_nothing_the_rerun_keeps(tmp_path):
    """``data synth`` (and the dataset caches) build in ``.NAME.tmp-*``: a killed build's folder used to stay
    forever; the next build removes it under the build lock and publishes a complete dataset."""
    out = tmp_path / "ds"
    argv = ["data", "synth", str(out), "--images", "4", "--val", "2", "--imgsz", "64"]
    kill_at(argv, "build:begun")
    assert not out.exists() and [p.name[:8] for p in tmp_path.iterdir() if p.name != ".ds.lock"] == [".ds.tmp-"]
    _finish(argv)
    assert _leftovers(tmp_path, "ds") == [] and len(list((out / "images" / "train").iterdir())) == 4


@pytest.mark.slow
@pytest.mark.parametrize("target,artifact,says", [
    ("cpu", "onnx-fp32", "Error: File too large while writing; nothing half-written was published (a file-size "
                         "limit (ulimit -f) or the file system caps file size; give an --out elsewhere)"),
    # OpenVINO's writer fails with a C++ "basic_ios::clear: iostream error" that names no file
    ("intel", "openvino-fp32", "openvino-fp32/model.xml: OpenVINO could not write the model (RuntimeError: "
                               "basic_ios::clear: iostream error): is the disk full, or a file-size limit"),
])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained_bundle, target, artifact, says):
    """A write the machine refuses (here a file-size limit, `ulimit -f`: the kernel's EFBIG, as ENOSPC on a full
    disk) was 'internal error: ...' (exit 1). Now: one line saying what to do, exit 2, no partial folder; with
    the limit lifted the same command publishes."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "exp"
    argv = ["export", str(trained_bundle), "--target", target, "-a", artifact, "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv, "-q"], preexec_fn=limit, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert says in p.stderr and "ublished" in p.stderr
    assert not out.exists() and _leftovers(tmp_path, "exp") == []
    _finish(argv)
    assert verify_bundle(out).ok


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, tiny_data):
    """Ultralytics writes last.pt in place; a failed write (here the file-size limit again) must leave no
    truncated checkpoint where a good one was: the run fails in one line and nothing of it is left to resume."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    r = tmp_path / "t.yaml"
    r.write_text(f"name: t\nstudent: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {tiny_data}}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8, workers: 0}\n")
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "train", str(r), "--out", str(tmp_path / "t"), "-q"],
                       preexec_fn=limit, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "File too large while writing" in p.stderr, p.stderr
    assert _leftovers(tmp_path, "t") == [], "a truncated last.pt kept the work folder, and --resume then failed"


_LIBRARY_INTERRUPTED = """
import os, signal, sys, time
import kdctl.export.openvino as ov

def convert(source):  # what OpenVINO's frontend does with an interruption in the Python it calls back
    try:
        os.kill(os.getpid(), getattr(signal, os.environ["SIG"]))
        time.sleep(5)  # the handler raises here
    except KeyboardInterrupt:
        raise RuntimeError("Check 'false' failed at src/frontends/common/src/frontend.cpp:53:\\n"
                           "Converting input model\\nKeyboardInterrupt: <EMPTY MESSAGE>") from None
    raise AssertionError("the signal did not arrive")

ov.convert = convert
from kdctl.cli.main import main
sys.argv[0] = "kdctl"
main()
"""


@pytest.mark.parametrize("sig,rc,word", [("SIGINT", 130, "Interrupted"), ("SIGTERM", 143, "Terminated")])
def test_an_interruption_a_library_turned_into_its_own_error_is_still_one(tmp_path, trained_bundle, sig, rc, word):
    """Ctrl-C during OpenVINO's conversion of the traced model: its PyTorch frontend catches the KeyboardInterrupt
    raised in the Python it calls back and raises "RuntimeError: Check 'false' failed ... KeyboardInterrupt",
    which kdctl reported as an internal error with exit 1. A signal came first, so it is the interruption: its
    line and exit code, nothing published. In a process of its own, which starts with Python's Ctrl-C handler as
    a kdctl command started from a shell does (SIGINT not ignored by its parent)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "x"
    p = subprocess.run([sys.executable, "-c", _LIBRARY_INTERRUPTED, "export", str(trained_bundle), "--target", "intel",
                        "--out", str(out), "-q"], capture_output=True, text=True, env={**os.environ, "SIG": sig},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), timeout=600)
    assert p.returncode == rc, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [f"{word} (nothing half-written was published)"], p.stderr[-2000:]
    assert not out.exists() and _leftovers(tmp_path, "x") == []
