"""Export paths on a tiny real model: outputs checked against PyTorch, mAP through the eval code, failures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import refused_in_one_line, superset_checkpoint

from kdctl.bundle import load_bundle, verify_bundle
from kdctl.cli.main import app
from kdctl.errors import BackendUnavailable, BundleError, CheckFailed, DataError, KdctlError, RecipeError
from kdctl.export.base import compare_outputs
from kdctl.export.stage import ExportOptions, export_bundle
from kdctl.export.targets import available_targets, load_target


def arts(bundle):
    return {a["name"]: a for a in json.loads((bundle / "manifest.json").read_text())["metrics"]["artifacts"]}


def test_cpu_export_onnx_fp32_and_int8(export_cpu):
    a = arts(export_cpu)
    assert set(a) == {"onnx-fp32", "onnx-int8"}
    assert a["onnx-fp32"]["parity"]["ok"] is True and a["onnx-fp32"]["parity"]["box_max_abs"] < 0.1
    assert a["onnx-int8"]["settings"]["format"] == "QDQ" and a["onnx-int8"]["settings"]["per_channel"]
    assert a["onnx-int8"]["settings"]["excluded_nodes"] > 0          # box decode tail kept in float
    for x in a.values():
        assert 0 <= x["metrics"]["map50_95"] <= 1 and x["metrics"]["images"] == 8
    assert (export_cpu / "model-int8.onnx").stat().st_size < (export_cpu / "model-fp32.onnx").stat().st_size / 2
    assert verify_bundle(export_cpu).ok
    import onnx

    onnx.checker.check_model(str(export_cpu / "model-fp32.onnx"))


def test_intel_export_openvino_with_explicit_precision(tmp_path, trained_bundle):
    b = export_bundle(trained_bundle, ExportOptions(target="intel", calibration_images=8), out=tmp_path / "ov").path
    a = arts(b)
    assert set(a) == {"openvino-fp32", "openvino-fp16", "openvino-bf16", "openvino-int8"}
    assert a["openvino-fp32"]["runtime"]["inference_precision"] == "f32"  # asked for, and read back
    assert a["openvino-fp32"]["parity"]["ok"] and a["openvino-fp16"]["parity"]["ok"]
    # bf16: the FP32 IR, run in bfloat16 where the CPU has it (f32 elsewhere, recorded), checked at bf16's tolerance
    bf = a["openvino-bf16"]
    assert bf["precision"] == "bf16" and bf["runtime"]["requested_precision"] == "bf16"
    assert bf["runtime"]["inference_precision"] in ("bf16", "f32") and bf["parity"]["ok"]
    assert bf["parity"]["tolerance"]["score_max_abs"] == 0.05
    assert (b / "openvino-bf16" / "model.bin").stat().st_size == (b / "openvino-fp32" / "model.bin").stat().st_size
    # profile times it at the precision the export recorded and reports what the CPU ran
    from kdctl.bundle import load_bundle
    from kdctl.profile.stage import profile_bundle

    p = profile_bundle(b, artifacts=["openvino-bf16"], warmup=1, runs=5, e2e_runs=2, throughput_batch=1,
                       out=tmp_path / "prof").path
    (row,) = load_bundle(p).metrics["results"]
    assert row["artifact"] == "openvino-bf16" and row["latency_ms"]["p50"] > 0
    assert row["runtime"]["inference_precision"] == bf["runtime"]["inference_precision"]
    assert a["openvino-int8"]["settings"]["tool"] == "nncf"
    # the intel preset asks for bf16 in the INT8 model's float layers; what ran is recorded (f32 without BF16)
    rt = a["openvino-int8"]["runtime"]
    assert rt["requested_precision"] == "bf16" and rt["inference_precision"] in ("bf16", "f32")
    assert (b / "openvino-int8" / "model.xml").is_file() and not (b / "model-fp32.onnx").exists()


def test_jetson_device_package_without_tensorrt(export_jetson):
    from kdctl.bundle import verify_bundle
    from kdctl.runtimes.tensorrt import tensorrt_status

    b = export_jetson
    a = arts(b)
    assert {"onnx-fp32", "onnx-fp16", "onnx-int8"} <= set(a)
    assert a["onnx-fp16"]["parity"]["ok"]
    script = (b / "build_engine.sh").read_text()
    assert "--fp16" in script and "--int8" in script and "model-int8.onnx" in script
    assert "on the device" in (b / "README-device.md").read_text().lower()
    if not tensorrt_status()[0]:
        assert a["tensorrt-fp16"]["files"] == [] and a["tensorrt-fp16"]["runtime"]["engine_built"] is False
        manifest = json.loads((b / "manifest.json").read_text())
        assert manifest["device_built"] == ["model-fp16.engine", "model-int8.engine"]
        assert verify_bundle(b).ok


class _Bars:
    """Records what a stage does with its progress bars (Rich's Progress calls that kdctl.progress.Step makes)."""

    def __init__(self):
        self.tasks = {}

    def add_task(self, description, total=None):
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "completed": 0}
        return len(self.tasks) - 1

    def advance(self, task, n=1):
        self.tasks[task]["completed"] += n

    def update(self, task, description=None, completed=None):
        if completed is not None:
            self.tasks[task]["completed"] = completed


def test_export_progress_bars_end_full_when_engines_are_built_on_the_device(trained_bundle, tmp_path):
    """Asked for TensorRT engines alone, an export also makes the ONNX files they are built from, and evaluates
    no engine where TensorRT is not installed: the bars counted 5 of 3 steps, and evaluations stopped at 3/4 (the
    Jetson preset's at 4/6)."""
    from kdctl.runtimes.tensorrt import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is installed here: the engines are built and evaluated")
    bars = _Bars()
    b = export_bundle(trained_bundle, ExportOptions(artifacts=["tensorrt-fp16", "tensorrt-int8"], calibration_images=8),
                      out=tmp_path / "trt", progress=bars).path
    assert set(arts(b)) == {"onnx-fp32", "onnx-int8", "tensorrt-fp16", "tensorrt-int8"}
    plan, ev = bars.tasks.values()
    assert (plan["completed"], plan["total"]) == (5, 5)  # the PyTorch reference, 2 ONNX files, 2 engine records
    n = load_bundle(b).metrics["eval_images"]
    assert (ev["completed"], ev["total"]) == (3 * n, 3 * n)  # PyTorch, ONNX FP32, ONNX INT8


@pytest.mark.tensorrt
def test_tensorrt_engine_builds_and_matches(tmp_path, trained_bundle):
    from kdctl.runtimes.tensorrt import tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    b = export_bundle(trained_bundle, ExportOptions(target="jetson", calibration_images=8), out=tmp_path / "t").path
    a = arts(b)
    assert a["tensorrt-fp16"]["files"] and a["tensorrt-fp16"]["parity"]["ok"]


@pytest.mark.tensorrt
def test_dynamic_tensorrt_engine_takes_one_to_its_batch(tmp_path, trained_bundle):
    """--dynamic --batch 4 on a GPU: the engine's profile runs 1 to 4 images (checked at 2 a call by the export), the
    same image gives the same output alone and in a batch of 4, and 5 is refused by the runner."""
    from kdctl.runtimes.tensorrt import TensorRTRunner, tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    opts = ExportOptions.from_recipe(None, target="jetson", artifacts=["tensorrt-fp16"], dynamic=True, batch=4)
    b = export_bundle(trained_bundle, opts, out=tmp_path / "t").path
    a = arts(b)["tensorrt-fp16"]
    assert a["settings"]["batch"] == "1..4" and a["parity"]["ok"]
    run = TensorRTRunner(b / a["files"][0])
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    one, four = np.asarray(run(x)), np.asarray(run(np.repeat(x, 4, axis=0)))
    assert four.shape[0] == 4 and np.allclose(four[3], one[0], atol=1e-2)
    with pytest.raises(ValueError, match="batch 5 is outside"):
        run(np.repeat(x, 5, axis=0))
    run.close()


def test_unknown_target_lists_valid():
    with pytest.raises(RecipeError, match="target 'tpu' does not exist; valid: cpu, intel, jetson"):
        load_target("tpu")
    assert {"cpu", "intel", "jetson", "rpi"} <= set(available_targets())
    for t in available_targets():
        load_target(t)


def test_a_target_naming_a_file_or_folder_here_says_what_it_is(tmp_path, monkeypatch):
    """``--target notes.txt`` named a file that is there: 'does not exist' sent the user looking for it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "intel.txt").write_text("runtime: openvino\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "cpu").mkdir()
    with pytest.raises(RecipeError, match=r"target 'intel.txt': 'intel.txt' is a file here, not a preset YAML "
                                          r"\(.yaml\); valid: cpu, intel"):
        load_target("intel.txt")
    with pytest.raises(RecipeError, match=r"target 'presets': 'presets' is a folder here, not a preset YAML"):
        load_target("presets")
    assert load_target("cpu").runtime  # a preset's name wins over a folder of that name here


def test_not_a_model_bundle(export_cpu, tmp_path):
    with pytest.raises(BundleError, match="is an 'export' bundle; expected one of: train, distill"):
        export_bundle(export_cpu, ExportOptions(), out=tmp_path / "x")
    res = CliRunner().invoke(app, ["export", str(export_cpu), "--target", "cpu", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "expected one of: train, distill" in res.output and "Traceback" not in res.output


def test_cli_unknown_target_exit_2(trained_bundle, tmp_path):
    res = CliRunner().invoke(app, ["export", str(trained_bundle), "--target", "tpu", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "valid: cpu" in res.output and not (tmp_path / "x").exists()


def test_calibration_too_small(trained_bundle, tmp_path):
    """The error names where the number came from: the flag a user typed, or the recipe field of the bundle."""
    flag = ExportOptions.from_recipe({"export": {"calibration_images": 16}}, target="cpu", calibration_images=500)
    with pytest.raises(DataError, match=r"^--calibration-images: 500 calibration images requested, but the train "
                                        r"split of .*data.yaml has only 24$"):
        export_bundle(trained_bundle, flag, out=tmp_path / "x")
    recipe = ExportOptions.from_recipe({"export": {"calibration_images": 2}}, target="cpu", calibration_images=None)
    with pytest.raises(DataError, match=rf"^{re.escape(str(trained_bundle))}: recipe export.calibration_images: 2 "
                                        r"is too few for INT8 calibration \(at least 8\)$"):
        export_bundle(trained_bundle, recipe, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_recipes_calibration_count_over_the_data_takes_all_of_it(trained_bundle, tmp_path):
    """A recipe's export.calibration_images was written for its own data: on a smaller train split (a shipped recipe
    run with --set data=...) the export calibrates on all of it and says so, as Ultralytics' INT8 export does; it
    stopped with "64 calibration images requested, but the train split ... has only 24". A flag still asks exactly
    (test_calibration_too_small)."""
    opts = ExportOptions.from_recipe({"export": {"calibration_images": 64}}, target="cpu", artifacts=["onnx-int8"])
    art = export_bundle(trained_bundle, opts, out=tmp_path / "x").metrics["artifacts"][0]
    assert art["name"] == "onnx-int8" and art["settings"]["calibration_images"] == 24
    assert re.fullmatch(r"calibrated on all 24 images of the train split of .*data\.yaml \(recipe "
                        r"export\.calibration_images: 64\)", art["settings"]["note"])


def test_a_failed_histogram_calibration_points_to_minmax(trained_bundle, tmp_path, monkeypatch):
    """ONNX Runtime's entropy and percentile calibrators histogram every tensor and fail on one whose values are
    nearly constant (a barely trained model: |x| of 7.8465-7.8469 has no 2048 float32 bins); minmax has no histogram.
    The one-line error says so, and says nothing of it where minmax itself failed."""
    import kdctl.export.quantize as quantize

    def fail(*a, **k):
        raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")

    monkeypatch.setattr(quantize, "quantize_onnx_int8", fail)
    for method, hint in (("percentile", "; percentile calibration builds a histogram of every tensor, "
                                        "--calibration-method minmax does not"), ("minmax", "")):
        with pytest.raises(CheckFailed) as e:
            export_bundle(trained_bundle, ExportOptions(target="cpu", artifacts=["onnx-int8"],
                                                        calibration_method=method), out=tmp_path / "x")
        assert str(e.value) == ("export onnx-int8: calibration failed (ValueError: Too many bins for data range. "
                                f"Cannot create 2048 finite-sized bins.){hint}")
    assert not (tmp_path / "x").exists()


def test_calibration_passes_are_the_largest_equal_ranges_that_fit_the_memory_budget():
    from kdctl.export.quantize import calibration_stride

    assert calibration_stride(64, 10 << 20, budget=1 << 30) == 64      # 640 MB: one pass, as ONNX Runtime does
    assert calibration_stride(64, 251 << 20, budget=1 << 30) == 4      # 16 GB at once: 4 batches a pass
    assert calibration_stride(24, 300 << 20, budget=1 << 30) == 3      # divisors of 24 only (equal ranges)
    assert calibration_stride(23, 300 << 20, budget=1 << 30) == 1      # a prime count: one batch a pass
    assert calibration_stride(8, 2 << 30, budget=1 << 30) == 1         # one batch over the budget: still one
    assert calibration_stride(0, 1, budget=1) == 1


def test_calibration_in_passes_reads_every_batch_once_and_keeps_min_max_ranges(tmp_path, monkeypatch):
    """Over the memory budget, ONNX Runtime's calibrator reads the batches in equal ranges (its strided
    calibration) instead of holding every intermediate tensor of all of them: 10 GB for 64 images at 640 px of a
    0.9 M-parameter YOLO with the histogram methods, the Jetson preset's entropy among them. Every batch is read
    once; min/max ranges, so the quantized model, are the same as in one pass; the histogram methods build a
    model and record the passes."""
    import onnx
    import torch

    import kdctl.export.quantize as quantize

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    src = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(src), input_names=["images"], dynamo=False)
    calib = [np.random.default_rng(i).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32) * (i + 1) for i in range(6)]
    read = []
    real_next = quantize._Reader.get_next

    def counted(self):
        batch = real_next(self)
        if batch is not None:
            read.append(self.i - 1)
        return batch

    monkeypatch.setattr(quantize._Reader, "get_next", counted)
    whole = quantize.quantize_onnx_int8(src, tmp_path / "whole.onnx", calib, method="minmax")
    assert "calibration_passes" not in whole and sorted(read) == list(range(6))
    per_batch = quantize.activation_bytes(onnx.load(str(src)))
    assert per_batch == (8 * 14 * 14 * 2 + 4 * 14 * 14) * 4  # Conv, ReLU, Conv outputs (float32)
    monkeypatch.setattr(quantize, "CALIBRATION_MEMORY", 2 * per_batch + 1)  # two batches a pass: 3 passes
    read.clear()
    parts = quantize.quantize_onnx_int8(src, tmp_path / "parts.onnx", calib, method="minmax")
    assert parts["calibration_passes"] == 3 and sorted(read) == list(range(6))
    assert onnx.load(str(tmp_path / "parts.onnx")).graph == onnx.load(str(tmp_path / "whole.onnx")).graph
    for method in ("entropy", "percentile"):
        read.clear()
        settings = quantize.quantize_onnx_int8(src, tmp_path / f"{method}.onnx", calib, method=method)
        assert settings["calibration_passes"] == 3 and sorted(read) == list(range(6)), method
        onnx.checker.check_model(str(tmp_path / f"{method}.onnx"))


def test_a_calibration_pass_over_the_available_memory_is_refused_in_one_line(trained_bundle, tmp_path, monkeypatch):
    """One calibration pass holds every intermediate tensor of at least one batch: 9.6 GB for one 4096 px image of
    the 0.9 M-parameter student, where `kdctl export --imgsz 4096` was killed for memory (exit 137, no word). Where
    a pass needs more than the available memory, the export stops before calibrating, in one line that says why and
    what to change; the graph's pre-processed copy is not left behind."""
    import onnx
    import torch

    import kdctl.export.quantize as quantize
    import kdctl.limits

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    src = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(src), input_names=["images"], dynamo=False)
    calib = [np.random.default_rng(i).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32) for i in range(6)]
    per_batch = quantize.activation_bytes(onnx.load(str(src)))
    monkeypatch.setattr(quantize, "CALIBRATION_MEMORY", 2 * per_batch + 1)  # two batches a pass
    need = int(1.15 * 2 * per_batch)
    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(quantize.CalibrationMemoryError) as e:
        quantize.quantize_onnx_int8(src, tmp_path / "q.onnx", calib, method="minmax")
    assert (e.value.tensors, e.value.need, e.value.available) == (2 * per_batch, need, need - 1)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx"]
    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: need)
    assert quantize.quantize_onnx_int8(src, tmp_path / "q.onnx", calib, method="minmax")["calibration_passes"] == 3

    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: 10 ** 7)  # the 24 images' pixels fit
    out = tmp_path / "x"
    line = refused_in_one_line(["export", str(trained_bundle), "-q", "-a", "onnx-fp32", "-a", "onnx-int8", "--imgsz",
                                "128", "--out", str(out)], out)
    assert re.fullmatch(r"Error: export onnx-int8: ONNX Runtime's INT8 calibration holds every intermediate tensor "
                        r"of a calibration batch at once, [\d.]+ MB for this model at 128 px \(about [\d.]+ MB in "
                        r"all\), more than this machine's available memory \(10\.0 MB\); give a smaller --imgsz, or "
                        r"leave onnx-int8 out \(--artifact\)", line), line
    assert not list(tmp_path.glob(".x*"))


def test_calibration_images_whose_pixels_exceed_half_the_memory_are_refused_before_any_work(trained_bundle, tmp_path,
                                                                                             monkeypatch):
    """The calibration images are kept as pixels through the export: --calibration-images 100000 of a COCO-sized
    train split at 640 px is 123 GB, which checked every chosen image and was then killed for memory. Over half the
    available memory it is one line before anything is read, naming where the count came from."""
    import kdctl.limits

    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: 2 * 16 * 3 * 64 * 64 - 1)
    out = tmp_path / "x"
    line = refused_in_one_line(["export", str(trained_bundle), "-q", "-a", "onnx-int8", "--imgsz", "64",
                                "--calibration-images", "16", "--out", str(out)], out)
    assert line == ("Error: --calibration-images: 16 calibration images at 64 px are 0.2 MB of pixels, kept through "
                    "the export, more than half this machine's available memory (0.4 MB); give fewer with "
                    "--calibration-images")
    line = refused_in_one_line(["export", str(trained_bundle), "-q", "-a", "onnx-int8", "--imgsz", "96",
                                "--out", str(out)], out)  # the default: all 24 train images
    assert line.startswith("Error: export: 24 calibration images at 96 px are 0.7 MB of pixels")
    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: 10 ** 9)
    res = CliRunner().invoke(app, ["export", str(trained_bundle), "-q", "-a", "onnx-fp32", "-a", "onnx-int8",
                                   "--imgsz", "64", "--calibration-images", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output


def test_calibration_inputs_are_made_when_read_from_pixels_kept_as_uint8(trained_bundle, tmp_path):
    """INT8 calibration's inputs are kept as letterboxed uint8 pixels and made into float32 batches one at a time
    (64 images at 4096 px are 12.9 GB as float32, held through the whole export): the batches are the ones the
    export made before, in groups of a static batch too, the last completed from the first images again."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.export.stage import _Inputs

    images = load_yolo_yaml(trained_bundle / "data.yaml").train_images[:5]
    eager = [to_input([letterbox(load_rgb(p), 96)[0]]) for p in images]  # (1, 3, 96, 96) float32 in [0, 1] each
    one, three = _Inputs(images, 96), _Inputs(images, 96, group=3)
    assert all(c.dtype == np.uint8 and c.shape == (96, 96, 3) for c in one.canvases)
    assert len(one) == 5 and all(np.array_equal(a, b) and a.dtype == np.float32 for a, b in zip(one, eager))
    cycled = [np.concatenate(eager[:3]), np.concatenate([eager[3], eager[4], eager[0]])]
    assert len(three) == 2 and all(np.array_equal(a, b) for a, b in zip(three, cycled))
    assert all(np.array_equal(a, b) for a, b in zip(one.grouped(3), cycled)) and one.grouped(3).canvases is one.canvases
    assert np.array_equal(three[-1], three[1]) and len(three[:8]) == 2 and np.array_equal(one[1:3][1], eager[2])
    with pytest.raises(IndexError):
        three[2]


def test_histogram_calibration_prints_nothing_on_stdout(tmp_path, capsys):
    """ONNX Runtime's entropy and percentile calibrators print() their progress ("Number of quantized bins : 128"):
    five lines on stdout between the progress bar and the export table. They are kept off it."""
    import torch

    from kdctl.export.quantize import quantize_onnx_int8

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    src = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(src), input_names=["images"], dynamo=False)
    calib = [np.random.default_rng(i).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32) for i in range(4)]
    for method in ("entropy", "percentile", "minmax"):
        settings = quantize_onnx_int8(src, tmp_path / f"{method}.onnx", calib, method=method)
        assert settings["calibration_method"] == method and (tmp_path / f"{method}.onnx").is_file()
        assert capsys.readouterr().out == "", method


def test_calibration_data_folder_calibrates_and_is_recorded(trained_bundle, tmp_path):
    """``--calibration-data DIR``: unlabelled images (nested folders too) calibrate INT8 instead of the train split;
    the bundle records where from, how many and their digest, and the INT8 graph is another one than the train
    split's. Bad folders are one line each, before any work."""
    import hashlib

    from PIL import Image

    frames = tmp_path / "frames"
    (frames / "cam1").mkdir(parents=True)
    for i in range(10):  # dark frames: other activation ranges than the training images
        Image.new("RGB", (96 + 8 * i, 80), (i, 2 * i, 3 * i)).save(frames / ("cam1" if i % 2 else "") / f"f{i}.png")
    run = CliRunner()
    res = run.invoke(app, ["export", str(trained_bundle), "-a", "onnx-int8", "--calibration-data", str(frames),
                           "--out", str(tmp_path / "cal"), "--json"])
    assert res.exit_code == 0, res.output
    m = load_bundle(tmp_path / "cal").manifest
    chosen = sorted(frames.rglob("*.png"))
    h = hashlib.sha256()
    for f in chosen:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    assert m["inputs"]["calibration_data"] == {"source": str(frames.resolve()), "images": 10, "sha256": h.hexdigest()}
    assert m["metrics"]["artifacts"][0]["settings"]["calibration_images"] == 10
    default = export_bundle(trained_bundle, ExportOptions(target="cpu", artifacts=["onnx-int8"]), out=tmp_path / "d")
    assert "calibration_data" not in default.manifest["inputs"]
    assert (tmp_path / "cal" / "model-int8.onnx").read_bytes() != (default.path / "model-int8.onnx").read_bytes()

    empty = tmp_path / "empty"
    empty.mkdir()
    (frames / "zz.png").write_bytes(b"not an image")
    for args, says in (
            (["--calibration-data", str(empty)], f"Error: --calibration-data: no images found in '{empty}'"),
            (["--calibration-data", str(tmp_path / "none")], f"Error: --calibration-data: '{tmp_path / 'none'}' "
                                                              "not found (give an image folder or a .txt image list)"),
            (["--calibration-data", str(frames), "--calibration-images", "11"], f"Error: {frames / 'zz.png'}: "),
            # Ultralytics' export calibrates on a dataset YAML (data=): kdctl's is --data
            (["--calibration-data", str(trained_bundle / "data.yaml")],
             f"Error: --calibration-data: '{trained_bundle / 'data.yaml'}' is a dataset YAML; give an image folder or "
             "a .txt image list (a dataset's train split calibrates with --data)"),
            (["-a", "onnx-fp32", "--calibration-data", str(frames)], f"Error: --calibration-data {frames}: no "
                                                                     "artifact of this export is calibrated")):
        args = ["-a", "onnx-int8"] + args if "-a" not in args else args
        res = run.invoke(app, ["export", str(trained_bundle), *args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and "".join(res.output.split()).startswith("".join(says.split())), res.output
    assert not (tmp_path / "x").exists()


def test_skip_invalid_leaves_broken_calibration_images_out_and_takes_others(trained_bundle, tmp_path):
    """``--skip-invalid`` covers ``--calibration-data`` too (camera frames nobody checked): a broken image chosen for
    calibration is left out and listed in the bundle, and an image of the folder not chosen yet stands in for it;
    fewer valid images than asked calibrate on what there is (said in the artifact's note), fewer than 8 is one
    line. Without the flag the first broken image is one line that names the flag."""
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(10):
        Image.new("RGB", (96, 80), (10 * i, 2 * i, 3 * i)).save(frames / f"f{i}.png")
    for name in ("a-broken.png", "zz-broken.png"):  # sorted first and last: both among the 10 spread over 12
        (frames / name).write_bytes(b"not an image")
    run = CliRunner()
    base = ["export", str(trained_bundle), "-a", "onnx-int8", "--calibration-data", str(frames)]
    res = run.invoke(app, [*base, "--calibration-images", "10", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"Error: {frames / 'a-broken.png'}: cannot be decoded as an image (not a format "
                                  f"Pillow reads) (--calibration-data {frames}; --skip-invalid leaves such images out)")
    res = run.invoke(app, [*base, "--calibration-images", "10", "--skip-invalid", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "a", verify=True)
    cal = b.manifest["inputs"]["calibration_data"]
    assert cal["images"] == 10 and cal["skipped"] == {"count": 2, "items": [
        f"{frames / n}: cannot be decoded as an image (not a format Pillow reads)" for n in ("a-broken.png",
                                                                                             "zz-broken.png")]}
    assert b.metrics["artifacts"][0]["settings"]["calibration_images"] == 10
    assert "note" not in b.metrics["artifacts"][0]["settings"]
    res = run.invoke(app, [*base, "--calibration-images", "12", "--skip-invalid", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    art = load_bundle(tmp_path / "b").metrics["artifacts"][0]
    assert art["settings"]["calibration_images"] == 10
    assert f"calibrated on the 10 valid images of {frames} (2 of 12 left out as invalid)" in art["settings"]["note"]
    for f in sorted(frames.glob("f*.png"))[3:]:
        f.write_bytes(b"broken too")
    res = run.invoke(app, [*base, "--skip-invalid", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and res.output.strip() == (
        f"Error: --calibration-data {frames}: 3 of its images are valid after leaving out 9 invalid (first: "
        f"{frames / 'a-broken.png'}: cannot be decoded as an image (not a format Pillow reads)); INT8 calibration "
        "needs at least 8"), res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


def test_default_calibration_uses_a_smaller_train_split_whole(trained_bundle, tmp_path):
    """Unasked, INT8 calibrates on 64 images or on all of a smaller train split (here 24), as NNCF's subset does;
    it used to refuse any dataset under 64 training images unless --calibration-images was given."""
    b = export_bundle(trained_bundle, ExportOptions(target="cpu", artifacts=["onnx-int8"]), out=tmp_path / "e")
    (art,) = load_bundle(b.path).metrics["artifacts"]
    assert art["settings"]["calibration_images"] == 24


def test_only_the_train_images_that_calibrate_are_read_and_a_broken_one_is_named_or_skipped(trained_bundle, tiny_data,
                                                                                             tmp_path):
    """Export scores every validation image but reads the train split only for its calibration images: a bad label
    row there does not stop an export (it used to check the whole split, minutes for a COCO-sized one); a train
    image that does not decode, chosen to calibrate, is one line naming it and --skip-invalid, which leaves it out
    (listed under inputs.data.skipped.train) and calibrates on the others."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_data.parent, root)
    y = root / "data.yaml"
    y.write_text(y.read_text().replace(str(tiny_data.parent), str(root)))
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    labels[0].write_text("17 0.5 0.5 0.2 0.2\n")  # class 17 of 3
    run = CliRunner()
    base = ["export", str(trained_bundle), "-a", "onnx-int8", "--data", str(y), "-q"]
    res = run.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "a").metrics["artifacts"][0]["settings"]["calibration_images"] == 24
    broken = sorted((root / "images" / "train").iterdir())[5]
    broken.write_bytes(b"not an image")
    res = run.invoke(app, [*base, "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and res.output.strip() == (
        f"Error: {broken}: cannot be decoded as an image (not a format Pillow reads) (the train split of {y}; "
        "--skip-invalid leaves such images out)"), res.output
    res = run.invoke(app, [*base, "--skip-invalid", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "c", verify=True)
    assert b.manifest["inputs"]["data"]["skipped"] == {"train": {"count": 1, "items": [
        f"{broken}: cannot be decoded as an image (not a format Pillow reads)"]}}
    assert b.metrics["artifacts"][0]["settings"]["calibration_images"] == 23
    assert b.metrics["artifacts"][0]["settings"]["note"] == (f"calibrated on the 23 valid images of the train split "
                                                             f"of {y} (1 of 24 left out as invalid)")
    assert not (tmp_path / "b").exists()


def test_runtime_not_installed(trained_bundle, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(BackendUnavailable, match="needs the 'openvino' package, which is not installed"):
        export_bundle(trained_bundle, ExportOptions(target="intel"), out=tmp_path / "x")


def test_map_drop_budget_fails_and_writes_nothing(trained_bundle, tmp_path, monkeypatch):
    """The budget rule itself, with the metric fixed: PyTorch 0.50, FP32 ONNX 0.50, INT8 ONNX 0.30; the message
    gives the drop's paired interval over the images (PyTorch finds the object in 20 of 40 images, INT8 in 12)."""
    from test_eval_records import _one_object_images  # images with one object each, found where True

    import kdctl.evaluate as ev
    from kdctl.evaluate.coco import paired_bootstrap

    ref, low = _one_object_images([True] * 20 + [False] * 20), _one_object_images([True] * 12 + [False] * 28)
    scores = iter([(0.50, ref), (0.50, ref), (0.30, low)])

    def fake(backend, images, names, imgsz, **kw):
        score, records = next(scores)
        return {"map50_95": score, "map50": 0.0, "map75": 0.0, "per_class_ap50_95": {}, "images": len(images),
                "imgsz": imgsz}, records

    monkeypatch.setattr(ev, "evaluate_with_records", fake)
    lo, hi = paired_bootstrap(low, ref)  # the drop: PyTorch's mAP minus INT8's, over the same resamples
    assert 0.05 < lo < 20 / 101 < hi < 0.35  # AP 51/101 against 31/101 (recall 0.5 and 0.3): a drop on every resample
    with pytest.raises(CheckFailed, match=r"onnx-int8: mAP50-95 0.3000 is 0.2000 below PyTorch FP32 \(0.5000\), "
                                          rf"by {lo:.4f} to {hi:.4f} over resamples of the \d+ validation images"):
        export_bundle(trained_bundle, ExportOptions(target="cpu", calibration_images=8, max_map_drop=0.01),
                      out=tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    # a drop just past the budget says so with the digits that show it (not "is 0.0200 below ...; ... is 0.02")
    scores = iter([(0.50, ref), (0.50, ref), (0.47996, low)])
    with pytest.raises(CheckFailed, match=r"onnx-int8: mAP50-95 0.4800 is 0.02004 below PyTorch FP32 \(0.5000\), .*"
                                          r"export.max_map_drop is 0.02$"):
        export_bundle(trained_bundle, ExportOptions(target="cpu", calibration_images=8, max_map_drop=0.02),
                      out=tmp_path / "x")
    # within budget the interval is kept per artifact, and shown as the interval of the change (negated)
    scores = iter([(0.50, ref), (0.50, ref), (0.30, low)])
    b = export_bundle(trained_bundle, ExportOptions(target="cpu", calibration_images=8), out=tmp_path / "y")
    got = {a["name"]: a["metrics"]["map50_95_drop_ci95"] for a in b.metrics["artifacts"]}
    assert got == {"onnx-fp32": [0.0, 0.0], "onnx-int8": [lo, hi]}
    from kdctl.bundle import delta_interval

    assert delta_interval(got["onnx-int8"]) == f"[{-hi:+.4f}, {-lo:+.4f}]" and delta_interval(None) == "—"
    assert delta_interval(got["onnx-fp32"]) == "[+0.0000, +0.0000]"


def test_parity_failure_fails_the_export(trained_bundle, tmp_path, monkeypatch):
    import kdctl.export.base as base

    monkeypatch.setitem(base.TOLERANCE, "fp32", {"box_frac": 0.0, "score": 0.0})
    with pytest.raises(CheckFailed, match="onnx-fp32: outputs differ from PyTorch beyond tolerance"):
        export_bundle(trained_bundle, ExportOptions(target="cpu", artifacts=["onnx-fp32"]), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_compare_outputs_tolerances():
    ref = np.zeros((1, 6, 10), np.float32)
    ref[:, 4] = 0.5  # every anchor scores: its box is compared
    ok = compare_outputs(ref, ref + 1e-5, 640, "fp32")
    bad = compare_outputs(ref, ref + np.array([0, 0, 0, 0, 0.1, 0], np.float32)[None, :, None], 640, "fp32")
    assert ok["ok"] and not bad["ok"] and bad["score_max_abs"] == pytest.approx(0.1)
    assert compare_outputs(ref, ref, 640, "int8")["ok"] is None
    assert compare_outputs(ref, ref, 640, "int8")["judged_on"] == "mAP" and ok["judged_on"] == "outputs"
    assert compare_outputs(ref, ref[:, :5], 640, "fp32")["ok"] is False
    # bf16 (8 significant bits): a box 16 px off at 640 px (2.5 %) and a score 0.03 off pass, 32 px or 0.06 do not
    shift = lambda box, score: ref + np.array([box, 0, 0, 0, score, 0], np.float32)[None, :, None]  # noqa: E731
    assert compare_outputs(ref, shift(16, 0.03), 640, "bf16")["ok"]
    assert not compare_outputs(ref, shift(32, 0), 640, "bf16")["ok"]
    assert not compare_outputs(ref, shift(0, 0.06), 640, "bf16")["ok"]
    assert not compare_outputs(ref, shift(16, 0.03), 640, "fp16")["ok"]  # fp16 is held tighter


def test_parity_compares_the_boxes_a_detection_can_come_from():
    """Boxes are compared where either output scores above the evaluator's floor (0.001): a background anchor's box
    (yolov10n in bf16: 656 x 733 px at a 128 px input, 8 px off, score 6.5e-6) changes no detection; one that
    either side scores as a possible detection is held to the tolerance, and every score is."""
    from kdctl.evaluate.predict import CONF_FLOOR

    ref = np.zeros((2, 7, 5), np.float32)
    ref[:, :4] = 60.0
    ref[0, 4, :3] = 0.4                                   # image 0: anchors 0-2 score; image 1: none
    ref[1, 6, 4] = 1e-5
    cand = ref.copy()
    cand[0, :4, 3:] += 30.0                               # boxes of image 0's background anchors, far off
    cand[1, :4, :] += 30.0                                # and every box of image 1
    res = compare_outputs(ref, cand, 128, "fp32")
    assert res["ok"] and res["boxes_compared"] == 3 and res["box_max_abs"] == 0.0 and res["box_mean_abs"] == 0.0
    cand[0, 1, 2] += 0.25                                 # a scoring anchor's box 0.25 px off: the max and mean
    res = compare_outputs(ref, cand, 128, "fp32")
    assert res["box_max_abs"] == 0.25 and res["box_mean_abs"] == pytest.approx(0.25 / 12)
    assert not res["ok"]                                  # fp32 allows 0.128 px at 128
    cand[0, 1, 2] -= 0.25
    cand[1, 5, 4] = 2 * CONF_FLOOR                        # the candidate alone scores anchor 4 of image 1
    res = compare_outputs(ref, cand, 128, "fp32")
    assert res["boxes_compared"] == 4 and res["box_max_abs"] == pytest.approx(30.0) and not res["ok"]
    cand[1, 5, 4] = CONF_FLOOR                            # at the floor it keeps nothing: not compared
    assert compare_outputs(ref, cand, 128, "fp32")["boxes_compared"] == 3
    cand[1, 5, 4] = 0.0
    none = compare_outputs(ref[1:], cand[1:] + np.float32(1e-4), 128, "fp32")  # nothing scores: scores still held
    assert none["boxes_compared"] == 0 and none["box_max_abs"] == 0.0 and none["ok"]
    assert not compare_outputs(ref[1:], cand[1:] + np.float32(0.01), 128, "fp32")["ok"]


def test_a_runtime_that_cannot_run_the_export_is_one_line(trained_bundle, tmp_path, monkeypatch):
    """A runtime that fails on a real image (e.g. an empty-tensor reshape) fails the export in one line, exit 1."""
    import kdctl.runtimes.onnxruntime as onnx_mod

    real = onnx_mod.onnxruntime_backend

    def broken(path, *a, **kw):
        run = real(path, *a, **kw)

        def fail(x):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape")

        fail.session, fail.fixed_batch = run.session, run.fixed_batch
        return fail

    monkeypatch.setattr(onnx_mod, "onnxruntime_backend", broken)
    with pytest.raises(CheckFailed, match="onnx-fp32: onnxruntime cannot run the exported model .*Reshape"):
        export_bundle(trained_bundle, ExportOptions(target="cpu", artifacts=["onnx-fp32"]), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.long
def test_json_stdout_is_only_the_document_and_quiet_prints_nothing(tmp_path, trained_bundle):
    """NNCF logs and draws its progress bars on stdout: `kdctl export --target intel --json` printed them before
    the JSON document, and a CI step that parsed stdout failed. Through the real CLI (file descriptors matter), with
    NNCF's accuracy-control quantization under --json (a --max-map-drop budget selects it) and its plain one under -q."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "kdctl.cli.main", "export", str(trained_bundle), "--target", "intel",
            "--artifact", "openvino-fp32", "--artifact", "openvino-int8", "--calibration-images", "8"]
    p = subprocess.run(base + ["--max-map-drop", "1.0", "--out", str(tmp_path / "j"), "--json"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # the whole of stdout is one document
    assert [a["artifact"] for a in doc["artifacts"]] == ["openvino-fp32", "openvino-int8"]
    assert [a["judged_on"] for a in doc["artifacts"]] == ["outputs", "mAP"]  # FP32 held to PyTorch; INT8 on mAP
    s = arts(tmp_path / "j")["openvino-int8"]["settings"]
    assert s["accuracy_control"] is True and s["max_drop"] == 1.0
    q = subprocess.run(base + ["--out", str(tmp_path / "q"), "-q"], capture_output=True, text=True, timeout=600)
    assert q.returncode == 0 and q.stdout == "", q.stdout[:300]
    assert "INFO:nncf" not in q.stderr and "FutureWarning" not in q.stderr, q.stderr[:300]
    assert arts(tmp_path / "q")["openvino-int8"]["settings"]["accuracy_control"] is False


def test_stdout_reserved_routes_every_writer_of_fd1():
    """print(), a raw write to file descriptor 1 and C's printf while a --json command runs go to stderr (or
    nowhere under --quiet); the document alone reaches stdout."""
    import subprocess
    import sys

    code = """
import ctypes, os, sys
from kdctl.cli._common import emit, stdout_reserved
with stdout_reserved(json_doc={j}, quiet={q}):
    print("python print")
    os.write(1, b"raw fd write\\\\n")
    ctypes.CDLL(None).printf(b"c printf\\\\n")
    emit({{"ok": True}}, as_json={j})
print("after")
"""
    for j, q in ((True, False), (True, True), (False, True)):
        p = subprocess.run([sys.executable, "-c", code.format(j=j, q=q)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout == ('{\n  "ok": true\n}\n' if j else "") + "after\n"
        noise = ["python print", "raw fd write", "c printf"]
        assert all((n in p.stderr) != q for n in noise), p.stderr


def test_an_input_size_the_model_cannot_take_names_where_it_came_from(tmp_path, trained_bundle):
    """A preset's imgsz was reported as '--imgsz', a flag the user never passed."""
    preset = tmp_path / "edge.yaml"
    preset.write_text("name: edge\nruntime: onnxruntime\nartifacts: [onnx-fp32]\nimgsz: 100\n")
    with pytest.raises(KdctlError, match=rf"target {preset}: imgsz: 100 is not a multiple"):
        export_bundle(trained_bundle, ExportOptions(target=str(preset)), out=tmp_path / "x")
    with pytest.raises(KdctlError, match=r"^--imgsz: 70 is not a multiple of 32"):
        export_bundle(trained_bundle, ExportOptions(target=str(preset), imgsz=70), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _model_bundle_with(src, out, recipe=None, **metrics):
    """``src``'s train bundle sealed anew with its recipe or metrics changed (a manifest edited and resealed)."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle

    b = load_bundle(src, verify=True)
    with BundleWriter(out, stage="train", recipe=b.recipe if recipe is None else recipe) as w:
        for role, rel in b.manifest["outputs"].items():
            shutil.copy2(src / rel, w.path / rel)
            w.add_output(role, rel)
        w.metrics.update({**b.metrics, **metrics})
    return out


@pytest.mark.parametrize("export, metrics, message", [
    ("x", {}, 'recipe.export: must be a mapping, got "x"'),
    ({"opset": 5}, {}, "recipe.export.opset: Input should be greater than or equal to 11"),
    ({"calibration_method": "kl"}, {}, "recipe.export.calibration_method: got \"kl\"; input should be 'minmax', "
                                       "'entropy' or 'percentile'"),
    (None, {"imgsz": 5}, "metrics.imgsz: must be the training input size (32..4096), got 5"),
    (None, {"imgsz": "x"}, 'metrics.imgsz: must be an integer, got "x"'),  # the type: when the bundle is loaded
])
def test_a_model_bundle_with_export_settings_of_the_wrong_shape_is_refused_by_field(trained_bundle, tmp_path, export,
                                                                                   metrics, message):
    from kdctl.bundle import load_bundle

    recipe = dict(load_bundle(trained_bundle).recipe)
    if export is not None:
        recipe["export"] = export
    src = _model_bundle_with(trained_bundle, tmp_path / "b", recipe, **metrics)
    res = CliRunner().invoke(app, ["export", str(src), "--target", "cpu", "-a", "onnx-fp32", "--out",
                                   str(tmp_path / "x"), "--json"])
    assert res.exit_code == 2 and "internal error" not in res.output and not (tmp_path / "x").exists()
    assert json.loads(res.stdout)["error"] == f"{src / 'manifest.json'}: {message}"


def _input_batch(path):
    import onnx

    d = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else d.dim_param


def test_static_batch_export_calibrates_checks_and_profiles_in_groups(trained_bundle, tmp_path):
    """--batch 3 (a static graph of 3 images; 8 calibration and 8 parity images are not a multiple of it): every
    runtime gets exactly 3 images per call, the manifest records the batch and the images, not the groups; profile
    times one 3-image call and gate says so."""
    out = tmp_path / "b3"
    res = CliRunner().invoke(app, ["export", str(trained_bundle), "--batch", "3", "--calibration-images", "8",
                                   "-a", "onnx-fp32", "-a", "onnx-int8", "-a", "openvino-int8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    b = load_bundle(out, verify=True)
    a = {x["name"]: x for x in b.metrics["artifacts"]}
    assert _input_batch(out / "model-fp32.onnx") == 3 and _input_batch(out / "model-int8.onnx") == 3
    assert {x["settings"]["batch"] for x in a.values()} == {3} and not any(x["settings"]["dynamic"] for x in a.values())
    assert a["onnx-int8"]["settings"]["calibration_images"] == 8 == a["openvino-int8"]["settings"]["calibration_images"]
    assert a["onnx-fp32"]["parity"]["ok"] is True and a["onnx-fp32"]["parity"]["images"] == 8
    assert all(x["metrics"]["images"] == 8 for x in a.values())  # 8 validation images in 3 calls, the last padded
    assert a["onnx-fp32"]["metrics"]["map50_95"] == pytest.approx(b.metrics["pytorch"]["map50_95"], abs=1e-3)
    assert b.manifest["inputs"]["target"]["batch"] == 3 and "batch: 3" in (out / "target.yaml").read_text()
    from kdctl.profile.stage import profile_bundle

    p = profile_bundle(out, warmup=1, runs=5, e2e_runs=2, throughput_batch=8, out=tmp_path / "prof")
    assert p.metrics["settings"]["batch"] == 3
    for r in p.metrics["results"]:
        assert r["batch"] == 3 and r["throughput"]["batch"] == 3 and r["end_to_end_ms"]["total"]["n"] == 2
    res = CliRunner().invoke(app, ["gate", str(tmp_path / "prof"), "--max-p90-ms", "1000", "--artifact", "onnx-int8",
                                   "--out", str(tmp_path / "gate"), "--json"])
    assert res.exit_code == 0, res.output
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert "one call on 3 images" in checks["max_p90_ms"]["message"]
    res = CliRunner().invoke(app, ["profile", str(out), "--pytorch", "-a", "onnx-fp32", "--runs", "3", "--warmup",
                                   "1", "--out", str(tmp_path / "prof-pt"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["settings"]["batch"] == [1, 3]  # PyTorch's reference row at one image a call
    from kdctl.report.stage import write_report

    write_report([tmp_path / "prof"], out=tmp_path / "report")
    assert (tmp_path / "report" / "report.md").read_text().count("(one call on 3 images)") == 3


def test_dynamic_export_takes_any_batch_and_profiles_throughput_batched(trained_bundle, tmp_path, monkeypatch):
    """--dynamic: a free batch axis the runtimes accept at 1 and at 5; throughput measured at the asked batch. A graph
    that takes one image only, though --dynamic was asked, fails the export's check (it compares 2 images a call)."""
    from kdctl.export import onnx as onnx_export
    from kdctl.runtimes.onnxruntime import onnxruntime_backend

    out = tmp_path / "dyn"
    opts = ExportOptions.from_recipe(None, target="cpu", dynamic=True, calibration_images=8)
    export_bundle(trained_bundle, opts, out=out)
    a = arts(out)
    assert {x["settings"]["dynamic"] for x in a.values()} == {True}
    for f in ("model-fp32.onnx", "model-int8.onnx"):
        assert isinstance(_input_batch(out / f), str)  # a named, free dimension
        run = onnxruntime_backend(out / f)
        assert run.fixed_batch is None
        x = np.random.default_rng(0).random((5, 3, 128, 128), dtype=np.float32)
        assert np.asarray(run(x)).shape[0] == 5 and np.asarray(run(x[:1])).shape[0] == 1
    from kdctl.profile.stage import profile_bundle

    p = profile_bundle(out, warmup=1, runs=5, e2e_runs=2, throughput_batch=4, out=tmp_path / "prof")
    assert p.metrics["settings"]["batch"] == 1
    assert all(r["batch"] == 1 and r["throughput"] == {"batch": 4, "images_per_s": pytest.approx(
        r["throughput"]["images_per_s"])} for r in p.metrics["results"])
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: real(*a, **{**k, "dynamic": False}))
    with pytest.raises(CheckFailed, match="export onnx-fp32: onnxruntime cannot run the exported model"):
        export_bundle(trained_bundle, ExportOptions.from_recipe(None, target="cpu", dynamic=True,
                                                                artifacts=["onnx-fp32"]), out=tmp_path / "one")
    assert not (tmp_path / "one").exists()


def test_trtexec_gets_a_shape_profile_for_a_dynamic_batch(tmp_path):
    """Without --minShapes/--optShapes/--maxShapes trtexec builds a dynamic ONNX for batch 1 alone."""
    from kdctl.export.tensorrt import write_device_package

    arts_ = {"onnx-fp32": "model-fp32.onnx", "onnx-int8": "model-int8.onnx"}
    for update, batch in (({"dynamic": True, "batch": 16}, 16), ({"dynamic": True}, 8), ({"batch": 4}, None)):
        d = tmp_path / str(update)
        d.mkdir()
        write_device_package(d, arts_, load_target("jetson").model_copy(update=update), 96, engines_built=False)
        engines = [ln for ln in (d / "build_engine.sh").read_text().splitlines() if "--saveEngine" in ln]
        assert len(engines) == 4
        readme = (d / "README-device.md").read_text()
        if batch:
            shapes = f"--minShapes=images:1x3x96x96 --optShapes=images:1x3x96x96 --maxShapes=images:{batch}x3x96x96"
            assert all(shapes in ln for ln in engines) and f"N (1 to {batch})x3x96x96" in readme
        else:
            assert not any("Shapes" in ln for ln in engines) and "4x3x96x96" in readme


def test_batch_and_dynamic_come_from_the_recipe_and_are_refused_for_two_stage(frcnn_bundle, tmp_path):
    from kdctl.recipe.schema import ExportSpec

    assert ExportSpec(batch=4, dynamic=True).batch == 4
    opts = ExportOptions.from_recipe({"export": {"batch": 2, "dynamic": True}}, target="cpu")
    assert (opts.batch, opts.dynamic) == (2, True) and not opts.given & {"batch", "dynamic"}
    line = refused_in_one_line(["export", str(frcnn_bundle), "--batch", "2", "--out", str(tmp_path / "x")],
                               tmp_path / "x")
    assert "--batch: " in line and "one image per graph" in line
    m = json.loads((frcnn_bundle / "manifest.json").read_text())
    with pytest.raises(DataError, match=r"recipe export.dynamic: .*one image per graph"):
        opts = ExportOptions.from_recipe({**m["recipe"], "export": {"dynamic": True}}, bundle=frcnn_bundle)
        export_bundle(frcnn_bundle, opts, out=tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_a_batch_the_machine_cannot_hold_is_refused_before_any_work(trained_bundle, tmp_path, monkeypatch):
    """--batch 256 at 640 px needed ~40 GB to trace and check: the process was killed for memory. Now one line."""
    import kdctl.limits

    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: 10_000_000)  # 10 MB left
    line = refused_in_one_line(["export", str(trained_bundle), "--batch", "2", "--out", str(tmp_path / "x")],
                               tmp_path / "x")
    assert "--batch: 2 images of 128 px need about 12.6 MB to export and check (their input alone is 0.4 MB)" in line
    assert line.endswith("give a smaller batch")
    monkeypatch.setattr(kdctl.limits, "available_memory_bytes", lambda: 10_000_000_000)
    opts = ExportOptions.from_recipe(None, target="cpu", batch=2, artifacts=["onnx-fp32"])
    assert arts(export_bundle(trained_bundle, opts, out=tmp_path / "ok").path)["onnx-fp32"]["settings"]["batch"] == 2


def test_an_out_path_that_is_not_utf8_is_refused_before_any_work(trained_bundle, tmp_path):
    """A byte that is not UTF-8 in --out (a surrogate in Python's view of the name): torch's ONNX writer failed on it
    mid-export with 'incompatible function arguments', exit 1. Now one line before any work."""
    out = tmp_path / "o\udcfe"
    line = refused_in_one_line(["export", str(trained_bundle), "--out", str(out), "-a", "onnx-fp32"], out)
    assert "o\\udcfe: has bytes that are not UTF-8 text; the model writers take UTF-8 paths only" in line


@pytest.mark.slow
def test_a_checkpoint_file_exports_with_data_its_path_and_hash_standing_in_for_a_parent(tmp_path, trained_bundle,
                                                                                        tiny_data, export_cpu):
    """``kdctl export best.pt --data data.yaml``, as ``yolo export model=best.pt``: the model scored and exported as
    its bundle's is (the size it was trained at, the same PyTorch mAP), no parent, the file's path and hash
    recorded; ``profile --pytorch`` runs that file and refuses it once changed. Without --data: one line, nothing
    written."""
    import hashlib
    import shutil

    ckpt = tmp_path / "best.pt"
    shutil.copy(trained_bundle / "weights.pt", ckpt)
    run = CliRunner()
    argv = ["export", str(ckpt), "--target", "cpu", "--artifact", "onnx-fp32", "--out", str(tmp_path / "x")]
    res = run.invoke(app, argv)
    assert res.exit_code == 2 and "--data: required to export the checkpoint" in " ".join(res.output.split())
    assert not (tmp_path / "x").exists()
    res = run.invoke(app, [*argv, "--data", str(tiny_data), "--json"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "x", verify=True)
    assert b.manifest["parents"] == [] and b.recipe is None
    assert b.manifest["inputs"]["weights"] == str(ckpt.resolve())
    assert b.manifest["inputs"]["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    from_bundle = load_bundle(export_cpu).metrics
    assert b.metrics["imgsz"] == from_bundle["imgsz"] == 128
    assert b.metrics["pytorch_fp32"]["map50_95"] == from_bundle["pytorch_fp32"]["map50_95"]
    assert arts(tmp_path / "x")["onnx-fp32"]["parity"]["ok"] is True
    prof = ["profile", str(tmp_path / "x"), "--pytorch", "--runs", "3", "--warmup", "1", "--json"]
    res = run.invoke(app, [*prof, "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert {r["artifact"] for r in load_bundle(tmp_path / "p").metrics["results"]} == {"pytorch-fp32", "onnx-fp32"}
    with ckpt.open("ab") as f:
        f.write(b"\0")
    res = run.invoke(app, [*prof, "--out", str(tmp_path / "p2")])
    assert res.exit_code == 1 and f"{ckpt.resolve()} was replaced after" in " ".join(res.output.split())
    assert not (tmp_path / "p2").exists()


def test_a_model_of_more_classes_exports_whole_and_is_scored_on_the_datasets_classes(tmp_path, trained_bundle,
                                                                                      tiny_data, export_cpu):
    """``kdctl export coco.pt --data person_car.yaml``: a model of more classes than the dataset, whose names
    include the dataset's (in another order), is exported whole, as ``yolo export`` exports it (the dataset only
    calibrates and checks it), and every artifact is scored on the dataset's classes, found by name: the mAP of the
    model of those classes alone. ``kdctl eval`` of the artifact scores it so too. Both were refused ('the dataset
    has 3 classes but the model ... predicts 5'); a model without every one of the dataset's classes still is."""
    big = superset_checkpoint(trained_bundle, tmp_path / "big.pt", ["dog", "triangle", "circle", "cat", "square"])
    run = CliRunner()
    res = run.invoke(app, ["export", str(big), "--data", str(tiny_data), "--target", "cpu", "-a", "onnx-fp32",
                           "--imgsz", "128", "--out", str(tmp_path / "x"), "--json"])
    assert res.exit_code == 0, res.output
    picked = {"model_nc": 5, "index": {"circle": 2, "square": 4, "triangle": 1}}
    b = load_bundle(tmp_path / "x", verify=True)
    assert json.loads(res.stdout)["classes"] == b.manifest["inputs"]["classes"] == picked
    assert b.metrics["names"] == ["dog", "triangle", "circle", "cat", "square"]  # what the artifact predicts
    import onnxruntime as ort

    out = ort.InferenceSession(str(tmp_path / "x" / arts(tmp_path / "x")["onnx-fp32"]["files"][0])).get_outputs()
    assert out[0].shape[1] == 4 + 5  # exported whole
    own = load_bundle(export_cpu).metrics
    # the same up to float rounding (a 5-channel convolution sums in another order than a 3-channel one)
    assert b.metrics["pytorch_fp32"]["map50_95"] == pytest.approx(own["pytorch_fp32"]["map50_95"], abs=1e-4)
    scored = arts(tmp_path / "x")["onnx-fp32"]["metrics"]["map50_95"]
    assert scored == pytest.approx(arts(export_cpu)["onnx-fp32"]["metrics"]["map50_95"], abs=1e-4)
    res = run.invoke(app, ["eval", str(tmp_path / "x"), "-a", "onnx-fp32", "--data", str(tiny_data), "--out",
                           str(tmp_path / "e")])
    assert res.exit_code == 0 and "scored on the dataset's 3 classes of the model's 5, found by name" in res.output
    ev = load_bundle(tmp_path / "e")
    assert ev.metrics["map50_95"] == scored and ev.manifest["inputs"]["classes"] == picked
    # a model trained one epoch finds little (mAP near 0), so the detections themselves show the columns read:
    # each class's scores are the model of those classes alone's, artifact against artifact
    res = run.invoke(app, ["eval", str(export_cpu), "-a", "onnx-fp32", "--out", str(tmp_path / "e0")])
    assert res.exit_code == 0, res.output
    per_class = [np.bincount(r["classes"], weights=r["scores"], minlength=3)
                 for r in (np.load(tmp_path / d / "eval-records.npz") for d in ("e", "e0"))]
    assert per_class[1].min() > 0.05 and np.allclose(*per_class, rtol=1e-3), per_class
    others = superset_checkpoint(trained_bundle, tmp_path / "others.pt", ["dog", "cat", "bird", "fish", "cow"])
    says = refused_in_one_line(["export", str(others), "--data", str(tiny_data), "--target", "cpu", "-a",
                                "onnx-fp32", "--out", str(tmp_path / "o")], tmp_path / "o")
    assert "the dataset has 3 classes but the model of" in says and "predicts 5" in says


@pytest.mark.slow
def test_eval_scores_an_exported_artifact_in_its_runtime_as_the_export_did(tmp_path, export_cpu, tiny_data):
    """``kdctl eval EXPORT --artifact onnx-int8``, as ``yolo val model=best.onnx``: the artifact in its own runtime
    on the export's dataset gives the export's own mAP to the digit; another split is scored where asked; what it
    cannot do is one line that writes nothing."""
    run = CliRunner()
    recorded = arts(export_cpu)["onnx-int8"]["metrics"]
    res = run.invoke(app, ["eval", str(export_cpu), "--artifact", "onnx-int8", "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "e", verify=True)
    assert b.metrics["map50_95"] == recorded["map50_95"] and b.metrics["map50"] == recorded["map50"]
    assert (b.metrics["runtime"], b.metrics["artifact"], b.metrics["precision"]) == ("onnxruntime", "onnx-int8", "int8")
    assert [p["id"] for p in b.manifest["parents"]] == [load_bundle(export_cpu).id]
    assert json.loads(res.stdout)["artifact"] == "onnx-int8"
    res = run.invoke(app, ["eval", str(export_cpu), "-a", "onnx-fp32", "--split", "train", "--out",
                           str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    train = load_bundle(tmp_path / "t").metrics
    assert (train["images"], train["split"]) == (24, "train")
    names = ", ".join(arts(export_cpu))
    for argv, says in [([], f"--artifact: {export_cpu} holds {names}; name the one to score"),
                       (["-a", "onnx-fp16"], f"--artifact: 'onnx-fp16' is not in {export_cpu}; it has: {names}"),
                       (["-a", "onnx-int8", "--imgsz", "256"], f"--imgsz 256: onnx-int8 of {export_cpu} was "
                                                               "exported for 128 px inputs"),
                       (["-a", "onnx-int8", "--device", "3"], "--device: '3': an exported artifact runs on the "
                        "first GPU its runtime sees; make GPU 3 the first with CUDA_VISIBLE_DEVICES=3 and give --device "
                        "cuda"),
                       (["-a", "onnx-int8", "--device", "tpu"], "--device: 'tpu'; valid: cpu, cuda (the first GPU; "
                                                                "also 0 or cuda:0)")]:
        res = run.invoke(app, ["eval", str(export_cpu), *argv, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and says in " ".join(res.output.split()), (argv, res.output)
        assert "Traceback" not in res.output and not (tmp_path / "x").exists()
    from kdctl.runtimes.onnxruntime import gpu_providers

    if not gpu_providers()[0]:  # no GPU provider in this ONNX Runtime: the runtime's own reason, after the flag
        for flag in ("cuda", "cuda:0"):  # the first GPU, as Ultralytics spells it too
            res = run.invoke(app, ["eval", str(export_cpu), "-a", "onnx-int8", "--device", flag, "--out",
                                   str(tmp_path / "x")])
            assert res.exit_code != 0 and "--device cuda: onnx-int8: ONNX Runtime here has no CUDA" in " ".join(
                res.output.split()) and not (tmp_path / "x").exists()
    # exported on a dataset given by path: that path may have moved since, so eval asks for it
    res = run.invoke(app, ["export", str(load_bundle(export_cpu).manifest["parents"][0]["path"]), "--target", "cpu",
                           "-a", "onnx-fp32", "--data", str(tiny_data), "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    res = run.invoke(app, ["eval", str(tmp_path / "d"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--data: required to score an artifact of" in " ".join(res.output.split())
    res = run.invoke(app, ["eval", str(tmp_path / "d"), "--data", str(tiny_data), "--out", str(tmp_path / "x")])
    assert res.exit_code == 0 and load_bundle(tmp_path / "x").metrics["map50_95"] == arts(tmp_path / "d")[
        "onnx-fp32"]["metrics"]["map50_95"]


@pytest.mark.slow
def test_an_artifacts_own_file_names_it_to_eval_and_profile(tmp_path, export_cpu, trained_bundle, monkeypatch):
    """``kdctl eval runs/export/x/model-int8.onnx``, as ``yolo val model=best.onnx`` (``profile`` of it, as
    ``benchmark_app -m model.xml``, and ``gate``): that artifact of its export bundle, verified as the bundle;
    elsewhere a file of a bundle is refused naming the bundle to give."""
    import shutil

    from kdctl.profile.stage import profile_bundle

    run, export_cpu = CliRunner(), shutil.copytree(export_cpu, tmp_path / "exp")  # a copy: its file is edited below
    model = export_cpu / load_bundle(export_cpu).manifest["artifacts"]["onnx-int8"]["files"][0]
    res = run.invoke(app, ["eval", str(model), "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "e", verify=True)
    assert b.metrics["artifact"] == "onnx-int8" and b.metrics["map50_95"] == arts(export_cpu)["onnx-int8"][
        "metrics"]["map50_95"]
    assert [p["id"] for p in b.manifest["parents"]] == [load_bundle(export_cpu).id]
    monkeypatch.chdir(model.parent)  # from the artifact's own folder
    res = run.invoke(app, ["eval", model.name, "--out", str(tmp_path / "g"), "-q"])
    assert res.exit_code == 0 and load_bundle(tmp_path / "g").metrics["artifact"] == "onnx-int8", res.output
    monkeypatch.chdir(tmp_path)
    says = refused_in_one_line(["eval", str(model), "-a", "onnx-fp32", "--out", str(tmp_path / "x")], tmp_path / "x")
    assert f"--artifact: onnx-fp32, but {model} is artifact onnx-int8 of the export bundle {export_cpu}" in says
    b = profile_bundle(model, warmup=1, runs=3, e2e_runs=1, out=tmp_path / "p")
    assert [r["artifact"] for r in b.metrics["results"]] == ["onnx-int8"]
    for given, artifact in ((model, "onnx-int8"), (export_cpu / "model-fp32.onnx", "onnx-fp32")):  # the first INT8
        res = run.invoke(app, ["gate", str(given), "--min-map", "0", "--out", str(tmp_path / f"g{artifact}"), "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["artifact"] == artifact, res.output  # by default
    for argv, says in ((["export", str(model), "--target", "cpu"], f"{model}: is part of artifact onnx-int8 of the "
                        f"export bundle {export_cpu}; give the bundle directory {export_cpu}"),
                       (["gate", str(export_cpu / "metrics.json")], f"{export_cpu / 'metrics.json'}: is part of the "
                        f"bundle {export_cpu}; give the bundle directory {export_cpu}"),
                       (["export", str(trained_bundle / "results.csv"), "--target", "cpu"], "is part of the bundle")):
        assert says in refused_in_one_line([*argv, "--out", str(tmp_path / "x")], tmp_path / "x")
    # an edited artifact is refused as the bundle is: the path names the bundle, which is verified whole
    with model.open("ab") as f:
        f.write(b"\0")
    res = run.invoke(app, ["eval", str(model), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and f"{model}: changed" in res.output and not (tmp_path / "x").exists(), res.output


def test_an_artifacts_folder_or_any_file_in_it_names_the_artifact(tmp_path):
    """An OpenVINO artifact is a folder of two files: the folder, either file, from its bundle's folder or from
    inside the artifact's; a file of two artifacts or of none names the bundle alone; a folder no manifest lists
    is no part of it."""
    from kdctl.bundle.store import artifact_given, part_of_bundle

    b = tmp_path / "runs" / "export" / "x"
    (b / "openvino-int8").mkdir(parents=True)
    arts_ = {"openvino-int8": {"files": ["openvino-int8/model.xml", "openvino-int8/model.bin"]},
             "onnx-int8": {"files": ["model-int8.onnx"]}, "both": {"files": ["shared.bin"]},
             "also": {"files": ["shared.bin"]}}
    files = {f: {} for a in arts_.values() for f in a["files"]} | {"metrics.json": {}}
    (b / "manifest.json").write_text(json.dumps({"stage": "export", "files": files, "artifacts": arts_}))
    for given in ("openvino-int8", "openvino-int8/model.xml", "openvino-int8/model.bin"):
        assert part_of_bundle(b / given) == (b, "openvino-int8"), given
        assert artifact_given(b / given, None) == (b, ["openvino-int8"])
    assert part_of_bundle(b / "model-int8.onnx") == (b, "onnx-int8")
    assert part_of_bundle(b / "shared.bin") == (b, None) and part_of_bundle(b / "metrics.json") == (b, None)
    assert artifact_given(b / "shared.bin", ["x"]) == (b / "shared.bin", ["x"])  # the bundle's loading names it
    assert part_of_bundle(b / "openvino-int8" / "other.xml") is None and part_of_bundle(b / "nope") is None
    assert artifact_given(b, ["onnx-int8"]) == (b, ["onnx-int8"])  # the bundle itself: as given
    with pytest.raises(BundleError, match="--artifact: onnx-int8, but .* is artifact openvino-int8 of the export"):
        artifact_given(b / "openvino-int8", ["onnx-int8"])
    import os

    old = os.getcwd()
    try:
        os.chdir(b / "openvino-int8")
        assert part_of_bundle("model.xml") == (b, "openvino-int8")
    finally:
        os.chdir(old)
    (b / "manifest.json").write_text(json.dumps({"stage": "train", "files": files, "artifacts": arts_}))
    assert part_of_bundle(b / "model-int8.onnx") == (b, None)  # only an export bundle's artifacts are artifacts


def _as_coco(data_yaml, out):
    """The YOLO dataset ``data_yaml`` as a COCO-JSON set (ids from 1, categories in reverse order), and a recipe
    naming it."""
    from PIL import Image

    from kdctl.data.resolve import load_yolo_yaml

    ds, paths = load_yolo_yaml(data_yaml), {}
    cats = [{"id": 2 * k + 1, "name": n} for k, n in enumerate(ds.names)][::-1]
    for split, images in (("train", ds.train_images), ("val", ds.val_images)):
        ims, anns = [], []
        for i, p in enumerate(images, 1):
            w, h = Image.open(p).size
            ims.append({"id": i, "file_name": p.name, "width": w, "height": h})
            for line in (p.parent.parent.parent / "labels" / split / f"{p.stem}.txt").read_text().splitlines():
                k, x, y, bw, bh = map(float, line.split())
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 2 * int(k) + 1, "iscrowd": 0,
                             "bbox": [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]})
        (out / f"{split}.json").write_text(json.dumps({"images": ims, "annotations": anns, "categories": cats}))
        paths[f"{split}_images"], paths[f"{split}_annotations"] = str(images[0].parent), str(out / f"{split}.json")
    recipe = out / "coco.yaml"
    recipe.write_text(f"name: coco\nstudent: yolov8-tiny.yaml\ndata: {{coco: {json.dumps(paths)}}}\n")
    return recipe


@pytest.mark.slow
def test_eval_and_export_take_a_recipe_as_data_for_a_coco_set(tmp_path, trained_bundle, tiny_data):
    """``--data recipe.yaml``: the dataset its data: section names, a COCO-JSON set converted as training converts
    it, where only a dataset YAML was taken (a COCO set could be scored only through a bundle trained on it). The
    same images and boxes as COCO JSON score the model as its own YOLO set does."""
    recipe = _as_coco(tiny_data, tmp_path)
    run = CliRunner()
    res = run.invoke(app, ["eval", str(trained_bundle), "--data", str(recipe), "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    own = load_bundle(trained_bundle).metrics
    e = load_bundle(tmp_path / "e", verify=True)
    assert e.metrics["map50_95"] == pytest.approx(own["map50_95"], abs=1e-4) and e.metrics["images"] == 8
    assert "/coco/" in e.manifest["inputs"]["data"]["yaml"]  # the converted layout, in kdctl's cache
    res = run.invoke(app, ["export", str(trained_bundle), "--data", str(recipe), "-t", "cpu", "-a", "onnx-int8",
                           "--calibration-images", "8", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    x = load_bundle(tmp_path / "x", verify=True).metrics
    assert x["eval_images"] == 8 and x["pytorch_fp32"]["map50_95"] == pytest.approx(own["map50_95"], abs=1e-4)
    says = refused_in_one_line(["eval", str(trained_bundle), "--data", str(recipe), "--split", "test", "--out",
                                str(tmp_path / "t")], tmp_path / "t")
    assert f"--data {recipe}: its dataset's field 'test' is missing (the split to score)" in says


def test_eval_finds_an_engine_built_on_the_device_after_export(tmp_path, export_jetson):
    """A Jetson export's TensorRT engines are built on the device (build_engine.sh), where ``kdctl eval -a
    tensorrt-int8`` is their only accuracy check: the engine beside the bundle's files is the artifact (here, with
    no TensorRT or no real engine, it then stops in one line at the runtime), and without it the artifact is not
    offered."""
    import shutil

    from kdctl.runtimes import available

    bundle = tmp_path / "jetson"
    shutil.copytree(export_jetson, bundle)
    argv = ["eval", str(bundle), "-a", "tensorrt-int8", "--out", str(tmp_path / "x")]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2 and f"--artifact: 'tensorrt-int8' is not in {bundle}" in " ".join(res.output.split())
    (bundle / "model-int8.engine").write_bytes(b"not an engine")  # what build_engine.sh writes, in name
    res = CliRunner().invoke(app, argv)
    ok, why = available("tensorrt")
    says = f"{bundle / 'model-int8.engine'}: tensorrt-int8 cannot be loaded by its runtime" if ok else \
        f"tensorrt-int8: {why}"
    assert res.exit_code != 0 and says in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()
    # the engine's own file, as `yolo val model=best.engine`: the same artifact, the same stop
    res = CliRunner().invoke(app, ["eval", str(bundle / "model-int8.engine"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and says in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()


def test_a_checkpoints_training_size_is_read_as_ultralytics_wrote_it():
    """eval and export of a .pt run at the size it was trained at: Ultralytics' train arguments (an int, or [h, w]:
    its longer side), kdctl's Faster R-CNN's own ``imgsz``; nothing readable: None (the caller's default, 640)."""
    from types import SimpleNamespace

    from kdctl.models import trained_size

    assert trained_size(SimpleNamespace(args={"imgsz": 320})) == 320
    assert trained_size(SimpleNamespace(args={"imgsz": [256, 416]})) == 416
    assert trained_size(SimpleNamespace(imgsz=96)) == 96
    for unreadable in ({"imgsz": True}, {"imgsz": "640"}, {"imgsz": [256, 4.5]}, {"imgsz": []}, {}):
        assert trained_size(SimpleNamespace(args=unreadable)) is None, unreadable
    assert trained_size(object()) is None
