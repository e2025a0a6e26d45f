"""Step time of distillation vs plain student training, measured in one run on the same batches.

One training step = forward, loss, backward, optimizer step. The plain step uses the student alone; the distill
step adds the teacher forward (no grad), hooks and the recipe's KD terms. Interleaved rounds, medians, ratio.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import ROOT, machine, median, table, write_section  # noqa: E402


DEFAULT_RECIPE = "recipes/head.yaml"


def main(rounds: int = 15, batch: int = 8, recipe: str = DEFAULT_RECIPE) -> None:
    from ultralytics.cfg import get_cfg

    from kdctl.data.resolve import resolve_data
    from kdctl.detectors.yolo import KDDetectionModel, TeacherRef, build_criterion, build_detector
    from kdctl.distill.cache import image_crc
    from kdctl.evaluate.predict import letterbox, load_rgb, read_labels, to_input
    from kdctl.models import resolve_model
    from kdctl.recipe import load_recipe

    r = load_recipe(ROOT / recipe)
    from kdctl.distill.losses import LOSSES

    online = [s.name for s in r.distill.losses if LOSSES[s.name].kind not in ("head", "cross_head")]
    if online or not r.distill.losses:  # the cached row would time them online all the same
        raise SystemExit(f"{recipe}: times head-level terms, online and from a teacher cache; "
                         f"{', '.join(online) or 'no term'} is not one")
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
    cached = KDDetectionModel(cfg, nc=ds.nc, verbose=False)
    cached.args = get_cfg()
    cached.train()
    for m in (kd, cached):
        m.attach(teacher, build_criterion(m, teacher, r.distill.losses, r.distill.auto_balance, imgsz))
    cache_dir = Path(tempfile.mkdtemp(prefix="kdctl-step-cache-"))
    cached.cache_ref = TeacherRef(_cache_of(teacher, x, cache_dir, top_k=256))
    u8 = (x * 255).round().to(torch.uint8)
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-4) for m in (plain, kd, cached)}

    def step(m):
        t0 = time.perf_counter()
        b = data
        if m is cached:  # the view ids and image CRCs the replay loader adds (CRCs are computed per step)
            b = {**data, "kd_view": list(range(len(imgs))), "kd_crc": [image_crc(im) for im in u8]}
        loss, _ = m.loss(b)
        loss.sum().backward()
        opts[m].step()
        opts[m].zero_grad()
        return time.perf_counter() - t0

    for _ in range(3):
        step(plain), step(kd), step(cached)
    tp, tk, tc = [], [], []
    for _ in range(rounds):
        tp.append(step(plain))
        tk.append(step(kd))
        tc.append(step(cached))
    ratio, ratio_c = median(tk) / median(tp), median(tc) / median(tp)
    shutil.rmtree(cache_dir, ignore_errors=True)
    title = "" if recipe == DEFAULT_RECIPE else f" ({Path(recipe).stem})"
    body = (f"## Distillation step time{title}\n\n{machine()}. `{recipe}` losses "
            f"({', '.join(s.name for s in r.distill.losses)}), teacher YOLOv8n, student {Path(cfg).name}, batch {batch}, "
            f"{imgsz} px, {rounds} interleaved rounds after 3 warm-up rounds. The cached step reads the teacher's head "
            "outputs (top 256 anchors per view) from a memory-mapped teacher cache and computes the view CRCs; the "
            "teacher does not run.\n\n"
            + table(["step", "median ms", "min ms", "max ms"],
                    [["plain student", median(tp) * 1e3, min(tp) * 1e3, max(tp) * 1e3],
                     ["student + teacher + KD (online)", median(tk) * 1e3, min(tk) * 1e3, max(tk) * 1e3],
                     ["student + cached teacher + KD", median(tc) * 1e3, min(tc) * 1e3, max(tc) * 1e3]])
            + f"\n\nDistillation / plain step time (ratio of medians, one run): online **{ratio:.2f}×**, "
            f"cached **{ratio_c:.2f}×**.\n")
    write_section("step-time" if recipe == DEFAULT_RECIPE else f"step-time-{Path(recipe).stem}", body)
    print(body)


def _cache_of(teacher, x, path: Path, top_k: int):
    """A one-epoch teacher cache of batch ``x`` (views 0..B-1), written as ``kdctl.distill.cache.build`` writes it."""
    import json

    import numpy as np

    from kdctl.detectors.yolo import teacher_forward
    from kdctl.distill.cache import DIGEST, TeacherCache, _file_digests, image_crc, top_k_rows
    from kdctl.distill.taps import FeatureTaps, head_outputs

    head = len(teacher.model) - 1
    with torch.no_grad(), FeatureTaps(teacher, [head]) as taps:
        teacher_forward(teacher, x)
    h = head_outputs(taps.outputs[head])
    rows = top_k_rows(h["scores"], h["boxes"], top_k)
    shard = path / "epoch-0000"
    shard.mkdir(parents=True)
    for f in ("scores", "boxes", "rest"):
        np.save(shard / f"{f}.npy", rows[f].numpy().astype(np.float16))
    np.save(shard / "anchors.npy", rows["anchors"].numpy())
    u8 = (x * 255).round().to(torch.uint8)
    np.save(shard / "crc.npy", np.array([image_crc(im) for im in u8], dtype=np.uint32))
    (shard / DIGEST).write_text(json.dumps(_file_digests(shard)))  # what a reader verifies each shard against
    (path / "meta.json").write_text(json.dumps({"views_per_epoch": len(x), "anchors": h["scores"].shape[2],
                                                "head_layer": head, "complete": True}))
    return TeacherCache(path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help="the KD terms to time (a recipe path; default "
                    f"{DEFAULT_RECIPE}); another recipe writes its own section, step-time-<recipe name>")
    main(recipe=ap.parse_args().recipe)
