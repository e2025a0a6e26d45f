"""Export benchmark: kdctl's exports vs Ultralytics' own exports of the same weights, measured in one run.

For each model (the quickstart student at its training size, and YOLOv8n trained at 640 px): latency
(batch 1, all available cores, p50 over interleaved rounds) and mAP50-95 on the synthetic validation set through
kdctl's evaluator, for PyTorch FP32, ONNX Runtime FP32/INT8, OpenVINO FP32/INT8, and Ultralytics' format=onnx,
format=openvino and format=openvino int8=True.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _common import ROOT, machine, median, table, write_section  # noqa: E402


def ultralytics_exports(weights: Path, imgsz: int, data_yaml: Path, work: Path) -> dict[str, Path]:
    import shutil

    from ultralytics import YOLO

    w = work / "ul.pt"
    shutil.copy(weights, w)
    out = {}
    out["ultralytics onnx"] = Path(YOLO(str(w)).export(format="onnx", imgsz=imgsz, simplify=True))
    out["ultralytics openvino"] = Path(YOLO(str(w)).export(format="openvino", imgsz=imgsz)) / "ul.xml"
    out["ultralytics openvino int8"] = Path(YOLO(str(w)).export(format="openvino", imgsz=imgsz, int8=True,
                                                                data=str(data_yaml))) / "ul.xml"
    return out


def qat_form_exports(model, imgsz: int, calibration: list, work: Path) -> dict[str, Path]:
    """The graph a QAT student exports (ModelOpt Q/DQ on every conv input and weight, head outputs and DFL in
    float), with ranges calibrated on the calibration images but not trained: its latency is the QAT artifact's,
    its mAP is calibration-only."""
    import copy

    import numpy as np
    import onnx
    import torch
    import modelopt.torch.quantization as mtq

    from kdctl.detectors.yolo import library_output_to_stderr
    from kdctl.export.onnx import export_onnx
    from kdctl.export.openvino import export_openvino
    from kdctl import detectors
    from kdctl.export.quantize import fold_weight_quantizers, quantize_qat_onnxruntime

    q = copy.deepcopy(model).eval()
    xs = torch.from_numpy(np.concatenate(calibration))
    with torch.no_grad(), library_output_to_stderr():
        q = mtq.quantize(q, mtq.INT8_DEFAULT_CFG, lambda m: [m.predict(xs[i:i + 8]) for i in range(0, len(xs), 8)])
    head = f"model.{len(q.model) - 1}."
    mtq.disable_quantizer(q, lambda n: n.startswith(head) and (".conv." not in n or ".dfl." in n))
    sym = export_onnx(q, work / "qat-form.onnx", imgsz)
    proto = onnx.load(str(sym))
    trained = onnx.load(str(sym))
    fold_weight_quantizers(proto)
    onnx.save(proto, str(sym))
    export_openvino(sym, work / "qat-form-ov", "int8")
    # ONNX Runtime's form, as `kdctl export` writes it: the trained ranges fixed, the rest calibrated
    quantize_qat_onnxruntime(trained, work / "qat-form-ort.onnx", calibration,
                             lambda nodes: detectors.float_tail(nodes, model))
    return {"kdctl onnx-int8 (QAT form)": work / "qat-form-ort.onnx",
            "kdctl openvino-int8 (QAT form)": work / "qat-form-ov" / "model.xml"}


def detr_dense(run, imgsz: int, nc: int):
    """Ultralytics' RT-DETR export returns (N, k, 6): normalised cx, cy, w, h, score, class. kdctl's evaluator takes
    (N, 4 + nc, k) in pixels; the conversion is outside the timed call's model but inside this wrapper (a few
    microseconds of NumPy, timed along, as a user's post-processing would be)."""
    import numpy as np

    def dense(x):
        y = np.asarray(run(x), dtype=np.float32)
        out = np.zeros((y.shape[0], 4 + nc, y.shape[1]), np.float32)
        out[:, :4] = (y[..., :4] * imgsz).transpose(0, 2, 1)
        cls = y[..., 5].astype(int).clip(0, nc - 1)
        for i in range(y.shape[0]):
            out[i, 4 + cls[i], np.arange(y.shape[1])] = y[i, :, 4]
        return out

    dense.fixed_batch = getattr(run, "fixed_batch", None)
    return dense


def ov_default(xml: Path, threads: int):
    """OpenVINO as Ultralytics' AutoBackend runs it: latency hint, the plugin's default precision."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    req = compiled.create_infer_request()

    def run(x):
        return req.infer({0: x})[compiled.output(0)].copy()

    run.fixed_batch = 1
    from kdctl.runtimes.openvino import precision_name

    run.precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return run


def bench_model(label: str, bundle: Path, imgsz: int, rounds: int, per_round: int, calib: int, threads: int) -> str:
    from kdctl.bundle import load_bundle
    from kdctl.detectors.yolo import load_detector
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.runtimes.onnxruntime import onnxruntime_backend
    from kdctl.runtimes.openvino import openvino_backend
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.data.resolve import load_yolo_yaml

    src = load_bundle(bundle)
    ds = load_yolo_yaml(src.file("data"))
    work = Path(tempfile.mkdtemp(prefix="kdctl-bench-"))
    ours = {}
    for target, arts in (("cpu", ["onnx-fp32", "onnx-int8"]),
                         ("intel", ["openvino-fp32", "openvino-bf16", "openvino-int8"])):
        b = export_bundle(bundle, ExportOptions(target=target, artifacts=arts, imgsz=imgsz, calibration_images=calib),
                          out=work / target)
        for a in b.metrics["artifacts"]:
            ours[f"kdctl {a['name']}"] = (b.path / a["files"][0], a)
    ul = ultralytics_exports(src.file("weights"), imgsz, src.file("data"), work)
    from kdctl.detectors import family

    detr = family(load_detector(src.file("weights"))).__name__.endswith("rtdetr")
    calib_x = [to_input([letterbox(load_rgb(p), imgsz)[0]]) for p in ds.train_images[:calib]]
    qat = {} if detr else qat_form_exports(load_detector(src.file("weights")), imgsz, calib_x, work)

    model = load_detector(src.file("weights")).fuse()
    import torch

    torch.set_num_threads(threads)
    runners = {"pytorch fp32": torch_backend(model)}
    for name, (path, a) in ours.items():
        runners[name] = (onnxruntime_backend(path, threads=threads) if a["format"] == "onnx"
                         else openvino_backend(path, a["precision"], threads=threads,
                                               hint=a["runtime"].get("requested_precision")))
    precision = {n: a["runtime"].get("inference_precision") for n, (_, a) in ours.items()}
    precision["pytorch fp32"] = "fp32"
    for name, path in qat.items():
        runners[name] = (onnxruntime_backend(path, threads=threads) if path.suffix == ".onnx"
                         else openvino_backend(path, "int8", threads=threads, hint="bf16"))
        precision[name] = "int8 (QDQ)" if path.suffix == ".onnx" else runners[name].runtime["inference_precision"]
    for name, path in ul.items():
        runners[name] = onnxruntime_backend(path, threads=threads) if path.suffix == ".onnx" else ov_default(path, threads)
        precision[name] = getattr(runners[name], "precision", "fp32 (ORT)")
        if detr:
            runners[name] = detr_dense(runners[name], imgsz, len(ds.names))

    x = to_input([letterbox(load_rgb(ds.val_images[0]), imgsz)[0]])
    samples = {n: [] for n in runners}
    for n, r in runners.items():
        for _ in range(10):
            r(x)
    for _ in range(rounds):  # interleaved, so drift hits every runner alike
        for n, r in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                r(x)
                samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    maps = {n: evaluate_backend(r, ds.val_images, ds.names, imgsz, batch=1)["map50_95"] for n, r in runners.items()}
    p50 = {n: median(s) for n, s in samples.items()}
    ref = maps["pytorch fp32"]
    pairs = {"kdctl onnx-fp32": "ultralytics onnx", "kdctl openvino-fp32": "ultralytics openvino",
             "kdctl openvino-bf16": "ultralytics openvino",
             "kdctl openvino-int8": "ultralytics openvino int8", "kdctl onnx-int8": "ultralytics openvino int8",
             "kdctl onnx-int8 (QAT form)": "ultralytics openvino int8",
             "kdctl openvino-int8 (QAT form)": "ultralytics openvino int8"}
    rows = []
    for n in runners:
        vs = pairs.get(n)
        rows.append([n, precision[n], round(p50[n], 2), round(maps[n], 4), round(100 * (maps[n] - ref), 2),
                     f"{p50[n] / p50[vs]:.2f} ({vs})" if vs else ""])
    best_int8 = min((n for n in runners if n.startswith("kdctl") and "int8" in n and "QAT" not in n),
                    key=lambda n: p50[n])
    summary = (f"Best kdctl INT8 ({best_int8}) / Ultralytics OpenVINO INT8 p50: "
               f"**{p50[best_int8] / p50['ultralytics openvino int8']:.2f}**, mAP50-95 change vs PyTorch "
               f"{100 * (maps[best_int8] - ref):+.2f} points; kdctl ONNX Runtime FP32 / Ultralytics ONNX p50: "
               f"**{p50['kdctl onnx-fp32'] / p50['ultralytics onnx']:.2f}**.")
    return (f"### {label}: {bundle.name} at {imgsz} px\n\n"
            + table(["artifact", "runs as", "p50 ms", "mAP50-95", "Δ mAP pts vs PyTorch", "p50 ratio vs Ultralytics"], rows)
            + f"\n\n{summary}\n")


LARGE_RECIPE = """
name: teacher-640
student: {model: runs/train/quickstart-teacher}
data:
  synthetic: {train: 240, val: 60, imgsz: 640, classes: 3, seed: 0, scene: clear}
train: {epochs: 3, imgsz: 640, batch: 8, seed: 0, device: cpu, workers: 0, optimizer: AdamW, lr0: 0.001, mosaic: 0.0,
        warmup_epochs: 0}
"""


def large_model(out: Path) -> None:
    """YOLOv8n at 640 px: the quickstart teacher (trained at 128 px) fine-tuned 3 epochs on 640-px synthetic scenes,
    so that mAP at 640 px means something (about 10 minutes on 2 cores)."""
    import yaml

    from kdctl.recipe.schema import Recipe
    from kdctl.training import run_training

    teacher = ROOT / "runs" / "train" / "quickstart-teacher"
    if not (teacher / "manifest.json").is_file():
        print(f"skip {out}: run `make demo` first (it needs {teacher})")
        return
    d = yaml.safe_load(LARGE_RECIPE)
    d["student"]["model"] = str(teacher)
    run_training(Recipe.model_validate(d), stage="train", source="bench", out=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", default="runs/distill/quickstart")
    ap.add_argument("--large", default="runs/bench/large640",
                    help="a YOLOv8n bundle trained at 640 px (made from the quickstart teacher when missing)")
    ap.add_argument("--rtdetr", default="runs/train/rtdetr-student",
                    help="an RT-DETR bundle (made with recipes/rtdetr-student.yaml when missing)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=25)
    ap.add_argument("--calibration", type=int, default=64)
    a = ap.parse_args()
    import os

    threads = len(os.sched_getaffinity(0))
    parts = [f"## Export: latency and accuracy vs Ultralytics' exports\n\n{machine()}. Batch 1, {threads} threads, "
             f"p50 of {a.rounds}×{a.per_round} interleaved runs after 10 warm-up runs, one process. mAP50-95 on the "
             "model's synthetic validation set (100 images at 128 px, 60 at 640 px) through kdctl's evaluator for "
             "every row, so rows compare. "
             "'runs as' is the precision the runtime reported; Ultralytics' OpenVINO export runs with the plugin "
             "default, which is bf16 on a CPU with AMX or AVX-512 BF16 (f32 elsewhere), as kdctl's openvino-bf16 asks "
             "for. kdctl's OpenVINO IRs are converted from the traced PyTorch model. "
             "'QAT form' rows: the Q/DQ graph a quantization-aware trained student exports, with ranges calibrated "
             "but not trained (its latency is the QAT artifact's; its mAP is calibration-only).\n"]
    for label, b, size in (("Quickstart student", a.student, None), ("YOLOv8n at 640 px", a.large, 640),
                           ("RT-DETR (kdctl's tiny)", a.rtdetr, None)):
        bundle = ROOT / b
        if size == 640 and not (bundle / "manifest.json").is_file():
            large_model(bundle)
        if b == a.rtdetr and not (bundle / "manifest.json").is_file():
            from kdctl.recipe import load_recipe
            from kdctl.training import run_training

            run_training(load_recipe(ROOT / "recipes" / "rtdetr-student.yaml"), stage="train", out=bundle)
        if not (bundle / "manifest.json").is_file():
            print(f"skip {b}: run `make demo` first")
            continue
        from kdctl.bundle import load_bundle

        imgsz = size or int(load_bundle(bundle).metrics["imgsz"])
        parts.append(bench_model(label, bundle, imgsz, a.rounds, a.per_round, a.calibration, threads))
    body = "\n".join(parts)
    write_section("export", body)
    print(body)


if __name__ == "__main__":
    main()
