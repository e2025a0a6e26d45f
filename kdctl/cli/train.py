"""``kdctl train`` and ``kdctl distill``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kdctl.cli._common import (JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RecipeArg, RunsOpt, SetOpt, SkipInvalidOpt,
                               console, emit, err_console, progress_bar)
from pathlib import Path
from typing import Optional

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a run at --out (default runs/<stage>/<name>) "
                                         "that was interrupted at any point: from its last epoch checkpoint, or "
                                         "just publish it if training had finished.")]


ReuseOpt = Annotated[bool, typer.Option("--reuse", help="Keep the bundle at --out if it verifies and was made from "
                                        "this same recipe (nothing is retrained); otherwise train as usual.")]


NprocOpt = Annotated[Optional[int], typer.Option(
    "--nproc-per-node", min=1, help="Train on this many torchrun (DDP) processes on this machine: one per GPU, or "
    "CPU processes over gloo. Default: one per GPU listed in train.device ('0,1' -> 2), else 1. train.batch is the "
    "global batch, split across all processes.")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, help="Machines in a multi-node run; start the same "
                                        "command on each, with its --node-rank and node 0's --rdzv-endpoint.")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, help="This machine's index in a multi-node run "
                                          "(0 checkpoints and writes the bundle).")]
RdzvOpt = Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of node 0, where the nodes of a "
                                                "multi-node run meet (the same on every node).")]


def _no_teacher_here(r, source: str) -> str | None:
    """``kdctl train`` of a distillation recipe (``kdctl distill`` meant, or its baseline wanted): trained without
    the teacher and the KD terms, which it says rather than leave a student that learned from no teacher looking
    like the distilled one."""
    unused = [f for f, given in (("teacher", r.teacher is not None), ("distill.losses", bool(r.distill.losses)))
              if given]
    if not unused:
        return None
    return (f"{source}: kdctl train leaves out {' and '.join(unused)}: it trains the student alone (the baseline); "
            f"kdctl distill {source} trains it with them")


def _run(stage: str, recipe: Path, out, runs: Path, resume: bool, overwrite: bool, json_: bool, quiet: bool,
         skip_invalid: bool, reuse: bool = False, nproc: int | None = None, nnodes: int = 1, node_rank: int = 0,
         rdzv: str | None = None, overrides: list[str] | None = None):
    from kdctl.bundle.output import bundle_state
    from kdctl.distributed import plan
    from kdctl.recipe import load_recipe
    from kdctl.recipe.loader import overrides_named
    from kdctl.training import run_training, untrained_teacher

    r = load_recipe(recipe, overrides or ())
    with overrides_named(str(recipe), overrides or (), r._inherited):
        warning = untrained_teacher(r, str(recipe)) if stage == "distill" else _no_teacher_here(r, str(recipe))
        if warning and not quiet:
            err_console.print(f"Warning: {warning}", highlight=False)
        launch = plan(r.train.device, nproc, nnodes, node_rank, rdzv, str(recipe), r.train.batch)
        target = Path(out) if out else Path(runs) / stage / r.name  # where --resume / --reuse look
        state, there = bundle_state(target) if resume or reuse else ("absent", None)
        there = there if state == "bundle" else None  # the id of the bundle there before the run
        with progress_bar(not (json_ or quiet)) as p:
            b = run_training(r, stage=stage, source=str(recipe), out=out, runs_dir=runs, resume=resume,
                             overwrite=overwrite, skip_invalid=skip_invalid or None, reuse=reuse, progress=p,
                             launch=launch)
    if b is None:  # a node other than node 0 of a multi-node run
        emit({"stage": stage, "node_rank": node_rank, "nnodes": nnodes, "bundle": None}, as_json=json_, quiet=quiet,
             human=lambda: console.print(f"{stage}: node {node_rank} of {nnodes} finished its ranks; node 0 writes "
                                         "the bundle"))
        return
    m = b.metrics
    # --resume of a finished run, or --reuse: the bundle that was there, nothing trained (Ultralytics: "training to
    # N epochs is finished, nothing to resume"); the user is told, not shown its table as if just trained
    kept = there is not None and b.id == there and b.path.resolve() == target.resolve()
    result = {"bundle": str(b.path), "stage": stage, "map50_95": m["map50_95"], "map50": m["map50"],
              "params": m["params"], "train_seconds": m["train_seconds"], "kept": kept}
    if warning:
        result["warnings"] = [warning]
    if isinstance(m.get("teacher"), dict):  # the user's own teacher checkpoint, scored on the same images
        result["teacher_map50_95"] = m["teacher"].get("map50_95")
    inputs = b.manifest.get("inputs") or {}
    for who in ("teacher", "student"):  # the dataset's classes found in the teacher's, a student checkpoint's
        picked = (inputs.get(who) or {}).get("classes")
        if isinstance(picked, dict):
            result[f"{who}_classes"] = picked
    if "distributed" in m:
        result["world_size"] = m["distributed"]["world_size"]
    if "init" in m:
        result["init"] = m["init"]["from"]
        if m["init"].get("reason"):
            result["init_note"] = m["init"]["reason"]
    if "kd_terms" in m:
        from kdctl.distill.losses.registry import kd_item, last_distilled_epoch

        last = last_distilled_epoch(m)
        result["kd_terms"] = {t["name"]: last.get(f"train/{kd_item(t['name'])}") for t in m["kd_terms"]}

    def human():
        t = Table(title=f"{stage}: {b.path}")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in result.items():
            if k in ("init", "init_note"):
                t.add_row("student started from" if k == "init" else "random start because", str(v))
            elif k == "teacher_classes":
                t.add_row("teacher classes (by name)", f"{len(v.get('index', {}))} of its {v.get('model_nc')}")
            elif k == "student_classes":
                found = sum(i is not None for i in v.get("index", {}).values())
                t.add_row("student classes (by name)", f"{found} of {len(v.get('index', {}))} from its "
                          f"{v.get('model_nc')}")
            elif k not in ("bundle", "stage", "kd_terms", "warnings", "kept"):
                t.add_row(k, f"{v:.4f}" if isinstance(v, float) else f"{v:,}")
        for k, v in result.get("kd_terms", {}).items():
            t.add_row(f"last-epoch kd/{k}" if "kd_stop_epoch" not in m else f"epoch-{m['kd_stop_epoch']} kd/{k}",
                      "n/a" if v is None else f"{v:.4f}")
        console.print(t)
        if kept:
            console.print(f"{b.path}: finished earlier from this recipe; kept as it is, nothing trained "
                          f"({'--reuse' if reuse else '--resume: nothing to resume'})", highlight=False)

    emit(result, as_json=json_, quiet=quiet, human=human)


def train(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, runs: RunsOpt = Path("runs"),
          resume: ResumeOpt = False,
          overwrite: OverwriteOpt = False, reuse: ReuseOpt = False, skip_invalid: SkipInvalidOpt = False,
          nproc_per_node: NprocOpt = None, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0,
          rdzv_endpoint: RdzvOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Train the recipe's student without a teacher (teachers, and the baseline every distillation must beat).

    Example: [bold]kdctl train recipes/quickstart-teacher.yaml[/bold]  (4 GPUs: [bold]--nproc-per-node 4[/bold];
    a shorter run: [bold]--set train.epochs=5[/bold])
    """
    _run("train", recipe, out, runs, resume, overwrite, json_, quiet, skip_invalid, reuse, nproc_per_node, nnodes,
         node_rank, rdzv_endpoint, set_)


def distill(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, runs: RunsOpt = Path("runs"),
            resume: ResumeOpt = False,
            overwrite: OverwriteOpt = False, reuse: ReuseOpt = False, skip_invalid: SkipInvalidOpt = False,
            nproc_per_node: NprocOpt = None, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0,
            rdzv_endpoint: RdzvOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Train the student with knowledge distillation from the recipe's teacher and write a bundle.

    Example: [bold]kdctl distill recipes/quickstart.yaml[/bold]  (after a kill: add [bold]--resume[/bold];
    on 2 GPUs: [bold]--nproc-per-node 2[/bold] with train.device '0,1'; on 2 machines: add
    [bold]--nnodes 2 --node-rank 0|1 --rdzv-endpoint node0:29500[/bold])
    """
    _run("distill", recipe, out, runs, resume, overwrite, json_, quiet, skip_invalid, reuse, nproc_per_node, nnodes,
         node_rank, rdzv_endpoint, set_)
