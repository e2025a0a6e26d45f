"""``kdctl list losses|targets``."""

from __future__ import annotations

import typer
from rich.table import Table

from kdctl.cli._common import JsonOpt, console, emit

app = typer.Typer(no_args_is_help=True, help="List registered losses and export targets.\n\nExample: kdctl list losses")


@app.command("losses")
def losses(json_: JsonOpt = False) -> None:
    """Distillation losses a recipe can name, with their levels and parameters.

    Example: [bold]kdctl list losses[/bold]
    """
    from kdctl.distill.losses import LOSSES

    rows = [{"name": e.name, "levels": list(e.levels), "kind": e.kind, "params": e.params, "paper": e.paper}
            for e in LOSSES.values()]

    def human():
        t = Table("name", "levels", "params", "paper")
        for r in rows:
            t.add_row(r["name"], ", ".join(r["levels"]), ", ".join(f"{k}={v}" for k, v in r["params"].items()),
                      r["paper"])
        console.print(t)

    emit(rows, as_json=json_, human=human)


@app.command("targets")
def targets(json_: JsonOpt = False) -> None:
    """Export target presets (deploy/targets/*.yaml) with their runtime and artifacts.

    Example: [bold]kdctl list targets[/bold]
    """
    from kdctl.export.targets import available_targets, load_target

    rows = [load_target(t).model_dump() for t in available_targets()]

    def human():
        t = Table("name", "runtime", "artifacts", "description")
        for r in rows:
            t.add_row(r["name"], r["runtime"], ", ".join(r["artifacts"]), r["description"])
        console.print(t)

    emit(rows, as_json=json_, human=human)
