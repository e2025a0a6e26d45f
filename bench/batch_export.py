"""Batched exports on this machine: what `kdctl export --batch 8` (a static graph of 8 images) and `--dynamic` (a
free batch axis) give over the default one-image graph, per runtime, at two input sizes.

The three exports of each size are made by `kdctl export` (checked against PyTorch as always) and run by kdctl's own
runners (the ones `kdctl profile` times) on a real validation image repeated to the batch. Time per image = the
median over 5 interleaved rounds (each variant in turn, so drift on the host hits all alike) of the median of a
round's calls, divided by the images a call takes. "×" = the one-image graph's time per image over this one's, same
rounds. Needs the demo's distilled student (`make demo`), or give another train/distill bundle.

    python bench/batch_export.py [--bundle runs/distill/quickstart --sizes 128 640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, median, table, write_section  # noqa: E402

ARTIFACTS = ["onnx-fp32", "openvino-fp32", "openvino-int8"]
# (label, export options, images per timed call)
VARIANTS = (("one image (default)", {}, 1), ("--batch 8", {"batch": 8}, 8),
            ("--dynamic, 1 a call", {"dynamic": True}, 1), ("--dynamic, 8 a call", {"dynamic": True}, 8))


def _per_image_ms(run, x, calls: int) -> float:
    t = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        run(x)
        t.append((time.perf_counter_ns() - t0) / 1e6)
    return median(t) / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "distill" / "quickstart")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 640])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import numpy as np

    from kdctl.bundle import load_bundle
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.profile.stage import _open_runner
    from kdctl.limits import usable_cores

    threads = usable_cores()
    src = load_bundle(args.bundle, verify=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for imgsz in args.sizes:
            bundles = {}
            for label, extra, _ in VARIANTS:
                key = tuple(sorted(extra.items()))
                if key not in bundles:
                    opts = ExportOptions.from_recipe(None, target="intel", artifacts=ARTIFACTS, imgsz=imgsz,
                                                     calibration_images=32, eval_images=20, **extra)
                    bundles[key] = export_bundle(args.bundle, opts, out=Path(tmp) / f"{imgsz}-{len(bundles)}")
            image = load_yolo_yaml(src.file("data")).val_images[0]
            x1 = to_input([letterbox(load_rgb(image), imgsz)[0]])
            calls = 40 if imgsz <= 256 else 8
            for name in ARTIFACTS:
                runners = {}
                for label, extra, n in VARIANTS:
                    b = bundles[tuple(sorted(extra.items()))]
                    art = next(a for a in b.metrics["artifacts"] if a["name"] == name)
                    runners[label] = (_open_runner(b.path, art, threads, "cpu"), np.repeat(x1, n, axis=0))
                for run, x in runners.values():  # warm-up
                    for _ in range(3):
                        run(x)
                times = {label: [] for label in runners}
                for _ in range(args.rounds):
                    for label, (run, x) in runners.items():
                        times[label].append(_per_image_ms(run, x, calls))
                one = median(times[VARIANTS[0][0]])
                for label, _, n in VARIANTS:
                    ms = median(times[label])
                    rows.append([imgsz, name, label, n, round(ms, 3), round(1000 / ms), f"{one / ms:.2f}×"])
                    print(rows[-1], flush=True)
                del runners
    body = (f"## Batched exports: `--batch 8` and `--dynamic` against one image a call\n\n{machine()}. "
            f"Bundle {args.bundle.name} (kdctl's yolov8-tiny student), {threads} threads; time per image = median "
            f"of {args.rounds} interleaved rounds of the median call over the images a call takes; img/s = 1000 / "
            "that; \"×\" = the one-image graph's time per image over this one's (same rounds).\n\n"
            + table(["px", "artifact", "export, images a call", "images / call", "ms / image", "img/s", "×"], rows))
    write_section("batch-export", body)


if __name__ == "__main__":
    main()
