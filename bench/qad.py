"""Quantization-aware distillation vs post-training INT8, on the built-in benchmark pair, over several seeds.

Start: the float student distilled by `recipes/head.yaml` (``runs/bench/clear/head-s{seed}``, made by
``bench/distill_families.py``) and its teacher. Rows, each exported for ONNX Runtime (cpu target) and OpenVINO
(intel target) and scored by kdctl's evaluator on the validation set:

- PTQ: the float student quantized after training (64 calibration images).
- QAD: ``recipes/quickstart-qad.yaml`` (3 epochs, fake-quantized student, head KD from the float teacher).
- QAT, no teacher: the same fine-tune without KD (``kdctl train`` with ``distill.quantize: int8``).
- float KD fine-tune, then PTQ: the same 3 epochs without quantization (is it the extra training or the QAT?).
- Ultralytics ``quantize=8`` with ``distill_model=`` (its own QAT + KD), the same epochs, exported by Ultralytics.

Every mAP drop is against the starting float student's PyTorch FP32 mAP50-95 (what a user would ship otherwise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, finished_or_trained, machine, table, write_section  # noqa: E402


def _recipe(seed: int, float_student: Path, teacher: Path | None, quantize: bool):
    from kdctl.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "quickstart-qad.yaml")
    d = r.model_dump()
    d["train"]["seed"] = seed
    d["student"]["model"] = str(float_student)
    d["distill"]["quantize"] = "int8" if quantize else None
    if teacher is None:
        d.pop("teacher")
    else:
        d["teacher"]["model"] = str(teacher)
    return type(r).model_validate(d)


def _train(out: Path, stage: str, recipe) -> float:
    return finished_or_trained(out, recipe, stage, "bench").metrics["train_seconds"]


def _exports(bundle: Path, work: Path) -> dict:
    """mAP50-95 of the PyTorch model and of its INT8 ONNX Runtime and OpenVINO exports."""
    from kdctl.bundle import load_bundle
    from kdctl.bundle import reference_metrics
    from kdctl.export.stage import ExportOptions, export_bundle

    res = {}
    for target, art in (("cpu", "onnx-int8"), ("intel", "openvino-int8")):
        out = work / f"{bundle.name}-{target}"
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            export_bundle(bundle, ExportOptions(target=target, artifacts=[art], calibration_images=64), out=out)
        m = load_bundle(out).metrics
        res["pytorch"] = reference_metrics(m)["map50_95"]
        res[art] = next(a for a in m["artifacts"] if a["name"] == art)["metrics"]["map50_95"]
    return res


def _ultralytics_qat(seed: int, float_student: Path, teacher: Path, out: Path) -> dict:
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_backend
    from kdctl.models import resolve_model
    from kdctl.runtimes.onnxruntime import onnxruntime_backend

    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    from ultralytics import YOLO

    r = _recipe(seed, float_student, teacher, True)
    ds = load_yolo_yaml(float_student / "data.yaml")
    t = r.train
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    w = out / "student.pt"
    shutil.copy(resolve_model(str(float_student), "student", "bench").ref, w)  # bundles verified: their checkpoints
    t0 = time.perf_counter()
    teacher_pt = resolve_model(str(teacher), "teacher", "bench").ref
    YOLO(str(w)).train(data=str(ds.yaml), quantize=8, distill_model=teacher_pt, epochs=t.epochs,
                       imgsz=t.imgsz, batch=t.batch, seed=seed, optimizer=t.optimizer, lr0=t.lr0, mosaic=t.mosaic,
                       warmup_epochs=t.warmup_epochs, workers=0, device="cpu", plots=False, project=str(out),
                       name="train", exist_ok=True, verbose=False, amp=False, deterministic=True)
    train_s = time.perf_counter() - t0
    onnx = Path(YOLO(str(out / "train" / "weights" / "best.pt")).export(format="onnx", imgsz=t.imgsz))
    res = {"onnx-int8": evaluate_backend(onnxruntime_backend(onnx), ds.val_images, ds.names, t.imgsz)["map50_95"],
           "train_s": round(train_s, 1)}
    result.write_text(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench" / "clear"))
    ap.add_argument("--no-ultralytics", action="store_true")
    a = ap.parse_args()
    root = Path(a.root)
    teacher = root / "teacher"
    work = root / "qad"
    work.mkdir(parents=True, exist_ok=True)
    rows_by: dict[str, dict[int, dict]] = {}
    for seed in a.seeds:
        start = root / f"head-s{seed}"
        if not (start / "manifest.json").is_file() or not (teacher / "manifest.json").is_file():
            sys.exit(f"{start} or {teacher} missing: run `python bench/distill_families.py --families head` first")
        rows_by.setdefault("float student (start)", {})[seed] = {**_exports(start, work), "train_s": None}
        runs = (("QAD (quantize: int8 + head KD)", "distill", teacher, True, "qad"),
                ("QAT, no teacher", "train", None, True, "qat"),
                ("float KD fine-tune, then PTQ", "distill", teacher, False, "ft"))
        for label, stage, t, q, tag in runs:
            out = work / f"{tag}-s{seed}"
            train_s = _train(out, stage, _recipe(seed, start, t, q))
            rows_by.setdefault(label, {})[seed] = {**_exports(out, work), "train_s": train_s}
        if not a.no_ultralytics:
            rows_by.setdefault("Ultralytics quantize=8 + distill_model", {})[seed] = _ultralytics_qat(
                seed, start, teacher, work / f"ultralytics-s{seed}")
        (work / "results.json").write_text(json.dumps(rows_by, indent=1))

    start = rows_by["float student (start)"]
    fp32 = {s: start[s]["pytorch"] for s in start}

    def drops(name: str, key: str) -> str:
        per = rows_by[name]
        d = [100 * (fp32[s] - per[s][key]) for s in sorted(per) if per[s].get(key) is not None]
        return f"{sum(d) / len(d):+.2f} ({' / '.join(f'{x:+.2f}' for x in d)})" if d else "—"

    rows = []
    for name, per in rows_by.items():
        rows.append([name if name != "float student (start)" else "PTQ of the float student",
                     drops(name, "pytorch") if name != "float student (start)" and "Ultralytics" not in name else "—",
                     drops(name, "onnx-int8"), drops(name, "openvino-int8"),
                     round(sum(per[s]["train_s"] for s in per) / len(per), 1) if per[next(iter(per))].get("train_s")
                     else "—"])
    fp = " / ".join(f"{fp32[s]:.4f}" for s in sorted(fp32))
    body = (f"## Quantization-aware distillation vs post-training INT8\n\n{machine()}. `python bench/qad.py`: "
            f"seeds {', '.join(map(str, a.seeds))}; start = the float student head-level-distilled by recipes/head.yaml, each seed "
            f"(PyTorch FP32 mAP50-95 {fp}); teacher = the quickstart teacher. Fine-tunes: 3 epochs, AdamW lr0 "
            "3e-4, no warm-up. mAP drop in points against the start's FP32 mAP (negative = better than the float "
            "student), mean (per seed); ONNX Runtime INT8 = cpu target, OpenVINO INT8 = intel target.\n\n"
            + table(["model", "PyTorch (fake-quant for QAT)", "ONNX Runtime INT8 drop", "OpenVINO INT8 drop",
                     "fine-tune s"], rows) + "\n")
    write_section("qad", body)
    print(body)


if __name__ == "__main__":
    main()
