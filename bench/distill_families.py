"""Distillation benchmark on the built-in synthetic data: teacher, baseline student, Ultralytics' built-in
``distill_model=`` KD, and the student distilled with each kdctl loss family, over several seeds.

Same data (seed 0), epochs, student and training settings for every run; only train.seed changes. Reports COCO
mAP50-95 (kdctl's evaluator) and "gap closed" = (student_KD − student_base) / (teacher − student_base).
Takes about 25 minutes per seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, table, write_section  # noqa: E402

# Settings tried before the shipped ones, kept in the table: label -> bundle prefix under --root.
TRIED = {"distill-cwd at auto_balance 0.25 (tried)": "tried-cwd-b025",
         "distill-mgd at auto_balance 0.25 (tried)": "tried-mgd-b025",
         "distill-fgd at auto_balance 0.25 (tried)": "tried-fgd-b025",
         "neck-head with CWD at full weight (tried)": "tried-neck-head-w1"}

FAMILIES = ["distill-fitnet", "distill-at", "distill-cwd", "distill-mgd", "distill-fgd", "distill-pkd",
            "distill-kd-logit", "distill-ld", "head", "neck-head", "backbone-head"]


def _recipe(name: str, seed: int, teacher: Path | None):
    from kdctl.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    d = r.model_dump()
    d["train"]["seed"] = seed
    if teacher is not None and d.get("teacher"):
        d["teacher"]["model"] = str(teacher)
    return type(r).model_validate(d)


def run_kdctl(name: str, stage: str, seed: int, teacher: Path | None, out: Path) -> dict:
    from kdctl.bundle import load_bundle
    from kdctl.training import run_training

    if not (out / "manifest.json").is_file():
        shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
        run_training(_recipe(name, seed, teacher), stage=stage, source=name, out=out)
    m = load_bundle(out).metrics
    return {"map50_95": m["map50_95"], "train_s": m["train_seconds"]}


def run_ultralytics_kd(seed: int, teacher: Path, out: Path) -> dict:
    """Ultralytics' own KD (neck-level, score-weighted L2, dis=6.0), same settings, evaluated by kdctl."""
    from kdctl.data.resolve import resolve_data
    from kdctl.distill.ultralytics import load_detector
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.models import resolve_model

    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    r = _recipe("quickstart", seed, teacher)
    ds = resolve_data(r.data)
    from ultralytics import YOLO

    t = r.train
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    YOLO(resolve_model(r.student.model, "student", "bench").ref).train(
        data=str(ds.yaml), distill_model=str(teacher / "weights.pt"), dis=6.0, epochs=t.epochs, imgsz=t.imgsz,
        batch=t.batch, seed=seed, optimizer=t.optimizer, lr0=t.lr0, mosaic=t.mosaic, warmup_epochs=t.warmup_epochs,
        close_mosaic=t.close_mosaic, workers=0, device="cpu", plots=False, project=str(out.parent), name=out.name,
        exist_ok=True, verbose=False, amp=False, deterministic=True)
    train_s = time.perf_counter() - t0
    model = load_detector(out / "weights" / "best.pt")
    model = getattr(model, "student_model", model)
    res = {"map50_95": evaluate_backend(torch_backend(model), ds.val_images, ds.names, t.imgsz)["map50_95"],
           "train_s": round(train_s, 1)}
    result.write_text(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"))
    a = ap.parse_args()
    root = Path(a.root)
    teacher = root / "teacher"
    res: dict[str, dict[int, dict]] = {}
    res["teacher"] = {0: run_kdctl("quickstart-teacher", "train", 0, None, teacher)}
    for seed in a.seeds:
        res.setdefault("baseline student", {})[seed] = run_kdctl("quickstart-student", "train", seed, None,
                                                                  root / f"base-s{seed}")
        res.setdefault("ultralytics distill_model (dis=6)", {})[seed] = run_ultralytics_kd(seed, teacher,
                                                                                         root / f"ultralytics-s{seed}")
        for fam in a.families:
            res.setdefault(fam, {})[seed] = run_kdctl(fam, "distill", seed, teacher, root / f"{fam}-s{seed}")
        (root / "results.json").write_text(json.dumps(res, indent=1))
    from kdctl.bundle import load_bundle

    for label, prefix in TRIED.items():
        for seed in a.seeds:
            d = root / f"{prefix}-s{seed}"
            if (d / "manifest.json").is_file():
                m = load_bundle(d).metrics
                res.setdefault(label, {})[seed] = {"map50_95": m["map50_95"], "train_s": m["train_seconds"]}

    t_map = res["teacher"][0]["map50_95"]
    base = res["baseline student"]
    rows = []
    for name, per_seed in res.items():
        maps = [per_seed[s]["map50_95"] for s in sorted(per_seed)]
        mean = sum(maps) / len(maps)
        gaps = [(per_seed[s]["map50_95"] - base[s]["map50_95"]) / (t_map - base[s]["map50_95"])
                for s in sorted(per_seed) if s in base and name not in ("teacher", "baseline student")]
        rows.append([name, " / ".join(f"{m:.4f}" for m in maps), round(mean, 4),
                     round((max(maps) - min(maps)) / 2, 4) if len(maps) > 1 else "",
                     f"{100 * sum(gaps) / len(gaps):.0f} % ({' / '.join(f'{100 * g:.0f}' for g in gaps)})" if gaps else "",
                     round(sum(per_seed[s]["train_s"] for s in per_seed) / len(per_seed), 1)])
    body = (f"## Distillation: loss families vs Ultralytics' built-in KD\n\n{machine()}. Synthetic data (400 train / "
            f"100 val images, 160 px, 6 classes, data seed 0); teacher YOLOv8n (3.0 M params) trained once; student "
            f"kdctl's yolov8-tiny (0.9 M params); every run 15 epochs, batch 8, AdamW lr0 0.002, no mosaic; "
            f"train seeds {a.seeds}. mAP50-95 by kdctl's COCO evaluator on the 100 validation images. Gap closed = "
            f"(student_KD − student_base) / (teacher − student_base) per seed, then averaged.\n\n"
            + table(["run", "mAP50-95 per seed", "mean", "± half-range", "gap closed (mean, per seed)", "train s"], rows)
            + "\n")
    write_section("distill", body)
    print(body)


if __name__ == "__main__":
    main()
