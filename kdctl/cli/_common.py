"""Shared option aliases, output (human / --json / quiet) and progress bars for every command."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

# No Rich markup in what kdctl prints: paths, class and bundle names are the user's, and one like '[/]' or '[bold]x'
# ended a finished run in a MarkupError (or restyled the line); styled words are rich.text.Text with a style.
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)

def finite(value: float | None) -> float | None:
    """Option callback: ``inf`` and ``nan`` parse as floats but are no budget (and no valid JSON in a manifest)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def non_negative(value: float | None) -> float | None:
    """Option callback: finite and 0 or more (checked here, not with Typer's ``min=``, which would judge ``nan``
    against the range first and report it as out of range)."""
    value = finite(value)
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be ≥ 0, got {value:g}")
    return value


def fraction(value: float | None) -> float | None:
    """Option callback: a finite number in [0, 1] (an mAP, a share)."""
    value = non_negative(value)
    if value is not None and value > 1:
        raise typer.BadParameter(f"must be in [0, 1], got {value:g}")
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
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", show_default=False,
    help="Change a recipe field for this run (repeatable), e.g. --set train.epochs=5 --set "
    "distill.losses.0.params.temperature=4; the value is read as YAML. The bundle records the recipe as run.")]


_json_stream = None  # while a --json command runs: the real stdout, kept for kdctl's JSON document alone


@contextmanager
def stdout_reserved(json_doc: bool, quiet: bool) -> Iterator[None]:
    """Under ``--json``, stdout carries kdctl's JSON document and nothing else; under ``--quiet`` nothing at all.
    Whatever else writes to file descriptor 1 while the command runs (NNCF's logger and progress bars and
    Ultralytics' logger print to stdout, native libraries printf) goes to stderr, or nowhere when quiet. Without
    it ``kdctl export --target intel --json`` printed NNCF's INFO lines before the document, and a CI step parsing
    it failed. A stdout that is no file (a test runner's buffer) is left as it is: nothing else writes to it."""
    global _json_stream
    try:
        real = (json_doc or quiet) and _json_stream is None and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        real = False
    if not real:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY) if quiet else os.dup(2)
    os.dup2(sink, 1)
    os.close(sink)
    _json_stream = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        yield
    finally:
        sys.stdout.flush()
        try:  # C-level stdio buffers too, or they reach the real stdout at exit
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        _json_stream.close()
        _json_stream = None
        os.dup2(saved, 1)
        os.close(saved)


def print_json(doc, indent: int | None = None) -> None:
    """A JSON document on the real stdout (see :func:`stdout_reserved`), flushed."""
    out = _json_stream or sys.stdout
    out.write(json.dumps(doc, indent=indent, default=str) + "\n")
    out.flush()


def emit(result: Any, *, as_json: bool, quiet: bool = False, human=None) -> None:
    """One place that decides what a command prints."""
    if as_json:
        print_json(result, indent=2)
    elif not quiet:
        if human is not None:
            human()
        else:
            console.print(result)


def classes_record(bundle) -> dict | None:
    """The record of a model of more classes scored on the dataset's, found by name (a bundle's
    ``inputs.classes``: ``{"model_nc": N, "index": {class: its index}}``), or None."""
    picked = (bundle.manifest.get("inputs") or {}).get("classes")
    return picked if isinstance(picked, dict) and isinstance(picked.get("index"), dict) else None


def print_scored_classes(picked: dict | None) -> None:
    if picked:
        console.print(f"scored on the dataset's {len(picked['index'])} classes of the model's "
                      f"{picked.get('model_nc')}, found by name", highlight=False)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A Rich progress display on stderr, or ``None`` (the library then reports nothing)."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(SpinnerColumn(), TextColumn("{task.description}", style="progress.description", markup=False),
                  BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=False) as p:
        try:
            yield p
        finally:
            if not p.tasks:  # no bar was shown (refused before any work): no empty line above the error
                p.live.transient = True
                p.live.stop()
                p.disable = True  # Progress.stop would print a blank line on a non-terminal stderr
