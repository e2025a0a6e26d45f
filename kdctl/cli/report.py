"""``kdctl report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from kdctl.cli._common import JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RunsOpt, console, emit


def report(
    bundles: Annotated[list[Path], typer.Argument(help="Bundles to report on; their ancestors are followed.",
                                                  show_default=False)],
    out: OutOpt = None, runs: RunsOpt = Path("runs"), overwrite: OverwriteOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write an HTML and Markdown report (lineage, metrics, latency histograms, Pareto plot, KD losses).

    "Did distillation help?" compares each distilled student with its teacher and a baseline given among the bundles
    (a train bundle of the same student and data, of the student's seed where there are several); several distilled
    students get a verdict each, in one table, and one recipe given on several seeds (each with its baseline) a
    verdict over them: above the baseline on every seed and by more than the baselines' own spread.
    A gain comes with its 95% interval from resampling the validation images (paired bootstrap of both bundles'
    evaluation records); one whose interval reaches 0 is "Not shown". Plain files among several paths (a glob's
    JUnit reports and logs beside the bundles) are left out and listed.

    Example: [bold]kdctl report runs/profile/quickstart-cpu runs/gate/quickstart-cpu[/bold]
    """
    from kdctl.report.stage import write_report

    b = write_report(bundles, out=out, runs_dir=runs, overwrite=overwrite)
    kd, gates = b.metrics.get("kd"), b.metrics.get("gates") or []
    students = b.metrics.get("kd_students") or []
    groups = b.metrics.get("kd_seed_groups") or []
    result = {"bundle": str(b.path), "html": str(b.path / "report.html"), "markdown": str(b.path / "report.md"),
              "plots": b.metrics["plots"], "kd": kd, "kd_students": students, "kd_seed_groups": groups,
              "gates": gates, "not_bundles": b.manifest["inputs"].get("not_bundles", [])}

    def human():
        if result["not_bundles"]:
            console.print(Text(f"Left out, not bundles: {', '.join(result['not_bundles'])}"), soft_wrap=True)
        for g in groups:
            console.print(g["verdict"])
        for s in students:
            who = f" ({Path(s['distilled']).name})" if len(students) > 1 else ""
            console.print(f"Did distillation help{who}? {s['verdict']}")
            if s.get("gain_interval_95"):
                lo, hi = s["gain_interval_95"]
                console.print(f"  gain's 95% interval over the {s['interval_images']} validation images: "
                              f"{lo * 100:+.2f} to {hi * 100:+.2f} points (training noise not included)")
            elif s.get("interval_note"):
                console.print(f"  {s['interval_note']}")
        for g in gates:
            console.print(Text.assemble(f"Gate {g['bundle']}: ", ("PASS", "green") if g["passed"] else ("FAIL", "red")))
        console.print(Text.assemble(("Wrote", "green"), f" {b.path / 'report.html'}"))

    emit(result, as_json=json_, quiet=quiet, human=human)
