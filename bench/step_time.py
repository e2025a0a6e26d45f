"""Step time of distillation vs plain student training, measured in one run on the same batches.

One training step = forward, loss, backward, optimizer step. The plain step uses the student alone; the distill
step adds the teacher forward (no grad), hooks and the recipe's KD terms. Interleaved rounds, medians, ratio.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import ROOT, machine, median, table, write_section  # noqa: E402


def main(rounds: int = 15, batch: int = 8, recipe: str = "recipes/quickstart.yaml") -> None:
    from ultralytics.cfg import get_cfg

    from kdctl.data.resolve import resolve_data
    from kdctl.detectors.yolo import KDDetectionModel, build_criterion, build_detector
    from kdctl.evaluate.predict import letterbox, load_rgb, read_labels, to_input
    from kdctl.models import resolve_model
    from kdctl.recipe import load_recipe

    r = load_recipe(ROOT / recipe)
    ds = resolve_data(r.data)
    imgsz = r.train.imgsz
    imgs = ds.train_images[:batch]
    x = torch.from_numpy(to_input([letterbox(load_rgb(p), imgsz)[0] for p in imgs]))
    cls, boxes, idx = [], [], []
    for i, p in enumerate(imgs):
        g = read_labels(p, (imgsz, imgsz))
        for c, b in zip(g.classes, g.boxes / imgsz):
            cls.append([float(c)]), idx.append(float(i))
            boxes.append([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]])
    data = {"img": x, "cls": torch.tensor(cls), "bboxes": torch.tensor(boxes, dtype=torch.float32),
            "batch_idx": torch.tensor(idx)}
    cfg = resolve_model(r.student.model, "student.model", recipe).ref
    teacher = build_detector("yolov8n.yaml", ds.nc).eval()
    plain = KDDetectionModel(cfg, nc=ds.nc, verbose=False)
    kd = KDDetectionModel(cfg, nc=ds.nc, verbose=False)
    for m in (plain, kd):
        m.args = get_cfg()
        m.train()
    kd.attach(teacher, build_criterion(kd, teacher, r.distill.losses, r.distill.auto_balance, imgsz))
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-4) for m in (plain, kd)}

    def step(m):
        t0 = time.perf_counter()
        loss, _ = m.loss(data)
        loss.sum().backward()
        opts[m].step()
        opts[m].zero_grad()
        return time.perf_counter() - t0

    for _ in range(3):
        step(plain), step(kd)
    tp, tk = [], []
    for _ in range(rounds):
        tp.append(step(plain))
        tk.append(step(kd))
    ratio = median(tk) / median(tp)
    body = (f"## Distillation step time\n\n{machine()}. `{recipe}` losses "
            f"({', '.join(s.name for s in r.distill.losses)}), teacher YOLOv8n, student {Path(cfg).name}, batch {batch}, "
            f"{imgsz} px, {rounds} interleaved rounds after 3 warm-up rounds.\n\n"
            + table(["step", "median ms", "min ms", "max ms"],
                    [["plain student", median(tp) * 1e3, min(tp) * 1e3, max(tp) * 1e3],
                     ["student + teacher + KD", median(tk) * 1e3, min(tk) * 1e3, max(tk) * 1e3]])
            + f"\n\nDistillation / plain step time: **{ratio:.2f}×** (ratio of medians, one run).\n")
    write_section("step-time", body)
    print(body)


if __name__ == "__main__":
    main()
