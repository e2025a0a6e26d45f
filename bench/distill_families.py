"""Distillation benchmark on the built-in synthetic data: teacher, baseline student, Ultralytics' built-in
``distill_model=`` KD, and the student distilled with each kdctl loss family, over several seeds.

Same data (seed 0), epochs, student and training settings for every run (the recipes' quickstart settings); only
train.seed changes. Reports COCO mAP50-95 (kdctl's evaluator), the baseline's own seed-to-seed spread, and "gap
closed" = (student_KD − student_base) / (teacher − student_base) per seed. A family beats the baseline only where
its mean gain exceeds the baseline's spread. ``--scene dense`` runs the same on the second built-in dataset (other
shapes, more and smaller objects, more clutter; its 30-epoch teacher, recipes/quickstart-teacher.yaml at batch 8,
reaches 0.450 on an Intel Xeon, the clear one's 0.514), ``--scene cluttered`` on the hardest one. ``--jobs 2`` runs
two students at once (Ultralytics trains on one thread on 2 cores, so this uses the second). About 2-3 minutes per
student run on 2 CPU cores, 6 for the teacher. ``--heldout 1000`` scores the same runs on 1000 images of a new data
seed: the validation images also chose each run's published epoch (best fitness), so their mAP is a little
optimistic (about 10 s per run to score).

On your own data: ``--data`` (an Ultralytics data YAML, or a recipe whose ``data:`` names a COCO set), ``--teacher``
(your trained teacher, scored here), ``--student`` and ``--train KEY=VALUE`` (train fields of every run); the table
goes to ``<root>/data-<name>.../families.md``.

    python bench/distill_families.py --seeds 0 1 2 --families distill-at distill-pkd head
    python bench/distill_families.py --data data/mydata/data.yaml --teacher runs/train/my-teacher \
        --student yolov8n.yaml --train imgsz=640 --train batch=32 --epochs 50 --families head backbone-head
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, finished_or_trained, gap_closed_cell, machine, paired_interval, table, write_section  # noqa: E402

FAMILIES = ["distill-fitnet", "distill-at", "distill-cwd", "distill-mgd", "distill-fgd", "distill-pkd",
            "distill-crosskd", "distill-kd-logit", "distill-ld", "head", "neck-head", "backbone-head"]


SCENE = {"name": "clear"}  # set by --scene; "dense" or "cluttered" swaps in another built-in dataset (6 classes)
# --data / --train / --student: the user's dataset (a recipe's data section), train fields and student model, in
# every run (the student in the baseline and distillation runs only)
USER: dict[str, object] = {"data": None, "train": {}, "student": None}
EPOCHS = {"students": None, "teacher": None}  # --epochs / --teacher-epochs: schedules other than the recipes'
OVERRIDES: dict[str, object] = {}  # --set: recipe fields changed in every distillation run (a weight screen)


def parse_override(text: str) -> tuple[str, object]:
    """``distill.auto_balance=0.25`` -> ("distill.auto_balance", 0.25): kdctl's ``--set``, read as YAML."""
    import argparse

    from kdctl.errors import RecipeError
    from kdctl.recipe.loader import parse_override as parse

    try:
        parts, value = parse(text)
    except RecipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ".".join(parts), value


def parse_train_field(text: str) -> tuple[str, object]:
    """``imgsz=640`` -> ("imgsz", 640): a field of the recipes' train: section (validated with the recipe)."""
    key, sep, value = text.partition("=")
    if not sep or not key or "." in key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE with a train: field, e.g. imgsz=640")
    return key, parse_override(f"train.{text}")[1]


def override_tag() -> str:
    """The suffix of a screen's run folders and rows, e.g. '-auto_balance=0.25' (empty without --set)."""
    return "".join(f"-{k.rsplit('.', 1)[-1]}={v}" for k, v in OVERRIDES.items())


def variant_tag(a) -> str:
    """What a run's folders, results and doc section are named after besides the dataset: a given teacher or student
    and --train fields, e.g. '-teacher-my-teacher-imgsz=640' (empty for the recipes' own pair and settings), so a
    table from another teacher never replaces the built-in teacher's."""
    return ((f"-teacher-{Path(a.teacher).resolve().stem}" if a.teacher else "")
            + (f"-student-{Path(a.student).stem}" if a.student else "")
            + "".join(f"-{k}={v}" for k, v in a.train_fields))


def variant_title(a) -> str:
    """:func:`variant_tag` for the section heading, e.g. ', teacher runs/train/my-teacher, imgsz=640'."""
    parts = ([f"teacher {a.teacher}"] if a.teacher else []) + ([f"student {a.student}"] if a.student else [])
    return "".join(f", {p}" for p in parts + [f"{k}={v}" for k, v in a.train_fields])


def screen_tag(families: list[str]) -> str:
    """The suffix of the doc section and results file of a run of some families, e.g. '-pkd-head-fitnet-head', so
    it does not replace the families table, nor a screen of other families with the same --set (empty for every
    family)."""
    return "" if families == FAMILIES else "-" + "-".join(families)


def apply_overrides(d: dict) -> None:
    """Set each override in the recipe dict, as ``kdctl distill --set`` does (``distill.losses.0.level``)."""
    from kdctl.recipe.loader import set_field

    for key, value in OVERRIDES.items():
        set_field(d, key.split("."), value)


def train_assistant(model: str, teacher: Path, out: Path) -> dict:
    """A teacher assistant (Mirzadeh et al., AAAI 2020): recipes/assistant.yaml (backbone-head's terms, the teacher's
    epochs, seed 0) with ``model`` as its student, distilled from ``teacher``. The screen's --set fields are not
    applied to it."""
    saved = dict(OVERRIDES)
    OVERRIDES.clear()
    OVERRIDES["student.model"] = str(Path(model).resolve()) if Path(model).is_file() else model
    try:
        return run_kdctl("assistant", "distill", 0, teacher, out)
    finally:
        OVERRIDES.clear()
        OVERRIDES.update(saved)


def baseline_student() -> str:
    """The baseline's student model (recipes/quickstart-student.yaml's), the student of every distillation run too,
    whatever a family's recipe names (recipes/logit-crosskd.yaml names a YOLO26 one)."""
    from kdctl.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "quickstart-student.yaml").student.model


def _recipe(name: str, seed: int, teacher: Path | None):
    from kdctl.recipe import load_recipe
    from kdctl.recipe.validation import validate

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    d = r.model_dump()
    d["train"]["seed"] = seed
    key = "teacher" if name in ("quickstart-teacher", "assistant") else "students"
    if EPOCHS[key]:
        d["train"]["epochs"] = EPOCHS[key]
    if USER["data"] is not None:
        d["data"] = dict(USER["data"])
    elif SCENE["name"] != "clear" and d["data"].get("synthetic"):
        d["data"]["synthetic"].update(scene=SCENE["name"], classes=6)
    d["train"].update(USER["train"])
    if name not in ("quickstart-teacher", "assistant", "quickstart-student"):  # every run: the baseline's student
        d["student"]["model"] = USER["student"] or baseline_student()
    elif USER["student"] and name == "quickstart-student":
        d["student"]["model"] = USER["student"]
    if teacher is not None and d.get("teacher"):
        d["teacher"]["model"] = str(teacher)
    if d.get("distill") is not None and name not in ("quickstart-teacher", "quickstart-student"):
        apply_overrides(d)
    return validate(d, type(r), name)  # a field set from the command line: one line naming it, not a traceback


def run_kdctl(name: str, stage: str, seed: int, teacher: Path | None, out: Path) -> dict:
    m = finished_or_trained(out, _recipe(name, seed, teacher), stage, name).metrics
    return {"map50_95": m["map50_95"], "train_s": m["train_seconds"]}


def user_data(path: str) -> dict:
    """``--data``: an Ultralytics dataset YAML, or a kdctl recipe whose ``data:`` section names the dataset (a COCO
    one, say); as a recipe's data section, with absolute paths."""
    from kdctl.recipe import load_recipe
    from kdctl.recipe.validation import read_yaml

    raw = read_yaml(path, "dataset")
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        return load_recipe(path).data.model_dump(exclude_none=True)
    return {"yolo": str(Path(path).resolve())}


def score(weights: Path, ds, imgsz: int) -> float:
    """mAP50-95 of a checkpoint (a kdctl bundle's weights.pt or an Ultralytics run's best.pt, whose distillation
    wrapper is left out) on ``ds``'s validation images, by kdctl's evaluator."""
    from kdctl.detectors import load_detector

    model = load_detector(weights)
    return score_model(getattr(model, "student_model", model), ds, imgsz, str(weights))


def score_model(model, ds, imgsz: int, name: str) -> float:
    """mAP50-95 of a loaded detector on ``ds``'s validation images, once its classes and input size fit them."""
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.models import check_imgsz, model_classes

    check_imgsz(imgsz, model)
    ds.check_model_classes(model_classes(model), f"the model of {name}", names=getattr(model, "names", None))
    return evaluate_backend(torch_backend(model), ds.val_images, ds.names, imgsz)["map50_95"]


def given_teacher_map(teacher: str, ds, imgsz: int, ultralytics_row: bool) -> float:
    """``--teacher``: a trained checkpoint or train/distill bundle (verified), loaded as kdctl loads a recipe's
    teacher (one of more classes read for the dataset's, by name), scored on the validation images; with the
    Ultralytics row, a YOLO one (what its distill_model= loads)."""
    from kdctl.detectors import family, yolo
    from kdctl.models import dataset_classes, load_model, resolve_model

    ref = resolve_model(teacher, "--teacher", "distill_families")
    if ref.kind != "checkpoint":
        raise SystemExit(f"error: --teacher {teacher}: give a trained teacher (a .pt checkpoint or a kdctl "
                         "train/distill bundle), not a model to train")
    model, _ = dataset_classes(load_model(ref, ds.nc, "--teacher", "distill_families"), ds)
    if ultralytics_row and family(model) is not yolo:
        raise SystemExit(f"error: --teacher {teacher}: Ultralytics' distill_model= takes a YOLO teacher, not this "
                         f"{family(model).__name__.rsplit('.', 1)[-1]} one; add --no-ultralytics")
    return score_model(model, ds, imgsz, teacher)


def run_ultralytics_kd(seed: int, teacher: Path, out: Path) -> dict:
    """Ultralytics' own KD (neck-level, score-weighted L2, dis=6.0), same settings, evaluated by kdctl."""
    from kdctl.data.resolve import resolve_data
    from kdctl.models import resolve_model

    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    r = _recipe("quickstart", seed, teacher)
    ds = resolve_data(r.data)
    from ultralytics import YOLO

    t = r.train
    teacher_pt = resolve_model(str(teacher), "teacher", "bench").ref  # a bundle (verified) or a .pt: its checkpoint
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    YOLO(resolve_model(r.student.model, "student", "bench").ref).train(
        data=str(ds.yaml), distill_model=teacher_pt, dis=6.0, epochs=t.epochs, imgsz=t.imgsz,
        batch=t.batch, seed=seed, optimizer=t.optimizer, lr0=t.lr0, mosaic=t.mosaic, warmup_epochs=t.warmup_epochs,
        close_mosaic=t.close_mosaic, nbs=t.nbs or 64, workers=0, device="cpu", plots=False,
        project=str(out.parent), name=out.name, exist_ok=True, verbose=False, amp=False, deterministic=True)
    train_s = time.perf_counter() - t0
    res = {"map50_95": score(out / "weights" / "best.pt", ds, t.imgsz), "train_s": round(train_s, 1)}
    result.write_text(json.dumps(res))
    return res


HELDOUT_SEED = 1  # the held-out images' data seed; every run trains and validates on data seed 0


def heldout_data(root: Path, images: int, seed: int = 0):
    """``images`` new images of this scene and classes, drawn with another data seed: no run trained on them or
    picked its checkpoint with them (kdctl publishes the epoch that scored best on the validation images)."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.data.synth import write_dataset

    syn = _recipe("quickstart-student", seed, None).data.synthetic
    out = root / f"heldout-{images}"
    if not (out / "data.yaml").is_file():
        tmp = root / f".heldout-{images}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_dataset(tmp, train=1, val=images, seed=HELDOUT_SEED, imgsz=syn.imgsz, classes=syn.classes,
                      scene=syn.scene, root=out)
        tmp.replace(out)
    return load_yolo_yaml(out / "data.yaml", splits=("val",))


def heldout_map(run: Path, ds, imgsz: int) -> float:
    """mAP50-95 of a run's published weights (a kdctl bundle's, or Ultralytics' best.pt) on the held-out images;
    cached beside the held-out set, never inside a bundle."""
    cache = ds.yaml.parent / "maps" / f"{run.name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["map50_95"]
    if run.is_file():  # a teacher given as a checkpoint
        m = score(run, ds, imgsz)
    else:
        bundle = (run / "manifest.json").is_file()
        m = score(run / "weights.pt" if bundle else run / "weights" / "best.pt", ds, imgsz)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps({"map50_95": m}))
    return m


def _worker_init(scene: str, epochs: dict, overrides: dict, user: dict, threads: int) -> None:
    import torch

    SCENE["name"] = scene
    USER.update(user)
    EPOCHS.update(epochs)
    OVERRIDES.update(overrides)
    torch.set_num_threads(threads)


def _run_all(runs: list, jobs: int):
    """Yield (row, seed, result) per run: in order in this process, or ``jobs`` processes at a time."""
    if jobs <= 1:
        for row, seed, fn, args in runs:
            yield row, seed, fn(*args)
        return
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(SCENE["name"], dict(EPOCHS), dict(OVERRIDES), dict(USER), threads)) as pool:
        futures = {pool.submit(fn, *args): (row, seed) for row, seed, fn, args in runs}
        for f in as_completed(futures):
            yield (*futures[f], f.result())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--scene", choices=["clear", "cluttered", "dense"], help="the built-in dataset (default: clear)")
    ap.add_argument("--data", metavar="YAML", help="your dataset instead of a built-in one: an Ultralytics data YAML, "
                    "or a kdctl recipe whose data: section names it (COCO JSON, say); the table goes to "
                    "<root>/<dataset name>/families.md, not to docs/benchmarks.md")
    ap.add_argument("--teacher", metavar="MODEL", help="your trained teacher (a .pt checkpoint or a kdctl "
                    "train/distill bundle), scored here on the validation images, instead of training "
                    "recipes/quickstart-teacher.yaml; --no-ultralytics for a teacher Ultralytics' distill_model= "
                    "cannot load")
    ap.add_argument("--student", metavar="MODEL", help="the student of the baseline and every distillation run "
                    "instead of the recipes' yolov8-tiny.yaml (a model YAML, .pt or torchvision:<builder>)")
    ap.add_argument("--train", dest="train_fields", type=parse_train_field, action="append", default=[],
                    metavar="KEY=VALUE", help="a train: field of every run (teacher, baseline, students) instead of "
                    "the recipes' (imgsz 128, batch 16, AdamW lr0 0.003, nbs 16), e.g. --train imgsz=640 --train "
                    "batch=32; --epochs sets the students' epochs")
    ap.add_argument("--no-ultralytics", action="store_true", help="skip Ultralytics' built-in KD rows")
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--epochs", type=int, help="train the students this many epochs instead of the recipes' 20 "
                    "(the teacher keeps its 30): does KD still help a student trained to the teacher's level?")
    ap.add_argument("--jobs", type=int, default=1, help="student runs at once (after the teacher), each in its own "
                    "process with cores/jobs threads; their train s are then times on shared cores")
    ap.add_argument("--teacher-epochs", type=int, help="train the teacher this many epochs instead of its recipe's 30 "
                    "(a converged teacher; its own bundle, the baselines are shared)")
    ap.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                    metavar="KEY=VALUE", help="change a recipe field in every distillation run (not the teacher or "
                    "baseline), e.g. --set distill.auto_balance=0.25: a screen, with its own run folders and rows")
    ap.add_argument("--assistant", metavar="MODEL", help="a teacher assistant (Mirzadeh et al., AAAI 2020), e.g. "
                    "kdctl's yolov8-ta.yaml: trained once from the teacher with recipes/assistant.yaml "
                    "(backbone-head's terms for the teacher's epochs, seed 0), then the teacher of every "
                    "distillation run; its own run folders and rows ('-via-<name>'), gap closed still against the "
                    "teacher")
    ap.add_argument("--heldout", type=int, metavar="N", help="score every run on N new images of the scene (data "
                    "seed 1) instead of the validation images, which also chose each run's published epoch; "
                    "trains only what is missing, its own doc section")
    ap.add_argument("--section", help="the doc section and results file of this run (default: from the scene, the "
                    "options and the families when not all: a screen of some families gets its own table instead of "
                    "replacing the families table)")
    a = ap.parse_args(argv)
    if a.data and (a.scene or a.heldout):
        ap.error(f"--data {a.data}: a dataset of your own replaces --scene, and --heldout draws new images of a "
                 "built-in scene; hold out images in your dataset's own val split instead")
    if a.teacher and a.teacher_epochs:
        ap.error(f"--teacher {a.teacher}: a teacher given is not trained here (no --teacher-epochs)")
    a.scene = a.scene or "clear"
    SCENE["name"], EPOCHS["students"], EPOCHS["teacher"] = a.scene, a.epochs, a.teacher_epochs
    OVERRIDES.update(a.overrides)
    from kdctl.errors import KdctlError

    try:
        USER.update(data=user_data(a.data) if a.data else None, train=dict(a.train_fields), student=a.student)
        _table(a)
    except KdctlError as e:  # the user's dataset, teacher or student: one line naming the file and field
        raise SystemExit(f"error: {e}") from None


def _table(a) -> None:
    """Train (or reuse) every run of ``a`` and write its table."""
    dataset = a.data and Path(a.data).resolve()
    label = dataset and f"data-{(dataset.parent.name if dataset.stem == 'data' else dataset.stem)}"
    given = a.teacher and Path(a.teacher).resolve()
    root = Path(a.root) / ((label if dataset else a.scene) + variant_tag(a))
    base_tag = f"-e{a.epochs}" if a.epochs else ""
    t_tag = f"-t{a.teacher_epochs}" if a.teacher_epochs else ""
    tag = base_tag + t_tag
    r = _recipe("quickstart-student", 0, None)
    from kdctl.data.resolve import resolve_data

    ds = resolve_data(r.data) if dataset or given else None  # to describe, and to score a given teacher on
    res: dict[str, dict[int, dict]] = {}
    if given:
        teacher = given
        res["teacher"] = {0: {"map50_95": given_teacher_map(a.teacher, ds, r.train.imgsz, not a.no_ultralytics),
                              "train_s": None}}
    else:
        teacher = root / f"teacher{t_tag}"
        res["teacher"] = {0: run_kdctl("quickstart-teacher", "train", 0, None, teacher)}
    root.mkdir(parents=True, exist_ok=True)
    kd_teacher, via = teacher, ""
    if a.assistant:
        via = f"-via-{Path(a.assistant).stem}"
        kd_teacher = root / f"assistant{t_tag}{via}"
        res["teacher assistant"] = {0: train_assistant(a.assistant, teacher, kd_teacher)}
    runs = []  # (row, seed, function, arguments): independent of each other once the teacher exists
    for seed in a.seeds:
        runs.append(("baseline student", seed, run_kdctl,
                     ("quickstart-student", "train", seed, None, root / f"base{base_tag}-s{seed}")))
        if not a.no_ultralytics:
            runs.append(("ultralytics distill_model (dis=6)", seed, run_ultralytics_kd,
                         (seed, teacher, root / f"ultralytics{tag}-s{seed}")))
        runs += [(fam + via + override_tag(), seed, run_kdctl,
                  (fam, "distill", seed, kd_teacher, root / f"{fam}{tag}{via}{override_tag()}-s{seed}"))
                 for fam in a.families]
    # the results file's suffix (and the table's, on your data: families.md, as the docstring says)
    named = "-" + a.section if a.section else "" if dataset else screen_tag(a.families)
    for row, seed, out in _run_all(runs, a.jobs):
        res.setdefault(row, {})[seed] = out
        (root / f"results{tag}{via}{override_tag()}{named}.json").write_text(json.dumps(res, indent=1))
    order = (["teacher"] + (["teacher assistant"] if a.assistant else [])  # then the rows in run order, seeds sorted
             + list(dict.fromkeys(row for row, *_ in runs)))
    res = {row: dict(sorted(res[row].items())) for row in order}
    scored_on = "the validation images"
    if a.heldout:
        ds, imgsz = heldout_data(root, a.heldout), _recipe("quickstart-student", 0, None).train.imgsz
        folders = {("teacher", 0): teacher, ("teacher assistant", 0): kd_teacher,
                   **{(row, seed): args[-1] for row, seed, _, args in runs}}
        res = {row: {seed: {**r, "map50_95": heldout_map(folders[row, seed], ds, imgsz)} for seed, r in per.items()}
               for row, per in res.items()}
        scored_on = (f"{a.heldout} held-out images (data seed {HELDOUT_SEED}; no run trained on them or chose its "
                     "published epoch with them)")

    t_map = res["teacher"][0]["map50_95"]
    base = res["baseline student"]
    base_maps = [base[s]["map50_95"] for s in sorted(base)]
    base_mean = sum(base_maps) / len(base_maps)
    base_spread = (max(base_maps) - min(base_maps)) / 2
    rows = []
    for name, per_seed in res.items():
        maps = [per_seed[s]["map50_95"] for s in sorted(per_seed)]
        mean = sum(maps) / len(maps)
        role = name in ("teacher", "teacher assistant", "baseline student")
        gains = [per_seed[s]["map50_95"] - base[s]["map50_95"] for s in sorted(per_seed) if s in base]
        gain = mean - base_mean
        above = sum(g > 0 for g in gains)
        beats = "" if role else (
            "yes" if gain > base_spread and above == len(per_seed) else ("mean only" if gain > base_spread else "no"))
        ci = None if role else paired_interval([100 * g for g in gains])
        rows.append([name, " / ".join(f"{m:.4f}" for m in maps), round(mean, 4),
                     round((max(maps) - min(maps)) / 2, 4) if len(maps) > 1 else "",
                     "" if role else f"{100 * gain:+.2f} ({' / '.join(f'{100 * g:+.2f}' for g in gains)})",
                     "" if role else gap_closed_cell(per_seed, base, t_map, mark_below=False),
                     "" if role else f"{above}/{len(gains)}",
                     "" if ci is None else f"{ci[0]:+.1f} to {ci[1]:+.1f}", beats,
                     "" if None in (times := [per_seed[s]["train_s"] for s in per_seed]) else
                     round(sum(times) / len(times), 1)])
    t = r.train
    when = (f", students {a.epochs} epochs" if a.epochs else "") + (
        f", teacher {a.teacher_epochs} epochs" if a.teacher_epochs else "") + (
        f", through the teacher assistant {Path(a.assistant).name}" if a.assistant else "") + "".join(
        f", {k}={v} in every distillation run" for k, v in OVERRIDES.items()) + (
        f", scored on {a.heldout} held-out images" if a.heldout else "")
    rows_run = f": {', '.join(a.families)}" if a.families != FAMILIES else ""  # a screen of some families
    against = "" if a.no_ultralytics else " vs Ultralytics' built-in KD"
    if dataset:
        data_text = (f"Dataset {a.data} ({len(ds.train_images)} train / {len(ds.val_images)} val images, {ds.nc} "
                     f"classes, {t.imgsz} px)")
    else:
        syn = r.data.synthetic
        data_text = (f"Synthetic data ({syn.train} train / {syn.val} val images, {syn.imgsz} px, {syn.classes} "
                     f"classes, scene '{syn.scene}', data seed 0)")
    teacher_text = (f"teacher {a.teacher} (given; scored here)" if given else
                    f"teacher YOLOv8n (3.0 M params) trained once (recipes/quickstart-teacher.yaml, "
                    f"{a.teacher_epochs or 30} epochs)")
    student_text = f"student {a.student}" if a.student else "student kdctl's yolov8-tiny (0.9 M params)"
    title = f"{label} ({a.data})" if dataset else f"{a.scene} scenes" + variant_title(a)
    body = (f"## Distillation: loss families{against} ({title}{when}{rows_run})\n\n{machine()}. "
            f"{data_text}; {teacher_text}; {student_text}; every student run "
            f"{t.epochs} epochs, batch {t.batch}, {t.optimizer} lr0 {t.lr0}, "
            f"{f'mosaic {t.mosaic}' if t.mosaic else 'no mosaic'}; train seeds {a.seeds}. "
            f"mAP50-95 by kdctl's COCO evaluator on {scored_on}. Gain = student_KD − student_base in mAP "
            f"points, per seed and mean; gap closed = (student_KD − student_base) / (teacher − student_base) per "
            f"seed, then averaged (n/a where the teacher is not above the baseline). Baseline spread (half-range over seeds): "
            f"{base_spread:.4f}; \"beats baseline\" = mean gain above that spread and above the baseline on every "
            f"seed. \"Seeds above\": on how many seeds the run is above the baseline of the same seed (the same "
            f"initial weights); \"95 % CI\": of the mean gain, from the per-seed gains (paired, Student's t), in "
            f"points.\n\n"
            + table(["run", "mAP50-95 per seed", "mean", "± half-range", "gain, points (mean, per seed)",
                     "gap closed (mean, per seed)", "seeds above", "gain 95 % CI", "beats baseline", "train s"],
                    rows) + "\n")
    if dataset:  # the user's own data: a table beside the runs, not a section of the project's docs
        out = root / f"families{tag}{via}{override_tag()}{named}.md"
        out.write_text(body)
    else:
        write_section(a.section or (("distill" if a.scene == "clear" else f"distill-{a.scene}") + variant_tag(a)
                                    + tag + via + override_tag() + screen_tag(a.families)
                                    + (f"-heldout{a.heldout}" if a.heldout else "")), body)
    print(body)


if __name__ == "__main__":
    main()
