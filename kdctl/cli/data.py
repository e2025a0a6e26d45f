"""``kdctl data synth`` and ``kdctl data check``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from kdctl.cli._common import JsonOpt, QuietOpt, console, emit, progress_bar
from kdctl.limits import SEED_MAX

app = typer.Typer(no_args_is_help=True, help="Datasets: generate the built-in synthetic detection set, "
                  "check a dataset before training on it.\n\nExample: kdctl data check data/mydata/data.yaml")


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write (must not exist).", show_default=False)],
    images: Annotated[int, typer.Option("--images", "-n", min=1, max=100_000, help="Training images.")] = 400,
    val: Annotated[int, typer.Option("--val", min=1, max=100_000, help="Validation images.")] = 100,
    seed: Annotated[int, typer.Option("--seed", "-s", min=0, max=SEED_MAX, help="Random seed (same seed, same bytes).")] = 0,
    imgsz: Annotated[int, typer.Option("--imgsz", min=64, max=2048, help="Image side in pixels.")] = 320,
    classes: Annotated[int, typer.Option("--classes", min=1, max=12, help="Number of shape classes.")] = 6,
    scene: Annotated[str, typer.Option("--scene", help="cluttered (many small, occluded objects), clear (fewer, "
                                       "larger objects) or dense (other shapes, more and smaller objects).")] = "cluttered",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a deterministic YOLO-format detection dataset with data.yaml.

    Example: [bold]kdctl data synth data/shapes --images 400 --seed 0[/bold]
    """
    from kdctl.data.resolve import atomic_build
    from kdctl.data.synth import write_dataset
    from kdctl.errors import DataError

    if out.exists():
        raise DataError(f"{out}: already exists; choose a new directory")
    for anc in out.absolute().parents:
        if anc.exists() and not anc.is_dir():
            raise DataError(f"{out}: '{anc}' is a file, not a directory")
    from kdctl.data.synth import SCENES, scene_classes

    if scene not in SCENES:
        raise DataError(f"--scene: '{scene}'; valid: {', '.join(SCENES)}")
    if classes > scene_classes(scene):
        raise DataError(f"--classes: {classes}; scene '{scene}' has {scene_classes(scene)} shapes")

    def build(tmp: Path) -> None:  # the bar starts once the output is locked and its temp folder made
        with progress_bar(not (json_ or quiet)) as p:
            task = p.add_task("generating", total=images + val) if p else None
            write_dataset(tmp, train=images, val=val, seed=seed, imgsz=imgsz, classes=classes, root=out,
                          scene=scene, progress=(lambda: p.advance(task)) if p else None)

    atomic_build(out, build)
    result = {"data": str(out / "data.yaml"), "train": images, "val": val, "seed": seed}
    emit(result, as_json=json_, quiet=quiet,
         human=lambda: console.print(Text.assemble(("Wrote", "green"), f" {out / 'data.yaml'}")))


@app.command("check")
def check(
    data: Annotated[Path, typer.Argument(help="An Ultralytics dataset YAML, or a recipe (its data: section: yolo, coco "
                                              "or synthetic).", show_default=False)],
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Validate a dataset as train, distill, eval and export read it: every invalid image and label line listed.

    Counts images, objects and background images per split and class. Exit 0: clean; 1: problems listed (training
    would stop at the first, or leave them out with --skip-invalid); 2: the YAML itself is unusable.

    Example: [bold]kdctl data check data/mydata/data.yaml[/bold]
    """
    from rich.table import Table

    from kdctl.data.check import check_dataset
    from kdctl.data.resolve import class_keys

    r = check_dataset(data)

    def human():
        t = Table(title=f"{r['data']}: {len(r['names'])} classes")
        for c in ("split", "images", "usable", "skipped", "objects", "background images"):
            t.add_column(c, justify="left" if c == "split" else "right")
        for name, s in r["splits"].items():
            t.add_row(name, *(f"{s[k]:,}" for k in ("images", "usable", "skipped", "objects", "background_images")))
        console.print(t)
        c = Table(title="objects per class")
        c.add_column("class")
        for name in r["splits"]:
            c.add_column(name, justify="right")
        for i, (cls, key) in enumerate(zip(r["names"], class_keys(r["names"]))):
            c.add_row(f"{i} {cls}", *(f"{s['per_class'][key]:,}" for s in r["splits"].values()))
        console.print(c)
        for name, s in r["splits"].items():
            if s["classes_without_objects"]:
                console.print(f"{name}: no objects of {', '.join(s['classes_without_objects'])}", style="yellow")
        for note in r["notes"]:
            console.print(note, style="yellow", highlight=False)
        for name, items in r["problems"].items():
            console.print(Text.assemble((f"{name}: {len(items)} invalid image(s)", "red"),
                                        "; the first 20:" if len(items) > 20 else ":"))
            for line in items[:20]:
                console.print(f"  {line}", highlight=False)
        if r["ok"]:
            console.print(Text.assemble(("OK", "green"), ": every image and label line is valid"))

    emit(r, as_json=json_, quiet=quiet, human=human)
    if not r["ok"]:
        raise typer.Exit(1)
