"""Two-stage distillation benchmark on the built-in data: torchvision Faster R-CNN teachers, the baseline
MobileNetV3-Large 320 FPN student, and the student distilled at each level (``recipes/fasterrcnn-distill-*.yaml``:
RPN, RoI, CrossKD-RoI, RoI feature mimic, combined), over several seeds.

Same data, epochs and training settings for every student run (the recipes'); only train.seed changes. Reports
COCO mAP50-95, the baseline's seed-to-seed spread, "gap closed" = (student_KD − student_base) / (teacher −
student_base) per seed and its mean, train time and the distill step-time ratio (seconds per epoch vs the
baseline's). Teachers are trained once and reused. The RPN recipe's teacher is the MobileNetV3 FPN (same anchor
layout), every other recipe's the ResNet-50 FPN. Faster R-CNN from scratch on a CPU is slow (about 2 min per student
epoch at 128 px on 2 cores; the ResNet-50 teacher several times that): use ``--device 0`` on a GPU.

    python bench/two_stage_kd.py --seeds 0 1 2 --device 0
    python bench/two_stage_kd.py --smoke        # a few minutes: checks the script end to end, writes no doc
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (KD_SEED_HEAD, Job, machine, parse_seed_bench, run_and_save, runs_root, seed_row,  # noqa: E402
                     table, teacher_rows, write_section)

LEVELS = ["rpn", "roi", "crosskd", "mimic", "fgfi", "combined"]
TEACHERS = {"rpn": "fasterrcnn-teacher-mbv3"}  # every other level: fasterrcnn-teacher (ResNet-50 FPN)


def plan(a) -> list[Job]:
    """The runs in the order they are trained: teachers, then per seed the baseline and each level."""
    root = runs_root(a)
    t_epochs = a.epochs * 2 if a.epochs else None
    jobs = [Job(t, "train", 0, str(root / t), epochs=t_epochs)
            for t in sorted({TEACHERS.get(lv, "fasterrcnn-teacher") for lv in a.levels})]
    for seed in a.seeds:
        jobs.append(Job("fasterrcnn-student", "train", seed, str(root / f"base-s{seed}"), row="baseline student",
                        epochs=a.epochs))
        jobs += [Job(f"fasterrcnn-distill-{lv}", "distill", seed, str(root / f"{lv}-s{seed}"), row=lv,
                     teacher=TEACHERS.get(lv, "fasterrcnn-teacher"), epochs=a.epochs) for lv in a.levels]
    return jobs


def parse(argv=None):
    return parse_seed_bench(argv, __doc__, 'two-stage', "student epochs (teachers: twice); default: recipes'",
                            lambda ap: ap.add_argument("--levels", nargs="+", default=LEVELS, choices=LEVELS))


def main(argv=None) -> None:
    a = parse(argv)
    root = runs_root(a)
    teachers, res = run_and_save(plan(a), a)

    base = res["baseline student"]
    rows = teacher_rows(teachers)
    for name, per_seed in res.items():
        if name == "baseline student":
            row, base_spread = seed_row(name, "", per_seed)
        else:
            row, _ = seed_row(name, "", per_seed, base, teachers[TEACHERS.get(name, "fasterrcnn-teacher")][1]["map50_95"])
        rows.append(row)
    from kdctl.bundle import load_bundle

    rec = load_bundle(root / f"base-s{a.seeds[0]}").recipe  # the baseline as it ran
    syn, t = rec["data"]["synthetic"], rec["train"]
    body = (f"## Two-stage distillation (torchvision Faster R-CNN)\n\n{machine()}; device {a.device}. "
            f"`python bench/two_stage_kd.py --seeds {' '.join(map(str, a.seeds))}`: synthetic data ({syn['train']} "
            f"train / {syn['val']} val, {syn['imgsz']} px, {syn['classes']} classes, scene '{syn['scene']}'); student "
            f"MobileNetV3-Large 320 FPN {t['epochs']} epochs, batch {t['batch']}, {t['optimizer']} lr0 {t['lr0']}; teachers "
            "trained once (twice the epochs). Gap closed per seed against the row's teacher (RPN: the MobileNetV3 "
            f"FPN teacher; others: ResNet-50 FPN). Baseline half-range over seeds {base_spread:.4f}; step-time "
            "ratio = train seconds per epoch vs the baseline's (validation included).\n\n"
            + table(KD_SEED_HEAD, rows) + "\n")
    print(body)
    if not a.smoke:
        write_section("two-stage-kd", body)


if __name__ == "__main__":
    main()
