"""Cached vs online head-level KD: ``recipes/head.yaml`` (kd_logit + ld from the quickstart teacher)
distilled with the teacher online and from a teacher-output cache (``distill.cache``), over several seeds; the
cache's build time and size per view; and the size per view at COCO scale (80 classes, 640 px, YOLOv8n teacher).

The online runs are ``bench/ddp.py``'s one-process runs when they are there (the same recipe, seeds and code).

    python bench/teacher_cache.py --seeds 0 1 2
    python bench/teacher_cache.py --smoke          # minutes: checks the script, writes no doc
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, table, write_section  # noqa: E402
from ddp import _distill, _recipe  # noqa: E402


def _cached_recipe(seed: int, teacher: Path, smoke: bool, out: Path, cache: Path, top_k: int) -> Path:
    import yaml

    path = _recipe(seed, teacher, "cpu", smoke, out)
    d = yaml.safe_load(path.read_text())
    d["distill"]["cache"] = {"path": str(cache), "top_k": top_k}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _build(recipe: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "cache", "build", str(recipe), "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def _coco_scale(root: Path, top_k: int) -> dict:
    """Bytes per view of a cache at 640 px, 80 classes, a YOLOv8n teacher (one epoch of 16 synthetic images)."""
    import yaml

    from kdctl.data.synth import write_dataset

    data = write_dataset(root / "data80", train=16, val=4, seed=0, imgsz=640, classes=12)
    d = yaml.safe_load(data.read_text())  # the generator draws 12 kinds of object; the model predicts 80 classes
    d["names"] = {i: d["names"][i] if i < len(d["names"]) else f"class{i}" for i in range(80)}
    d.pop("nc", None)
    data.write_text(yaml.safe_dump(d, sort_keys=False))
    r = root / "coco-scale.yaml"
    r.write_text(yaml.safe_dump({
        "name": "coco-scale", "teacher": {"model": "yolov8n.yaml"}, "student": {"model": "yolov8-tiny.yaml"},
        "data": {"yolo": str(data)}, "train": {"epochs": 1, "imgsz": 640, "batch": 8, "workers": 0},
        "distill": {"cache": {"path": str(root / "cache80"), "top_k": top_k},
                    "losses": [{"name": "kd_logit"}, {"name": "ld"}]}}, sort_keys=False))
    return _build(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "train" / "quickstart-teacher")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    root = ROOT / "runs" / "bench" / ("cache-smoke" if a.smoke else "cache")
    online_root = ROOT / "runs" / "bench" / ("ddp-smoke" if a.smoke else "ddp")
    online, cached, builds = {}, {}, {}
    for s in a.seeds:
        out_o, out_c = online_root / f"one-s{s}", root / f"cached-s{s}"
        online[s] = _distill(_recipe(s, a.teacher, "cpu", a.smoke, out_o), out_o, 1)
        rc = _cached_recipe(s, a.teacher, a.smoke, out_c, root / f"cache-s{s}", a.top_k)
        builds[s] = _build(rc)
        cached[s] = _distill(rc, out_c, 1)
    big = _coco_scale(root, a.top_k)
    (root / "results.json").write_text(json.dumps({"online": online, "cached": cached, "builds": builds,
                                                   "coco_scale": big}, indent=2))

    def cell(rs, key, fmt):
        vals = [rs[s][key] for s in a.seeds]
        return f"{fmt(statistics.mean(vals))} ({' / '.join(fmt(v) for v in vals)})"

    spread = max(online[s]["map50_95"] for s in a.seeds) - min(online[s]["map50_95"] for s in a.seeds)
    diffs = [cached[s]["map50_95"] - online[s]["map50_95"] for s in a.seeds]
    train_ratio = statistics.mean(cached[s]["train_s"] / online[s]["train_s"] for s in a.seeds)
    b0 = builds[a.seeds[0]]
    rows = [["online KD", cell(online, "map50_95", lambda v: f"{v:.4f}"), cell(online, "train_s", lambda v: f"{v:.0f}"),
             "—"],
            [f"cached KD (top_k {a.top_k})", cell(cached, "map50_95", lambda v: f"{v:.4f}"),
             cell(cached, "train_s", lambda v: f"{v:.0f}"),
             f"{statistics.mean(builds[s]['build_seconds'] for s in a.seeds):.0f}"]]
    body = (f"## Teacher-output cache: cached vs online head-level KD\n\n{machine()}. `python bench/teacher_cache.py "
            f"--seeds {' '.join(map(str, a.seeds))}`: `recipes/head.yaml` (kd_logit + ld, teacher "
            f"`{a.teacher.relative_to(ROOT) if a.teacher.is_relative_to(ROOT) else a.teacher}`), online vs "
            f"`distill.cache: {{top_k: {a.top_k}}}`; train s = the training part of `kdctl distill` (the cache is "
            "built before, by `kdctl cache build`). Mean (per seed).\n\n"
            + table(["run", "mAP50-95", "train s", "cache build s"], rows)
            + f"\n\n- cached − online mAP50-95 per seed: {' / '.join(f'{d:+.4f}' for d in diffs)} (mean "
            f"{statistics.mean(diffs):+.4f}); the online runs' seed spread is {spread:.4f}: **"
            f"{'within' if abs(statistics.mean(diffs)) <= spread else 'outside'}** the seed spread.\n"
            f"- training time cached / online: {train_ratio:.2f}× (whole epochs, validation included).\n"
            f"- cache: {b0['views_per_epoch']} views × {b0['epochs']} epochs, {b0['anchors']} anchors of which "
            f"{b0['k']} kept, {b0['bytes_per_view'] / 1024:.1f} KB per view, {b0['bytes'] / 2 ** 20:.1f} MB in all, "
            f"built in {b0['build_seconds']:.0f} s (the teacher's forward passes and the augmentation of every view).\n"
            f"- at COCO scale (80 classes, 640 px, YOLOv8n teacher: {big['anchors']} anchors, {big['k']} kept): "
            f"**{big['bytes_per_view'] / 1024:.1f} KB per view** (target ≤ 100 KB), "
            f"{big['build_seconds'] / max(1, big['views_per_epoch']) * 1000:.0f} ms per view to build on this CPU.\n")
    if not a.smoke:
        write_section("teacher-cache", body)
    print(body)


if __name__ == "__main__":
    main()
