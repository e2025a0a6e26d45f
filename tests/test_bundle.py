"""Bundles: manifest content, verification, tamper detection, and atomic publication."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from kdctl.bundle import BundleWriter, load_bundle, verify_bundle
from kdctl.cli.main import app
from kdctl.errors import BundleError


def make(tmp_path, name="b", parents=()):
    with BundleWriter(tmp_path / name, stage="train", recipe={"name": "x"}, parents=parents) as w:
        (w.path / "weights.pt").write_bytes(b"\x00weights")
        (w.path / "logs").mkdir()
        (w.path / "logs" / "a.txt").write_text("log")
        w.add_output("weights", "weights.pt")
        w.metrics["map50_95"] = 0.5
    return w.bundle


def test_manifest_fields(tmp_path):
    b = make(tmp_path)
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["stage"] == "train" and m["recipe"] == {"name": "x"} and m["metrics"]["map50_95"] == 0.5
    assert set(m["files"]) == {"weights.pt", "logs/a.txt"}
    assert m["files"]["weights.pt"]["size"] == 8 and len(m["files"]["weights.pt"]["sha256"]) == 64
    env = m["environment"]
    assert env["python"] and "torch" in env["packages"] and env["cpu"]
    assert m["outputs"]["weights"] == "weights.pt"


def test_duration_counts_from_the_stages_claim_of_its_out(tmp_path, trained_bundle):
    """A stage claims --out before its work and opens the writer at the end: the manifest's duration_s is the
    stage's (its training included), not the seconds spent writing the files."""
    import time

    from kdctl.bundle import claim_output

    with claim_output(tmp_path / "b", overwrite=False):
        time.sleep(0.5)  # the stage's work
        b = make(tmp_path, "b")
    assert b.manifest["duration_s"] >= 0.5
    trained = load_bundle(trained_bundle)
    assert trained.manifest["duration_s"] >= trained.metrics["train_seconds"] > 0


def test_parent_is_recorded(tmp_path):
    a = make(tmp_path, "a")
    b = make(tmp_path, "b", parents=[a])
    p = b.manifest["parents"][0]
    assert p["id"] == a.id and p["content_sha256"] == a.manifest["content_sha256"] and p["stage"] == "train"


def test_verify_ok_then_tamper_missing_extra(tmp_path):
    b = make(tmp_path)
    assert verify_bundle(b.path).ok
    (b.path / "weights.pt").write_bytes(b"\x00weightz")           # same size, different bytes
    res = verify_bundle(b.path)
    assert not res.ok and res.problems == ["weights.pt: changed (sha256 differs from manifest)"]
    (b.path / "logs" / "a.txt").unlink()
    (b.path / "intruder.bin").write_bytes(b"x")
    probs = "\n".join(verify_bundle(b.path).problems)
    assert "logs/a.txt: missing" in probs and "intruder.bin: not listed" in probs


def test_cli_verify_quiet_prints_only_the_failures(tmp_path):
    """`bundle verify -q` in a CI step: nothing for a bundle that verifies, the FAIL lines (on stderr, since -q
    discards stdout) and exit 1 for one that does not."""
    b = make(tmp_path)
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path), "-q"])
    assert r.exit_code == 0 and r.output == ""
    (b.path / "weights.pt").write_bytes(b"tampered!")
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path), "-q"])
    assert r.exit_code == 1 and r.stdout == "" and "FAIL" in r.stderr and "weights.pt" in r.stderr


def test_cli_verify_exit_codes(tmp_path):
    b = make(tmp_path)
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    (b.path / "weights.pt").write_bytes(b"tampered!")
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path)])
    assert r.exit_code == 1 and "weights.pt" in r.output
    r = CliRunner().invoke(app, ["bundle", "show", str(b.path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["stage"] == "train"


def test_cli_verifies_several_bundles_as_sha256sum_checks_several_files(tmp_path):
    """`kdctl bundle verify runs/*/*`: each bundle checked and named; one that is not a bundle (a log beside them) or
    fails fails on its own line, the others are still checked; exit 1 if any failed, --json one document each."""
    a, b, c = make(tmp_path, "a"), make(tmp_path, "b"), make(tmp_path, "c")
    r = CliRunner().invoke(app, ["bundle", "verify", str(a.path), str(b.path), str(c.path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.count("OK ") == 3 and "3 of 3 bundles verify" in r.output, r.output
    (b.path / "weights.pt").write_bytes(b"tampered!")
    log = tmp_path / "train.log"
    log.write_text("x")
    argv = ["bundle", "verify", str(a.path), str(b.path), str(log), str(c.path)]
    r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    lines = r.output.splitlines()
    assert r.exit_code == 1 and lines == [
        f"OK {a.path}: 2 files match the sealed manifest",
        f"FAIL {b.path}/weights.pt: changed (sha256 differs from manifest)",
        f"FAIL {log}: is a file, not a bundle directory",
        f"OK {c.path}: 2 files match the sealed manifest",
        "2 of 4 bundles verify; 2 failed"], r.output
    d = json.loads(CliRunner().invoke(app, argv + ["--json"]).stdout)
    assert d["ok"] is False and [x["ok"] for x in d["bundles"]] == [True, False, False, True]
    assert d["bundles"][2] == {"bundle": str(log), "ok": False, "error": f"{log}: is a file, not a bundle directory"}
    q = CliRunner().invoke(app, argv + ["-q"])
    assert q.exit_code == 1 and q.stdout == "" and q.stderr.count("FAIL") == 2
    one = CliRunner().invoke(app, ["bundle", "verify", str(log)])  # one path: an error, exit 2, as before
    assert one.exit_code == 2 and "is a file, not a bundle directory" in one.output


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b", stage="train") as w:
            (w.path / "half.pt").write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_leaves_no_empty_stage_folders_and_a_published_one_keeps_them(tmp_path):
    """``kdctl eval`` with a bad --data used to leave an empty ``runs/eval/`` behind; the folders made for the
    output's lock go again when nothing was published there, and only those (a folder that was there stays)."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "kept" / "runs" / "eval" / "b", stage="eval") as w:
            (w.path / "half.json").write_text("{}")
            raise RuntimeError("bad input found late")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    done = make(tmp_path / "kept" / "runs" / "train", "b")
    assert done.path.is_dir() and load_bundle(done.path).metrics["map50_95"] == 0.5
    with pytest.raises(RuntimeError):  # a later failure beside it keeps the published bundle's folders
        with BundleWriter(tmp_path / "kept" / "runs" / "train" / "c", stage="train"):
            raise RuntimeError("x")
    assert sorted(p.name for p in (tmp_path / "kept" / "runs" / "train").iterdir()) == ["b"]


def test_killed_process_leaves_no_complete_looking_bundle(tmp_path):
    """A hard kill (no cleanup at all) mid-write: the final path must not exist, only a hidden partial dir."""
    code = textwrap.dedent(f"""
        import os
        from kdctl.bundle import BundleWriter
        w = BundleWriter({str(tmp_path / 'b')!r}, stage="train").__enter__()
        (w.path / "weights.pt").write_bytes(b"half")
        os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not (tmp_path / "b").exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and leftovers[0] == ".b.lock" and leftovers[1].startswith(".b.partial-")
    with pytest.raises(BundleError, match="not a kdctl bundle"):
        load_bundle(tmp_path / leftovers[1])
    make(tmp_path)  # the next writer of the same --out takes the (released) lock and cleans the stale partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_replaces_and_refuses_without_flag(tmp_path):
    make(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        make(tmp_path)
    with BundleWriter(tmp_path / "b", stage="eval", overwrite=True) as w:
        (w.path / "m.json").write_text("{}")
    assert load_bundle(tmp_path / "b").stage == "eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_load_errors(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "none")
    (tmp_path / "d").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # Python's parser: RecursionError
    with pytest.raises(BundleError, match=r"manifest is not valid JSON \(nested too deeply\)"):
        load_bundle(tmp_path / "d")
    b = make(tmp_path)
    with pytest.raises(BundleError, match=r"is a 'train' bundle; expected one of: export \(run kdctl export on it "
                                          r"first\)$"):
        load_bundle(b.path, stages=("export",))
    # a file: an exported model of the user's (yolo val model=best.onnx) is told where kdctl runs one from
    (tmp_path / "model.bin").write_bytes(b"x")  # an OpenVINO IR is its .xml and its .bin
    for name in ("best.onnx", "model.XML", "yolo.engine"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(BundleError, match=r": an exported model outside a kdctl export bundle; kdctl runs "
                                              r"artifacts from the export bundle that checked them against PyTorch"):
            load_bundle(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "gate.junit.xml").write_text("<testsuites/>")  # an XML file that is no IR (the gate's JUnit report)
    for name in ("notes.txt", "gate.junit.xml"):
        with pytest.raises(BundleError, match=f"{name}: is a file, not a bundle directory$"):
            load_bundle(tmp_path / name)


def _edit(b, fn):
    m = json.loads((b.path / "manifest.json").read_text())
    fn(m)
    (b.path / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("edit", [lambda m: m["metrics"].update(map50_95=0.99), lambda m: m.update(stage="profile"),
                                  lambda m: m["parents"].clear()])
def test_verify_catches_an_edited_manifest(tmp_path, edit):
    b = make(tmp_path)
    _edit(b, edit)
    res = verify_bundle(b.path)
    assert not res.ok and res.problems == ["manifest.json: changed (does not match manifest.sha256)"]
    with pytest.raises(BundleError, match="manifest.json: changed") as e:
        load_bundle(b.path, verify=True)
    assert e.value.exit_code == 1


def _reseal(b, fn):
    """Edit the manifest and recompute its seal, as someone who knows the format would: verify's hashes then pass."""
    import hashlib

    _edit(b, fn)
    text = (b.path / "manifest.json").read_bytes()
    (b.path / "manifest.sha256").write_text(f"{hashlib.sha256(text).hexdigest()}  manifest.json\n")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(stage=7), "field 'stage' must be one of data, train, distill, eval, export, profile, gate, "
                                  "report, got 7"),
    (lambda m: m.update(stage="cache"), "field 'stage' must be one of"),
    (lambda m: m.update(id=""), "field 'id' must be a non-empty string"),
    (lambda m: m.update(content_sha256=None), "field 'content_sha256' must be a string"),
    (lambda m: m.update(metrics=[1]), "field 'metrics' must be a JSON object, got list"),
    (lambda m: m.update(environment="x"), "field 'environment' must be a JSON object, got str"),
    (lambda m: m.update(recipe=5), "field 'recipe' must be a JSON object or null, got int"),
    (lambda m: m.update(parents={}), "field 'parents' must be a list, got dict"),
    (lambda m: m.update(parents=[{"id": 1, "stage": "train"}]), "parents.0: must be an object with string 'id'"),
    (lambda m: m["outputs"].update(weights=["weights.pt"]), "outputs.weights: must be a file name, got list"),
    (lambda m: m.update(device_built=[3]), "field 'device_built' must be a list of file names"),
    (lambda m: m["metrics"].update(map50_95="0.9"), 'metrics.map50_95: must be a number, got "0.9"'),
    (lambda m: m["metrics"].update(imgsz=True), "metrics.imgsz: must be an integer, got true"),
    (lambda m: m["metrics"].update(per_class_ap50_95="x"), "metrics.per_class_ap50_95: must be an object of class "
                                                           'name to number, got "x"'),
    (lambda m: m["metrics"].update(per_class_ap50_95={"a": "0.5"}), "metrics.per_class_ap50_95: must be an object"),
    (lambda m: m["metrics"].update(epochs=[1, 2]), "metrics.epochs: must be a list of JSON objects, got [1, 2]"),
    (lambda m: m["metrics"].update(passed="yes"), 'metrics.passed: must be true or false, got "yes"'),
    (lambda m: m["metrics"].update(results=[{"artifact": "onnx-fp32", "runtime": "onnxruntime"}]),
     'metrics.results.0.runtime: must be a JSON object, got "onnxruntime"'),
    (lambda m: m["metrics"].update(artifacts=[{"name": "onnx-fp32", "files": "model.onnx"}]),
     'metrics.artifacts.0.files: must be a list of file names, got "model.onnx"'),
    (lambda m: m["metrics"].update(checks=[{"name": "min_map50_95", "passed": 1}]),
     "metrics.checks.0.passed: must be true or false, got 1"),
    (lambda m: m["metrics"].update(epochs=[{"epoch": "1"}]), 'metrics.epochs.0.epoch: must be an integer, got "1"'),
])
def test_a_resealed_manifest_of_a_shape_kdctl_never_writes_is_refused_by_field(tmp_path, edit, message):
    """Every stage trusts a loaded manifest's shape; one edited and resealed by hand is refused at load, one line
    naming the manifest and the field (not a TypeError somewhere in the stage that reads it)."""
    b = make(tmp_path)
    _reseal(b, edit)
    with pytest.raises(BundleError) as e:
        load_bundle(b.path)
    assert str(e.value).startswith(f"{b.path / 'manifest.json'}: {message}")
    r = CliRunner().invoke(app, ["bundle", "verify", str(b.path)])
    assert r.exit_code != 0 and "internal error" not in r.output and "Traceback" not in r.output
    fine = make(tmp_path, "fine")
    # the shape kdctl writes, resealed the same way, loads and verifies; None stands for a value not measured
    _reseal(fine, lambda m: m["metrics"].update(per_class_ap50_95={"a": None, "b": 0.5}, gflops=None, extra="free"))
    assert load_bundle(fine.path, verify=True).stage == "train"


def test_seal_is_sha256sum_compatible(tmp_path):
    b = make(tmp_path)
    r = subprocess.run(["sha256sum", "-c", "manifest.sha256"], cwd=b.path, capture_output=True, text=True)
    assert r.returncode == 0 and "manifest.json: OK" in r.stdout
    (b.path / "manifest.sha256").unlink()
    assert verify_bundle(b.path).problems == ["manifest.sha256: missing (the manifest is not sealed)"]


def test_verify_refuses_symlinks_even_to_identical_copies(tmp_path):
    import os
    import shutil

    b = make(tmp_path)
    copy = tmp_path / "copy.pt"
    shutil.copy(b.path / "weights.pt", copy)
    (b.path / "weights.pt").unlink()
    os.symlink(copy, b.path / "weights.pt")
    assert "weights.pt: is a symlink (bundles hold regular files only)" in verify_bundle(b.path).problems
    c = make(tmp_path, "c")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_text("x")
    os.symlink(tmp_path / "outside", c.path / "extra")
    assert verify_bundle(c.path).problems == ["extra: is a symlink (bundles hold regular files only)"]


def test_verify_refuses_a_directory_in_place_of_a_listed_file(tmp_path):
    b = make(tmp_path)
    (b.path / "weights.pt").unlink()
    (b.path / "weights.pt").mkdir()  # a folder has no bytes to hash: it was skipped as a folder, and verified OK
    assert verify_bundle(b.path).problems == ["weights.pt: is a directory where the manifest lists a file"]
    result = CliRunner().invoke(app, ["bundle", "verify", str(b.path)])
    assert result.exit_code == 1 and "weights.pt: is a directory where the manifest lists a file" in result.output


def test_manifest_cannot_name_files_outside_the_bundle(tmp_path):
    b = make(tmp_path)
    (tmp_path / "secret").write_text("s")
    m = json.loads((b.path / "manifest.json").read_text())
    m["files"]["../secret"] = {"size": 1, "sha256": "0" * 64}
    text = json.dumps(m)
    (b.path / "manifest.json").write_text(text)
    from kdctl.bundle.store import seal_text

    (b.path / "manifest.sha256").write_text(seal_text(text.encode()))  # a forger who also re-seals
    assert "manifest.json: files entry '../secret' is malformed" in verify_bundle(b.path).problems


def test_device_built_engines_are_allowed_but_reported(tmp_path):
    with BundleWriter(tmp_path / "e", stage="export") as w:
        (w.path / "model.onnx").write_bytes(b"onnx")
        w.extra["device_built"] = ["model-int8.engine"]
    (tmp_path / "e" / "model-int8.engine").write_bytes(b"engine")
    res = verify_bundle(tmp_path / "e")
    assert res.ok and res.device_built == ["model-int8.engine"]
    (tmp_path / "e" / "model-fp16.engine").write_bytes(b"engine")  # not declared
    assert verify_bundle(tmp_path / "e").problems == ["model-fp16.engine: not listed in manifest"]


def test_parent_ref_hashes_are_checked_not_copied(tmp_path):
    a = make(tmp_path, "a")
    a2 = load_bundle(a.path)
    (a.path / "weights.pt").write_bytes(b"\x00weightz")
    with pytest.raises(BundleError, match="weights.pt: changed"):
        make(tmp_path, "b", parents=[a2])
    assert not (tmp_path / "b").exists()


def test_overwrite_only_replaces_kdctl_bundles(tmp_path):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "ch1.tex").write_text("x")
    with pytest.raises(BundleError, match="refusing to replace"):
        with BundleWriter(user, stage="train", overwrite=True):
            pass
    assert (user / "ch1.tex").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="without a kdctl manifest.json"):
        BundleWriter(tmp_path / "empty", stage="train", overwrite=True).__enter__()
    b = make(tmp_path, "b")
    (b.path / "logs" / "mine.txt").write_text("user's")
    with pytest.raises(BundleError, match="holds 'logs/mine.txt', which kdctl did not write"):
        make(tmp_path, "b")


def test_something_appearing_at_out_during_the_run_is_kept(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="changed while this run was going"):
        with BundleWriter(out, stage="train") as w:
            (w.path / "m.txt").write_text("result")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    old = make(tmp_path, "c")
    with pytest.raises(BundleError, match="changed while this run was going"):
        with BundleWriter(tmp_path / "c", stage="eval", overwrite=True) as w:
            (w.path / "m.txt").write_text("x")
            make(tmp_path / "other", "c")  # another bundle replaced it meanwhile: not the one we may overwrite
            import shutil

            shutil.rmtree(old.path)
            (tmp_path / "other" / "c").rename(old.path)
    assert load_bundle(old.path).stage == "train"


def test_second_writer_fails_at_once(tmp_path):
    """Another process holds --out: the second writer stops at once with one line, and writes nothing."""
    code = textwrap.dedent(f"""
        import sys, time
        from kdctl.bundle import claim_output
        with claim_output({str(tmp_path / 'b')!r}, overwrite=False):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BundleError, match="another kdctl process is writing there"):
            make(tmp_path)
        assert not (tmp_path / "b").exists()
    finally:
        holder.communicate("\n", timeout=30)
    make(tmp_path)  # released: the lock file is gone, and the next writer goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_default_run_folder_another_process_is_writing_is_not_chosen(tmp_path):
    """``runs/<stage>/<name>`` is numbered as Ultralytics numbers runs; a name another kdctl process is writing now
    (no bundle there until it publishes) was chosen again, and the second run stopped on its lock."""
    from kdctl.bundle import next_run_dir

    code = textwrap.dedent(f"""
        import sys
        from kdctl.bundle import claim_output
        with claim_output({str(tmp_path / 'eval' / 'b')!r}, overwrite=False):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    assert next_run_dir(tmp_path, "eval", "b") == tmp_path / "eval" / "b"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert next_run_dir(tmp_path, "eval", "b") == tmp_path / "eval" / "b2"
        (tmp_path / "eval" / ".b2.lock").write_text("")  # a lock file nobody holds (a killed run's): free
        assert next_run_dir(tmp_path, "eval", "b") == tmp_path / "eval" / "b2"
    finally:
        holder.communicate("\n", timeout=30)
    assert next_run_dir(tmp_path, "eval", "b") == tmp_path / "eval" / "b"


def test_a_stages_default_run_folder_is_locked_as_it_is_chosen(tmp_path):
    """Two runs started at the same instant both chose ``runs/<stage>/<name>`` (neither had taken its lock yet), and
    the second stopped on the first one's lock. A stage's default folder is now locked as it is chosen: another
    process choosing meanwhile gets the next number; the stage's own claim takes the lock over; a name chosen by a
    stage that stopped before claiming it is let go at the next choice and at exit."""
    from kdctl.bundle import next_run_dir
    from kdctl.bundle.output import release_reservations

    choose = textwrap.dedent(f"""
        from kdctl.bundle import next_run_dir
        print(next_run_dir({str(tmp_path)!r}, "eval", "b", reserve=True).name)
    """)
    other = lambda: subprocess.run([sys.executable, "-c", choose], capture_output=True, text=True,  # noqa: E731
                                   timeout=60).stdout.strip()
    first = next_run_dir(tmp_path, "eval", "b", reserve=True)
    assert first == tmp_path / "eval" / "b" and (tmp_path / "eval" / ".b.lock").exists()
    assert other() == "b2"                      # this process holds b
    assert not (tmp_path / "eval" / ".b2.lock").exists()  # the other one's choice, never claimed: let go at exit
    b = make(tmp_path / "eval", "b")            # the stage's claim takes the lock over, and releases it
    assert b.path == first and sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["b"]
    assert next_run_dir(tmp_path, "eval", "b", reserve=True).name == "b2"
    assert next_run_dir(tmp_path, "eval", "b", reserve=True).name == "b2"  # the unclaimed b2 was let go first
    release_reservations()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["b"]
    assert next_run_dir(tmp_path, "eval", "c") == tmp_path / "eval" / "c"  # without reserve: nothing locked
    assert not (tmp_path / "eval" / ".c.lock").exists()


def test_verify_lineage_follows_every_recorded_ancestor(tmp_path):
    """``bundle verify --lineage``: each ancestor must be the very bundle its child recorded, and verify; one that
    changed, was replaced (a re-run with --overwrite), or is not there is named with why, exit 1. Without --lineage
    only the bundle itself is checked, as before."""
    import shutil

    a = make(tmp_path, "a")
    b = make(tmp_path, "b", parents=[a])
    side = make(tmp_path, "side")
    c = make(tmp_path, "c", parents=[b, side])
    d = make(tmp_path, "d", parents=[c, a])  # a is reached twice: listed once

    def verify(*extra):
        res = CliRunner().invoke(app, ["bundle", "verify", str(d.path), "--json", *extra])
        return res.exit_code, json.loads(res.stdout)

    code, doc = verify("--lineage")
    assert code == 0 and doc["ok"] is True
    assert [(r["path"], r["status"]) for r in doc["lineage"]] == [
        (str(c.path), "ok"), (str(a.path), "ok"), (str(b.path), "ok"), (str(side.path), "ok")]
    (b.path / "weights.pt").write_bytes(b"\x00forged")
    code, doc = verify("--lineage")
    assert code == 1 and doc["ok"] is False
    row = {r["path"]: r for r in doc["lineage"]}[str(b.path)]
    assert (row["status"], row["problem"]) == ("changed", "weights.pt: changed (sha256 differs from manifest)")
    code, doc = verify()  # without --lineage: the bundle itself, which verifies
    assert code == 0 and doc["ok"] is True and "lineage" not in doc
    shutil.rmtree(b.path)
    make(tmp_path, "b")  # another bundle where b was
    shutil.rmtree(side.path)
    (a.path / "manifest.json").write_text("{")
    code, doc = verify("--lineage")
    status = {r["path"]: r["status"] for r in doc["lineage"]}
    assert code == 1 and status == {str(c.path): "ok", str(a.path): "unreadable", str(b.path): "replaced",
                                    str(side.path): "missing"}
    res = CliRunner().invoke(app, ["bundle", "verify", str(d.path), "--lineage"])
    assert res.exit_code == 1 and f"FAIL ancestor train {side.path}: missing: not found at the recorded path" in \
        " ".join(res.output.split())
    from kdctl.bundle import recorded_parent

    # a record without a path is not the working directory (a bundle there is no ancestor of this one)
    assert recorded_parent({"id": a.id, "stage": "train"})[0] == recorded_parent({"path": ""})[0] == "missing"


def test_show_draws_the_whole_lineage(tmp_path):
    """``bundle show`` printed the parents alone; it now draws every recorded ancestor, nested, and marks one that
    is no longer at its recorded path."""
    import shutil

    a = make(tmp_path, "a")
    b = make(tmp_path, "b", parents=[a])
    c = make(tmp_path, "c", parents=[b])

    def shown():  # a process of its own: the consoles read COLUMNS when kdctl is imported (80 in some runners)
        import os

        res = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "bundle", "show", str(c.path)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert res.returncode == 0, res.stderr
        return [line for line in res.stdout.splitlines() if f"  {tmp_path}/" in line]

    rows = shown()
    assert [r.split("train  ")[1].split("  ")[0] for r in rows] == [str(b.path), str(a.path)]
    assert rows[1].index("train") > rows[0].index("train")  # a under b
    shutil.rmtree(a.path)
    assert shown()[1].endswith(f"id={a.id[:12]}  (missing)")


@pytest.mark.slow
def test_a_bundles_own_weights_file_is_read_as_the_bundle(tmp_path, trained_bundle, tiny_data):
    """``teacher.model: runs/train/t/weights.pt``, ``kdctl eval``/``export`` of it: the bundle it belongs to,
    verified whole and recorded as the parent (a loose checkpoint records neither and needs --data); an edited
    weights.pt is refused as the bundle is; the same file copied out of the bundle is a checkpoint of the user's."""
    import shutil

    from kdctl.models import is_checkpoint_file, resolve_model

    b = shutil.copytree(trained_bundle, tmp_path / "t")  # a copy: its weights are edited below
    weights, bid = b / "weights.pt", load_bundle(b).id
    assert not is_checkpoint_file(weights) and resolve_model(str(weights), "teacher.model", "r.yaml").bundle.id == bid
    res = CliRunner().invoke(app, ["eval", str(weights), "--out", str(tmp_path / "e"), "-q"])
    assert res.exit_code == 0, res.output  # no --data: the bundle's own dataset
    assert [p["id"] for p in load_bundle(tmp_path / "e", verify=True).manifest["parents"]] == [bid]
    res = CliRunner().invoke(app, ["export", str(weights), "-t", "cpu", "-a", "onnx-fp32", "--out",
                                   str(tmp_path / "x"), "-q"])
    assert res.exit_code == 0, res.output
    assert [p["id"] for p in load_bundle(tmp_path / "x").manifest["parents"]] == [bid]
    loose = tmp_path / "loose.pt"
    shutil.copy(weights, loose)
    assert is_checkpoint_file(loose) and resolve_model(str(loose), "teacher.model", "r.yaml").bundle is None
    res = CliRunner().invoke(app, ["eval", str(loose), "--out", str(tmp_path / "l")])
    assert res.exit_code == 2 and "--data: required to score the checkpoint" in " ".join(res.output.split())
    with weights.open("ab") as f:
        f.write(b"\0")
    res = CliRunner().invoke(app, ["eval", str(weights), "--out", str(tmp_path / "y")])
    assert res.exit_code == 1 and f"{weights}: changed" in " ".join(res.output.split()), res.output
    with pytest.raises(Exception, match="changed"):
        resolve_model(str(weights), "teacher.model", "r.yaml")
    assert not (tmp_path / "y").exists()
