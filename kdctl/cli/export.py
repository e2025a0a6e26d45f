"""``kdctl export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kdctl.cli._common import (JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RunsOpt, SkipInvalidOpt, console,
                               classes_record, emit, fraction, print_scored_classes, progress_bar)
from kdctl.bundle import delta_interval, reference_metrics
from kdctl.limits import IMGSZ_MAX
from kdctl.runtimes import ARTIFACTS


def export(
    bundle: Annotated[Path, typer.Argument(help="A train/distill bundle, or a model checkpoint (.pt, e.g. "
                                                "Ultralytics' best.pt) with --data.", show_default=False)],
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Target preset: cpu, intel, jetson, "
                                                  "jetson-orin-nx, jetson-agx-orin, rpi, or a preset YAML path "
                                                  "(default: the recipe's export.target).")] = None,
    artifact: Annotated[Optional[list[str]], typer.Option("--artifact", "-a", help="Only these artifacts (overrides "
                                                          f"the preset; repeatable): {', '.join(ARTIFACTS)}.")] = None,
    imgsz: Annotated[Optional[int], typer.Option("--imgsz", min=32, max=IMGSZ_MAX, help="Export input size (default: training size).")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", min=11, max=23, help="ONNX opset.")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, max=256,
                                                 help="Input batch of the exported graphs (default: the preset's, 1); "
                                                      "with --dynamic, the largest batch TensorRT engines are built "
                                                      "for.")] = None,
    dynamic: Annotated[Optional[bool], typer.Option("--dynamic/--static",
                                                    help="A free batch axis in the exported graphs, or a fixed one "
                                                         "(default: the preset's).", show_default=False)] = None,
    calibration_images: Annotated[Optional[int], typer.Option("--calibration-images", min=1,
                                                              help="INT8 calibration images, spread over the train split or "
                                                                   "--calibration-data (default: 64, or all of fewer).")] = None,
    calibration_method: Annotated[Optional[str], typer.Option("--calibration-method",
                                                              help="minmax | entropy | percentile (ONNX Runtime INT8).")] = None,
    max_map_drop: Annotated[Optional[float], typer.Option("--max-map-drop", callback=fraction,
                                                          help="Fail (write nothing) if an FP16/BF16/INT8 artifact "
                                                               "loses more mAP50-95 than this vs PyTorch (0.01 = 1 "
                                                               "point).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset YAML for calibration and checks, or a "
                                                 "recipe whose data: names the set (a COCO one; default: the "
                                                 "bundle's; required for a .pt). A model of more "
                                                 "classes whose names include the dataset's (a COCO one) is "
                                                 "exported whole and scored on the dataset's, found by name.")] = None,
    calibration_data: Annotated[Optional[Path], typer.Option("--calibration-data", help="INT8 calibration images "
                                                             "instead of the train split: a folder (searched "
                                                             "recursively) or a .txt list; no labels needed (e.g. "
                                                             "frames from the device's camera).")] = None,
    eval_images: Annotated[Optional[int], typer.Option("--eval-images", min=1,
                                                       help="Validation images for mAP (default: all).")] = None,
    out: OutOpt = None, runs: RunsOpt = Path("runs"), overwrite: OverwriteOpt = False,
    skip_invalid: SkipInvalidOpt = False, json_: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Quantize and export a trained/distilled model for a target, verified against PyTorch, into a bundle.

    Example: [bold]kdctl export runs/distill/quickstart --target cpu --max-map-drop 0.01[/bold]

    A model trained elsewhere: [bold]kdctl export best.pt --data data.yaml --target intel[/bold] (its path and
    hash are recorded in place of a parent bundle).

    Batched graphs: [bold]--dynamic --batch 8[/bold] (a free batch axis, TensorRT engines for 1 to 8 images), or
    [bold]--batch 4[/bold] alone (exactly 4 images per call).
    """
    from kdctl.bundle import load_bundle
    from kdctl.export.stage import ExportOptions, export_bundle
    from kdctl.models import is_checkpoint_file

    if calibration_method and calibration_method not in ("minmax", "entropy", "percentile"):
        from kdctl.errors import KdctlError

        raise KdctlError(f"--calibration-method: '{calibration_method}' is not one of minmax, entropy, percentile")
    src = None if is_checkpoint_file(bundle) else load_bundle(bundle, stages=("train", "distill"))
    opts = ExportOptions.from_recipe(src and src.recipe, bundle=src and src.path, target=target, artifacts=artifact,
                                     imgsz=imgsz, opset=opset, batch=batch, dynamic=dynamic,
                                     calibration_images=calibration_images, calibration_method=calibration_method,
                                     max_map_drop=max_map_drop, data=str(data) if data else None,
                                     calibration_data=str(calibration_data) if calibration_data else None,
                                     eval_images=eval_images, skip_invalid=skip_invalid or None)
    with progress_bar(not (json_ or quiet)) as p:
        b = export_bundle(bundle, opts, out=out, runs_dir=runs, overwrite=overwrite, progress=p)
    m = b.metrics
    rows = [{"artifact": a["name"], "files": a["files"], "precision_used": a["runtime"].get("inference_precision"),
             "map50_95": (a["metrics"] or {}).get("map50_95"), "map_drop": (a["metrics"] or {}).get("map50_95_drop"),
             "map_drop_ci95": (a["metrics"] or {}).get("map50_95_drop_ci95"),
             "box_max_abs": (a["parity"] or {}).get("box_max_abs"), "judged_on": (a["parity"] or {}).get("judged_on"),
             "size_mb": a["settings"].get("size_mb"),
             "note": a["runtime"].get("reason")} for a in m["artifacts"]]
    result = {"bundle": str(b.path), "target": m["target"], "pytorch_map50_95": reference_metrics(m)["map50_95"],
              "qat": "qat" in m, "artifacts": rows}
    picked = classes_record(b)
    if picked:  # a model of more classes, exported whole and scored on the dataset's (selected by name)
        result["classes"] = picked

    def human():
        ref = reference_metrics(m)
        kind = "QAT, fake-quantized" if ref.get("model", "fp32") != "fp32" else "FP32"
        t = Table(title=f"export → {m['target']}: {b.path}  (PyTorch {kind} mAP50-95 {ref['map50_95']:.4f})")
        for c in ("artifact", "runs as", "mAP50-95", "Δ vs PyTorch", "Δ 95 % CI", "max |Δbox| px", "judged on",
                  "MB"):
            if c == "artifact":  # the names stay whole on a narrow terminal; the number columns wrap their headers
                t.add_column(c, no_wrap=True, min_width=max((len(r["artifact"]) for r in rows), default=8))
            else:
                t.add_column(c, justify="right")
        for r in rows:
            if r["map50_95"] is None:
                t.add_row(r["artifact"], "on device", "—", "—", "—", "—", "—", "build_engine.sh")
                continue
            t.add_row(r["artifact"], str(r["precision_used"]), f"{r['map50_95']:.4f}", f"{-r['map_drop']:+.4f}",
                      delta_interval(r["map_drop_ci95"]),
                      f"{r['box_max_abs']:.3g}", str(r["judged_on"] or "—"), f"{r['size_mb']:.2f}")
        console.print(t)
        print_scored_classes(picked)
        for a in m["artifacts"]:
            if a["settings"].get("note"):
                console.print(f"note ({a['name']}): {a['settings']['note']}")
        for name, why in (m.get("skipped_artifacts") or {}).items():
            console.print(f"skipped {name}: {why}")
        if m.get("qat", {}).get("skipped_artifacts"):
            console.print(f"QAT student: its INT8 graph is exported as trained; skipped float artifacts "
                          f"{', '.join(m['qat']['skipped_artifacts'])}")

    emit(result, as_json=json_, quiet=quiet, human=human)
