"""``kdctl bundle show|verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from kdctl.cli._common import BundleArg, JsonOpt, QuietOpt, console, emit, err_console

app = typer.Typer(no_args_is_help=True, help="Inspect and verify artifact bundles.\n\n"
                                             "Example: kdctl bundle verify runs/distill/quickstart --lineage")


def _scalar_metrics(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
        elif isinstance(v, dict) and len(v) <= 12:
            out.update(_scalar_metrics(v, f"{prefix}{k}."))
    return out


@app.command("show")
def show(bundle: BundleArg, json_: JsonOpt = False) -> None:
    """Show a bundle's lineage, files and metrics.

    The lineage is every ancestor the bundle records, each with its own parents where it is still at its recorded
    path (one that is not is marked missing, unreadable or replaced).

    Example: [bold]kdctl bundle show runs/distill/quickstart[/bold]
    """
    from kdctl.bundle import load_bundle, recorded_parent

    b = load_bundle(bundle)
    m = b.manifest

    def ancestors(node, manifest: dict, seen: set) -> None:
        """Each recorded parent under ``node``, and its own parents where it is still at its recorded path."""
        for p in manifest.get("parents", []):
            p = p if isinstance(p, dict) else {}
            status, parent, _ = recorded_parent(p)
            child = node.add(f"{p.get('stage')}  {p.get('path')}  id={str(p.get('id'))[:12]}"
                             + ("" if status == "found" else f"  ({status})"))
            if status == "found" and parent.id not in seen:
                seen.add(parent.id)
                ancestors(child, parent.manifest, seen)

    def human():
        tree = Tree(Text.assemble((str(b.path), "bold"), "  stage=", (str(b.stage), "cyan"),
                                  f"  id={b.id[:12]}  created={m.get('created', '?')}"))
        origin = (m.get("inputs") or {}).get("recipe_file")
        if isinstance(origin, dict):  # train/distill: the recipe file as read and the --set texts applied to it
            sets = [str(x) for x in origin.get("set") or []] if isinstance(origin.get("set"), list) else []
            node = tree.add(Text(f"recipe  {origin.get('file')}  sha256={str(origin.get('sha256'))[:12]}"
                                 + "".join(f"  --set {x}" for x in sets)))
            for base in origin.get("bases") if isinstance(origin.get("bases"), list) else []:
                if isinstance(base, dict):  # the files it was merged over (recipe base:)
                    node.add(Text(f"base  {base.get('file')}  sha256={str(base.get('sha256'))[:12]}"))
        ancestors(tree.add("lineage (kdctl bundle verify --lineage re-hashes it)"), m, {b.id})
        files = tree.add("files")
        for name, info in m["files"].items():
            files.add(f"{name}  {info['size']:,} B  sha256={info['sha256'][:12]}")
        env = m.get("environment", {})
        tree.add(f"environment  python {env.get('python')}  cpu {env.get('cpu')}  gpus {env.get('gpus') or 'none'}")
        console.print(tree)
        t = Table("metric", "value")
        for k, v in _scalar_metrics(b.metrics).items():
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(t)
        if b.metrics.get("kd_terms"):
            from kdctl.distill.losses.registry import kd_item, last_distilled_epoch

            first, last = (b.metrics.get("epochs") or [{}])[0], last_distilled_epoch(b.metrics)
            stop = b.metrics.get("kd_stop_epoch")
            k = Table("KD term", "loss", "student → teacher layers", "scale", "epoch 1",
                      f"epoch {stop} (KD stopped after)" if stop else "last epoch")
            for term in b.metrics["kd_terms"]:
                col = f"train/{kd_item(term['name'])}"
                k.add_row(term["name"], term["loss"], f"{term['student_layers']} → {term['teacher_layers']}",
                          f"{term['scale']:.4g}" if term.get("scale") is not None else "—",
                          f"{first.get(col, float('nan')):.4f}", f"{last.get(col, float('nan')):.4f}")
            console.print(k)

    emit(m, as_json=json_, human=human)


@app.command("verify")
def verify(bundles: Annotated[list[Path], typer.Argument(
               help="Bundle directories written by earlier stages (several, or a glob such as runs/*/*).",
               metavar="BUNDLE...", show_default=False)],
           lineage: bool = typer.Option(
               False, "--lineage", help="Also verify every ancestor the bundle records (its parents, theirs...) at "
               "its recorded path: each must be the very bundle recorded and verify; one missing (made on another "
               "machine), replaced (re-run with --overwrite) or changed fails."),
           json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Check the manifest's seal and re-hash every file.

    Exit 1 naming each file that changed, went missing, was added, or is a symlink (also with --quiet, which
    prints nothing for a bundle that verifies); with --lineage, also each ancestor that is not as recorded.

    Several bundles (as sha256sum -c checks several files): each is checked and reported, one that is not a bundle
    (a log file beside them in runs/train) fails as it is named, and the exit code is 1 if any failed. --json then
    prints {"ok": ..., "bundles": [one document per bundle]}.

    Example: [bold]kdctl bundle verify runs/gate/quickstart-cpu --lineage[/bold], or [bold]kdctl bundle verify
    runs/*/*/[/bold] (the trailing / keeps the shell's glob to folders: not the gate's JUnit file or a log)
    """
    from kdctl.errors import BundleError

    if len(bundles) == 1:  # one bundle: a bundle that cannot be read is an error (exit 2), as in every command
        result, human = _verify_one(bundles[0], lineage, quiet)
        emit(result, as_json=json_, human=human)
        if not result["ok"]:
            raise typer.Exit(1)
        return
    results, humans = [], []
    for b in bundles:
        try:
            result, human = _verify_one(b, lineage, quiet)
        except BundleError as e:
            result = {"bundle": str(b), "ok": False, "error": str(e)}
            human = (lambda e=e: (err_console if quiet else console).print(Text.assemble(("FAIL", "red"), f" {e}"),
                                                                          highlight=False))
        results.append(result)
        humans.append(human)
    ok = all(r["ok"] for r in results)

    def human():
        for h in humans:
            h()
        if not quiet:
            failed = sum(not r["ok"] for r in results)
            console.print(f"{len(results) - failed} of {len(results)} bundles verify" +
                          (f"; {failed} failed" if failed else ""), highlight=False)

    emit({"ok": ok, "bundles": results}, as_json=json_, human=human)
    if not ok:
        raise typer.Exit(1)


def _verify_one(bundle: Path, lineage: bool, quiet: bool) -> tuple[dict, Callable[[], None]]:
    """One bundle's verification: its JSON document, and the function that prints it for a person."""
    from kdctl.bundle import load_bundle, verify_bundle, verify_lineage

    res = verify_bundle(bundle)
    ancestors = verify_lineage(load_bundle(bundle)) if lineage else []
    ok = res.ok and all(a["status"] == "ok" for a in ancestors)
    result = {"bundle": str(bundle), "ok": ok, "files_checked": res.checked, "problems": res.problems,
              "device_built": res.device_built}
    if lineage:
        result["lineage"] = ancestors

    def human():
        if ok and quiet:
            return
        if res.ok:
            console.print(Text.assemble(("OK", "green"), f" {bundle}: {res.checked} files match the sealed manifest"))
            for f in res.device_built:
                console.print(f"  {f}: built on the device after export (declared; profile records its hash)")
        else:  # with --quiet (stdout discarded) the failures are the errors it still prints, on stderr
            for p in res.problems:
                (err_console if quiet else console).print(Text.assemble(("FAIL", "red"), f" {bundle}/{p}"))
        for a in ancestors:
            if a["status"] == "ok":
                if not quiet:
                    console.print(Text.assemble(("OK", "green"), f" ancestor {a['stage']} {a['path']}"))
            else:
                (err_console if quiet else console).print(Text.assemble(
                    ("FAIL", "red"), f" ancestor {a['stage']} {a['path']}: {a['status']}: {a['problem']}"))

    return result, human
