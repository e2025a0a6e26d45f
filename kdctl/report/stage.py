"""``kdctl report``: an HTML and Markdown report of bundles and their lineage, teacher to device."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from kdctl.bundle import (Bundle, BundleWriter, delta_interval, load_bundle, next_run_dir, recorded_parent,
                          require_verified)
from kdctl.errors import BundleError, KdctlError, distinct, parse_json
from kdctl.gate.junit import md_escape
from kdctl.gate.stage import not_checked_note
from kdctl.profile.stats import call_images, per_call
from kdctl.report import graph, plots
from kdctl.report.kd_summary import HEAD as KD_HEAD
from kdctl.report.kd_summary import classes_read, compare_all, field_of, seed_groups, side_by_side


def lineage(bundles: list[Bundle]) -> list[Bundle]:
    """The given bundles and every ancestor still on disk, oldest first, each once.

    An ancestor is followed only when it is the very bundle its child recorded (same id and content hash) and
    it verifies; one made on another machine, or replaced since, is recorded in the manifest but not shown.
    An ancestor that is there but fails verification stops the report: it would show forged numbers.
    """
    seen: dict[str, Bundle] = {}

    def visit(b: Bundle) -> None:
        if b.id in seen:
            return
        for p in b.manifest.get("parents", []):
            status, parent, _ = recorded_parent(p)
            if status == "found":  # not missing, nor replaced since (e.g. re-run with --overwrite)
                visit(require_verified(parent))
        seen[b.id] = b

    for b in bundles:
        visit(b)
    return list(seen.values())


def _latencies(b: Bundle) -> dict:
    f = b.path / "latencies.json"
    if "latencies.json" not in b.manifest["files"]:
        return {}
    try:
        lat = parse_json(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{f}: not valid JSON ({e})") from None
    return lat if isinstance(lat, dict) else {}


def _fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "—" where it was not measured (None, or absent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return f"{value:{spec}}{suffix}"


def _rows(chain: list[Bundle]) -> tuple[list[list[str]], list[list[str]]]:
    stage_rows, perf_rows = [], []
    for b in chain:
        m, subset = b.metrics, _of_its_classes(b)
        if b.stage in ("train", "distill", "eval"):
            # an eval of an exported artifact, or of another split, says which: its mAP is not the PyTorch model's
            # on the validation images
            scored = [m["artifact"]] if isinstance(m.get("artifact"), str) else []
            if isinstance(m.get("split"), str) and m["split"] != "val":
                scored.append(f"{m['split']} split")
            scored += [subset] if subset else []
            name = f"{b.path.name} ({', '.join(scored)})" if b.stage == "eval" and scored else b.path.name
            stage_rows.append([b.stage, name, _fmt(m.get("map50_95"), ".4f"), _fmt(m.get("map50"), ".4f"),
                               _fmt(m.get("params") or None, ","), _fmt(m.get("train_seconds") or None, ".0f", " s")])
        if b.stage == "export":
            for a in m.get("artifacts") or []:
                if a.get("metrics"):
                    drop = field_of(a, "metrics", "map50_95_drop")
                    perf_rows.append(["export", f"{b.path.name}/{a.get('name')}" + (f" ({subset})" if subset else ""),
                                      _fmt(a["metrics"].get("map50_95"), ".4f"),
                                      " ".join(filter(None, [
                                          _fmt(-drop if isinstance(drop, (int, float)) else 0, "+.4f"),
                                          delta_interval(field_of(a, "metrics", "map50_95_drop_ci95"), missing="")])),
                                      str(field_of(a, "runtime", "inference_precision") or a.get("precision") or "—"),
                                      _fmt(field_of(a, "settings", "size_mb") or 0, ".2f", " MB"), "", ""])
        if b.stage == "profile":
            for r in m.get("results") or []:
                lat = r.get("latency_ms")
                if not isinstance(lat, dict) or not all(isinstance(lat.get(k), (int, float))
                                                        for k in ("p50", "p90", "p99")):
                    continue  # not measured (a runtime that failed on this machine): nothing to tabulate
                runtime = r.get("runtime") or {}
                perf_rows.append(["profile", f"{b.path.name}/{r.get('artifact')}", _fmt(r.get("map50_95"), ".4f"), "",
                                  # PyTorch records neither: the precision it was asked for is what it ran
                                  str(runtime.get("inference_precision") or runtime.get("provider")
                                      or r.get("precision") or "—"),
                                  _fmt(r.get("size_mb"), ".2f", " MB"),
                                  f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f}" + per_call(r),
                                  _fmt(field_of(r, "throughput", "images_per_s"), ".0f") + _in_flight(r)])
    return stage_rows, perf_rows


def _of_its_classes(b: Bundle) -> str:
    """For an eval or export bundle of a model of more classes than its dataset, scored on the dataset's (found by
    name, ``inputs.classes``): 'the dataset's 3 of its 5 classes'; else ''."""
    return classes_read(field_of(b.manifest.get("inputs"), "classes"))


def _in_flight(result: dict) -> str:
    """' (async, N in flight)' (OpenVINO) or ' (concurrent, N in flight)' (ONNX Runtime) after a throughput measured
    with requests in flight (profile --hint throughput)."""
    n, mode = field_of(result, "throughput", "requests_in_flight"), field_of(result, "throughput", "mode")
    return f" ({mode}, {n} in flight)" if mode in ("async", "concurrent") and isinstance(n, int) else ""


STAGE_HEAD = ["stage", "bundle", "mAP50-95", "mAP50", "params", "train time"]
GATE_HEAD = ["check", "budget", "value", "result", "detail"]
PERF_HEAD = ["stage", "artifact", "mAP50-95", "Δ vs PyTorch (95 % interval)", "runs as", "size", "p50 / p90 / p99 ms",
             "img/s"]


def _md_table(head, rows):
    """Every cell escaped: class and bundle names are the user's (a ``|`` in one would split its row)."""
    return "\n".join(["| " + " | ".join(map(md_escape, head)) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(map(md_escape, r)) + " |" for r in rows])


def _html_table(head, rows):
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _gate_rows(chain: list[Bundle]) -> list[tuple[Bundle, list[list[str]]]]:
    out = []
    for b in chain:
        if b.stage != "gate":
            continue
        rows = []
        for c in b.metrics.get("checks", []):
            v, budget = c.get("value"), c.get("budget")
            if v is None:
                shown = "—"
            elif isinstance(budget, (int, float)):
                shown = distinct("{:.4g}", v, budget)[0]
            else:
                shown = f"{v:.4g}"
            rows.append([c.get("name", ""), f"{budget}", shown,
                         "pass" if c.get("passed") else "FAIL", c.get("message", "")])
        out.append((b, rows))
    return out


def _predictions(cmps: list, root: Path) -> str | None:
    """predictions.png beside the report, when the models and PyTorch are on this machine; else None. The last
    distilled student's teacher, baseline and validation images, and every distilled student trained on its data."""
    import importlib.util

    if not cmps or importlib.util.find_spec("torch") is None:
        return None
    cmp = cmps[-1]
    data = (cmp.distilled.recipe or {}).get("data")
    students = [c.distilled for c in cmps if (c.distilled.recipe or {}).get("data") == data]
    models = []
    for label, b in (("teacher", cmp.teacher), ("baseline", cmp.baseline)):
        try:
            models += [(label, b.file("weights"))] if b is not None else []
        except KdctlError:  # the user's own teacher checkpoint, moved or changed since the distill run
            pass
    models += [("distilled" if len(students) == 1 else f"distilled: {b.path.name}", b.file("weights"))
               for b in students]
    try:
        from kdctl.data.resolve import load_yolo_yaml
        from kdctl.report.predictions import prediction_grid

        ds = load_yolo_yaml(cmp.distilled.file("data"), splits=("val",))
    except KdctlError:
        return None  # the dataset is not on this machine
    images = [ds.val_images[i] for i in sorted({0, len(ds.val_images) // 2, len(ds.val_images) - 1})]
    imgsz = int(cmp.distilled.metrics.get("imgsz") or 640)
    prediction_grid(models, images, ds, imgsz, root / "predictions.png")
    return "predictions.png"


def _beside_bundles(path: Path) -> bool:
    """A plain file that is no part of a bundle, given among several paths: ``kdctl report runs/*/*`` also names the
    gate's JUnit and summary beside its bundle, and logs; left out (listed in the report's inputs), not refused."""
    from kdctl.bundle.store import part_of_bundle

    return path.is_file() and not path.is_symlink() and part_of_bundle(path) is None


def write_report(bundles: list[str | Path], *, out: str | Path | None = None, runs_dir: str | Path = "runs",
                 overwrite: bool = False, title: str = "kdctl report") -> Bundle:
    if not bundles:
        raise BundleError("report: give at least one bundle")
    given, not_bundles = [], []
    for b in bundles:  # a bundle named twice (or by two paths) is one input
        if len(bundles) > 1 and _beside_bundles(Path(b)):
            not_bundles.append(str(b))
            continue
        loaded = load_bundle(b, verify=True)
        if all(g.manifest.get("id") != loaded.manifest.get("id") for g in given):
            given.append(loaded)
    if not given:
        raise BundleError(f"report: none of the {len(bundles)} paths given is a bundle directory (first: "
                          f"{not_bundles[0]})")
    chain = lineage(given)
    out = Path(out) if out else next_run_dir(runs_dir, "report", given[-1].path.resolve().name, reserve=True)
    with BundleWriter(out, stage="report", parents=given, overwrite=overwrite, input_paths=[b.path for b in chain],
                      inputs={"bundles": [str(b.path) for b in given],
                              **({"not_bundles": not_bundles} if not_bundles else {})}) as w:
        cmps = compare_all(chain)
        groups = seed_groups(cmps)
        gates = _gate_rows(chain)
        images = _plots(chain, w.path)
        pred = _predictions(cmps, w.path)
        stage_rows, perf_rows = _rows(chain)
        md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
        kd_rows, class_head, class_rows = side_by_side(cmps) if cmps else ([], [], [])
        if cmps:
            md += ["## Did distillation help?", ""]
            body += ["<h2>Did distillation help?</h2>"]
        if len(cmps) == 1:
            (cmp,) = cmps
            notes = cmp.notes()
            md += [f"**{cmp.verdict()}**", "", _md_table(KD_HEAD, kd_rows), ""] + [y for x in notes for y in (x, "")]
            body += [f"<p class='verdict'><b>{html.escape(cmp.verdict())}</b></p>", _html_table(KD_HEAD, kd_rows)]
            body += [f"<p>{html.escape(x)}</p>" for x in notes]
        elif cmps:  # several students (two recipes side by side, or one on several seeds): a verdict each, one table
            for g in groups:  # one recipe on several seeds: its verdict over them first
                md += [f"**{g.verdict()}**", ""]
                body += [f"<p class='verdict'><b>{html.escape(g.verdict())}</b></p>"]
            for c in cmps:
                notes = " ".join(c.notes())
                said = c.verdict() + (f" {notes}" if notes else "")
                line = f"{c.distilled.path.name}: {said}"
                md += [f"- **{md_escape(c.distilled.path.name)}: {said}**"]
                body += [f"<p class='verdict'><b>{html.escape(line)}</b></p>"]
            md += ["", _md_table(KD_HEAD, kd_rows), ""]
            body += [_html_table(KD_HEAD, kd_rows)]
        for g, rows in gates:
            verdict = "PASS" if g.metrics.get("passed") else "FAIL"
            art = g.metrics.get("artifact", "")
            md += [f"## Gate: {verdict} ({md_escape(art)}, {md_escape(g.path.name)})", "", _md_table(GATE_HEAD, rows),
                   ""]
            body += [f"<h2>Gate: <span class='{verdict.lower()}'>{verdict}</span> ({html.escape(art)}, "
                     f"{html.escape(g.path.name)})</h2>", _html_table(GATE_HEAD, rows)]
            left = g.metrics.get("not_checked") or []
            if left:  # an export or eval bundle gated: the recipe's latency budgets wait for a profile
                note = f"Not checked: {not_checked_note(left)}."
                md += [md_escape(note), ""]
                body += [f"<p>{html.escape(note)}</p>"]
        md += ["## Lineage", "", graph.mermaid(chain), ""]
        body += ["<h2>Lineage</h2>", graph.svg(chain)]
        if class_rows:
            md += ["## Per-class AP50-95", "", _md_table(class_head, class_rows), ""]
            body += ["<h2>Per-class AP50-95</h2>", _html_table(class_head, class_rows)]
        if pred:
            md += ["## Predictions (teacher / baseline / distilled, score ≥ 0.25)", "", f"![predictions]({pred})", ""]
            body += ["<h2>Predictions (teacher / baseline / distilled, score ≥ 0.25)</h2>",
                     f"<img class='wide' src='{pred}' alt='predictions'>"]
        md += ["## Models", "", _md_table(STAGE_HEAD, stage_rows), "", "## Exports and profiles", "",
               _md_table(PERF_HEAD, perf_rows), ""]
        md += [f"![{md_escape(alt)}]({quote(f)})" for f, alt in images]
        body += ["<h2>Models</h2>", _html_table(STAGE_HEAD, stage_rows), "<h2>Exports and profiles</h2>",
                 _html_table(PERF_HEAD, perf_rows), "<h2>Plots</h2>"]
        body += [f'<figure><img src="{html.escape(quote(f))}" alt="{html.escape(a)}"><figcaption>{html.escape(a)}'
                 f"</figcaption></figure>" for f, a in images]
        (w.path / "report.md").write_text("\n".join(md) + "\n")
        (w.path / "report.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,"
            "th:first-child,td:nth-child(2){text-align:left}figure{display:inline-block;margin:8px}"
            "img{max-width:520px}img.wide{max-width:100%}.verdict{font-size:1.2em}.pass{color:#15803d}"
            ".fail{color:#b91c1c}</style></head><body>" + "".join(body) + "</body></html>\n")
        w.add_output("html", "report.html")
        w.add_output("markdown", "report.md")
        kd = [{"teacher": c.teacher and str(c.teacher.path), "baseline": c.baseline and str(c.baseline.path),
               "distilled": str(c.distilled.path), "gap_closed": c.gap_closed, "verdict": c.verdict(),
               "gain": c.gain, "gain_interval_95": c.interval and list(c.interval[:2]),
               "interval_images": c.interval and c.interval[2],
               "interval_note": None if c.interval else c.interval_line()} for c in cmps]
        w.metrics.update({"bundles": [str(b.path) for b in chain], "plots": [f for f, _ in images]
                          + ([pred] if pred else []),
                          "kd": kd[-1] if kd else None,  # the last distilled student
                          "kd_students": kd,  # every distilled student, in lineage order
                          "kd_seed_groups": [g.to_dict() for g in groups],  # one recipe on several seeds
                          "gates": [{"bundle": str(g.path), "passed": g.metrics.get("passed")} for g, _ in gates]})
    return w.bundle


def _plots(chain: list[Bundle], root: Path) -> list[tuple[str, str]]:
    images: list[tuple[str, str]] = []
    for b in chain:
        if b.stage == "distill" and b.metrics.get("epochs"):
            f = f"losses-{b.path.name}.png"
            plots.losses(b.metrics["epochs"], root / f, f"{b.path.name}: task vs KD losses per epoch",
                         b.metrics.get("kd_stop_epoch"))
            images.append((f, f"Losses per epoch ({b.path.name})"))
    points = []
    for b in chain:
        if b.stage != "profile":
            continue
        lat = _latencies(b)
        for r in b.metrics.get("results") or []:
            if not isinstance(r.get("latency_ms"), dict) or not isinstance(r["latency_ms"].get("p50"), (int, float)) \
                    or not isinstance(r.get("artifact"), str):
                continue
            if r["artifact"] in lat:
                f = f"latency-{b.path.name}-{r['artifact']}.png"
                plots.latency_histogram(lat[r["artifact"]], r["latency_ms"], f"{b.path.name}: {r['artifact']}",
                                        root / f, batch=call_images(r))
                images.append((f, f"Latency histogram {r['artifact']} ({b.path.name})"))
            if r.get("map50_95") is not None:  # a static batch's latency is that of a call on its N images
                points.append((r["artifact"] + (f" (batch {call_images(r)})" if call_images(r) > 1 else ""),
                               r["latency_ms"]["p50"], r["map50_95"]))
    if points:
        plots.pareto(points, root / "pareto.png")
        images.insert(0, ("pareto.png", "mAP50-95 vs p50 latency"))
    return images
