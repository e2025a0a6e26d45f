"""The two Q/DQ INT8 forms kdctl exports, on the same FP32 ONNX and calibration images: ONNX Runtime's
(uint8 activations with zero points, int32 biases; the cpu/rpi presets) and TensorRT's (symmetric int8, zero points
0, float biases; the jetson presets). ONNX Runtime p50 (median of 5 repeats of 60 runs), mAP50-95, and whether
TensorRT's explicit-quantization rules hold. Needs runs/train/quickstart-student (from `make demo`).

    python bench/int8_forms.py [--bundle runs/train/quickstart-student]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, ort_p50s, write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "train" / "quickstart-student")
    args = ap.parse_args()

    from kdctl.bundle import load_bundle
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors import yolo
    from kdctl.evaluate import evaluate_backend
    from kdctl.export.onnx import export_onnx
    from kdctl.runtimes.onnxruntime import onnxruntime_backend
    from kdctl.export.quantize import quantize_onnx_int8, tensorrt_qdq_problems
    from kdctl.export.stage import _Inputs, _spread
    from kdctl.models import load_bundle_weights

    src = load_bundle(args.bundle, verify=True)
    ds = load_yolo_yaml(src.file("data"))
    imgsz = int(src.metrics["imgsz"])
    model = load_bundle_weights(src)
    work = Path(tempfile.mkdtemp(prefix="kdctl-int8-"))
    fp32 = export_onnx(model, work / "fp32.onnx", imgsz, opset=17)
    calib = _Inputs(_spread(ds.train_images, 64), imgsz)
    paths = {"fp32": fp32}
    for scheme in ("onnxruntime", "tensorrt"):
        paths[scheme] = work / f"{scheme}.onnx"
        quantize_onnx_int8(fp32, paths[scheme], calib, lambda nodes: yolo.float_tail(nodes, model), method="minmax",
                           scheme=scheme)
    x = _Inputs(ds.val_images[:1], imgsz)[0]
    p50 = ort_p50s(paths, x)
    rows = []
    for k, p in paths.items():
        m = evaluate_backend(onnxruntime_backend(p), ds.val_images, ds.names, imgsz)["map50_95"]
        rules = "n/a (float)" if k == "fp32" else ("met" if not tensorrt_qdq_problems(p) else "broken")
        rows.append(f"| {k} | {p50[k]:.3f} | {p50[k] / p50['fp32']:.2f} | {m:.4f} | {rules} |")
    body = "\n".join([
        "## INT8 forms: ONNX Runtime's vs TensorRT's Q/DQ", "",
        f"Machine: {machine()}. `python bench/int8_forms.py`: {src.path.name} at {imgsz} px, 64 calibration images "
        "(MinMax), ONNX Runtime CPU, batch 1; p50 = median of 5 interleaved repeats of 60 runs.", "",
        "| form | ORT p50 ms | vs FP32 | mAP50-95 | TensorRT Q/DQ rules |", "|---|---|---|---|---|", *rows, "",
        "The cpu/rpi presets export ONNX Runtime's form; TensorRT targets export TensorRT's (the only form its "
        "explicit quantization accepts), which ONNX Runtime still runs for the parity and mAP checks.",
    ])
    write_section("int8-forms", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
