"""``kdctl gate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from kdctl.cli._common import (BundleArg, JsonOpt, OutOpt, OverwriteOpt, QuietOpt, RunsOpt, console, emit, fraction,
                               non_negative, positive)


def gate(
    bundle: BundleArg,
    min_map: Annotated[Optional[float], typer.Option("--min-map", "--min-map50-95", callback=fraction, help="Minimum mAP50-95 (0..1).")] = None,
    min_map50: Annotated[Optional[float], typer.Option("--min-map50", callback=fraction, help="Minimum mAP50 (0..1).")] = None,
    max_p50_ms: Annotated[Optional[float], typer.Option("--max-p50-ms", callback=positive, help="Maximum median (p50) latency (> 0).")] = None,
    max_p90_ms: Annotated[Optional[float], typer.Option("--max-p90-ms", callback=positive, help="Maximum p90 latency (> 0).")] = None,
    max_p99_ms: Annotated[Optional[float], typer.Option("--max-p99-ms", callback=positive, help="Maximum p99 latency (> 0).")] = None,
    min_fps: Annotated[Optional[float], typer.Option("--min-fps", callback=positive, help="Minimum throughput, images/s (> 0).")] = None,
    max_size_mb: Annotated[Optional[float], typer.Option("--max-size-mb", callback=positive, help="Maximum model size (> 0).")] = None,
    max_memory_mb: Annotated[Optional[float], typer.Option("--max-memory-mb", callback=positive, help="Maximum process RSS (> 0).")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="Bundle to compare with, of the gated one's kind (e.g. main's profile).")] = None,
    max_latency_regression: Annotated[Optional[float], typer.Option("--max-latency-regression", callback=non_negative,
                                                                    help="Allowed p50 slow-down vs baseline, as a fraction (0.03 = 3 %).")] = None,
    max_map_regression: Annotated[Optional[float], typer.Option("--max-map-regression", callback=fraction,
                                                                help="Allowed mAP50-95 loss vs baseline (0.005 = 0.5 point).")] = None,
    artifact: Annotated[Optional[str], typer.Option("--artifact", "-a", help="Artifact to judge (default: the first INT8 one).")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML here.")] = None,
    summary: Annotated[Optional[Path], typer.Option("--summary", help="Also write the Markdown summary here.")] = None,
    out: OutOpt = None, runs: RunsOpt = Path("runs"), overwrite: OverwriteOpt = False, json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pass/fail a profile bundle on accuracy, latency, size and memory budgets (recipe gate: section + flags);
    an export or eval bundle on accuracy (and an export's size).

    Exit code 0 = pass, 1 = fail, 2 = usage error. A budget whose metric is missing fails. An export bundle is
    gated on its artifacts' mAP and size, an eval bundle on its mAP (the recipe's other budgets are listed as not
    checked; a flag for them is refused).

    Example: [bold]kdctl gate runs/profile/quickstart-cpu --min-map 0.05 --max-p90-ms 50 --baseline main-profile --max-latency-regression 0.03 --junit gate.xml[/bold]
    """
    from kdctl.gate.stage import not_checked_note, run_gate

    budgets = {"min_map50_95": min_map, "min_map50": min_map50, "max_p50_ms": max_p50_ms, "max_p90_ms": max_p90_ms,
               "max_p99_ms": max_p99_ms, "min_fps": min_fps, "max_size_mb": max_size_mb, "max_memory_mb": max_memory_mb,
               "max_latency_regression": max_latency_regression, "max_map_regression": max_map_regression}
    r = run_gate(bundle, budgets=budgets, baseline=baseline, artifact=artifact, junit=junit, summary=summary,
                 out=out, runs_dir=runs, overwrite=overwrite)
    result = {"passed": r.passed, "artifact": r.artifact, "bundle": str(r.bundle.path),
              "checks": [c.to_dict() for c in r.checks], "not_checked": r.not_checked}

    def human():
        t = Table(title=Text.assemble(f"gate: {r.artifact} → ", ("PASS", "green") if r.passed else ("FAIL", "red")))
        for c in ("check", "result", "detail"):
            t.add_column(c)
        for c in r.checks:
            t.add_row(c.name, Text("pass", style="green") if c.passed else Text("FAIL", style="red"), c.message)
        console.print(t)
        if r.not_checked:
            console.print(f"not checked: {not_checked_note(r.not_checked)}", highlight=False)

    emit(result, as_json=json_, quiet=quiet, human=human)
    if not r.passed:
        raise typer.Exit(1)
