"""``kdctl train`` and ``kdctl distill``: train a detector through Ultralytics (with or without a teacher) and
write a bundle with the plain student weights, per-epoch losses (task and each KD term) and COCO mAP.

Training state lives in a work directory beside the bundle (``.<name>.work``) until the bundle is published, so a
killed run can be continued with ``resume=True`` and a finished one leaves only the bundle.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import shutil
import time
import uuid
from pathlib import Path

import yaml

from kdctl import faults
from kdctl.bundle import Bundle, BundleWriter, claim_output, next_run_dir, write_json_atomic
from kdctl.data.resolve import normalised_yaml, resolve_data
from kdctl.errors import CheckFailed, KdctlError, RecipeError, ResumeMismatch
from kdctl.models import as_started, dataset_classes, load_model, resolve_model
from kdctl.progress import Step
from kdctl.recipe.schema import TORCHVISION_TRAIN, ULTRALYTICS_TRAIN, Recipe, is_model_config


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


def _earlier_processes_s(epochs: list[dict], *, trained_here: bool) -> float:
    """Training seconds spent by the processes a resumed run continues. results.csv's ``time`` counts from the start
    of the process that logged the epoch (Ultralytics' trainer and the torchvision loop alike), so it falls back at
    each resume, and each earlier process contributes its last value. With ``trained_here`` False (a run killed after
    its last epoch, published by the resuming process) the last process is an earlier one too. An epoch a killed
    process logged and the next one repeated counts once (:func:`_read_results` keeps the repeat)."""
    times = [r.get("time") for r in epochs]
    ends = [a for a, b in zip(times, times[1:]) if a is not None and b is not None and b < a]
    if not trained_here and times and times[-1] is not None:
        ends.append(times[-1])
    return float(sum(ends))


def _raised_by_ultralytics_data(e: BaseException) -> bool:
    """True for the errors Ultralytics raises about datasets and settings (not for bugs elsewhere)."""
    if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)) or isinstance(e, KdctlError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).as_posix() if tb else ""
    return any(f"/ultralytics/{m}/" in where for m in ("data", "cfg"))


def _stop_advice(kd: bool, qat: bool) -> str:
    """What a run stopped on a non-finite loss or weights should change."""
    return ("lower train.lr0" + (" or the KD weights (or set distill.auto_balance)" if kd else "") +
            ("; quantization-aware training wants a well-trained float student to start from (its ranges are "
             "calibrated on it) and a low lr0, e.g. 0.0003" if qat else ""))


def _callbacks(trainer, epochs: int, progress, stage: str, work: Path, kd: bool, stop_epoch: int | None = None,
               warmup_epochs: int | None = None, qat: bool = False) -> None:
    """Progress, the finite-loss check, KD bookkeeping and fault points; ``kd``: the run has KD terms (a distillation
    with ``distill.init`` alone has none); ``qat``: quantization-aware (what a non-finite loss then points to);
    ``stop_epoch``: ``distill.stop_epoch`` (KD off from then on) and
    ``warmup_epochs``: ``distill.warmup_epochs`` (KD ramped in), also after ``--resume``: both are decided from the
    epoch number at each epoch's start."""
    from kdctl.detectors.yolo import kd_criterion, save_balance
    from kdctl.distributed import rank

    bar = Step(progress, f"{stage} epoch 1/{epochs}", total=epochs)
    batches = Step(progress, "batches", total=None)
    t0 = {}

    def on_train_epoch_start(tr):
        t0["epoch"] = time.perf_counter()
        batches.total(len(tr.train_loader))
        criterion = kd_criterion(tr)
        if criterion is not None:
            criterion.at_epoch(tr.epoch, stop_epoch, warmup_epochs)
        stopped = " (KD stopped: task loss only)" if criterion is not None and criterion.stopped else (
            f" (KD at {criterion.ramp:.0%})" if criterion is not None and criterion.ramp < 1 else "")
        bar.describe(f"{stage} epoch {tr.epoch + 1}/{epochs}{stopped}")

    def on_train_batch_end(tr):
        loss = tr.loss.detach() if tr.loss is not None else None
        if loss is not None and not bool(loss.isfinite().all()):
            items = {k: round(float(v), 4) for k, v in (tr.loss_items or {}).items()}
            raise CheckFailed(f"training stopped: loss is not finite at epoch {tr.epoch + 1} ({items}); "
                              + _stop_advice(kd, qat))
        if kd and not any(k.startswith("kd_") for k in (tr.loss_items or {})):
            raise RuntimeError("distillation step produced no KD terms; refusing to train the student without KD")
        save_balance(tr)
        batches.advance()

    def on_train_epoch_end(tr):
        # a finite loss can still back-propagate a non-finite gradient (QAT from a barely trained student: NaN in
        # the first layers' gradients at the first step); the weights then go NaN and every later loss with them,
        # so what would be published is a model that outputs nothing
        model = getattr(tr.model, "module", tr.model)
        bad = next((n for n, p in model.named_parameters() if not bool(p.detach().isfinite().all())), None)
        if bad is not None:
            raise CheckFailed(f"training stopped: the student's weights are not finite after epoch {tr.epoch + 1} "
                              f"({bad}, though the loss was finite: a gradient was not); " + _stop_advice(kd, qat))

    def on_fit_epoch_end(tr):
        m = tr.metrics or {}
        done = min(tr.epoch + 1, epochs)  # Ultralytics fires this once more for the final validation
        validated = getattr(tr.args, "val", True) or done == epochs  # train.val: false validates the last epoch only
        bar.describe(f"{stage} epoch {done}/{epochs}" +
                     (f"  mAP50-95(val) {m.get('metrics/mAP50-95(B)', 0):.3f}" if validated else ""))
        bar.completed(done)

    def on_train_start(tr):
        kd = kd_criterion(tr)
        if kd is not None and rank() <= 0:  # under DDP rank 0 writes the run's files
            write_json_atomic(work / KD_TERMS_FILE, [
                {"name": t.name, "loss": t.loss_name, "student_layers": t.s_layers, "teacher_layers": t.t_layers,
                 "weight": t.weight} for t in kd.terms])

    def on_model_save(tr):
        faults.point("train:epoch-saved")

    trainer.add_callback("on_train_start", on_train_start)
    trainer.add_callback("on_model_save", on_model_save)
    trainer.add_callback("on_train_epoch_start", on_train_epoch_start)
    trainer.add_callback("on_train_batch_end", on_train_batch_end)
    trainer.add_callback("on_train_epoch_end", on_train_epoch_end)
    trainer.add_callback("on_fit_epoch_end", on_fit_epoch_end)


def _overrides(recipe: Recipe, data_yaml: Path, model_ref: str, work: Path, from_checkpoint: bool = False) -> dict:
    """Ultralytics' trainer settings. ``pretrained`` is what makes it start from a checkpoint's weights (with
    ``pretrained=False`` it builds the checkpoint's architecture and discards its weights); a YAML has none."""
    t = recipe.train
    return {
        "model": model_ref, "data": str(data_yaml), "epochs": t.epochs, "imgsz": t.imgsz, "batch": t.batch,
        "lr0": t.lr0, "optimizer": t.optimizer, "seed": t.seed, "device": t.device, "workers": t.workers,
        "amp": t.amp, "patience": t.patience, "mosaic": t.mosaic, "close_mosaic": t.close_mosaic,
        "warmup_epochs": t.warmup_epochs, "warmup_bias_lr": _warmup_bias_lr(t),
        "project": str(work.resolve()), "name": "train", "exist_ok": True,
        "plots": False, "val": t.val, "deterministic": True, "verbose": False, "compile": False,
        "pretrained": from_checkpoint, "cache": False, "quantize": 8 if recipe.distill.quantize == "int8" else None,
    } | ({"nbs": t.nbs} if t.nbs else {}) | {k: getattr(t, k) for k in ULTRALYTICS_TRAIN if getattr(t, k) is not None}


RUN_FILE = "run.json"     # in the work dir: the bundle id this run will publish and whether it may overwrite
KD_TERMS_FILE = "kd_terms.json"


def _run_info(work: Path) -> dict | None:
    try:
        info = json.loads((work / RUN_FILE).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("bundle_id"), str) else None
    except (OSError, ValueError):
        return None


def _checkpoint_state(last: Path, epochs: int) -> str:
    """``"none"``, ``"partial"`` (resume training) or ``"finished"`` (only publishing is left)."""
    if not last.is_file():
        return "none"
    import torch

    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        epoch = int(ckpt.get("epoch", -1))
    except Exception as e:  # killed while Ultralytics rewrote it
        raise KdctlError(f"{last}: the interrupted run's checkpoint is unreadable ({type(e).__name__}); "
                         "pass --overwrite to start over") from None
    return "finished" if epoch == -1 or epoch + 1 >= epochs else "partial"


def _warmup_bias_lr(t) -> float:
    """Ultralytics warms biases up from lr 0.1 (its SGD-era default) unless it picks the optimizer itself. With
    an explicit AdamW that looks ~30x too high, but measured on the quickstart it is what trains a strong detector
    from scratch: teacher mAP50-95 0.365 with 0.1 against 0.214 starting at 0 (same seed, docs/benchmarks.md), so
    the default stays 0.1 and ``train.warmup_bias_lr`` overrides it."""
    return 0.1 if t.warmup_bias_lr is None else t.warmup_bias_lr


def _reusable(out: Path, recipe: Recipe, stage: str) -> Bundle | None:
    """The bundle at ``out`` if it verifies and was made by this stage from exactly this recipe."""
    from kdctl.bundle import load_bundle
    from kdctl.bundle.output import bundle_state
    from kdctl.errors import BundleError

    if bundle_state(out)[0] != "bundle":
        return None
    try:
        b = load_bundle(out, stages=(stage,), verify=True)
    except BundleError:
        return None
    return b if recipe_difference(b.recipe, recipe) is None else None


def _as_current(dump):
    """A recorded recipe as this kdctl reads it (fields added since with their defaults), so a bundle or an
    interrupted run from an earlier kdctl still counts as the same recipe."""
    try:
        return Recipe.model_validate(dump).model_dump(mode="json")
    except Exception:  # not a recipe this kdctl can read: compared as recorded (and then differs)
        return dump


def untrained_teacher(recipe: Recipe, source: str = "recipe") -> str | None:
    """Why ``recipe``'s teacher has nothing to teach, if it is built from a model config (a YAML, a torchvision
    builder): kdctl downloads no weights, so such a teacher starts from random weights, where Ultralytics' own
    ``yolov8n.pt`` would come pretrained. None for a checkpoint or bundle teacher, and for ``kdctl train``."""
    from kdctl.models import resolve_model

    spec = recipe.teacher.model if recipe.teacher is not None else None
    if spec is None or not is_model_config(spec):
        return None  # a checkpoint or bundle: resolved (hashed, verified) once, by the run itself
    ref = resolve_model(spec, "teacher.model", source)  # a config: cheap to resolve; a bad one is the run's error
    return (f"{source}: teacher.model: '{ref.ref}' is a model config: the teacher is built with random weights and "
            "has learnt nothing to teach; name a trained .pt or a train bundle (kdctl train <teacher recipe>)")


def run_training(recipe: Recipe, *, stage: str, source: str = "recipe", out: str | Path | None = None,
                 runs_dir: str | Path = "runs", resume: bool = False, overwrite: bool = False,
                 skip_invalid: bool | None = None, reuse: bool = False, progress=None,
                 launch=None) -> Bundle | None:
    """Train (``stage='train'``) or distill (``stage='distill'``) ``recipe.student``; returns the new bundle.

    ``launch`` (a :class:`kdctl.distributed.Launch`) trains on torchrun ranks instead of in this process; on a node
    other than node 0 this process only runs its ranks and returns None (node 0 publishes).

    ``resume=True`` continues a run killed at any point: before its first checkpoint (starts over), mid-run (from
    the last epoch), after its last epoch or while publishing (publishes), after publishing (cleans up).
    ``reuse=True`` returns the bundle already at ``out`` when it verifies and came from this very recipe.
    """
    refused = recipe.refusal(stage, source)
    if refused:
        raise RecipeError(refused)
    if recipe.distill.quantize:
        import importlib.util

        from kdctl.errors import BackendUnavailable

        missing = [m for m in ("modelopt", "huggingface_hub") if importlib.util.find_spec(m) is None]
        if missing:
            raise BackendUnavailable(f"{source}: distill.quantize: quantization-aware training needs the "
                                     f"'{missing[0]}' package (pip install 'kdctl[train]', which brings "
                                     "nvidia-modelopt and huggingface_hub)")
    from kdctl.distributed import check_device

    check_device(recipe.train.device, f"{source}: train.device")
    writer = launch is None or launch.node_rank == 0  # the other nodes of a multi-node run publish nothing
    out = Path(out) if out else (Path(runs_dir) / stage / recipe.name if resume else
                                 next_run_dir(runs_dir, stage, recipe.name, reserve=writer))
    work = work_dir_for(out)
    if reuse and not work.exists():  # e.g. the demo's teacher: trained once, kept while its recipe is unchanged
        same = _reusable(out, recipe, stage)
        if same is not None:
            return same
    info = _run_info(work)
    if resume:
        done = _already_published(out, work, info, recipe, stage)
        if done is not None:
            return done
    student_ref = resolve_model(recipe.student.model, "student.model", source)
    teacher_ref = resolve_model(recipe.teacher.model, "teacher.model", source) if stage == "distill" else None
    if launch is not None and launch.node_rank > 0:
        return _join(recipe, stage, source, work, launch, student_ref, teacher_ref, skip_invalid, progress)
    in_bundles = [r.bundle.path for r in (student_ref, teacher_ref) if r is not None and r.bundle is not None]
    may_overwrite = overwrite or bool(resume and info and info.get("overwrite"))
    with claim_output(out, overwrite=may_overwrite, inputs=in_bundles):
        last = work / "train" / "weights" / "last.pt"
        state = _checkpoint_state(last, recipe.train.epochs) if work.exists() else "none"
        if work.exists() and not resume:
            if state != "none" and not overwrite:
                raise KdctlError(f"{work}: an interrupted run is there; pass --resume to continue it, or "
                                 "--overwrite to discard it")
            shutil.rmtree(work)  # stale (killed before its first checkpoint) or discarded by --overwrite
        elif resume and state == "none":
            shutil.rmtree(work, ignore_errors=True)  # killed before the first checkpoint: nothing to keep
        if resume and info and state != "none" and overwrite and _changed_recipe(info, recipe):
            shutil.rmtree(work)  # --resume --overwrite: continue the interrupted run if it is this recipe's, else
            state = "none"       # discard it and start over, as --overwrite alone would (make demo passes both)
        if resume and info and state != "none":
            _check_same_recipe(info, recipe, source, work)
        else:
            info = {"bundle_id": uuid.uuid4().hex, "overwrite": overwrite, "stage": stage,
                    "recipe": recipe.model_dump(mode="json")}
        return _train_and_publish(recipe, stage, source, out, work, state if resume else "none", info,
                                  student_ref, teacher_ref, may_overwrite, skip_invalid, progress, launch)


RESUME_MAY_CHANGE = ("train.device", "train.workers")  # a killed run may continue on another device


def _first_difference(a, b, path: str = "", may_change: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first field where two recipe dumps differ, other than ``may_change`` (None: the
    same)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), may_change)
            if d:
                return d
        return None
    return None if a == b or path in may_change else path


def recipe_difference(recorded, recipe: Recipe, may_change: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first field where a recorded recipe (a bundle's or an interrupted run's, read as this
    kdctl reads it) differs from ``recipe``, every field counted but ``may_change``; None where it is the same
    recipe."""
    current = _as_current(recorded)
    if not isinstance(current, dict):
        return "recipe"  # none recorded
    return _first_difference(current, recipe.model_dump(mode="json"), may_change=may_change)


def _changed_recipe(info: dict, recipe: Recipe) -> bool:
    before = info.get("recipe")
    return not isinstance(before, dict) or recipe_difference(before, recipe, RESUME_MAY_CHANGE) is not None


def _check_same_recipe(info: dict, recipe: Recipe, source: str, work: Path) -> None:
    """``--resume`` continues the interrupted run's training: its checkpoint, KD adapters and balance belong to the
    recipe it started from, so a changed recipe (other losses, epochs, data...) is refused in one line."""
    before = info.get("recipe")
    diff = recipe_difference(before, recipe, RESUME_MAY_CHANGE) if isinstance(before, dict) else None
    if diff:
        from kdctl.errors import shown

        was, now = _field(_as_current(before), diff), _field(recipe.model_dump(mode="json"), diff)
        raise ResumeMismatch(f"{source}: {diff}: differs from the recipe of the interrupted run in {work} "
                             f"({shown(was, 40)} there, {shown(now, 40)} here); resume it with the recipe it started "
                             "from (and the same --set), or pass --overwrite to start over")


def _field(dump, dotted: str):
    """A recipe dump's value at a dotted path (None where the path is not there)."""
    for part in dotted.split("."):
        dump = dump.get(part) if isinstance(dump, dict) else None
    return dump


def _already_published(out: Path, work: Path, info: dict | None, recipe: Recipe, stage: str) -> Bundle | None:
    """``--resume`` of a run whose bundle is already published: clean up its work dir and return the bundle."""
    from kdctl.bundle import load_bundle
    from kdctl.bundle.output import OutputLock, absolute, bundle_state

    state, bid = bundle_state(out)
    if state != "bundle":
        return None
    if info is None or bid != info["bundle_id"]:
        # not ours: a newer interrupted run is in the work dir (resume it), or the bundle is someone else's
        # result (claim_output refuses it with the usual message) unless it is this very recipe's, finished earlier
        return None if work.exists() else _reusable(out, recipe, stage)
    lock = OutputLock(absolute(out))
    lock.acquire()
    try:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()
    return load_bundle(out, verify=True)


def _train_and_publish(recipe: Recipe, stage: str, source: str, out: Path, work: Path, state: str, info: dict,
                       student_ref, teacher_ref, overwrite: bool, skip_invalid, progress, launch=None) -> Bundle:
    """Check the models -> fit (unless a killed run had finished) -> evaluate the best weights -> publish."""
    ds = resolve_data(recipe.data, skip_invalid=skip_invalid)
    fam, student0, setup, start = _models(recipe, stage, source, ds, state, student_ref, teacher_ref)
    if setup is not None:  # a layer out of range, a pair that does not match: one line before any work
        _check_criterion(student0, setup, recipe)
    if start is not None:  # a checkpoint of other classes: where each of the dataset's classes started, by name
        info["student_classes"] = start
    if setup is not None and setup.init_note:  # distill.init: auto fell back to a random start: the bundle says why
        info["init_note"] = setup.init_note
    if setup is not None and setup.teacher_classes:  # the teacher's classes the dataset's were found at, by name
        info["teacher_classes"] = setup.teacher_classes
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / RUN_FILE, info)
    faults.point("train:started")
    data_yaml = normalised_yaml(ds, work / "data.yaml")
    if setup is not None and setup.cache:  # built once here (resumed if a build was killed); ranks only read it
        from kdctl.distill.cache import build

        with _resumable_or_gone(work):  # e.g. a stale cache before any training: no work dir left
            build(recipe, source, setup.teacher, data_yaml, ds.train_images, Path(setup.cache), progress=progress)
    t_start = time.perf_counter()  # training only (a cache build is timed in the cache's meta)
    if state != "finished":
        if launch is not None:
            setup = None  # every rank loads its own teacher from disk
        _fit(recipe, stage, source, work, state, fam, setup, student_ref, data_yaml, progress, launch)
        faults.point("train:finished")
    train_s = time.perf_counter() - t_start  # this process's share when resumed; the killed ones' added below
    epochs = _read_results(work / "train" / "results.csv")  # read once: the time here, the metrics in the bundle
    train_s += _earlier_processes_s(epochs, trained_here=state != "finished")
    return _publish(recipe, stage, source, out, work, info, ds, fam, student_ref, teacher_ref, epochs, train_s,
                    overwrite, progress)


def _rank_spec(recipe: Recipe, stage: str, source: str, work: Path, state: str, data_yaml: Path, progress) -> dict:
    """What a torchrun rank needs to rebuild this run's trainer (:func:`fit_rank`)."""
    return {"recipe": recipe.model_dump(mode="json"), "stage": stage, "source": source, "work": str(work.resolve()),
            "state": state, "data_yaml": str(data_yaml.resolve()), "progress": progress is not None}


def _join(recipe: Recipe, stage: str, source: str, work: Path, launch, student_ref, teacher_ref, skip_invalid,
          progress) -> None:
    """A node other than node 0 of a multi-node run: run this node's ranks; node 0 checkpoints and publishes. This
    node's launch files live in ``.<name>.node<k>.work`` beside the run; with the run directory on a shared
    filesystem, ``--resume`` on every node continues from node 0's checkpoint."""
    from kdctl import distributed

    ds = resolve_data(recipe.data, skip_invalid=skip_invalid)
    cached = stage == "distill" and recipe.distill.cache is not None
    # a bad student is one line here too; with a teacher cache, this node builds (or checks) its own copy
    _, _, setup, _ = _models(recipe, stage, source, ds, "none" if cached else "finished", student_ref, teacher_ref)
    node_dir = work.parent / f"{work.name.removesuffix('.work')}.node{launch.node_rank}.work"
    node_dir.mkdir(parents=True, exist_ok=True)
    data_yaml = normalised_yaml(ds, node_dir / "data.yaml")
    if cached:
        from kdctl.distill.cache import build

        build(recipe, source, setup.teacher, data_yaml, ds.train_images, Path(setup.cache), progress=progress)
        del setup
    state = _checkpoint_state(work / "train" / "weights" / "last.pt", recipe.train.epochs)
    if state != "finished":
        distributed.run(launch, node_dir, _rank_spec(recipe, stage, source, work, state, data_yaml, progress))
    shutil.rmtree(node_dir, ignore_errors=True)
    return None


def fit_rank(spec: dict) -> None:
    """One torchrun rank (``python -m kdctl.distributed worker``): the same trainer as a one-process run, rebuilt from
    the recipe, teacher included; rank 0 shows the progress and writes checkpoints; every rank reports digests."""
    from kdctl import distributed
    from kdctl.cli._common import progress_bar
    from kdctl.data.resolve import load_yolo_yaml

    recipe = Recipe.model_validate(spec["recipe"])
    stage, source, work, state = spec["stage"], spec["source"], Path(spec["work"]), spec["state"]
    ds = load_yolo_yaml(spec["data_yaml"], skip_invalid=True)
    student_ref = resolve_model(recipe.student.model, "student.model", source)
    teacher_ref = resolve_model(recipe.teacher.model, "teacher.model", source) if stage == "distill" else None
    fam, _, setup, _ = _models(recipe, stage, source, ds, state, student_ref, teacher_ref)
    reporter = distributed.RankReporter(work / distributed.DDP_DIR, setup.teacher if setup else None)
    with progress_bar(bool(spec.get("progress")) and distributed.rank() == 0) as p:
        _train(recipe, stage, source, work, state, fam, setup, student_ref, Path(spec["data_yaml"]), p,
               reporter.attach)


def missing_inputs(recipe: Recipe, source: Path) -> list[str]:
    """``kdctl recipe check``: what the recipe reads that is not there yet, a model checkpoint or bundle, the
    dataset's files. Notes, not errors: an earlier stage of a pipeline (the teacher's ``kdctl train``) may still
    write them, and train or distill stops on each in one line. A model that is there but unusable (another stage's
    bundle, an altered one) is an error here as it is there."""

    def missing(field: str, path: str) -> str:  # a relative path was resolved beside the recipe when found nowhere
        where = (" (a relative path is looked for beside the recipe, then in the working directory)"
                 if Path(path).is_relative_to(source.parent.resolve()) else "")
        return f"{field}: '{path}' does not exist yet{where}"

    notes = []
    models = [("student.model", recipe.student.model)]
    models += [("teacher.model", recipe.teacher.model)] if recipe.teacher else []
    for field, spec in models:
        p = Path(spec)
        path = not spec.startswith("torchvision:") and (p.suffix not in (".yaml", ".yml") or len(p.parts) > 1)
        if path and not p.exists():  # a bare name is a model config: resolved below, or one line saying it is none
            notes.append(missing(field, spec))
        else:
            resolve_model(spec, field, str(source))
    data = [("data.yolo", recipe.data.yolo)] if recipe.data.yolo else []
    if recipe.data.coco:
        data += [(f"data.coco.{k}", v) for k, v in recipe.data.coco.model_dump().items()]
    return notes + [missing(field, path) for field, path in data if not Path(path).exists()]


def check_models(recipe: Recipe, source: str = "recipe", skip_invalid: bool | None = None) -> dict:
    """``kdctl recipe check --models``: build the student and, for a recipe with distillation losses, the teacher
    and the KD criterion exactly as ``distill`` would (layers resolved, adapters sized, pairs and levels checked),
    without training or writing a bundle (built-in synthetic data is generated, as distill would). Returns the
    resolved KD terms and, with ``distill.init``, how the student would start."""
    ds = resolve_data(recipe.data, skip_invalid=skip_invalid)
    distill = bool(recipe.distill.losses or recipe.distill.init) and recipe.teacher is not None
    student_ref = resolve_model(recipe.student.model, "student.model", source)
    teacher_ref = resolve_model(recipe.teacher.model, "teacher.model", source) if distill else None
    _, student, setup, start = _models(recipe, "distill" if distill else "train", source, ds, "none", student_ref,
                                       teacher_ref)
    out = {"student_classes": start} if start else {}
    if setup is None:
        return {"kd_terms": [], **out}
    kd = _check_criterion(student, setup, recipe)
    out["kd_terms"] = [{"name": t.name, "loss": t.loss_name, "student_layers": t.s_layers,
                        "teacher_layers": t.t_layers, "weight": t.weight} for t in kd.terms]
    if recipe.distill.init:
        out["init"] = {"from": "teacher"} if setup.init else {"from": "random", "reason": setup.init_note}
    if setup.teacher_classes:
        out["teacher_classes"] = setup.teacher_classes
    return out


def _check_criterion(student, setup, recipe: Recipe):
    """The KD criterion resolved on the throw-away student, as ``recipe check --models`` does and the trainer will:
    a layer out of range or a pair that does not match is one line before the progress bar and the work folder,
    not an error from inside the trainer. The random state is left as it was (adapters are initialised here), so
    the run that follows starts from the same draws."""
    import torch

    from kdctl.detectors import build_criterion

    with torch.random.fork_rng(devices=[]):
        return build_criterion(student, setup, recipe.train.imgsz)


def _check_stride(recipe: Recipe, source: str, model, who: str) -> None:
    """Ultralytics trains a P6 model (stride 64) at 96 px by rounding up to 128, and kdctl's evaluation at 96 then
    fails mid-run: an input size the model cannot take is refused before any work."""
    from kdctl.models import check_imgsz

    check_imgsz(recipe.train.imgsz, model, f"{source}: train.imgsz", f"the {who}'s", RecipeError)


def _models(recipe: Recipe, stage: str, source: str, ds, state: str, student_ref, teacher_ref):
    """The student's family and model (built once, so a bad one is a one-line error before any work) and, for a
    distillation still to run, the teacher with the KD set-up."""
    from kdctl.detectors import family, torchvision
    from kdctl.detectors.yolo import DistillSetup

    student0, start = load_model(student_ref, ds.nc, "student.model", source), None  # one line if it does not build
    if student_ref.kind == "checkpoint":  # a checkpoint of other classes: the student its trainer will start
        try:
            student0, start = as_started(student0, ds, recipe.train.seed)
        except KdctlError as e:  # a quantization-aware Faster R-CNN of other classes
            raise RecipeError(f"{source}: student.model: {e}", exit_code=e.exit_code) from None
    _check_stride(recipe, source, student0, "student")
    fam = family(student0)
    if fam is torchvision and not recipe.train.val:
        raise RecipeError(f"{source}: train.val: false skips validation in Ultralytics' trainer; kdctl's {fam.LABEL} "
                          "loop validates every epoch to keep the best one; leave train.val out")
    ignored = [k for k in ULTRALYTICS_TRAIN if getattr(recipe.train, k) is not None and k not in TORCHVISION_TRAIN]
    if fam is torchvision and ignored:
        raise RecipeError(f"{source}: train.{ignored[0]}: a setting of Ultralytics' trainer, which kdctl's "
                          f"{fam.LABEL} loop does not apply (of these it takes {', '.join(TORCHVISION_TRAIN)}); "
                          "leave it out")
    if fam is torchvision and recipe.train.nbs not in (None, recipe.train.batch):
        raise RecipeError(f"{source}: train.nbs: {recipe.train.nbs} accumulates gradients over batches, and kdctl's "
                          f"{fam.LABEL} loop steps the optimizer every batch (as torchvision's references do); leave "
                          "nbs out or set it to train.batch")
    if stage != "distill" or state == "finished":
        return fam, student0, None, start
    import torch

    # a teacher built from a model YAML gets the same weights in every process (each DDP rank, a cache build and
    # the distillation that replays it)
    torch.manual_seed(recipe.train.seed)
    # a teacher of more classes than the dataset's (a COCO one) read for the dataset's, by name
    teacher, classes = dataset_classes(load_model(teacher_ref, ds.nc, "teacher.model", source), ds)
    _check_stride(recipe, source, teacher, "teacher")
    if fam is torchvision and family(teacher) is not torchvision:
        raise RecipeError(f"{source}: teacher.model: a {family(teacher).LABEL} teacher ('{teacher_ref.ref}') for a "
                          f"{fam.LABEL} student: a one-stage teacher for a two-stage student is not available yet; "
                          "use a torchvision teacher (a two-stage teacher can teach a YOLO or RT-DETR student)")
    # class-count or anchor-grid mismatches for head losses are reported by build_criterion, per loss; a teacher
    # whose classes are the dataset's in another order would teach (or hand its head to) the wrong classes
    d = recipe.distill
    from kdctl.distill.losses.registry import LOSSES

    if d.init or any(LOSSES[spec.name].kind not in ("feature", "rpn") for spec in d.losses):
        ds.check_model_names(getattr(teacher, "names", None), f"the teacher ('{teacher_ref.ref}')")
    cache = None
    if d.cache is not None:
        from kdctl.distill.cache import cache_path, check_recipe

        check_recipe(recipe, source, student0, teacher)
        cache = str(cache_path(recipe))
    init, note = d.init, None
    if init:
        try:
            _check_init(student_ref, student0, teacher, fam, source)
        except RecipeError as e:
            if init != "auto":
                raise
            init, note = None, str(e).removeprefix(f"{source}: distill.init: ")  # a random start, and why
            if d.quantize and student_ref.kind != "checkpoint":  # as run_training refuses it without init
                raise RecipeError(f"{source}: distill.quantize: {d.quantize} fine-tunes a trained student, and "
                                  f"distill.init: auto leaves '{student_ref.ref}' at random weights here ({note}); "
                                  "train it first without quantize and name that bundle as student.model") from None
    setup = DistillSetup(teacher, d.losses, d.auto_balance, source, d.balance_batches, d.balance_cap, cache,
                         "teacher" if init else None, note, classes)
    return fam, student0, setup, start


def _check_init(student_ref, student, teacher, fam, source: str) -> None:
    """``distill.init: teacher`` on a pair it can work for: a YOLO student built from a model YAML (a checkpoint
    or bundle student already has weights) whose layer layout the teacher shares (tried on the throw-away build)."""
    from kdctl.detectors import family, torchvision
    from kdctl.detectors.weight_selection import FIELD, select_weights

    if torchvision in (fam, family(teacher)):
        raise RecipeError(f"{source}: {FIELD}: weight selection is available for Ultralytics YOLO and RT-DETR pairs "
                          f"only (here a {family(teacher).LABEL} teacher and a {fam.LABEL} student)")
    if student_ref.kind != "yaml":
        raise RecipeError(f"{source}: {FIELD}: the student '{student_ref.ref}' already has weights; weight "
                          "selection starts a student built from a model YAML (e.g. student.model: yolov8n.yaml)")
    select_weights(student, teacher, source)


@contextlib.contextmanager
def _resumable_or_gone(work: Path):
    """A failure before the first epoch checkpoint leaves no work dir (there is nothing to resume); after it, the
    work dir stays for ``--resume``."""
    try:
        yield
    except BaseException:
        if not (work / "train" / "weights" / "last.pt").is_file():
            shutil.rmtree(work, ignore_errors=True)
        raise


def _fit(recipe: Recipe, stage: str, source: str, work: Path, state: str, fam, setup, student_ref, data_yaml: Path,
         progress, launch=None) -> None:
    """Run the family's trainer in ``work/train`` (from the last epoch checkpoint when ``state == 'partial'``): in
    this process, or on ``launch``'s torchrun ranks (``kdctl.distributed``) while this process waits."""
    from kdctl import distributed

    # the ranks' report belongs to the epochs that write it: a DDP run's is stale once training starts again
    (work / distributed.DDP_DIR / distributed.RANKS_FILE).unlink(missing_ok=True)
    with _resumable_or_gone(work):
        if launch is None:
            _train(recipe, stage, source, work, state, fam, setup, student_ref, data_yaml, progress)
        else:
            distributed.run(launch, work, _rank_spec(recipe, stage, source, work, state, data_yaml, progress))


def _train(recipe: Recipe, stage: str, source: str, work: Path, state: str, fam, setup, student_ref,
           data_yaml: Path, progress, attach=None) -> None:
    """Build the family's trainer (resuming ``work/train/weights/last.pt`` when ``state == 'partial'``) and train;
    ``attach(trainer)`` adds more callbacks. Errors Ultralytics raises about the data become one line."""
    from kdctl.detectors.yolo import library_output_to_stderr, train_threads

    last = work / "train" / "weights" / "last.pt"
    overrides = _overrides(recipe, data_yaml, student_ref.ref, work, student_ref.kind == "checkpoint")
    if state == "partial":
        overrides = {"resume": str(last), "data": str(data_yaml), "device": recipe.train.device,
                     "workers": recipe.train.workers}
    try:
        with train_threads(recipe.train.threads):
            trainer = fam.trainer(overrides, distill=setup)
            _callbacks(trainer, recipe.train.epochs, progress, stage, work,
                       kd=stage == "distill" and bool(recipe.distill.losses), stop_epoch=recipe.distill.stop_epoch,
                       warmup_epochs=recipe.distill.warmup_epochs, qat=bool(recipe.distill.quantize))
            if attach is not None:
                attach(trainer)
            with library_output_to_stderr():
                trainer.train()
    except BaseException as e:
        if _raised_by_ultralytics_data(e):  # bad images/labels/settings: one line, not a traceback
            msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0] if str(e) else type(e).__name__
            raise KdctlError(f"{source}: training failed: {msg}") from None
        raise


def _publish(recipe: Recipe, stage: str, source: str, out: Path, work: Path, info: dict, ds, fam, student_ref,
             teacher_ref, epochs: list[dict], train_s: float, overwrite: bool, progress) -> Bundle:
    """Evaluate the best checkpoint and write the bundle (weights, data, results, recipe, metrics; ``epochs``: the
    rows of results.csv); the work dir goes once the bundle is published."""
    from kdctl.detectors import load_detector, save_checkpoint
    from kdctl.distributed import trained_on
    from kdctl.evaluate import evaluate_with_records, torch_backend
    from kdctl.evaluate.records import add_records

    best, last = work / "train" / "weights" / "best.pt", work / "train" / "weights" / "last.pt"
    weights_src = best if best.is_file() else last
    student = fam.plain_student(load_detector(weights_src))

    inputs = {"data": ds.describe(), "student": {"model": recipe.student.model, "resolved": student_ref.ref,
                                                  "sha256": student_ref.sha256}}
    if info.get("student_classes"):
        inputs["student"]["classes"] = info["student_classes"]
    parents = [b for b in (student_ref.bundle, teacher_ref.bundle if teacher_ref else None) if b is not None]
    if teacher_ref:
        inputs["teacher"] = {"model": recipe.teacher.model, "resolved": teacher_ref.ref, "sha256": teacher_ref.sha256}
        if info.get("teacher_classes"):
            inputs["teacher"]["classes"] = info["teacher_classes"]
    if recipe._origin:  # the file as read and the --set texts on it (the bundle's recipe is the result of both)
        inputs["recipe_file"] = recipe._origin

    ev = Step(progress, "evaluate (COCO mAP)", total=len(ds.val_images))
    device = _first_gpu(recipe.train.device)
    metrics, records = evaluate_with_records(torch_backend(student, device), ds.val_images, ds.names,
                                             recipe.train.imgsz, progress=ev.advance)
    teacher_eval = (_evaluate_teacher(teacher_ref, ds, records, recipe, source, device, progress)
                    if stage == "distill" else None)

    with BundleWriter(out, stage=stage, recipe=recipe.model_dump(mode="json"), parents=parents, inputs=inputs,
                      overwrite=overwrite, bundle_id=info["bundle_id"]) as w:
        save_checkpoint(student, w.path / "weights.pt", _train_args(weights_src))
        w.add_output("weights", "weights.pt")
        normalised_yaml(ds, w.path / "data.yaml", image_lists=False)  # no paths into the work dir
        w.add_output("data", "data.yaml")
        add_records(w, records, ds.val_images)  # what the report's paired interval resamples
        if (work / "train" / "results.csv").is_file():
            shutil.copy(work / "train" / "results.csv", w.path / "results.csv")
            w.add_output("results", "results.csv")
        (w.path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        w.add_output("recipe", "recipe.yaml")
        # where it trained (train.device 'mps' on a machine without Apple's GPU ran on the CPU) and was scored
        w.metrics.update(_summary(metrics, epochs, student, train_s, recipe), eval_device=device,
                         train_device=trained_on(recipe.train.device))
        if stage == "distill":
            w.metrics["kd_terms"] = _kd_terms(work) if recipe.distill.losses else []  # [] for distill.init alone
            if teacher_eval is not None:
                w.metrics["teacher"] = teacher_eval
            if recipe.distill.stop_epoch is not None:
                w.metrics["kd_stop_epoch"] = recipe.distill.stop_epoch  # the last epoch with KD terms
        if stage == "distill" and recipe.distill.init:
            from kdctl.detectors.yolo import INIT_FILE

            init = work / "train" / INIT_FILE
            if info.get("init_note"):
                w.metrics["init"] = {"from": "random", "reason": info["init_note"]}
            elif not init.is_file():
                raise CheckFailed(f"{source}: distill.init: {recipe.distill.init} was set, but the run left no record "
                                  f"of it ({init.name})")
            else:
                w.metrics["init"] = json.loads(init.read_text())
        if stage == "distill" and recipe.distill.cache is not None:
            from kdctl.distill.cache import META, cache_path

            meta_path = cache_path(recipe) / META
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            w.metrics["teacher_cache"] = {"path": str(cache_path(recipe)), **{k: meta.get(k) for k in (
                "teacher_sha256", "data_sha256", "views_per_epoch", "epochs", "kd_epochs", "top_k", "k", "anchors",
                "bytes_per_view", "build_seconds")}}
        ranks = _ranks(work)
        if ranks is not None:
            from kdctl.distributed import check_ranks

            w.metrics["distributed"] = check_ranks(ranks, len(ranks), stage)
        if recipe.distill.quantize:
            from kdctl.detectors.yolo import is_qat, quantizer_summary

            if not is_qat(student):
                raise CheckFailed(f"{source}: distill.quantize: {recipe.distill.quantize} was set, but the trained "
                                  "student carries no fake quantizers")
            w.metrics["qat"] = {"quantize": recipe.distill.quantize, **quantizer_summary(student)}
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        w.add_output("metrics", "metrics.json")
    faults.point("train:published")
    shutil.rmtree(work, ignore_errors=True)
    return w.bundle


def _evaluate_teacher(teacher_ref, ds, records, recipe: Recipe, source: str, device: str,
                      progress) -> dict | None:
    """The teacher's mAP on the distillation's validation images at its image size, where no bundle already holds
    that number: the teacher is the user's own checkpoint, or a bundle scored on other images or at another size
    (a teacher trained at 640 px on a larger set, distilled at 320 px): what the report's "Did distillation help?"
    sets the students against. None for a bundle scored as the student was (``records``: the student's evaluation
    records), a teacher built from a model YAML or by torchvision without weights (it learnt nothing) and one that
    predicts other classes than the dataset's (feature-level KD from a teacher of another dataset): there is
    nothing to compare there. Scored on ``device``, where the student was."""
    if teacher_ref is None or teacher_ref.kind != "checkpoint":
        return None
    if teacher_ref.bundle is not None and _scored_alike(teacher_ref.bundle, ds, records, recipe.train.imgsz):
        return None
    from kdctl.errors import DataError
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.models import model_classes

    teacher, _ = dataset_classes(load_model(teacher_ref, ds.nc, "teacher.model", source), ds)
    try:
        ds.check_model_classes(model_classes(teacher), "the teacher", names=getattr(teacher, "names", None))
    except DataError:
        return None
    ev = Step(progress, "evaluate the teacher (COCO mAP)", total=len(ds.val_images))
    m = evaluate_backend(torch_backend(teacher, device), ds.val_images, ds.names, recipe.train.imgsz,
                         progress=ev.advance)
    return {"model": teacher_ref.ref, "sha256": teacher_ref.sha256,
            **{k: m[k] for k in ("map50_95", "map50", "map75", "per_class_ap50_95")}, "eval_images": m["images"],
            "imgsz": recipe.train.imgsz, "params": sum(p.numel() for p in teacher.parameters())}


def _scored_alike(bundle: Bundle, ds, records, imgsz: int) -> bool:
    """Whether a bundle's published mAP was scored at ``imgsz`` on the images and labels the student's ``records``
    were (its evaluation records: the same image keys and ground-truth counts)."""
    from kdctl.evaluate.records import ROLE, RecordsError, aligned, has_records, image_keys, load_records

    if bundle.metrics.get("imgsz") != imgsz or not has_records(bundle):
        return False
    try:
        theirs, keys = load_records(bundle.file(ROLE))
    except (RecordsError, KdctlError):
        return False
    return aligned(records, image_keys(ds.val_images), theirs, keys) is not None


def _first_gpu(device: str | None) -> str:
    """Where to score the trained model and a teacher: the first CUDA GPU the run trained on (a large model over a
    COCO-sized validation set takes hours on a CPU), else the CPU ('mps' included, as Ultralytics falls back to
    it)."""
    from kdctl.evaluate import torch_device

    first = str(device or "").split(",")[0].strip().lower()
    return torch_device(first, "train.device") if first == "cuda" or first.isdigit() else "cpu"


def _ranks(work: Path) -> list[dict] | None:
    """Every rank's end-of-training report when the last epochs ran on torchrun ranks (None: one process)."""
    from kdctl.distributed import DDP_DIR, RANKS_FILE

    path = work / DDP_DIR / RANKS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _kd_terms(work: Path) -> list[dict]:
    """The KD terms as built for this run, with the auto-balance scales it settled on."""
    from kdctl.detectors.yolo import BALANCE_FILE

    terms = json.loads((work / KD_TERMS_FILE).read_text())
    balance = work / "train" / BALANCE_FILE
    state = json.loads(balance.read_text()) if balance.is_file() else {}
    scales = state.get("scales") or state.get("current") or [None] * len(terms)
    return [{**t, "scale": s} for t, s in zip(terms, scales)]


def _train_args(ckpt_path: Path) -> dict:
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return {k: v for k, v in (ckpt.get("train_args") or {}).items() if isinstance(v, (int, float, str, bool, type(None)))}


def _summary(metrics: dict, epochs: list[dict], model, train_s: float, recipe: Recipe) -> dict:
    params = sum(p.numel() for p in model.parameters())
    per_epoch = []
    for i, r in enumerate(epochs):
        row = {"epoch": int(r.get("epoch", len(per_epoch) + 1)), "time_s": r.get("time")}
        # with train.val off only the last epoch was validated: the others' columns hold placeholders, not results
        kept = ("train/", "val/", "metrics/") if recipe.train.val or i == len(epochs) - 1 else ("train/",)
        for k, v in r.items():
            if k.startswith(kept):
                row[k] = v if math.isfinite(v) else None
        per_epoch.append(row)
    return {"map50_95": metrics["map50_95"], "map50": metrics["map50"], "map75": metrics["map75"],
            "per_class_ap50_95": metrics["per_class_ap50_95"], "eval_images": metrics["images"],
            "imgsz": recipe.train.imgsz, "params": params, "train_seconds": round(train_s, 2),
            "epochs": per_epoch}


