"""``kdctl recipe check|schema``."""

from __future__ import annotations

import typer
from rich.syntax import Syntax

from kdctl.cli._common import JsonOpt, RecipeArg, console, emit

app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their JSON Schema.")


@app.command("check")
def check(recipe: RecipeArg, json_: JsonOpt = False) -> None:
    """Validate a recipe and print it with every default filled in.

    Example: [bold]kdctl recipe check recipes/quickstart.yaml[/bold]
    """
    import yaml

    from kdctl.recipe import load_recipe

    r = load_recipe(recipe)
    data = r.model_dump(mode="json")
    emit(data, as_json=json_, human=lambda: (
        console.print(f"[green]OK[/green] {recipe}"),
        console.print(Syntax(yaml.safe_dump(data, sort_keys=False), "yaml"))))


@app.command("schema")
def schema() -> None:
    """Print the recipe JSON Schema (for editor autocompletion and validation).

    Example: [bold]kdctl recipe schema > recipe.schema.json[/bold]
    """
    from kdctl.recipe import recipe_json_schema

    typer.echo(recipe_json_schema())
