"""TensorRT on a GPU, in one command: FP16 and INT8 engines from kdctl's Jetson export (Python API and trtexec),
timed by kdctl (CUDA events, GPU compute) and by trtexec (its GPU Compute Time), mAP checked; results go to
docs/benchmarks.md with the GPU's name and TensorRT version. Target: kdctl's compute p50 within 5 % of trtexec's.

    python bench/tensorrt_gpu.py [--bundle runs/train/quickstart-student] [--runs 500]

Without a bundle it trains a small student on the built-in data first (a few epochs on the GPU). It also
fine-tunes that student for 2 epochs with quantization-aware training and builds an INT8 engine from its own Q/DQ
graph (``--no-qat`` skips it). Needs the ``tensorrt`` and ``cuda-python`` packages; trtexec is optional (its
column is then empty). Exits 2 with one line when there is no GPU or no TensorRT, so it can be run blind on any
machine.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, write_section  # noqa: E402


def _student(work: Path) -> Path:
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    r = work / "student.yaml"
    r.write_text("name: trt-bench\nstudent: {model: yolov8-tiny.yaml}\n"
                 "data: {synthetic: {train: 400, val: 100, imgsz: 320, classes: 6, seed: 0}}\n"
                 "train: {epochs: 10, imgsz: 320, batch: 32, device: '0'}\n")
    return run_training(load_recipe(r), stage="train", out=work / "student").path


def _qat_student(work: Path, src: Path) -> Path:
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    r = work / "qat.yaml"
    r.write_text(f"name: trt-bench-qat\nstudent: {{model: {src}}}\n"
                 f"data: {{yolo: {src / 'data.yaml'}}}\n"
                 "train: {epochs: 2, imgsz: 320, batch: 32, device: '0', lr0: 0.0003, optimizer: AdamW, "
                 "warmup_epochs: 0}\ndistill: {quantize: int8}\n")
    return run_training(load_recipe(r), stage="train", out=work / "student-qat").path


def _trtexec(engine: Path, runs: int, graph: bool) -> float | None:
    exe = shutil.which("trtexec") or ("/usr/src/tensorrt/bin/trtexec" if Path("/usr/src/tensorrt/bin/trtexec").exists()
                                      else None)
    if exe is None:
        return None
    cmd = [exe, f"--loadEngine={engine}", f"--iterations={runs}", "--warmUp=500", "--avgRuns=1"]
    if graph:
        cmd.append("--useCudaGraph")
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(r"GPU Compute Time: .*?median = ([\d.]+) ms", out)
    return float(m.group(1)) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a train/distill bundle (default: train one here)")
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--no-qat", action="store_true", help="skip the quantization-aware trained INT8 engine")
    args = ap.parse_args()

    from kdctl.runtimes.tensorrt import tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        print(f"tensorrt_gpu: {why}", file=sys.stderr)
        return 2
    import tensorrt as trt

    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_backend
    from kdctl.bundle import reference_metrics
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.export.tensorrt import build_engine
    from kdctl.runtimes.tensorrt import TensorRTRunner

    work = Path(tempfile.mkdtemp(prefix="kdctl-trt-"))
    src = args.bundle or _student(work)
    exp = export_bundle(src, ExportOptions(target="jetson", artifacts=["onnx-fp32", "onnx-fp16", "onnx-int8"]),
                        out=work / "export")
    ds = load_yolo_yaml(exp.manifest["inputs"]["data"]["yaml"])
    imgsz = int(exp.metrics["imgsz"])
    ref = reference_metrics(exp.metrics)["map50_95"]
    rows, ratios, device = [], [], ""
    import numpy as np

    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    engines = [("fp16", exp.path / ("model-fp16.onnx" if info_typed(trt) else "model-fp32.onnx")),
               ("int8", exp.path / "model-int8.onnx")]
    if not args.no_qat:  # the same student after 2 epochs of quantization-aware training: its own Q/DQ graph
        qat = export_bundle(_qat_student(work, src), ExportOptions(target="jetson", artifacts=["onnx-int8"]),
                            out=work / "export-qat")
        engines.append(("int8 (QAT)", qat.path / "model-int8.onnx"))
    for prec, onnx in engines:
        engine = work / f"model-{prec.split()[0]}{'-qat' if 'QAT' in prec else ''}.engine"
        info = build_engine(onnx, engine, prec.split()[0])
        for graph in (False, True):
            run = TensorRTRunner(engine, cuda_graph=graph)
            device = run.info["device"]
            for _ in range(200):
                run(x)
            parts = {"h2d": [], "compute": [], "d2h": []}
            for _ in range(args.runs):
                run(x)
                for k in parts:
                    parts[k].append(run.last_ms[k])
            mine = median(parts["compute"])
            theirs = _trtexec(engine, args.runs, graph)
            m = evaluate_backend(run, ds.val_images, ds.names, imgsz)["map50_95"] if not graph else None
            ratio = mine / theirs if theirs else None
            if ratio:
                ratios.append(ratio)
            rows.append(f"| {prec} | {'yes' if graph else 'no'} | {info['strongly_typed']} | {mine:.3f} | "
                        f"{median(parts['h2d']):.3f} | {median(parts['d2h']):.3f} | "
                        f"{'—' if theirs is None else f'{theirs:.3f}'} | {'—' if ratio is None else f'{ratio:.3f}'} | "
                        f"{'' if m is None else f'{m:.4f} ({(m - ref) * 100:+.2f} pts)'} |")
            run.close()
    body = [f"## TensorRT on {device} (TensorRT {trt.__version__})", "",
            f"`python bench/tensorrt_gpu.py`, {args.runs} timed runs after 200 warm-up, batch 1, {imgsz} px; "
            f"PyTorch FP32 mAP50-95 {ref:.4f}.", "",
            "| engine | CUDA graph | strongly typed | kdctl compute p50 ms | H2D p50 | D2H p50 | trtexec GPU compute "
            "median ms | kdctl / trtexec | mAP50-95 (vs PyTorch) |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if ratios:
        worst = max(abs(r - 1) for r in ratios)
        body.append(f"Largest |kdctl/trtexec - 1|: {worst:.3f} (target: within 0.05: {'met' if worst <= 0.05 else 'NOT met'}).")
    write_section("tensorrt-gpu", "\n".join(body))
    print("\n".join(body))
    return 0


def info_typed(trt) -> bool:
    from kdctl.export.tensorrt import strongly_typed, tensorrt_version

    return strongly_typed(tensorrt_version(trt.__version__))


if __name__ == "__main__":
    raise SystemExit(main())
