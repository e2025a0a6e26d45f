"""``kdctl recipe check|schema``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.syntax import Syntax
from rich.text import Text

from kdctl.cli._common import JsonOpt, RecipeArg, SetOpt, console, emit

app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their JSON Schema.\n\n"
                                             "Example: kdctl recipe check recipes/quickstart.yaml")


@app.command("check")
def check(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False,
          models: bool = typer.Option(False, "--models", help="Also build the student, the teacher and the KD "
                                      "criterion as distill would (data resolved, layers and loss/level/pair checked); "
                                      "nothing is trained and no bundle written.")) -> None:
    """Validate a recipe and print it with every default filled in.

    Example: [bold]kdctl recipe check recipes/quickstart.yaml --models[/bold]
    """
    import yaml

    from kdctl.recipe import load_recipe
    from kdctl.recipe.loader import overrides_named
    from kdctl.training import missing_inputs

    r = load_recipe(recipe, set_ or ())
    data = r.model_dump(mode="json")
    terms = init = None
    with overrides_named(str(recipe), set_ or (), r._inherited):
        missing = [] if models else missing_inputs(r, Path(recipe))  # --models: the first missing stops it
        if models:
            from kdctl.training import check_models

            checked = check_models(r, source=str(recipe))
            terms, init = checked["kd_terms"], checked.get("init")
        picked = checked.get("teacher_classes") if models else None  # the dataset's classes found in the teacher's
        start = checked.get("student_classes") if models else None  # a student checkpoint's, by name
        out = data if terms is None else {**data, "kd_terms": terms, **({"student_init": init} if init else {}),
                                          **({"teacher_classes": picked} if picked else {}),
                                          **({"student_classes": start} if start else {})}
        # which command takes it: a teacher with nothing to distill is a recipe kdctl distill refuses (a train recipe
        # with a teacher set aside is still a train recipe, so this is a note, not an error)
        refused = {stage: r.refusal(stage, str(recipe)) for stage in ("train", "distill")}
        if all(refused.values()):  # no command takes it: the error the command it is written for would give
            from kdctl.errors import RecipeError

            raise RecipeError(refused["distill" if r.teacher is not None else "train"])
    out = {**out, "stages": {stage: {"accepted": why is None, **({"refused": why} if why else {})}
                             for stage, why in refused.items()}, "missing": missing}
    bases = [b["file"] for b in (r._origin or {}).get("bases", [])]
    if bases:
        out["bases"] = bases
    note = refused["distill"] if r.teacher is not None and refused["train"] is None else None

    def human():
        console.print(Text.assemble(("OK", "green"), f" {recipe}"))
        if bases:  # what follows is the recipe merged over these
            console.print(f"from bases: {', '.join(bases)}", highlight=False)
        console.print(Syntax(yaml.safe_dump(data, sort_keys=False), "yaml"))
        for line in missing:
            console.print(f"note: {line}; the run stops on it unless an earlier stage writes it", style="yellow")
        if note:
            console.print(f"note: kdctl train takes this recipe (its teacher unused); kdctl distill refuses it: {note}",
                          style="yellow")
        for t in terms or []:
            console.print(Text.assemble("KD term ", (t["name"], "bold"), f": student {t['student_layers']} ← teacher "
                                        f"{t['teacher_layers']}"))
        if init:
            console.print("student starts from the teacher's weights (weight selection)" if init["from"] == "teacher"
                          else f"student starts at random: {init['reason']}")
        if picked:
            found = ", ".join(f"{n} = its class {i}" for n, i in picked["index"].items())
            console.print(f"teacher: the dataset's classes, by name, of its {picked['model_nc']}: {found}",
                          highlight=False)
        if start:
            found = ", ".join(f"{n} = its class {i}" if i is not None else f"{n} fresh"
                              for n, i in start["index"].items())
            console.print(f"student: a checkpoint of {start['model_nc']} classes, started on the dataset's by name: "
                          f"{found}", highlight=False)

    emit(out, as_json=json_, human=human)


@app.command("schema")
def schema() -> None:
    """Print the recipe JSON Schema (for editor autocompletion and validation).

    Example: [bold]kdctl recipe schema > recipe.schema.json[/bold]
    """
    from kdctl.recipe import recipe_json_schema

    typer.echo(recipe_json_schema())
