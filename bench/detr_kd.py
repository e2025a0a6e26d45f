"""DETR-family distillation benchmark on the built-in data: the RT-DETR teacher, kdctl's tiny RT-DETR
student (baseline) and the student distilled at each level (``recipes/rtdetr-distill-*.yaml``: query, logit,
feature, combined, and logit from a start cut from the teacher: inherit), plus the cross-family pairs beside
their same-family baselines (``rtdetr-to-yolo``: RT-DETR teacher → YOLO student vs the YOLO baseline;
``yolo-to-rtdetr``: the YOLOv8n quickstart teacher → RT-DETR student), over several seeds.

The RT-DETR teacher (``recipes/rtdetr-teacher.yaml``: kdctl's rtdetr-small) starts from the YOLOv8n quickstart
teacher's backbone and neck, so that teacher is trained first. Same data, epochs and training settings per student
family (the recipes'); only train.seed changes. Reports COCO mAP50-95, each baseline's seed-to-seed spread, "gap
closed" per seed against the row's teacher and its mean, train time and the epoch-time ratio (train seconds per
epoch vs the baseline's). Teachers are trained once and reused.

    python bench/detr_kd.py --seeds 0 1 2
    python bench/detr_kd.py --runs yolo-to-rtdetr --seeds 0 1 2     # one row (and what it needs)
    python bench/detr_kd.py --smoke                                  # minutes: checks the script, writes no doc
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (KD_SEED_HEAD, Job, machine, parse_seed_bench, run_and_save, runs_root, seed_jobs,  # noqa: E402
                     seed_rows, table, teacher_rows, write_section)

# run -> (recipe, teacher recipe, baseline recipe)
RUNS = {
    "query": ("rtdetr-distill-query", "rtdetr-teacher", "rtdetr-student"),
    "logit": ("rtdetr-distill-logit", "rtdetr-teacher", "rtdetr-student"),
    "feature": ("rtdetr-distill-feature", "rtdetr-teacher", "rtdetr-student"),
    "combined": ("rtdetr-distill-combined", "rtdetr-teacher", "rtdetr-student"),
    "inherit": ("rtdetr-distill-inherit", "rtdetr-teacher", "rtdetr-student"),
    "rtdetr-to-yolo": ("rtdetr-to-yolo", "rtdetr-teacher", "quickstart-student"),
    "rtdetr-to-yolo-det": ("rtdetr-to-yolo-det", "rtdetr-teacher", "quickstart-student"),
    "yolo-to-rtdetr": ("yolo-to-rtdetr", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-logit": ("yolo-to-rtdetr-logit", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-inherit": ("yolo-to-rtdetr-inherit", "quickstart-teacher", "rtdetr-student"),
    "yolo-to-rtdetr-init": ("yolo-to-rtdetr-init", "quickstart-teacher", "rtdetr-student"),
}

# a teacher that starts from another teacher's weights (distill.init: teacher, no KD terms) -> that teacher
STARTS_FROM = {"rtdetr-teacher": "quickstart-teacher"}


def plan(a) -> list[Job]:
    """The runs in the order they are trained: teachers (one another starts from first), then per seed the
    baselines and each run."""
    root = runs_root(a)
    teachers = {RUNS[r][1] for r in a.runs}
    teachers |= {STARTS_FROM[t] for t in teachers if t in STARTS_FROM}
    jobs = [Job(t, "distill" if t in STARTS_FROM else "train", 0, str(root / t), teacher=STARTS_FROM.get(t),
                epochs=a.epochs) for t in sorted(teachers, key=lambda t: (t in STARTS_FROM, t))]
    return jobs + seed_jobs(RUNS, a.runs, a.seeds, root, a.epochs)


def parse(argv=None):
    def more(ap):
        ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
        ap.add_argument("--section", help="the doc section of this run's table (one teacher's runs only; default: "
                        "that teacher's table, which it replaces): rows added to a table without rerunning it")

    return parse_seed_bench(argv, __doc__, 'detr', "epochs of every run; default: the recipes'", more)


def tables(a, teachers: dict, res: dict) -> dict[str, str]:
    """One table per teacher family: ``{doc section: body}``. The RT-DETR teacher's rows (same-family DETR KD and
    RT-DETR → YOLO) and the YOLO teacher's (YOLO → RT-DETR) are separate sections, so a run of one group leaves the
    other's table as it was."""
    out = {}
    for teacher in dict.fromkeys(RUNS[r][1] for r in a.runs):
        runs = [r for r in a.runs if RUNS[r][1] == teacher]
        start = STARTS_FROM.get(teacher)
        rows = [[t, "teacher" + (f" (starts from {STARTS_FROM[t]})" if t in STARTS_FROM else ""), *row[2:]]
                for t, row in zip(teachers, teacher_rows(teachers)) if t in (teacher, start)]
        run_rows, spreads = seed_rows(RUNS, runs, res, teachers)
        rows += run_rows
        title = ("DETR-family distillation (RT-DETR teacher) and RT-DETR → YOLO" if teacher == "rtdetr-teacher"
                 else "DETR-family distillation: YOLO → RT-DETR")
        if a.section:  # rows added beside a table: say which
            title += ": " + ", ".join(runs)
        halves = ", ".join(f"{k} {v:.4f}" for k, v in spreads.items())
        body = (f"## {title}\n\n{machine()}; device {a.device}. "
                f"`python bench/detr_kd.py --seeds {' '.join(map(str, a.seeds))} --runs {' '.join(runs)}`: the "
                "recipes' data and settings (built-in clear scenes, 128 px); teachers trained once"
                + (f" ({teacher} starts from {start}'s backbone and neck, `distill.init: teacher`)" if start else "")
                + ". Gap closed per seed = (student_KD − baseline) / (teacher − baseline) against the row's teacher "
                f"and baseline; baseline half-ranges over seeds: {halves}."
                "\n\n" + table(KD_SEED_HEAD, rows) + "\n")
        key = "detr-kd" if teacher != "rtdetr-teacher" else "detr-kd-rtdetr-teacher"
        out[a.section or (key if a.device == "cpu" else key + "-gpu")] = body
    return out


def main(argv=None) -> None:
    a = parse(argv)
    teachers, res = run_and_save(plan(a), a)
    for section, body in tables(a, teachers, res).items():
        print(body)
        if not a.smoke:  # a CPU's tables and a GPU session's are kept side by side
            write_section(section, body)


if __name__ == "__main__":
    main()
