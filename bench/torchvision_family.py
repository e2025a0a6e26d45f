"""torchvision Faster R-CNN on the built-in data: the baseline mAP of ``recipes/fasterrcnn-student.yaml`` (CPU, a
reduced number of epochs by default) and the p50 latency of kdctl's exports next to torchvision's own ONNX export
of the same weights (``torch.onnx.export`` of the model as torchvision documents it), measured in one run.

    python bench/torchvision_family.py [--epochs 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, finished_or_trained, machine, median, table, write_section  # noqa: E402


def torchvision_onnx(model, example, path: Path) -> Path:
    """torchvision's documented export: the bare model, a list of images in, boxes/labels/scores out (traced on the
    same real image as kdctl's, since a blank one yields degenerate proposal counts)."""
    import copy

    import torch

    net = copy.deepcopy(model.net).eval()
    x = [torch.from_numpy(example[0])]
    torch.onnx.export(net, (x,), str(path), opset_version=17, input_names=["images"],
                      output_names=["boxes", "labels", "scores"], dynamo=False)
    return path


def dense_from_lists(session, nc: int, k: int = 100):
    """Run torchvision's ONNX (one image) and lay its detections out as kdctl's dense output, for the evaluator."""
    import numpy as np

    name = session.get_inputs()[0].name

    def run(x):
        out = np.zeros((1, 4 + nc, k), np.float32)
        try:
            boxes, labels, scores = session.run(None, {name: x[0]})
        except Exception:  # noqa: BLE001 - counted and reported: the graph cannot run this image
            run.failures += 1
            return out
        n = min(len(scores), k)
        b = boxes[:n]
        out[0, :4, :n] = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                   b[:, 3] - b[:, 1]])
        out[0, 4 + (labels[:n] - 1).clip(0, nc - 1), np.arange(n)] = scores[:n]
        return out

    run.fixed_batch = 1
    run.failures = 0
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default="runs/bench/fasterrcnn-student")
    a = ap.parse_args()

    import os

    import onnxruntime as ort

    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors import load_detector
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.runtimes.onnxruntime import onnxruntime_backend
    from kdctl.runtimes.openvino import openvino_backend
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.recipe import load_recipe

    out = ROOT / a.out
    r = load_recipe(ROOT / "recipes" / "fasterrcnn-student.yaml")
    d = r.model_dump()
    d["train"]["epochs"] = a.epochs
    recipe = type(r).model_validate(d)
    b = finished_or_trained(out, recipe, "train", "bench")  # a killed run's leftover work folder is discarded
    ds = load_yolo_yaml(b.file("data"))
    imgsz = int(b.metrics["imgsz"])
    threads = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="kdctl-frcnn-"))
    runners, precision, maps = {}, {}, {}
    for target, arts in (("cpu", ["onnx-fp32", "onnx-int8"]), ("intel", ["openvino-fp32", "openvino-int8"])):
        e = export_bundle(out, ExportOptions(target=target, artifacts=arts, calibration_images=64), out=work / target)
        for art in e.metrics["artifacts"]:
            path = e.path / art["files"][0]
            name = f"kdctl {art['name']}"
            runners[name] = (onnxruntime_backend(path, threads=threads) if art["format"] == "onnx" else
                             openvino_backend(path, art["precision"], threads=threads,
                                              hint=art["runtime"].get("requested_precision")))
            precision[name] = art["runtime"].get("inference_precision")
    model = load_detector(b.file("weights"))
    runners["pytorch fp32"], precision["pytorch fp32"] = torch_backend(model), "fp32"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 4  # its failures on images without proposals are counted, not logged per image
    x = to_input([letterbox(load_rgb(ds.val_images[0]), imgsz)[0]])
    tv = torchvision_onnx(model, x, work / "torchvision.onnx")
    runners["torchvision onnx"] = dense_from_lists(ort.InferenceSession(str(tv), so, providers=["CPUExecutionProvider"]),
                                                   len(ds.names))
    precision["torchvision onnx"] = "fp32 (ORT)"

    samples = {n: [] for n in runners}
    for r in runners.values():
        for _ in range(3):
            r(x)
    for _ in range(a.rounds):
        for n, r in runners.items():
            for _ in range(a.per_round):
                t0 = time.perf_counter_ns()
                r(x)
                samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    for n, r in runners.items():
        maps[n] = evaluate_backend(r, ds.val_images, ds.names, imgsz, batch=1)["map50_95"]
    failed = runners["torchvision onnx"].failures
    p50 = {n: median(s) for n, s in samples.items()}
    ref = p50["torchvision onnx"]
    rows = [[n, precision[n], round(p50[n], 2), round(maps[n], 4), f"{p50[n] / ref:.2f}"] for n in runners]
    body = (f"## torchvision Faster R-CNN on the built-in data\n\n{machine()}. `python bench/torchvision_family.py`: "
            f"`recipes/fasterrcnn-student.yaml` (MobileNetV3-Large 320 FPN, no pretrained weights) trained "
            f"{b.metrics['epochs'][-1]['epoch']} epochs on CPU ({b.metrics['train_seconds']:.0f} s), mAP50-95 "
            f"{b.metrics['map50_95']:.4f}. Batch 1, {threads} threads, p50 of {a.rounds}×{a.per_round} interleaved "
            f"runs, one process; 'torchvision onnx' is `torch.onnx.export` of the bare model (its list outputs laid "
            "out as kdctl's dense output for the evaluator, outside the timed call's graph). "
            f"torchvision's own ONNX could not run {failed} of the {len(ds.val_images)} validation images "
            "(those without a region proposal: its traced `reshape(0, -1)` fails) and counts them as no detections; "
            "kdctl's export runs them all.\n\n"
            + table(["artifact", "runs as", "p50 ms", "mAP50-95", "p50 / torchvision onnx"], rows) + "\n")
    write_section("torchvision-family", body)
    print(body)


if __name__ == "__main__":
    main()
