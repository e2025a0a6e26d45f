"""Gate: pass, fail, fail-closed, baseline regression, exit codes, JUnit XML validity."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.gate.junit import junit_xml
from kdctl.gate.rules import evaluate_budgets

RESULT = {"artifact": "onnx-int8", "precision": "int8", "map50_95": 0.40, "map50": 0.62, "size_mb": 3.0,
          "latency_ms": {"p50": 10.0, "p90": 12.0, "p99": 15.0}, "memory": {"rss_mb": 200.0},
          "throughput": {"batch": 1, "images_per_s": 95.0}}


def by_name(checks):
    return {c.name: c for c in checks}


def test_pass_and_fail():
    c = by_name(evaluate_budgets(RESULT, {"min_map50_95": 0.35, "max_p90_ms": 12.0, "max_p99_ms": 14.0,
                                          "max_size_mb": 5, "max_memory_mb": 100}))
    assert c["min_map50_95"].passed and c["max_p90_ms"].passed and c["max_size_mb"].passed
    assert not c["max_p99_ms"].passed and "exceeds budget" in c["max_p99_ms"].message
    assert not c["max_memory_mb"].passed


def test_median_latency_map50_and_throughput_budgets():
    """Each reads its own metric: p50 (not p90), mAP50 (not mAP50-95), images/s; each at its edge passes."""
    c = by_name(evaluate_budgets(RESULT, {"max_p50_ms": 10.0, "min_map50": 0.62, "min_fps": 95.0}))
    assert c["max_p50_ms"].passed and c["max_p50_ms"].value == 10.0 and "median (p50) latency 10.00 ms" in \
        c["max_p50_ms"].message
    assert c["min_map50"].passed and c["min_map50"].value == 0.62
    assert c["min_fps"].passed and c["min_fps"].value == 95.0
    c = by_name(evaluate_budgets(RESULT, {"max_p50_ms": 9.9, "min_map50": 0.63, "min_fps": 96.0}))
    assert not c["max_p50_ms"].passed and not c["min_map50"].passed and not c["min_fps"].passed
    assert "throughput 95.0 img/s below budget 96.0 img/s" == c["min_fps"].message
    c = by_name(evaluate_budgets({"artifact": "x", "latency_ms": {"p90": 1.0}}, {"max_p50_ms": 5, "min_fps": 1,
                                                                                "min_map50": 0.1}))
    assert not any(x.passed for x in c.values()) and all("failing closed" in x.message for x in c.values())


def test_a_value_just_past_its_budget_is_shown_with_the_digits_that_tell_them_apart():
    """mAP50-95 0.29996 fails a 0.3 budget: the message and the summary table do not read "0.3000 below budget
    0.3000"; where the usual digits already differ they stay as they were."""
    from kdctl.gate.junit import markdown_summary

    near = {**RESULT, "map50_95": 0.29996, "latency_ms": {"p50": 10.0, "p90": 12.004}, "size_mb": 3.0}
    c = by_name(evaluate_budgets(near, {"min_map50_95": 0.3, "max_p90_ms": 12.0, "max_size_mb": 3.0}))
    assert c["min_map50_95"].message == "mAP50-95 0.29996 below budget 0.30000"
    assert c["max_p90_ms"].message == "p90 latency 12.004 ms exceeds budget 12.000 ms"
    assert c["max_size_mb"].message == "model size 3.00 MB within budget 3.00 MB"  # equal: as usual
    base = {**RESULT, "latency_ms": {"p50": 10.0 / 1.0304}}
    slow = by_name(evaluate_budgets(RESULT, {"max_latency_regression": 0.03}, base))["max_latency_regression"]
    assert slow.message == "p50 latency change vs baseline +3.04% exceeds budget +3.00%"
    far = by_name(evaluate_budgets(RESULT, {"min_map50_95": 0.45}))["min_map50_95"]
    assert far.message == "mAP50-95 0.4000 below budget 0.4500"
    md = markdown_summary(list(c.values()), "gate", {})
    assert "| min_map50_95 | 0.29996 | 0.3 | **FAIL** |" in md and "| max_size_mb | 3 | 3 | pass |" in md
    from types import SimpleNamespace

    from kdctl.report.stage import _gate_rows  # the report's gate table (check, budget, value, ...)

    gate = SimpleNamespace(stage="gate", metrics={"checks": [x.to_dict() for x in c.values()]})
    rows = _gate_rows([gate])[0][1]
    assert [r[:4] for r in rows] == [["min_map50_95", "0.3", "0.29996", "FAIL"],
                                     ["max_p90_ms", "12.0", "12.004", "FAIL"], ["max_size_mb", "3.0", "3", "pass"]]


def test_missing_metric_fails_closed():
    partial = {k: v for k, v in RESULT.items() if k != "map50_95"}
    c = by_name(evaluate_budgets(partial, {"min_map50_95": 0.1}))
    assert not c["min_map50_95"].passed and "missing: failing closed" in c["min_map50_95"].message
    c = by_name(evaluate_budgets(RESULT, {"max_latency_regression": 0.03}, baseline=None))
    assert not c["max_latency_regression"].passed and "no baseline" in c["max_latency_regression"].message


def test_regression_against_baseline():
    base = {**RESULT, "latency_ms": {"p50": 9.8}, "map50_95": 0.402}
    c = by_name(evaluate_budgets(RESULT, {"max_latency_regression": 0.03, "max_map_regression": 0.005}, base))
    assert c["max_latency_regression"].passed and c["max_latency_regression"].value == 10.0 / 9.8 - 1
    assert c["max_map_regression"].passed
    slow = {**RESULT, "latency_ms": {"p50": 10.5}, "map50_95": 0.39}
    c = by_name(evaluate_budgets(slow, {"max_latency_regression": 0.03, "max_map_regression": 0.005}, base))
    assert not c["max_latency_regression"].passed and not c["max_map_regression"].passed


def test_junit_is_valid_xml():
    checks = evaluate_budgets(RESULT, {"min_map50_95": 0.5, "max_p90_ms": 20})
    root = ET.fromstring(junit_xml(checks))
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {tc.get("name"): tc for tc in suite.findall("testcase")}
    assert cases["min_map50_95"].find("failure") is not None and cases["max_p90_ms"].find("failure") is None


def test_cli_exit_codes_and_files(profile_cpu, tmp_path):
    junit, md = tmp_path / "g.xml", tmp_path / "g.md"
    ok = CliRunner().invoke(app, ["gate", str(profile_cpu), "--max-p90-ms", "10000", "--max-size-mb", "100",
                                  "--out", str(tmp_path / "g1"), "--junit", str(junit), "--summary", str(md), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["passed"] is True and json.loads(ok.stdout)["artifact"] == "onnx-int8"
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0" and "PASS" in md.read_text()
    bad = CliRunner().invoke(app, ["gate", str(profile_cpu), "--max-p90-ms", "0.0001", "--out", str(tmp_path / "g2")])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    med = CliRunner().invoke(app, ["gate", str(profile_cpu), "--max-p50-ms", "10000", "--min-map50", "0.0",
                                   "--min-fps", "1e9", "--out", str(tmp_path / "g-med"), "--json"])
    checks = {c["name"]: c for c in json.loads(med.stdout)["checks"]}
    assert med.exit_code == 1 and set(checks) == {"max_p50_ms", "min_map50", "min_fps"}
    assert checks["max_p50_ms"]["passed"] and checks["min_map50"]["passed"] and not checks["min_fps"]["passed"]
    assert (tmp_path / "g2" / "junit.xml").is_file()  # the gate bundle is written on failure too
    reg = CliRunner().invoke(app, ["gate", str(profile_cpu), "--baseline", str(profile_cpu), "-a", "onnx-fp32",
                                   "--max-latency-regression", "0.0", "--out", str(tmp_path / "g3")])
    assert reg.exit_code == 2 and "is the profile being gated" in reg.output  # itself: would pass by construction
    usage = CliRunner().invoke(app, ["gate", str(profile_cpu), "--out", str(tmp_path / "g4")])
    assert usage.exit_code == 2 and "no budgets to check" in usage.output  # the recipe sets none
    nob = CliRunner().invoke(app, ["gate", str(tmp_path / "missing"), "--min-map", "0.1"])
    assert nob.exit_code == 2 and "bundle directory not found" in nob.output
    # the recipe's gate.min_map50_95 has its own spelling as a flag too
    alias = CliRunner().invoke(app, ["gate", str(profile_cpu), "--min-map50-95", "0.99", "--out", str(tmp_path / "g6"),
                                     "--json"])
    assert alias.exit_code == 1 and "min_map50_95" in alias.stdout, alias.output
    for value, flag in (("0", "--max-p90-ms"), ("-2", "--max-memory-mb")):  # a maximum of 0 fails every model
        r = CliRunner().invoke(app, ["gate", str(profile_cpu), flag, value, "--out", str(tmp_path / "g7")])
        assert r.exit_code == 2 and f"{flag}': must be > 0, got {value}" in r.output and not (tmp_path / "g7").exists()
    for value in ("inf", "nan"):  # parse as floats, but no budget: inf would pass anything and is no valid JSON
        r = CliRunner().invoke(app, ["gate", str(profile_cpu), "--max-p90-ms", value, "--out", str(tmp_path / "g5")])
        assert r.exit_code == 2 and "--max-p90-ms" in r.output and not (tmp_path / "g5").exists()
        assert value == "nan" or "must be a finite number, got inf" in r.output
    # a fraction's range is judged after finiteness: nan is "not finite", not "above 1"
    for flag, value, said in (("--min-map", "nan", "must be a finite number, got nan"),
                              ("--min-map", "1.5", "must be in [0, 1], got 1.5"),
                              ("--max-map-regression", "-0.1", "must be ≥ 0, got -0.1"),
                              ("--max-latency-regression", "nan", "must be a finite number, got nan")):
        r = CliRunner().invoke(app, ["gate", str(profile_cpu), flag, value, "--out", str(tmp_path / "g8")])
        assert r.exit_code == 2 and said in r.output and not (tmp_path / "g8").exists(), (flag, value, r.output)


def test_baseline_measured_otherwise_fails_closed(export_cpu, tmp_path):
    """A latency or mAP regression against a baseline profiled at another input size, batch, thread count or
    device compares different measurements: it fails closed and says why (it reported +48.6 % and passed the mAP
    check against a 64-px baseline of another model)."""
    from kdctl.profile.stage import profile_bundle

    one, two = (profile_bundle(export_cpu, artifacts=["onnx-fp32"], warmup=1, runs=5, e2e_runs=2, threads=n,
                               out=tmp_path / f"t{n}").path for n in (1, 2))
    res = CliRunner().invoke(app, ["gate", str(two), "--baseline", str(one), "--max-latency-regression", "10",
                                   "--max-map-regression", "1", "--min-map", "0", "--out", str(tmp_path / "g"),
                                   "--json"])
    assert res.exit_code == 1, res.output
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["min_map50_95"]["passed"]
    for name in ("max_latency_regression", "max_map_regression"):
        assert not checks[name]["passed"] and "threads 1 (this profile: 2): not comparable" in checks[name]["message"]
    again = profile_bundle(export_cpu, artifacts=["onnx-fp32"], warmup=1, runs=5, e2e_runs=2, threads=2,
                           out=tmp_path / "t2-again").path  # measured the same way: comparable
    same = CliRunner().invoke(app, ["gate", str(again), "--baseline", str(two), "--max-latency-regression", "10",
                                    "--max-map-regression", "0", "--out", str(tmp_path / "g2")])
    assert same.exit_code == 0, same.output
    # a baseline that is no profile: the flag is named (it read as a problem of the profile gated)
    res = CliRunner().invoke(app, ["gate", str(again), "--baseline", str(export_cpu), "--out", str(tmp_path / "g3")])
    assert res.exit_code == 2 and " ".join(res.output.split()) == (
        f"Error: --baseline {export_cpu}: is an 'export' bundle; expected one of: profile (run kdctl profile on it "
        "first)"), res.output


def test_rerun_removes_what_a_killed_junit_write_left(profile_cpu, tmp_path):
    """--junit/--summary are written to a hidden temp sibling, then renamed: a gate killed in between left it."""
    junit = tmp_path / "gate.xml"
    stale = tmp_path / ".gate.xml.tmp-0123abcd"
    stale.write_text("<half")
    mine = tmp_path / ".gate.xml.tmp-notours"  # not kdctl's name: kept
    mine.write_text("x")
    res = CliRunner().invoke(app, ["gate", str(profile_cpu), "--min-map", "0", "--junit", str(junit),
                                   "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert ET.parse(junit).getroot().tag == "testsuites" and not stale.exists() and mine.exists()


def test_library_caller_gets_the_cli_rule_for_budgets(profile_cpu, tmp_path):
    """``run_gate(budgets={"max_p90_ms": inf})`` passed every model and wrote "Infinity" (no valid JSON) into the
    gate bundle's manifest; the CLI and the recipe schema refused it, the library did not."""
    from kdctl.errors import KdctlError
    from kdctl.gate.stage import run_gate

    for bad, said in ((float("inf"), "inf"), (float("nan"), "nan"), ("5", '"5"'), (True, "true")):
        with pytest.raises(KdctlError, match=f"gate budget max_p90_ms: must be a finite number, got {said}$"):
            run_gate(profile_cpu, budgets={"max_p90_ms": bad}, out=tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("section, message", [
    (["min_map", 0.1], 'recipe.gate: must be a mapping, got ["min_map", 0.1]'),
    ({"min_map50_95": 2}, "recipe.gate.min_map50_95: Input should be less than or equal to 1"),
])
def test_a_profile_whose_recipe_gate_has_another_shape_is_refused_by_field(profile_cpu, tmp_path, section, message):
    """The recipe's budgets a profile bundle carries are checked again as the schema checks them (an edited and
    resealed manifest, or an older kdctl's): one line naming the field, nothing written."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle

    b = load_bundle(profile_cpu, verify=True)
    with BundleWriter(tmp_path / "p", stage="profile", recipe={**b.recipe, "gate": section}) as w:
        for role, rel in b.manifest["outputs"].items():
            shutil.copy2(profile_cpu / rel, w.path / rel)
            w.add_output(role, rel)
        w.metrics.update(b.metrics)
    r = CliRunner().invoke(app, ["gate", str(tmp_path / "p"), "--out", str(tmp_path / "g"), "--json"])
    assert r.exit_code == 2 and "internal error" not in r.output and not (tmp_path / "g").exists()
    assert json.loads(r.stdout)["error"] == f"{tmp_path / 'p' / 'manifest.json'}: {message}"


def test_export_and_eval_bundles_are_gated_on_what_they_measure(export_cpu, trained_bundle, tmp_path):
    """A CI job that checks accuracy only (no profile on its machine): an export bundle is gated on its artifacts'
    mAP and file size, an eval bundle on its mAP. A flag for what such a bundle does not measure is refused in one
    line; a recipe budget for it is left out and named, so the recipe's gate: section does not fail every check."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle

    res = CliRunner().invoke(app, ["gate", str(export_cpu), "--min-map", "0", "--max-size-mb", "100", "--out",
                                   str(tmp_path / "g1"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    size = (export_cpu / "model-int8.onnx").stat().st_size / 1e6
    checks = {c["name"]: c for c in d["checks"]}
    assert d["artifact"] == "onnx-int8" and checks["max_size_mb"]["value"] == round(size, 3)
    exported = load_bundle(export_cpu).metrics["artifacts"][0]
    fp32 = CliRunner().invoke(app, ["gate", str(export_cpu), "-a", "onnx-fp32", "--min-map", "0.99", "--max-size-mb",
                                    "0.001", "--out", str(tmp_path / "g2"), "--json"])
    checks = {c["name"]: c for c in json.loads(fp32.stdout)["checks"]}
    assert fp32.exit_code == 1 and not any(c["passed"] for c in checks.values())
    assert checks["min_map50_95"]["value"] == exported["metrics"]["map50_95"]
    refused = CliRunner().invoke(app, ["gate", str(export_cpu), "--max-p90-ms", "10", "--out", str(tmp_path / "g3")])
    assert refused.exit_code == 2 and " ".join(refused.output.split()) == (
        f"Error: --max-p90-ms: {export_cpu} is an export bundle, which measures mAP and artifact sizes only; gate a "
        "profile bundle (kdctl profile EXPORT_BUNDLE) for latency, throughput, memory and size budgets")
    assert not (tmp_path / "g3").exists()

    ev = tmp_path / "e"
    assert CliRunner().invoke(app, ["eval", str(trained_bundle), "--out", str(ev), "-q"]).exit_code == 0
    scored = load_bundle(ev).metrics["map50_95"]
    res = CliRunner().invoke(app, ["gate", str(ev), "--min-map", str(scored), "--out", str(tmp_path / "g4"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["artifact"] == "pytorch-fp32", res.output
    above = CliRunner().invoke(app, ["gate", str(ev), "--min-map", str(min(1.0, scored + 0.01)), "--out",
                                     str(tmp_path / "g5")])
    assert above.exit_code == 1
    refused = CliRunner().invoke(app, ["gate", str(ev), "--max-size-mb", "10", "--out", str(tmp_path / "g6")])
    assert refused.exit_code == 2 and "is an eval bundle, which measures mAP only" in refused.output
    # a baseline is of the same kind: an eval compared with an eval, scored the same way
    for size in ("128", "96"):
        assert CliRunner().invoke(app, ["eval", str(trained_bundle), "--imgsz", size, "--out",
                                        str(tmp_path / f"e{size}"), "-q"]).exit_code == 0
    same = CliRunner().invoke(app, ["gate", str(ev), "--baseline", str(tmp_path / "e128"), "--max-map-regression",
                                    "0", "--out", str(tmp_path / "g9")])
    assert same.exit_code == 0, same.output
    other = CliRunner().invoke(app, ["gate", str(ev), "--baseline", str(tmp_path / "e96"), "--max-map-regression",
                                     "1", "--out", str(tmp_path / "g10"), "--json"])
    assert other.exit_code == 1 and "input size 96 (this eval: 128): not comparable, failing closed" in (
        json.loads(other.stdout)["checks"][0]["message"])
    base = CliRunner().invoke(app, ["gate", str(ev), "--baseline", str(export_cpu), "--max-map-regression", "0",
                                    "--out", str(tmp_path / "g7")])
    assert base.exit_code == 2 and f"--baseline {export_cpu}: is an 'export' bundle; expected one of: eval" in (
        " ".join(base.output.split()))

    b = load_bundle(ev, verify=True)  # the eval bundle of a recipe whose gate: also budgets latency and size
    with BundleWriter(tmp_path / "eg", stage="eval", recipe={**(b.recipe or {}), "gate": {
            "min_map50_95": 0.0, "max_p90_ms": 5.0, "max_size_mb": 1.0}}, inputs=b.manifest["inputs"]) as w:
        for role, rel in b.manifest["outputs"].items():
            shutil.copy2(ev / rel, w.path / rel)
            w.add_output(role, rel)
        w.metrics.update(b.metrics)
    md = tmp_path / "g.md"
    res = CliRunner().invoke(app, ["gate", str(tmp_path / "eg"), "--out", str(tmp_path / "g8"), "--summary", str(md),
                                   "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == 0 and [c["name"] for c in d["checks"]] == ["min_map50_95"], res.output
    assert d["not_checked"] == ["max_p90_ms", "max_size_mb"]
    assert ("- **not checked**: the recipe's max_p90_ms, max_size_mb, which the gated bundle does not measure (gate a "
            "profile bundle for them)\n") in md.read_text()
    assert load_bundle(tmp_path / "g8").metrics["not_checked"] == ["max_p90_ms", "max_size_mb"]
    rep = CliRunner().invoke(app, ["report", str(tmp_path / "g8"), "--out", str(tmp_path / "r"), "-q"])
    assert rep.exit_code == 0, rep.output
    said = "Not checked: the recipe's max_p90_ms, max_size_mb, which the gated bundle does not measure"
    assert said in (tmp_path / "r" / "report.md").read_text()
    assert said.replace("'", "&#x27;") in (tmp_path / "r" / "report.html").read_text()


def test_a_baseline_scored_on_other_validation_images_fails_its_map_check_closed(trained_bundle, export_cpu,
                                                                                  profile_cpu, tiny_data, tmp_path):
    """mAPs scored on two validation sets are no regression of one model: a baseline exported or evaluated with
    another --data (or a dataset whose val split changed) passed the mAP check at -3.9 points 'within budget'. The
    set is recorded (names, sizes, label bytes) by export and eval, carried by profile; the mAP check fails closed and
    says so, latency is still compared; a bundle written before it was recorded is compared as before."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.data.resolve import images_digest, load_yolo_yaml
    from kdctl.data.synth import write_dataset

    other = write_dataset(tmp_path / "data2", train=4, val=8, seed=11, imgsz=128, classes=3)
    for name, data in (("own", []), ("own2", []), ("other", ["--data", str(other)])):
        res = CliRunner().invoke(app, ["eval", str(trained_bundle), *data, "--out", str(tmp_path / name), "-q"])
        assert res.exit_code == 0, res.output
    own_sha = images_digest(load_yolo_yaml(tiny_data).val_images)
    assert load_bundle(tmp_path / "own").metrics["eval_sha256"] == own_sha
    assert load_bundle(export_cpu).metrics["eval_sha256"] == load_bundle(profile_cpu).metrics["eval_sha256"] == own_sha
    same = CliRunner().invoke(app, ["gate", str(tmp_path / "own"), "--baseline", str(tmp_path / "own2"),
                                    "--max-map-regression", "0", "--out", str(tmp_path / "g1")])
    assert same.exit_code == 0, same.output
    res = CliRunner().invoke(app, ["gate", str(tmp_path / "own"), "--baseline", str(tmp_path / "other"),
                                   "--max-map-regression", "1", "--out", str(tmp_path / "g2"), "--json"])
    other_sha = load_bundle(tmp_path / "other").metrics["eval_sha256"]
    assert res.exit_code == 1 and json.loads(res.stdout)["checks"][0]["message"] == (
        f"baseline {tmp_path / 'other'} was scored on other validation images (8 images, sha256 {other_sha[:12]}; this "
        f"eval: 8, sha256 {own_sha[:12]}): mAPs not comparable, failing closed")

    def profile_copy(dest, sha):  # profile_cpu as a profile of another validation set (or of an older kdctl)
        b = load_bundle(profile_cpu, verify=True)
        with BundleWriter(dest, stage="profile", recipe=b.recipe, inputs=b.manifest["inputs"]) as w:
            for role, rel in b.manifest["outputs"].items():
                shutil.copy2(profile_cpu / rel, w.path / rel)
                w.add_output(role, rel)
            w.metrics.update({k: v for k, v in b.metrics.items() if k != "eval_sha256"})
            if sha:
                w.metrics["eval_sha256"] = sha
        return dest

    for sha, map_passes in ((other_sha, False), (None, True)):
        base = profile_copy(tmp_path / f"p-{sha is None}", sha)
        res = CliRunner().invoke(app, ["gate", str(profile_cpu), "--baseline", str(base), "-a", "onnx-fp32",
                                       "--max-latency-regression", "100", "--max-map-regression", "0",
                                       "--out", str(tmp_path / f"g-{sha is None}"), "--json"])
        checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
        assert checks["max_latency_regression"]["passed"], res.output
        assert checks["max_map_regression"]["passed"] is map_passes, res.output
        assert res.exit_code == (0 if map_passes else 1)


def test_junit_and_summary_replace_only_what_a_gate_wrote(profile_cpu, tmp_path):
    """`--summary README.md` (a slip of the hand, or a path shared with other notes) replaced the user's file with a
    gate summary. An existing file is replaced only where it is empty (GitHub's $GITHUB_STEP_SUMMARY at a step's start)
    or a report a gate wrote (each CI run replaces the last one's); any other is refused before any work, unchanged."""
    readme, notes = tmp_path / "README.md", tmp_path / "notes.xml"
    readme.write_text("# My project\n")
    notes.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="pytest" tests="0"/>\n')
    for flag, path, says in (("--summary", readme, "a summary kdctl gate wrote"),
                             ("--junit", notes, "a JUnit report kdctl gate wrote")):
        res = CliRunner().invoke(app, ["gate", str(profile_cpu), "--min-map", "0", flag, str(path), "--out",
                                       str(tmp_path / "g")])
        assert res.exit_code == 2 and " ".join(res.output.split()) == (
            f"Error: {flag} {path}: exists and is not {says}; refusing to replace it (remove it, or give another "
            "path)"), res.output
        assert not (tmp_path / "g").exists()
    assert readme.read_text() == "# My project\n" and "pytest" in notes.read_text()
    md, xml = tmp_path / "step-summary.md", tmp_path / "gate.xml"
    md.write_text("")
    for n, budget in enumerate(("0", "1")):  # an empty file, then the gate's own files, rewritten: FAIL replaces PASS
        res = CliRunner().invoke(app, ["gate", str(profile_cpu), "--min-map", budget, "--summary", str(md), "--junit",
                                       str(xml), "--out", str(tmp_path / f"g{n}")])
        assert res.exit_code == n, res.output
        assert md.read_text().startswith(f"## {'❌' if n else '✅'} kdctl gate: {'FAIL' if n else 'PASS'}")
        assert f'failures="{n}"' in xml.read_text()
