"""Two-stage distillation benchmark on the built-in data: torchvision Faster R-CNN teachers, the baseline
MobileNetV3-Large 320 FPN student, the student distilled at each level (``recipes/fasterrcnn-distill-*.yaml``:
RPN, RoI, CrossKD-RoI, RoI feature mimic, FGFI, combined), and the cross-family pair (``to-yolo``:
``recipes/fasterrcnn-to-yolo.yaml``, the ResNet-50 FPN teacher → the YOLO student at the neck, and ``to-yolo-det``:
``recipes/fasterrcnn-to-yolo-det.yaml``, its final detections as the student's soft targets, both against
``recipes/quickstart-student.yaml``), over several seeds.

Same data, epochs and training settings for every student run of a family (the recipes'); only train.seed changes.
Reports COCO mAP50-95, the baselines' seed-to-seed spread, "gap closed" = (student_KD − student_base) / (teacher −
student_base) per seed and its mean, train time and the distill step-time ratio (seconds per epoch vs the
baseline's). Teachers are trained once and reused. The RPN recipe's teacher is the MobileNetV3 FPN (same anchor
layout), every other recipe's the ResNet-50 FPN. Faster R-CNN from scratch on a CPU is slow (about 2 min per student
epoch at 128 px on 2 cores; the ResNet-50 teacher several times that): use ``--device 0`` on a GPU, where
``bench/gpu_session.py --benches two-stage --mps`` trains the runs side by side (the whole table in about 10 min
of an H200 on 2026-12-04).

    python bench/two_stage_kd.py --seeds 0 1 2 --device 0
    python bench/two_stage_kd.py --smoke        # a few minutes: checks the script end to end, writes no doc
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (KD_SEED_HEAD, Job, machine, parse_seed_bench, run_and_save, runs_root, seed_jobs,  # noqa: E402
                     seed_rows, table, teacher_rows, write_section)

LEVELS = ["rpn", "roi", "crosskd", "mimic", "fgfi", "combined", "to-yolo", "to-yolo-det"]
# level -> (recipe, teacher recipe, baseline recipe): the RPN level's teacher is the MobileNetV3 FPN (the student's
# anchor layout), the cross-family levels' baseline the YOLO student trained alone
RUNS = {lv: (f"fasterrcnn-distill-{lv}", "fasterrcnn-teacher", "fasterrcnn-student") for lv in LEVELS[:6]}
RUNS["rpn"] = ("fasterrcnn-distill-rpn", "fasterrcnn-teacher-mbv3", "fasterrcnn-student")
RUNS["to-yolo"] = ("fasterrcnn-to-yolo", "fasterrcnn-teacher", "quickstart-student")
RUNS["to-yolo-det"] = ("fasterrcnn-to-yolo-det", "fasterrcnn-teacher", "quickstart-student")
BASE_DIRS = {"fasterrcnn-student": "base"}  # run folders: <dir>-s<seed>


def plan(a) -> list[Job]:
    """The runs in the order they are trained: teachers, then per seed the baselines and each level."""
    root = runs_root(a)
    t_epochs = a.epochs * 2 if a.epochs else None
    jobs = [Job(t, "train", 0, str(root / t), epochs=t_epochs) for t in sorted({RUNS[lv][1] for lv in a.levels})]
    return jobs + seed_jobs(RUNS, a.levels, a.seeds, root, a.epochs, BASE_DIRS)


def parse(argv=None):
    return parse_seed_bench(argv, __doc__, 'two-stage', "student epochs (teachers: twice); default: recipes'",
                            lambda ap: ap.add_argument("--levels", nargs="+", default=LEVELS, choices=LEVELS))


def main(argv=None) -> None:
    a = parse(argv)
    root = runs_root(a)
    teachers, res = run_and_save(plan(a), a)

    run_rows, spreads = seed_rows(RUNS, a.levels, res, teachers)
    rows = teacher_rows(teachers) + run_rows
    from kdctl.bundle import load_bundle

    setting = ""
    if "fasterrcnn-student" in spreads:
        rec = load_bundle(root / f"base-s{a.seeds[0]}").recipe  # the baseline as it ran
        syn, t = rec["data"]["synthetic"], rec["train"]
        setting = (f"synthetic data ({syn['train']} train / {syn['val']} val, {syn['imgsz']} px, {syn['classes']} "
                   f"classes, scene '{syn['scene']}'); student MobileNetV3-Large 320 FPN {t['epochs']} epochs, batch "
                   f"{t['batch']}, {t['optimizer']} lr0 {t['lr0']}; ")
    halves = ", ".join(f"{k} {v:.4f}" for k, v in spreads.items())
    body = (f"## Two-stage distillation (torchvision Faster R-CNN)\n\n{machine()}; device {a.device}. "
            f"`python bench/two_stage_kd.py --seeds {' '.join(map(str, a.seeds))} --levels {' '.join(a.levels)}`: "
            f"{setting}teachers trained once (their recipes' epochs); `to-yolo` and `to-yolo-det` are the "
            "ResNet-50 FPN teacher → YOLO student pair (`recipes/fasterrcnn-to-yolo.yaml`: PKD at the neck; "
            "`recipes/fasterrcnn-to-yolo-det.yaml`: det_kd on its final detections) against the YOLO student "
            "trained alone. Gap closed per "
            "seed against the row's teacher and baseline (RPN: the MobileNetV3 FPN teacher, same anchor layout). "
            f"Baseline half-ranges over seeds: {halves}; epoch time / baseline = train seconds per epoch vs the "
            "row's baseline's (validation included).\n\n" + table(KD_SEED_HEAD, rows) + "\n")
    print(body)
    if not a.smoke:
        write_section("two-stage-kd", body)


if __name__ == "__main__":
    main()
