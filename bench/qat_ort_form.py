"""A quantization-aware student in ONNX Runtime: the trained Q/DQ graph as ModelOpt exports it (each convolution's
input quantized, its output and SiLU in float) against ONNX Runtime's form of it (`kdctl export`'s since
2026-12-06: the trained ranges fixed, what training left in float calibrated, so the CPU kernels fuse integer
convolutions), beside the float student's FP32 and post-training INT8. ONNX Runtime p50 (median of 5 interleaved
repeats of 60 runs), batch 1, at the training size and at 640 px (same weights; mAP only at the training size).
Needs runs/distill/quickstart (from `make demo`); makes runs/distill/quickstart-qad with recipes/quickstart-qad.yaml
when it is missing.

    python bench/qat_ort_form.py [--qat runs/distill/quickstart-qad] [--sizes 128 640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, ort_p50s, table, write_section  # noqa: E402


def forms(qat, float_model, imgsz: int, calib: Sequence, work: Path) -> dict[str, Path]:
    """The four ONNX graphs at ``imgsz``: float FP32 and PTQ INT8 of the float student, the QAT student's trained
    graph as exported and ONNX Runtime's form of it."""
    import onnx

    from kdctl.detectors import yolo
    from kdctl.export.onnx import export_onnx
    from kdctl.export.quantize import (fold_weight_quantizers, quantize_onnx_int8, quantize_qat_onnxruntime,
                                       to_uint8_activations)

    out = {"float student, FP32": export_onnx(float_model, work / f"fp32-{imgsz}.onnx", imgsz, opset=17)}
    out["float student, post-training INT8"] = work / f"ptq-{imgsz}.onnx"
    quantize_onnx_int8(out["float student, FP32"], out["float student, post-training INT8"], calib,
                       lambda nodes: yolo.float_tail(nodes, float_model))
    exported = export_onnx(qat, work / f"qat-{imgsz}.onnx", imgsz, opset=17)
    trained = onnx.load(str(exported))
    before = onnx.load(str(exported))
    fold_weight_quantizers(before)
    to_uint8_activations(before)
    out["QAT student, trained graph as exported (before)"] = work / f"qat-before-{imgsz}.onnx"
    onnx.save(before, str(out["QAT student, trained graph as exported (before)"]))
    out["QAT student, ONNX Runtime's form (kdctl export now)"] = work / f"qat-ort-{imgsz}.onnx"
    quantize_qat_onnxruntime(trained, out["QAT student, ONNX Runtime's form (kdctl export now)"], calib,
                             lambda nodes: yolo.float_tail(nodes, qat))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qat", type=Path, default=ROOT / "runs" / "distill" / "quickstart-qad")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 640])
    args = ap.parse_args()

    from kdctl.bundle import load_bundle
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.export.stage import _Inputs, _spread
    from kdctl.models import load_bundle_weights
    from kdctl.runtimes.onnxruntime import onnxruntime_backend

    if not (args.qat / "manifest.json").is_file():
        from kdctl.recipe import load_recipe
        from kdctl.training import run_training

        run_training(load_recipe(ROOT / "recipes" / "quickstart-qad.yaml"), stage="distill", out=args.qat)
    src = load_bundle(args.qat, verify=True)
    start = load_bundle(ROOT / src.recipe["student"]["model"], verify=True)  # ROOT / an absolute path: that path
    ds = load_yolo_yaml(src.file("data"))
    trained_at = int(src.metrics["imgsz"])
    qat, float_model = load_bundle_weights(src), load_bundle_weights(start)
    work = Path(tempfile.mkdtemp(prefix="kdctl-qat-ort-"))
    rows = []
    for imgsz in args.sizes:
        calib = _Inputs(_spread(ds.train_images, 64), imgsz)
        paths = forms(qat, float_model, imgsz, calib, work)
        lat = ort_p50s(paths, _Inputs(ds.val_images[:1], imgsz)[0])
        fp32 = lat["float student, FP32"]
        for k, p in paths.items():
            m = (f"{evaluate_backend(onnxruntime_backend(p), ds.val_images, ds.names, imgsz)['map50_95']:.4f}"
                 if imgsz == trained_at else "")
            rows.append([imgsz, k, f"{lat[k]:.3f}", f"{lat[k] / fp32:.2f}", m])
    ref = evaluate_backend(torch_backend(qat), ds.val_images, ds.names, trained_at)["map50_95"]
    body = "\n".join([
        "## A quantization-aware student in ONNX Runtime: the trained graph vs ONNX Runtime's form", "",
        f"Machine: {machine()}. `python bench/qat_ort_form.py`: {src.path.name} (recipes/quickstart-qad.yaml: 3 "
        f"epochs of QAD from {start.path.name}) and its float start, ONNX Runtime CPU, batch 1, 64 calibration "
        "images (MinMax) for post-training INT8 and for the tensors training left in float; p50 = median of 5 "
        f"interleaved repeats of 60 runs. mAP50-95 on the {len(ds.val_images)} validation images at the training "
        f"size ({trained_at} px); the fake-quantized PyTorch student: {ref:.4f}.", "",
        table(["px", "graph", "ORT p50 ms", "vs FP32", "mAP50-95"], rows),
    ])
    write_section("qat-ort-form", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
