"""Profiler statistics against hand-computed values, and each CPU runner for real."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.profile.power import parse_tegrastats_power_mw
from kdctl.profile.stats import LatencyStats


def test_percentiles_hand_computed():
    s = LatencyStats.from_ms([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    # linear interpolation between order statistics: rank = p/100 * (n - 1)
    assert s.p50 == pytest.approx(5.5)
    assert s.p90 == pytest.approx(9.1)
    assert s.p95 == pytest.approx(9.55)
    assert s.p99 == pytest.approx(9.91)
    assert (s.min, s.max, s.mean, s.n) == (1, 10, 5.5, 10)
    assert s.std == pytest.approx(3.0276503540974917)  # sample std (n - 1)
    assert s.cv == pytest.approx(3.0276503540974917 / 5.5)
    one = LatencyStats.from_ms([4.0])
    assert one.p99 == 4.0 and one.std == 0.0
    with pytest.raises(ValueError):
        LatencyStats.from_ms([])


def test_tegrastats_power_parsing():
    jp6 = "11-25-2026 10:00:00 RAM 2811/7620MB CPU [3%@729] GR3D_FREQ 0% VDD_IN 4903mW/4903mW VDD_CPU_GPU_CV 480mW/480mW"
    jp4 = "RAM 1700/3964MB CPU [5%@102] POM_5V_IN 3032/3032 POM_5V_GPU 40/40"
    assert parse_tegrastats_power_mw(jp6) == 4903.0
    assert parse_tegrastats_power_mw(jp4) == 3032.0
    assert parse_tegrastats_power_mw("RAM 1/2MB") is None


def test_profile_onnxruntime_cpu(profile_cpu):
    m = json.loads((profile_cpu / "manifest.json").read_text())["metrics"]
    names = {r["artifact"] for r in m["results"]}
    assert names == {"onnx-fp32", "onnx-int8"}
    for r in m["results"]:
        lat = r["latency_ms"]
        assert r["timed_runs"] >= 20 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["runtime"]["provider"] == "CPUExecutionProvider" and r["runtime"]["threads"] >= 1
        e2e = r["end_to_end_ms"]
        assert e2e["total"]["p50"] >= e2e["model"]["p50"] > 0 and e2e["postprocess_nms"]["p50"] > 0
        assert r["throughput"]["images_per_s"] > 0 and r["memory"]["rss_mb"] > 0 and r["size_mb"] > 0
    assert m["settings"]["input"] == "validation images"
    raw = json.loads((profile_cpu / "latencies.json").read_text())
    assert len(raw["onnx-fp32"]) >= 20


def test_end_to_end_inputs_are_the_first_validation_images_that_decode_without_checking_the_dataset(tmp_path,
                                                                                                    monkeypatch):
    """Profile reads a few validation images for end-to-end timing: it lists the dataset instead of checking every
    image and label of both splits (minutes on an edge device for a COCO-sized set), skips an image that does not
    decode, and a dataset whose other files are broken (a bad label row) still gives real images, not the synthetic
    frame."""
    from types import SimpleNamespace

    from PIL import Image

    import kdctl.data.validate as validate
    from kdctl.profile.stage import _inputs

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32)).save(tmp_path / "images" / split / f"{i}.png")
            (tmp_path / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "images" / "val" / "0.png").write_bytes(b"not an image")
    (tmp_path / "labels" / "train" / "1.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class 7 of 1
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [a]\n")
    src = SimpleNamespace(manifest={"inputs": {"data": {"yaml": str(tmp_path / "data.yaml")}}})

    def no_split_check(*a, **k):
        raise AssertionError("the whole split was checked")

    monkeypatch.setattr(validate, "check_split", no_split_check)
    images, kind = _inputs(src, 32, 2)
    assert kind == "validation images"
    assert images == [tmp_path / "images" / "val" / f"{i}.png" for i in (1, 2)]
    for i in range(1, 4):
        (tmp_path / "images" / "val" / f"{i}.png").write_bytes(b"")
    assert _inputs(src, 32, 2) == ([], "synthetic frame (no validation image decodes here)")
    (tmp_path / "data.yaml").unlink()
    assert _inputs(src, 32, 2) == ([], "synthetic frame (dataset not on this machine)")


def test_profile_openvino_and_cli_json(tmp_path, trained_bundle):
    from kdctl.export.stage import ExportOptions, export_bundle

    exp = export_bundle(trained_bundle, ExportOptions(target="intel", artifacts=["openvino-fp32"]),
                        out=tmp_path / "ov").path
    res = CliRunner().invoke(app, ["profile", str(exp), "--runs", "10", "--warmup", "2", "--threads", "1",
                                   "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    r = data["results"][0]
    assert r["artifact"] == "openvino-fp32" and r["runtime"]["inference_precision"] == "f32"
    assert r["runtime"]["threads"] == 1 and data["settings"]["threads"] == 1


def test_profile_errors(tmp_path, export_cpu, trained_bundle):
    r = CliRunner().invoke(app, ["profile", str(trained_bundle), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "expected one of: export" in r.output
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "-a", "nope", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "'nope' is not in" in r.output and "onnx-int8" in r.output
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "--runtime", "tensorflow", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "valid: onnxruntime, openvino, tensorrt" in r.output


def _export_with_profile_section(src, out, section: dict):
    """``src``'s export bundle sealed anew by the bundle writer, its recipe's ``profile:`` section set to
    ``section`` (what exporting a recipe with that section gives)."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle

    b = load_bundle(src, verify=True)
    parents = [load_bundle(p["path"], verify=True) for p in b.manifest["parents"]]
    with BundleWriter(out, stage="export", recipe={**b.recipe, "profile": section}, parents=parents) as w:
        for role, rel in b.manifest["outputs"].items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)  # an OpenVINO IR's folder
            shutil.copy2(src / rel, w.path / rel)
            w.add_output(role, rel)
        w.metrics.update(b.metrics)
        w.extra["artifacts"] = b.manifest["artifacts"]
    return out


def _export_with_metrics(src, out, **metrics):
    """``src``'s export bundle sealed anew by the bundle writer with ``metrics`` changed (a manifest edited by
    someone who reseals it: every hash passes)."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle

    b = load_bundle(src, verify=True)
    with BundleWriter(out, stage="export", recipe=b.recipe) as w:
        for role, rel in b.manifest["outputs"].items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)  # an OpenVINO IR's folder
            shutil.copy2(src / rel, w.path / rel)
            w.add_output(role, rel)
        w.metrics.update({**b.metrics, **metrics})
        w.extra["artifacts"] = b.manifest["artifacts"]
    return out


@pytest.mark.parametrize("metrics, message", [
    ({"imgsz": None}, "metrics.imgsz: must be the export's input size (32..4096), got null"),
    ({"imgsz": 5}, "metrics.imgsz: must be the export's input size (32..4096), got 5"),
    ({"imgsz": True}, "metrics.imgsz: must be an integer, got true"),  # types: when the bundle is loaded
    ({"artifacts": "x"}, 'metrics.artifacts: must be a list of JSON objects, got "x"'),
    ({"artifacts": [{"name": "onnx-fp32", "format": "onnx", "precision": "fp32"}]},
     "metrics.artifacts.0: must be an object with string name, format, precision and a list of files"),
    ({"artifacts": [{"name": "onnx-fp32", "files": "model-fp32.onnx", "format": "onnx", "precision": "fp32"}]},
     'metrics.artifacts.0.files: must be a list of file names, got "model-fp32.onnx"'),  # the type: at load
    ({"pytorch": 5}, "metrics.pytorch: must be a JSON object, got 5"),
])
def test_profile_refuses_export_metrics_of_a_shape_export_never_writes(tmp_path, export_cpu, metrics, message):
    from kdctl.errors import BundleError
    from kdctl.profile.stage import profile_bundle

    src = _export_with_metrics(export_cpu, tmp_path / "e", **metrics)
    with pytest.raises(BundleError) as e:
        profile_bundle(src, runs=2, warmup=1, out=tmp_path / "p")
    assert str(e.value) == f"{src / 'manifest.json'}: {message}"
    r = CliRunner().invoke(app, ["profile", str(src), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "internal error" not in r.output and not (tmp_path / "p").exists()
    # kdctl eval of an artifact reads the same metrics, and refuses them the same way
    r = CliRunner().invoke(app, ["eval", str(src), "-a", "onnx-fp32", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "internal error" not in r.output
    assert not (tmp_path / "ev").exists()


def test_profile_takes_its_defaults_from_the_recipe(tmp_path, export_cpu):
    """The recipe's profile: section was validated and then ignored: `kdctl profile` ran 100 runs at 10 warm-ups
    whatever it said. Now it sets the defaults, and a flag still wins over it."""
    exp = _export_with_profile_section(export_cpu, tmp_path / "exp",
                                       {"warmup": 3, "runs": 7, "throughput_batch": 2, "threads": 1})
    res = CliRunner().invoke(app, ["profile", str(exp), "-a", "onnx-fp32", "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {k: data["settings"][k] for k in ("warmup", "runs", "throughput_batch", "threads")} == \
        {"warmup": 3, "runs": 7, "throughput_batch": 2, "threads": 1}
    assert data["results"][0]["timed_runs"] == 7 and data["results"][0]["runtime"]["threads"] == 1
    res = CliRunner().invoke(app, ["profile", str(exp), "-a", "onnx-fp32", "--runs", "5", "--warmup", "0",
                                   "--out", str(tmp_path / "q"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["settings"]["runs"] == 5 and data["settings"]["warmup"] == 0 and data["settings"]["threads"] == 1
    assert data["results"][0]["timed_runs"] == 5
    # a recipe written for a device with more cores: the error names the recipe field, not a flag never given
    from kdctl.limits import usable_cores

    many = _export_with_profile_section(export_cpu, tmp_path / "exp8", {"threads": usable_cores() + 1})
    res = CliRunner().invoke(app, ["profile", str(many), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and f"{many}: recipe profile.threads {usable_cores() + 1}: this process may use" in \
        " ".join(res.output.split())


def test_profile_refuses_what_the_machine_cannot_give(tmp_path, export_cpu, monkeypatch):
    """--threads 100000 made the runtimes start 100000 threads (17 GB, deaf to SIGTERM); a huge throughput batch
    would allocate its input before failing. Both are refused before any work, in one line."""
    from kdctl.limits import usable_cores

    n = usable_cores()
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "--threads", str(n + 1), "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and f"--threads {n + 1}: this process may use {n} CPU core" in r.output
    assert f"give at most {n}" in r.output and not (tmp_path / "t").exists()
    monkeypatch.setattr("kdctl.profile.stage.available_memory_bytes", lambda: 8 * 2**20)  # 8 MiB left
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "--throughput-batch", "16", "--out", str(tmp_path / "b")])
    # 16 × 3 × 128² × 4 B = 3.1 MB, more than a quarter of 8 MiB
    assert r.exit_code == 2 and "--throughput-batch 16: its input alone (16 × 3 × 128 × 128 float32) is 3.1 MB" \
        in r.output and "available memory (8.4 MB)" in r.output
    assert not (tmp_path / "b").exists()


def test_profile_device_cuda_without_the_gpu_path_is_refused_before_any_load(tmp_path, export_cpu, monkeypatch):
    """--device cuda on a machine whose ONNX Runtime has no CUDA provider and whose torch sees no GPU: one line
    naming each artifact's reason once, exit 2, nothing written. The PyTorch row used to fail at its load, exit 1,
    with torch's driver message pinned on the weights file; the ONNX rows after the progress bar had started."""
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "--device", "cuda", "--pytorch",
                                 "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no artifact can run here (pytorch-fp32: --device cuda: torch" in r.output
    assert "sees no CUDA GPU here; onnx-fp32, onnx-int8: --device cuda: ONNX Runtime here has no CUDA/TensorRT " \
        "provider (has: CPUExecutionProvider)" in r.output
    assert not (tmp_path / "p").exists()
    # the first GPU spelled as eval and Ultralytics take it is the same refusal; another GPU is named, how to pick it
    r = CliRunner().invoke(app, ["profile", str(export_cpu), "--device", "cuda:0", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "--device cuda: ONNX Runtime here has no CUDA/TensorRT" in r.output, r.output
    for flag, says in (("1", "--device: '1': an exported artifact runs on the first GPU its runtime sees; make GPU "
                             "1 the first with CUDA_VISIBLE_DEVICES=1 and give --device cuda"),
                       ("gpu", "--device: 'gpu'; valid: cpu, cuda (the first GPU; also 0 or cuda:0)")):
        r = CliRunner().invoke(app, ["profile", str(export_cpu), "--device", flag, "--out", str(tmp_path / "p")])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    assert not (tmp_path / "p").exists()


def test_profile_pytorch_reference(tmp_path, export_cpu):
    res = CliRunner().invoke(app, ["profile", str(export_cpu), "--pytorch", "-a", "onnx-fp32", "--runs", "5",
                                   "--warmup", "1", "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["artifact"]: r for r in json.loads(res.stdout)["results"]}
    assert set(rows) == {"pytorch-fp32", "onnx-fp32"}
    assert rows["pytorch-fp32"]["runtime"]["runtime"] == "pytorch" and rows["pytorch-fp32"]["latency_ms"]["p50"] > 0
    # the report's "runs as": the precision PyTorch ran at, where it was "None" (PyTorch records no runtime precision)
    assert CliRunner().invoke(app, ["report", str(tmp_path / "p"), "--out", str(tmp_path / "r")]).exit_code == 0
    row = next(ln for ln in (tmp_path / "r" / "report.md").read_text().splitlines() if "/pytorch-fp32 |" in ln)
    assert row.split(" | ")[4] == "fp32", row


def test_profile_pytorch_refuses_a_source_bundle_that_is_gone_or_another(tmp_path, export_cpu, kd_chain):
    """--pytorch runs the weights of the bundle the export came from, only where that very bundle is here: moved
    away, replaced by another, or broken, it is one line (exit 2 / 1 / 2) and nothing is written."""
    import hashlib
    import shutil

    def with_source(name, path):
        copy = tmp_path / name
        shutil.copytree(export_cpu, copy)
        m = json.loads((copy / "manifest.json").read_text())
        m["parents"][0]["path"] = str(path)
        (copy / "manifest.json").write_text(json.dumps(m))
        digest = hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
        (copy / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
        return copy

    broken = tmp_path / "broken-source"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    for name, source, code, says in (
            ("gone", tmp_path / "nowhere", 2, "the source bundle of {} is not on this machine"),
            ("other", kd_chain["baseline"], 1, f"{kd_chain['baseline']} was replaced after {{}} was exported from it"),
            ("broken", broken, 2, "the source bundle of {}: ")):
        src = with_source(name, source)
        out = tmp_path / f"p-{name}"
        res = CliRunner().invoke(app, ["profile", str(src), "--pytorch", "-a", "onnx-fp32", "--runs", "2",
                                       "--out", str(out)])
        text = " ".join(res.output.split())
        assert res.exit_code == code and f"--pytorch: {says.format(src)}" in text, (name, res.output)
        assert "Traceback" not in res.output and not out.exists()


@pytest.mark.gpu
def test_pytorch_cuda_runner_matches_cpu(trained_bundle):
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from kdctl.runtimes.pytorch import pytorch_runner

    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    cpu = pytorch_runner(trained_bundle / "weights.pt", 1, "cpu")(x)
    gpu = pytorch_runner(trained_bundle / "weights.pt", 1, "cuda")(x)
    assert np.abs(cpu[:, 4:] - gpu[:, 4:]).max() < 1e-3 and np.abs(cpu[:, :4] - gpu[:, :4]).max() < 0.05


def test_profile_runs_without_torch_or_ultralytics(export_cpu, tmp_path):
    """On the device only the runtime is needed: profiling must not import PyTorch or Ultralytics."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules['torch'] = None; sys.modules['ultralytics'] = None\n"
            f"from kdctl.profile.stage import profile_bundle\n"
            f"b = profile_bundle({str(export_cpu)!r}, warmup=1, runs=3, e2e_runs=1, out={str(tmp_path / 'p')!r})\n"
            f"assert len(b.metrics['results']) == 2\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_throughput_batch_stays_within_a_dynamic_engines_profile():
    """A dynamic TensorRT engine takes batches up to its profile's end: a larger --throughput-batch is run at that
    end and says so; a static graph of batch N is run at N."""
    import numpy as np

    from kdctl.profile.stage import _throughput

    class Run:
        def __init__(self, fixed, top):
            self.fixed_batch, self.max_shape, self.calls = fixed, top, set()

        def __call__(self, x):
            self.calls.add(x.shape[0])
            return x

    x, one = np.zeros((1, 3, 8, 8), np.float32), LatencyStats.from_ms([2.0, 2.0])
    for fixed, top, asked, ran in ((None, (4, 3, 8, 8), 16, 4), (None, (16, 3, 8, 8), 8, 8), (3, (3, 3, 8, 8), 8, 3)):
        run = Run(fixed, top)
        tp = _throughput(run, x, asked, one)
        assert tp["batch"] == ran and run.calls == {ran}
        assert ("ends at 4" in tp["note"]) if ran < asked and fixed is None else "note" not in tp
    assert _throughput(Run(1, None), x, 8, one) == {"batch": 1, "images_per_s": 500.0,
                                                     "note": "static batch 1: 1 / mean latency"}
    run = Run(3, (3, 3, 8, 8))  # --throughput-batch 1 on a 3-image graph: still 3 images a call
    assert _throughput(run, x, 1, one)["batch"] == 3 and run.calls == {3}


def test_an_export_bundle_at_a_path_that_is_not_utf8_is_one_line(export_cpu, tmp_path):
    """ONNX Runtime's session takes UTF-8 paths only: a bundle under a name with other bytes failed as 'incompatible
    constructor arguments', exit 1. Now it says why, exit 2, nothing written."""
    import shutil

    moved = tmp_path / "e\udcfe"
    shutil.copytree(export_cpu, moved)
    res = CliRunner().invoke(app, ["profile", str(moved), "--runs", "2", "--warmup", "0", "--out",
                                   str(tmp_path / "p")])
    assert res.exit_code == 2 and "has bytes that are not UTF-8 text" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "p").exists()


def test_throughput_hint_keeps_requests_in_flight_as_benchmark_app_and_perf_test(tmp_path, trained_bundle):
    """--hint throughput: an OpenVINO artifact's throughput under OpenVINO's THROUGHPUT hint, with the streams and
    requests in flight it chooses for these threads (benchmark_app's default), each request a static graph's batch;
    the ONNX artifact's with one one-thread request in flight per thread (onnxruntime_perf_test -c N -x 1); the
    PyTorch reference one request at a time, and says so. The recipe's profile.hint is the default; a hint kdctl
    does not know is refused."""
    import openvino as ov
    import openvino.properties.hint as hints

    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.profile.stage import profile_bundle

    exp = export_bundle(trained_bundle, ExportOptions(target="intel", artifacts=["openvino-fp32", "onnx-fp32"],
                                                      batch=2), out=tmp_path / "ov").path
    res = CliRunner().invoke(app, ["profile", str(exp), "--runs", "6", "--warmup", "1", "--hint", "throughput",
                                   "--pytorch", "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["settings"]["hint"] == "throughput"
    by = {r["artifact"]: r for r in data["results"]}
    tp = by["openvino-fp32"]["throughput"]
    threads = data["settings"]["threads"]
    chosen = ov.Core().compile_model(str(exp / "openvino-fp32" / "model.xml"), "CPU",
                                     {hints.performance_mode: hints.PerformanceMode.THROUGHPUT,
                                      "INFERENCE_NUM_THREADS": threads})
    assert tp["mode"] == "async" and tp["batch"] == 2
    assert tp["requests_in_flight"] == chosen.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    assert tp["streams"] == chosen.get_property("NUM_STREAMS")
    assert tp["requests"] == max(6, 4 * tp["requests_in_flight"])
    assert tp["images_per_s"] == pytest.approx(tp["requests"] * 2 / tp["seconds"])
    onnx = by["onnx-fp32"]["throughput"]
    assert onnx["mode"] == "concurrent" and onnx["batch"] == 2 and onnx["threads_per_request"] == 1
    assert onnx["requests_in_flight"] == onnx["streams"] == threads
    assert onnx["requests"] == max(6, 4 * threads)
    assert onnx["images_per_s"] == pytest.approx(onnx["requests"] * 2 / onnx["seconds"])
    torch_row = by["pytorch-fp32"]["throughput"]
    assert "mode" not in torch_row and "one request at a time here" in torch_row["note"]
    shown = CliRunner().invoke(app, ["report", str(tmp_path / "p"), "--out", str(tmp_path / "rep")])
    assert shown.exit_code == 0, shown.output
    md = (tmp_path / "rep" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| profile | p/openvino-fp32 |"))
    assert row.endswith(f"| {tp['images_per_s']:.0f} (async, {tp['requests_in_flight']} in flight) |"), row
    assert next(line for line in md.splitlines() if line.startswith("| profile | p/onnx-fp32 |")).endswith(
        f"| {onnx['images_per_s']:.0f} (concurrent, {threads} in flight) |")
    assert next(line for line in md.splitlines() if line.startswith("| profile | p/pytorch-fp32 |")).endswith(
        f"| {torch_row['images_per_s']:.0f} |")

    timed = CliRunner().invoke(app, ["profile", str(exp), "--runs", "6", "--warmup", "1", "--hint", "throughput",
                                     "--duration", "0.4", "-a", "openvino-fp32", "-a", "onnx-fp32",
                                     "--out", str(tmp_path / "d"), "--json"])
    assert timed.exit_code == 0, timed.output
    for r in json.loads(timed.stdout)["results"]:  # --duration: requests go on until it has passed, as -t
        t = r["throughput"]
        assert t["seconds"] >= 0.4 and t["requests"] >= max(6, 4 * t["requests_in_flight"]), r["artifact"]
        assert t["images_per_s"] == pytest.approx(t["requests"] * 2 / t["seconds"])

    latency = CliRunner().invoke(app, ["profile", str(exp), "--runs", "6", "--warmup", "1", "-a", "openvino-fp32",
                                       "--out", str(tmp_path / "q"), "--json"])
    assert latency.exit_code == 0, latency.output
    plain = json.loads(latency.stdout)
    assert plain["settings"]["hint"] == "latency" and "mode" not in plain["results"][0]["throughput"]

    from_recipe = _export_with_profile_section(exp, tmp_path / "ov-recipe", {"hint": "throughput", "runs": 4})
    p = profile_bundle(from_recipe, artifacts=["openvino-fp32"], warmup=0, e2e_runs=1, out=tmp_path / "r")
    assert p.metrics["settings"]["hint"] == "throughput" and p.metrics["results"][0]["throughput"]["mode"] == "async"
    bad = CliRunner().invoke(app, ["profile", str(exp), "--hint", "fast", "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "--hint: 'fast'; valid: latency, throughput" in " ".join(bad.output.split())
    assert not (tmp_path / "s").exists()
