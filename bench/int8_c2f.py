"""Does a different graph for YOLO's C2f blocks make OpenVINO INT8 faster? The lead from the export benchmark
(OpenVINO's per-op counters put C2f's Split/Concat and their layout reorders at ~7 % of the INT8 time).

Same weights, calibration images and NNCF settings as `kdctl export --target intel`; three graphs:
- as exported: ``cv1`` → Split → bottlenecks → Concat → ``cv2`` (Ultralytics' C2f);
- no Split: ``cv1`` as two convolutions with half the output channels each (same arithmetic);
- no Split, no Concat: also ``cv2`` as a sum of 1×1 convolutions, one per chunk (same arithmetic up to float
  summation order).
p50 of interleaved rounds in one process, OpenVINO INT8 (bf16 hint, 2 threads), and the FP32 output difference
against the exported graph (checks the rewrite keeps the model). Needs runs/bench/large640 (`bench/export_latency.py`).

    python bench/int8_c2f.py [--bundle runs/bench/large640 --imgsz 640]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, median, table, write_section  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _half(conv: nn.Conv2d, lo: int, hi: int) -> nn.Conv2d:
    c = nn.Conv2d(conv.in_channels, hi - lo, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    c.weight.data = conv.weight.data[lo:hi].clone()
    c.bias.data = conv.bias.data[lo:hi].clone()
    return c


class C2fRewritten(nn.Module):
    """A (BatchNorm-folded) C2f with ``cv1`` split into two convolutions and, with ``no_concat``, ``cv2`` applied as
    a sum of per-chunk 1×1 convolutions."""

    def __init__(self, block: nn.Module, no_concat: bool):
        super().__init__()
        c = block.c
        self.a, self.b = copy.deepcopy(block.cv1), copy.deepcopy(block.cv1)
        self.a.conv, self.b.conv = _half(block.cv1.conv, 0, c), _half(block.cv1.conv, c, 2 * c)
        self.m, self.cv2, self.no_concat = block.m, block.cv2, no_concat
        for attr in ("f", "i", "type", "np"):  # Ultralytics' layer bookkeeping, read by its forward loop
            setattr(self, attr, getattr(block, attr))
        if no_concat:
            w = block.cv2.conv.weight.data
            self.parts = nn.ModuleList(nn.Conv2d(c, w.shape[0], 1, bias=i == 0) for i in range(w.shape[1] // c))
            for i, p in enumerate(self.parts):
                p.weight.data = w[:, i * c:(i + 1) * c].clone()
            self.parts[0].bias.data = block.cv2.conv.bias.data.clone()

    def forward(self, x):
        y = [self.a(x), self.b(x)]
        y.extend(m(y[-1]) for m in self.m)
        if not self.no_concat:
            return self.cv2(torch.cat(y, 1))
        s = self.parts[0](y[0])
        for p, t in zip(self.parts[1:], y[1:]):
            s = s + p(t)
        return self.cv2.act(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "bench" / "large640")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=25)
    a = ap.parse_args()

    from ultralytics.nn.modules.block import C2f

    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.detectors import export_module, float_tail, load_detector
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input
    from kdctl.export.openvino import quantize_openvino_int8
    from kdctl.runtimes.openvino import openvino_backend

    model = load_detector(a.bundle / "weights.pt")
    ds = load_yolo_yaml(a.bundle / "data.yaml")
    calib = [to_input([letterbox(load_rgb(p), a.imgsz)[0]]) for p in ds.train_images[:a.calib]]
    x = to_input([letterbox(load_rgb(ds.val_images[0]), a.imgsz)[0]])
    work = Path(tempfile.mkdtemp(prefix="kdctl-c2f-"))
    variants = {"as exported (Split, Concat)": None, "no Split": False, "no Split, no Concat": True}
    runners, diff, ref = {}, {}, None
    for label, no_concat in variants.items():
        m, example = export_module(model, a.imgsz, 1, fmt="openvino")
        if no_concat is not None:
            for i, layer in enumerate(m.model):
                if type(layer) is C2f:
                    m.model[i] = C2fRewritten(layer, no_concat)
        with torch.no_grad():
            y = m(torch.from_numpy(x))
            y = (y[0] if isinstance(y, tuple) else y).numpy()
        ref = y if ref is None else ref
        diff[label] = float(abs(y - ref).max())
        d = work / f"v{len(runners)}"
        quantize_openvino_int8((m, example, False), d, calib, lambda nodes: float_tail(nodes, model))
        runners[label] = openvino_backend(d / "model.xml", "int8", threads=2, hint="bf16")
    samples = {k: [] for k in runners}
    for r in runners.values():
        for _ in range(10):
            r(x)
    for _ in range(a.rounds):  # interleaved, so drift hits every graph alike
        for k, r in runners.items():
            for _ in range(a.per_round):
                t0 = time.perf_counter_ns()
                r(x)
                samples[k].append((time.perf_counter_ns() - t0) / 1e6)
    base = median(next(iter(samples.values())))
    rows = [[k, round(median(s), 2), f"{median(s) / base:.3f}", f"{diff[k]:.1e}"] for k, s in samples.items()]
    body = (f"## INT8 graph variants of C2f (OpenVINO)\n\n{machine()}. `python bench/int8_c2f.py`: "
            f"{a.bundle.name} at {a.imgsz} px, OpenVINO INT8 by NNCF ({a.calib} calibration images, the intel "
            f"target's settings), bf16 hint, 2 threads, batch 1; p50 of {a.rounds}×{a.per_round} interleaved runs in "
            f"one process.\n\n"
            + table(["C2f graph", "p50 ms", "vs as exported", "max |Δ| FP32 output"], rows) + "\n")
    write_section("int8-c2f", body)
    print(body)


if __name__ == "__main__":
    main()
