"""Shared option aliases, output (human / --json / quiet) and progress bars for every command."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

def finite(value: float | None) -> float | None:
    """Option callback: ``inf`` and ``nan`` parse as floats but are no budget (and no valid JSON in a manifest)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def positive(value: float | None) -> float | None:
    """Option callback of a maximum (latency, size, memory): finite and above 0, as the recipe's gate section
    requires (a budget of 0 fails every model)."""
    value = finite(value)
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}")
    return value


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle directory to write "
                                                "(default: runs/<stage>/<name>, numbered like Ultralytics runs).")]
RunsOpt = Annotated[Path, typer.Option("--project", help="Root for default output directories (as Ultralytics' project=).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing kdctl bundle at --out (never a "
                                            "folder or file kdctl did not write, nor an input bundle).")]
SkipInvalidOpt = Annotated[bool, typer.Option("--skip-invalid", help="Leave out images whose label or image file "
                                              "is invalid (listed in the bundle) instead of stopping.")]
BundleArg = Annotated[Path, typer.Argument(help="A bundle directory written by an earlier stage.",
                                           show_default=False)]
RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).", show_default=False)]


def emit(result: Any, *, as_json: bool, quiet: bool = False, human=None) -> None:
    """One place that decides what a command prints."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    elif not quiet:
        if human is not None:
            human()
        else:
            console.print(result)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A Rich progress display on stderr, or ``None`` (the library then reports nothing)."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=False) as p:
        yield p
