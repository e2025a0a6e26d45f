"""``kdctl cache build|info``: the teacher-output cache of a distillation recipe."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kdctl.cli._common import JsonOpt, QuietOpt, RecipeArg, SetOpt, SkipInvalidOpt, console, emit, progress_bar

app = typer.Typer(no_args_is_help=True, help="Build and inspect teacher-output caches (head-level KD without "
                                             "running the teacher each step).\n\nExample: kdctl cache build "
                                             "recipes/quickstart-cached.yaml")


def _summary(path: Path, check: bool) -> dict:
    """What the cache at ``path`` holds; with ``check``, a complete one is verified first (each shard against its
    digests; a build has just verified or written it)."""
    from kdctl.distill.cache import kd_epochs, read_meta, verify

    meta = read_meta(path, "rebuild it with `kdctl cache build RECIPE --overwrite`")
    if check and meta.get("complete"):
        verify(path, meta)
    keys = ("complete", "views_per_epoch", "epochs", "kd_epochs", "anchors", "k", "nc", "bytes", "bytes_per_view",
            "build_seconds", "teacher_sha256", "data_sha256", "ultralytics")
    return {"path": str(path), **{k: meta.get(k) for k in keys}, "kd_epochs": kd_epochs(meta)}


def _show(res: dict) -> None:
    t = Table(title=f"teacher cache: {res['path']}")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in res.items():
        if k != "path":
            t.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    console.print(t)


@app.command("build")
def build(recipe: RecipeArg, set_: SetOpt = None,
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stale kdctl cache at the recipe's "
                                         "cache path (never a folder kdctl did not write)."),
          skip_invalid: SkipInvalidOpt = False, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Run the recipe's teacher once over every augmented view of its distillation and store its head outputs.

    Head-level losses then read them from the cache (distill.cache in the recipe; `kdctl distill` replays them)
    instead of running the teacher each step. A killed build resumes where it stopped.

    Example: [bold]kdctl cache build recipes/quickstart-cached.yaml[/bold]
    """
    import tempfile

    from kdctl.data.resolve import normalised_yaml, resolve_data
    from kdctl.distill.cache import build as build_cache
    from kdctl.distill.cache import cache_path
    from kdctl.errors import RecipeError
    from kdctl.recipe import load_recipe
    from kdctl.recipe.loader import overrides_named
    from kdctl.training import _models
    from kdctl.models import resolve_model

    r = load_recipe(recipe, set_ or ())
    source = str(recipe)
    with overrides_named(source, set_ or (), r._inherited):
        if r.distill.cache is None:
            raise RecipeError(f"{source}: distill.cache: not set; add `cache: {{}}` under distill (optionally with "
                              "path and top_k)")
        if r.teacher is None or not r.distill.losses:
            raise RecipeError(f"{source}: distill.losses: the cache needs a teacher and head-level losses")
        ds = resolve_data(r.data, skip_invalid=skip_invalid or None)
        student_ref = resolve_model(r.student.model, "student.model", source)
        teacher_ref = resolve_model(r.teacher.model, "teacher.model", source)
        _, _, setup, _ = _models(r, "distill", source, ds, "none", student_ref, teacher_ref)
        with tempfile.TemporaryDirectory(prefix="kdctl-cache-") as tmp, progress_bar(not (json_ or quiet)) as p:
            data_yaml = normalised_yaml(ds, Path(tmp) / "data.yaml")
            build_cache(r, source, setup.teacher, data_yaml, ds.train_images, cache_path(r), progress=p,
                        overwrite=overwrite, check=True)
    res = _summary(cache_path(r), check=False)
    emit(res, as_json=json_, quiet=quiet, human=lambda: _show(res))


@app.command("info")
def info(path: Path = typer.Argument(..., help="A cache folder (distill.cache.path, or "
                                     "$KDCTL_CACHE/teacher-outputs/<recipe name>).", show_default=False),
         json_: JsonOpt = False) -> None:
    """Show what a teacher cache holds: views, size per view, build time, the teacher and data it is for.

    A complete cache is verified first: a shard whose files are not the ones its build wrote is one line, exit 1.

    Example: [bold]kdctl cache info ~/.cache/kdctl/teacher-outputs/quickstart-cached --json[/bold]
    """
    from kdctl.distill.cache import META
    from kdctl.errors import KdctlError

    if not (path / META).is_file():
        raise KdctlError(f"{path}: not a kdctl teacher cache (no {META})")
    res = _summary(path, check=True)
    emit(res, as_json=json_, human=lambda: _show(res))
