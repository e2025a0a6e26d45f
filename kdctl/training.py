"""``kdctl train`` and ``kdctl distill``: train a detector through Ultralytics (with or without a teacher) and
write a bundle with the plain student weights, per-epoch losses (task and each KD term) and COCO mAP.

Training state lives in a work directory beside the bundle (``.<name>.work``) until the bundle is published, so a
killed run can be continued with ``resume=True`` and a finished one leaves only the bundle.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from pathlib import Path

import yaml

from kdctl.bundle import Bundle, BundleWriter, next_run_dir
from kdctl.data.resolve import normalised_yaml, resolve_data
from kdctl.errors import CheckFailed, KdctlError, RecipeError
from kdctl.models import load_model, resolve_model
from kdctl.progress import Step
from kdctl.recipe.schema import Recipe


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _read_results(csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        rows = [{k.strip(): float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]
    # A run killed after logging an epoch but before checkpointing it repeats that epoch on --resume: last wins.
    by_epoch = {int(r.get("epoch", i + 1)): r for i, r in enumerate(rows)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _raised_by_ultralytics_data(e: BaseException) -> bool:
    """True for the errors Ultralytics raises about datasets and settings (not for bugs elsewhere)."""
    if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)) or isinstance(e, KdctlError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).as_posix() if tb else ""
    return any(f"/ultralytics/{m}/" in where for m in ("data", "cfg"))


def _callbacks(trainer, epochs: int, progress, stage: str) -> None:
    from kdctl.distill.ultralytics import save_balance

    bar = Step(progress, f"{stage} epoch 1/{epochs}", total=epochs)
    batches = Step(progress, "batches", total=None)
    t0 = {}

    def on_train_epoch_start(tr):
        t0["epoch"] = time.perf_counter()
        batches.total(len(tr.train_loader))
        bar.describe(f"{stage} epoch {tr.epoch + 1}/{epochs}")

    def on_train_batch_end(tr):
        loss = tr.loss.detach() if tr.loss is not None else None
        if loss is not None and not bool(loss.isfinite().all()):
            items = {k: round(float(v), 4) for k, v in (tr.loss_items or {}).items()}
            raise CheckFailed(f"training stopped: loss is not finite at epoch {tr.epoch + 1} ({items}); "
                              "lower train.lr0 or the KD weights (or set distill.auto_balance)")
        if stage == "distill" and not any(k.startswith("kd_") for k in (tr.loss_items or {})):
            raise RuntimeError("distillation step produced no KD terms; refusing to train the student without KD")
        save_balance(tr)
        batches.advance()

    def on_fit_epoch_end(tr):
        m = tr.metrics or {}
        done = min(tr.epoch + 1, epochs)  # Ultralytics fires this once more for the final validation
        bar.describe(f"{stage} epoch {done}/{epochs}  mAP50-95(val) {m.get('metrics/mAP50-95(B)', 0):.3f}")
        bar.completed(done)

    trainer.add_callback("on_train_epoch_start", on_train_epoch_start)
    trainer.add_callback("on_train_batch_end", on_train_batch_end)
    trainer.add_callback("on_fit_epoch_end", on_fit_epoch_end)


def _overrides(recipe: Recipe, data_yaml: Path, model_ref: str, work: Path) -> dict:
    t = recipe.train
    return {
        "model": model_ref, "data": str(data_yaml), "epochs": t.epochs, "imgsz": t.imgsz, "batch": t.batch,
        "lr0": t.lr0, "optimizer": t.optimizer, "seed": t.seed, "device": t.device, "workers": t.workers,
        "amp": t.amp, "patience": t.patience, "mosaic": t.mosaic, "close_mosaic": t.close_mosaic,
        "warmup_epochs": t.warmup_epochs, "project": str(work.resolve()), "name": "train", "exist_ok": True,
        "plots": False, "val": True, "deterministic": True, "verbose": False, "compile": False,
        "pretrained": False, "cache": False,
    }


def run_training(recipe: Recipe, *, stage: str, source: str = "recipe", out: str | Path | None = None,
                 runs_dir: str | Path = "runs", resume: bool = False, overwrite: bool = False,
                 progress=None) -> Bundle:
    """Train (``stage='train'``) or distill (``stage='distill'``) ``recipe.student``; returns the new bundle."""
    if stage == "distill" and not recipe.distill.losses:
        raise RecipeError(f"{source}: distill.losses: empty; list at least one loss (`kdctl list losses`), "
                          "or use `kdctl train` for training without a teacher")
    if stage == "distill" and recipe.teacher is None:
        raise RecipeError(f"{source}: teacher: required for distillation")
    out = Path(out) if out else (Path(runs_dir) / stage / recipe.name if resume else
                                 next_run_dir(runs_dir, stage, recipe.name))
    work = work_dir_for(out)
    last = work / "train" / "weights" / "last.pt"
    if resume and not last.is_file():
        raise KdctlError(f"{out}: nothing to resume (no {last})")
    if not resume and work.exists():
        raise KdctlError(f"{work}: an interrupted run is there; pass --resume to continue it, or remove it")
    if out.exists() and not overwrite:
        raise KdctlError(f"{out}: already exists; choose another --out or pass --overwrite")

    ds = resolve_data(recipe.data)
    student_ref = resolve_model(recipe.student.model, "student.model", source)
    teacher_ref = resolve_model(recipe.teacher.model, "teacher.model", source) if stage == "distill" else None

    from kdctl.distill.ultralytics import DistillSetup, KDTrainer, load_detector, plain_student

    setup = None
    if stage == "distill":
        teacher = load_model(teacher_ref, ds.nc, "teacher.model", source)
        # class-count or anchor-grid mismatches for head losses are reported by build_criterion, per loss
        setup = DistillSetup(teacher, recipe.distill.losses, recipe.distill.auto_balance, source)

    work.mkdir(parents=True, exist_ok=True)
    data_yaml = normalised_yaml(ds, work / "data.yaml")
    overrides = _overrides(recipe, data_yaml, student_ref.ref, work)
    if resume:
        overrides = {"resume": str(last), "data": str(data_yaml), "device": recipe.train.device,
                     "workers": recipe.train.workers}
    t_start = time.perf_counter()
    try:
        trainer = KDTrainer(overrides=overrides, distill=setup)
        _callbacks(trainer, recipe.train.epochs, progress, stage)
        trainer.train()
    except BaseException as e:
        if not last.is_file():  # failed before the first epoch checkpoint: nothing to resume, leave nothing
            shutil.rmtree(work, ignore_errors=True)
        if _raised_by_ultralytics_data(e):  # bad images/labels/settings: one line, not a traceback
            msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0] if str(e) else type(e).__name__
            raise KdctlError(f"{source}: training failed: {msg}") from None
        raise
    train_s = time.perf_counter() - t_start

    best = work / "train" / "weights" / "best.pt"
    weights_src = best if best.is_file() else last
    student = plain_student(load_detector(weights_src))

    inputs = {"data": ds.describe(), "student": {"model": recipe.student.model, "resolved": student_ref.ref,
                                                  "sha256": student_ref.sha256}}
    parents = [b for b in (student_ref.bundle, teacher_ref.bundle if teacher_ref else None) if b is not None]
    if teacher_ref:
        inputs["teacher"] = {"model": recipe.teacher.model, "resolved": teacher_ref.ref, "sha256": teacher_ref.sha256}

    from kdctl.evaluate import evaluate_backend, torch_backend

    ev = Step(progress, "evaluate (COCO mAP)", total=len(ds.val_images))
    metrics = evaluate_backend(torch_backend(student), ds.val_images, ds.names, recipe.train.imgsz,
                               progress=ev.advance)
    epochs = _read_results(work / "train" / "results.csv")

    with BundleWriter(out, stage=stage, recipe=recipe.model_dump(mode="json"), parents=parents, inputs=inputs,
                      overwrite=overwrite) as w:
        _save_student(student, w.path / "weights.pt", trainer)
        w.add_output("weights", "weights.pt")
        shutil.copy(data_yaml, w.path / "data.yaml")
        w.add_output("data", "data.yaml")
        if (work / "train" / "results.csv").is_file():
            shutil.copy(work / "train" / "results.csv", w.path / "results.csv")
            w.add_output("results", "results.csv")
        (w.path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        w.add_output("recipe", "recipe.yaml")
        w.metrics.update(_summary(metrics, epochs, student, train_s, recipe))
        kd = getattr(trainer.model, "kd", None)
        if kd is not None:
            w.metrics["kd_terms"] = [{"name": t.name, "loss": t.loss_name, "student_layers": t.s_layers,
                                      "teacher_layers": t.t_layers, "weight": t.weight,
                                      "scale": (kd.scales or [None] * len(kd.terms))[i]}
                                     for i, t in enumerate(kd.terms)]
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        w.add_output("metrics", "metrics.json")
    shutil.rmtree(work, ignore_errors=True)
    return w.bundle


def _summary(metrics: dict, epochs: list[dict], model, train_s: float, recipe: Recipe) -> dict:
    params = sum(p.numel() for p in model.parameters())
    per_epoch = []
    for r in epochs:
        row = {"epoch": int(r.get("epoch", len(per_epoch) + 1)), "time_s": r.get("time")}
        for k, v in r.items():
            if k.startswith("train/") or k.startswith("val/") or k.startswith("metrics/"):
                row[k] = v if math.isfinite(v) else None
        per_epoch.append(row)
    return {"map50_95": metrics["map50_95"], "map50": metrics["map50"], "map75": metrics["map75"],
            "per_class_ap50_95": metrics["per_class_ap50_95"], "eval_images": metrics["images"],
            "imgsz": recipe.train.imgsz, "params": params, "train_seconds": round(train_s, 2),
            "epochs": per_epoch}


def _save_student(student, path: Path, trainer) -> None:
    """An Ultralytics-loadable checkpoint (``YOLO(path)`` works) holding only the plain student."""
    import copy
    import datetime as dt

    import torch

    from ultralytics import __version__ as ul_version

    torch.save({"model": copy.deepcopy(student).half(), "ema": None, "epoch": -1,
                "train_args": {k: v for k, v in vars(trainer.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                "date": dt.datetime.now().isoformat(), "version": ul_version, "kdctl": True}, path)
