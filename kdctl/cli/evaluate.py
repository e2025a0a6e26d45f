"""``kdctl eval``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from kdctl.cli._common import (JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RunsOpt, SkipInvalidOpt, console,
                               classes_record, emit, print_scored_classes, progress_bar)
from kdctl.limits import IMGSZ_MAX


class Split(str, Enum):
    val = "val"
    test = "test"
    train = "train"


def evaluate(
    bundle: Annotated[Path, typer.Argument(help="A train/distill bundle, a model checkpoint (.pt) with --data, an "
                                                "export bundle (one artifact, --artifact), or an artifact's file in "
                                                "one (its model-int8.onnx).", show_default=False)],
    artifact: Annotated[Optional[str], typer.Option("--artifact", "-a", help="Of an export bundle: the artifact to "
                                                    "score in its own runtime (e.g. onnx-int8), as yolo val "
                                                    "model=best.onnx.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Ultralytics dataset YAML, or a recipe whose data: "
                                                 "names the set (a COCO one; default: the bundle's). A model or "
                                                 "artifact of more classes whose names include the dataset's (a "
                                                 "COCO one) is scored on the dataset's, found by name.")] = None,
    imgsz: Annotated[Optional[int], typer.Option("--imgsz", min=32, max=IMGSZ_MAX, help="Inference size (default: training size).")] = None,
    split: Annotated[Split, typer.Option("--split", help="The dataset's split to score, as Ultralytics' split= (test: "
                                                         "the YAML's test: images).")] = Split.val,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or a GPU index such as 0 (as Ultralytics' "
                                                         "device=0).")] = "cpu",
    out: OutOpt = None, runs: RunsOpt = Path("runs"), overwrite: OverwriteOpt = False,
    skip_invalid: SkipInvalidOpt = False, json_: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Compute COCO mAP50 and mAP50-95 of a bundle's model, a .pt or an exported artifact; write an eval bundle.

    Example: [bold]kdctl eval runs/distill/quickstart --data data/shapes/data.yaml --split test[/bold], or
    [bold]kdctl eval runs/detect/train/weights/best.pt --data data.yaml[/bold], or
    [bold]kdctl eval runs/export/quickstart-cpu --artifact onnx-int8 --split test[/bold]
    """
    from kdctl.evaluate.stage import evaluate_bundle

    with progress_bar(not (json_ or quiet)) as p:
        b = evaluate_bundle(bundle, data=data, imgsz=imgsz, out=out, runs_dir=runs, overwrite=overwrite,
                            skip_invalid=skip_invalid, split=split.value, device=device, artifact=artifact,
                            progress=p)
    m = b.metrics
    result = {"bundle": str(b.path), "map50_95": m["map50_95"], "map50": m["map50"], "map75": m["map75"],
              "per_class_ap50_95": m["per_class_ap50_95"], "images": m["images"], "split": m["split"]}
    if "artifact" in m:
        result.update(artifact=m["artifact"], runtime=m["runtime"])
    picked = classes_record(b)
    if picked:  # a model of more classes, scored on the dataset's (selected by name)
        result["classes"] = picked

    def human():
        what = f", {m['artifact']} in {m['runtime']}" if "artifact" in m else ""
        t = Table(title=f"eval: {b.path} ({m['images']} {m['split']} images{what})")
        t.add_column("class")
        t.add_column("AP50-95", justify="right")
        for k, v in m["per_class_ap50_95"].items():
            t.add_row(k, "no labels" if v is None else f"{v:.4f}")
        t.add_row(Text("mAP50-95", style="bold"), Text(f"{m['map50_95']:.4f}", style="bold"))
        t.add_row("mAP50", f"{m['map50']:.4f}")
        console.print(t)
        print_scored_classes(picked)

    emit(result, as_json=json_, quiet=quiet, human=human)
