"""DETR-family distillation benchmark on the built-in data: the YOLOv8n-RT-DETR teacher, kdctl's tiny RT-DETR
student (baseline) and the student distilled at each level (``recipes/rtdetr-distill-*.yaml``: logit, feature,
combined), plus the cross-family pairs beside their same-family baselines (``rtdetr-to-yolo``: RT-DETR teacher →
YOLO student vs the YOLO baseline; ``yolo-to-rtdetr``: the YOLOv8n quickstart teacher → RT-DETR student), over
several seeds.

Same data, epochs and training settings per student family (the recipes'); only train.seed changes. Reports COCO
mAP50-95, each baseline's seed-to-seed spread, "gap closed" per seed against the row's teacher and its mean, train
time and the epoch-time ratio (train seconds per epoch vs the baseline's). Teachers are trained once and reused.

    python bench/detr_kd.py --seeds 0 1 2
    python bench/detr_kd.py --runs yolo-to-rtdetr --seeds 0 1 2     # one row (and what it needs)
    python bench/detr_kd.py --smoke                                  # minutes: checks the script, writes no doc
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (KD_SEED_HEAD, Job, machine, parse_seed_bench, run_and_save, runs_root, seed_row,  # noqa: E402
                     table, teacher_rows, write_section)

# run -> (recipe, teacher recipe, baseline recipe)
RUNS = {
    "query": ("rtdetr-distill-query", "rtdetr-teacher", "rtdetr-student"),
    "logit": ("rtdetr-distill-logit", "rtdetr-teacher", "rtdetr-student"),
    "feature": ("rtdetr-distill-feature", "rtdetr-teacher", "rtdetr-student"),
    "combined": ("rtdetr-distill-combined", "rtdetr-teacher", "rtdetr-student"),
    "rtdetr-to-yolo": ("rtdetr-to-yolo", "rtdetr-teacher", "quickstart-student"),
    "yolo-to-rtdetr": ("yolo-to-rtdetr", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-logit": ("yolo-to-rtdetr-logit", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-inherit": ("yolo-to-rtdetr-inherit", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-init": ("yolo-to-rtdetr-init", "quickstart-teacher", "rtdetr-student"),
}


def plan(a) -> list[Job]:
    """The runs in the order they are trained: teachers, then per seed the baselines and each run."""
    root = runs_root(a)
    jobs = [Job(t, "train", 0, str(root / t), epochs=a.epochs) for t in sorted({RUNS[r][1] for r in a.runs})]
    for seed in a.seeds:
        jobs += [Job(b, "train", seed, str(root / f"{b}-s{seed}"), row=b, epochs=a.epochs)
                 for b in sorted({RUNS[r][2] for r in a.runs})]
        jobs += [Job(RUNS[r][0], "distill", seed, str(root / f"{r}-s{seed}"), row=r, teacher=RUNS[r][1],
                     epochs=a.epochs) for r in a.runs]
    return jobs


def parse(argv=None):
    return parse_seed_bench(argv, __doc__, 'detr', "epochs of every run; default: the recipes'",
                            lambda ap: ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS)))


def main(argv=None) -> None:
    a = parse(argv)
    teachers, res = run_and_save(plan(a), a)

    rows, spreads = teacher_rows(teachers), {}
    for name, per_seed in res.items():
        if name not in RUNS:  # a baseline
            row, spreads[name] = seed_row(name, "baseline", per_seed)
        else:
            _, teacher, base_name = RUNS[name]
            row, _ = seed_row(name, f"vs {base_name}, teacher {teacher}", per_seed, res[base_name],
                              teachers[teacher][1]["map50_95"])
        rows.append(row)
    body = (f"## DETR-family distillation (RT-DETR) and RT-DETR ↔ YOLO\n\n{machine()}; device {a.device}. "
            f"`python bench/detr_kd.py --seeds {' '.join(map(str, a.seeds))} --runs {' '.join(a.runs)}`: the "
            "recipes' data and settings (built-in clear scenes, 128 px); teachers trained once. Gap closed per seed "
            "= (student_KD − baseline) / (teacher − baseline) against the row's teacher and baseline; baseline "
            f"half-ranges over seeds: {', '.join(f'{k} {v:.4f}' for k, v in spreads.items())}.\n\n"
            + table(KD_SEED_HEAD, rows) + "\n")
    print(body)
    if not a.smoke:  # the CPU table (cross-family rows) and a GPU session's table are kept side by side
        write_section("detr-kd" if a.device == "cpu" else "detr-kd-gpu", body)


if __name__ == "__main__":
    main()
