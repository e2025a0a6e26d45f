"""``kdctl gate``: judge a profile (or an export or eval) bundle against budgets (and a baseline), write JUnit +
Markdown + a bundle."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdctl.bundle import (Bundle, BundleWriter, artifact_given, check_output_file, claim_output, load_bundle,
                          next_run_dir, write_text_atomic)
from kdctl.bundle.store import remove_stale_temps
from kdctl.errors import BundleError, KdctlError, shown
from kdctl.gate.junit import is_our_junit, is_our_summary, junit_xml, markdown_summary
from kdctl.gate.rules import BUDGETS, Check, evaluate_budgets
from kdctl.runtimes import artifact_mb


@dataclass
class GateResult:
    passed: bool
    artifact: str
    checks: list[Check]
    bundle: Bundle
    not_checked: list[str] = field(default_factory=list)  # the recipe's budgets the gated bundle does not measure


GATED = ("profile", "export", "eval")
_ACCURACY = ("min_map50_95", "min_map50", "max_map_regression")
# the budgets each kind of bundle measures: a profile everything; an export each artifact's mAP and files (size); an
# eval one model's mAP. Latency, throughput and memory are measured by kdctl profile only.
MEASURED = {"profile": BUDGETS, "export": _ACCURACY + ("max_size_mb",), "eval": _ACCURACY}


def _results(b: Bundle) -> list[dict] | None:
    """The gated bundle's results, one per artifact, in the profile's row shape (None: none recorded)."""
    if b.stage == "profile":
        return b.metrics.get("results")
    if b.stage == "eval":
        m = b.metrics
        name = (b.manifest.get("inputs") or {}).get("artifact") or f"{m.get('runtime')}-{m.get('precision')}"
        return [{"artifact": name, "precision": m.get("precision"), "map50_95": m.get("map50_95"),
                 "map50": m.get("map50")}]
    rows = []
    for a in b.metrics.get("artifacts") or []:
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not isinstance(a.get("files"), list):
            return None
        m = a.get("metrics") if isinstance(a.get("metrics"), dict) else {}
        rows.append({"artifact": a["name"], "precision": a.get("precision"), "map50_95": m.get("map50_95"),
                     "map50": m.get("map50"), "size_mb": artifact_mb(b.path, a["files"])})
    return rows


def _measured_only(b: Bundle, flags: dict, merged: dict) -> tuple[dict, list[str]]:
    """The budgets ``b`` can be judged on. A flag it cannot measure is a usage error; a recipe budget it cannot
    (the recipe's latency budgets, gating an export's accuracy) is left out and named in the gate's result."""
    measured = MEASURED[b.stage]
    for k in BUDGETS:
        if flags.get(k) is not None and k not in measured:
            raise KdctlError(f"--{k.replace('_', '-')}: {b.path} is an {b.stage} bundle, which measures "
                             f"{'mAP and artifact sizes' if b.stage == 'export' else 'mAP'} only; gate a profile "
                             "bundle (kdctl profile EXPORT_BUNDLE) for latency, throughput, memory and size budgets")
    return {k: v for k, v in merged.items() if k in measured}, [k for k in merged if k not in measured]


def not_checked_note(names: list[str]) -> str:
    """The recipe's budgets a gate of an export or eval bundle left out, as the CLI, its summary and the report say."""
    return (f"the recipe's {', '.join(map(str, names))}, which the gated bundle does not measure (gate a profile "
            "bundle for them)")


def _pick(results: list[dict], artifact: str | None, where: Path) -> dict:
    names = [r["artifact"] for r in results]
    if artifact is not None:
        if artifact not in names:
            raise KdctlError(f"--artifact: '{artifact}' was not profiled in {where}; it has: {', '.join(names)}")
        return results[names.index(artifact)]
    int8 = [r for r in results if r.get("precision") == "int8"]
    return (int8 or results)[0]


def run_gate(profile: str | Path, *, budgets: dict | None = None, baseline: str | Path | None = None,
             artifact: str | None = None, junit: str | Path | None = None, summary: str | Path | None = None,
             out: str | Path | None = None, runs_dir: str | Path = "runs", overwrite: bool = False) -> GateResult:
    profile, picked = artifact_given(profile, None if artifact is None else [artifact])  # an export's model-int8.onnx
    artifact = picked[0] if picked else None
    prof = load_bundle(profile, stages=GATED, verify=True)
    try:  # compared like with like: a profile with a profile, an eval with an eval
        base_bundle = load_bundle(baseline, stages=(prof.stage,), verify=True) if baseline else None
    except BundleError as e:  # which of the two bundles: the flag says (the profile gated is named by its path)
        raise BundleError(f"--baseline {e}", exit_code=e.exit_code) from None
    if base_bundle is not None and base_bundle.id == prof.id:  # every regression check would pass by construction
        raise KdctlError(f"--baseline {baseline}: is the profile being gated ({prof.path}), or a copy of it; "
                         "give the profile to compare with (e.g. main's)")
    inputs = [prof.path] + ([base_bundle.path] if base_bundle else [])
    junit = check_output_file(junit, flag="--junit", inputs=inputs, ours=is_our_junit,
                              what="a JUnit report kdctl gate wrote") if junit else None
    summary = check_output_file(summary, flag="--summary", inputs=inputs, ours=is_our_summary,
                                what="a summary kdctl gate wrote") if summary else None
    if junit is not None and summary is not None and junit.resolve() == summary.resolve():
        raise KdctlError(f"--summary {summary}: is also the --junit file; give each its own file")
    out = Path(out) if out else next_run_dir(runs_dir, "gate", prof.path.resolve().name, reserve=True)
    for flag, f in (("--junit", junit), ("--summary", summary)):
        if f is not None and (f == out.absolute() or out.absolute() in f.parents):
            raise KdctlError(f"{flag} {f}: is inside --out {out}; write it elsewhere (the bundle has its own copy)")
    with claim_output(out, overwrite=overwrite, inputs=inputs):
        return _gate(prof, base_bundle, budgets, artifact, junit, summary, out, overwrite)


def _not_comparable(cur: dict, base: dict, what: str = "profile") -> str:
    """How the baseline's measurement differs from this one in what sets latency and mAP ('' if it does not)."""
    def settings(m):
        st = m.get("settings") if isinstance(m.get("settings"), dict) else {}
        return {"input size": m.get("imgsz"), "batch": st.get("batch"), "threads": st.get("threads"),
                "device": st.get("device"), "split": m.get("split"), "images": m.get("images")}  # the last two: eval

    a, b = settings(cur), settings(base)
    diff = [f"{k} {b[k]} (this {what}: {a[k]})" for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
    return "at " + ", ".join(diff) if diff else ""


def _other_images(cur: dict, base: dict, what: str) -> str:
    """How the baseline's mAP was scored on other validation images or labels than this one ('' if not, or where a
    bundle written before kdctl recorded them does not say): mAPs of two sets are not a regression of one model."""
    a, b = cur.get("eval_sha256"), base.get("eval_sha256")
    if not (isinstance(a, str) and isinstance(b, str)) or a == b:
        return ""
    n_cur, n_base = (m.get("eval_images", m.get("images")) for m in (cur, base))
    return f"on other validation images ({n_base} images, sha256 {b[:12]}; this {what}: {n_cur}, sha256 {a[:12]})"


def _gate(prof: Bundle, base_bundle: Bundle | None, budgets: dict | None, artifact: str | None,
          junit: Path | None, summary: Path | None, out: Path, overwrite: bool) -> GateResult:
    profile = prof.path
    from kdctl.recipe.schema import GateSpec
    from kdctl.recipe.validation import bundle_section

    # the recipe's budgets, checked again as the schema checks them (the manifest may be older, or edited)
    bundle_section(prof.recipe, "gate", GateSpec, profile / "manifest.json", known_only=True)
    merged = dict(((prof.recipe or {}).get("gate") or {}))
    merged.update({k: v for k, v in (budgets or {}).items() if v is not None})
    merged = {k: v for k, v in merged.items() if k in BUDGETS and v is not None}
    for k, v in merged.items():  # the CLI and the recipe schema check this too; a library caller gets the same rule
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise KdctlError(f"gate budget {k}: must be a finite number, got {shown(v)}")
    merged, not_checked = _measured_only(prof, budgets or {}, merged)
    if not merged:
        left = (f" (the recipe's {', '.join(not_checked)} need a profile bundle)" if not_checked else "")
        raise KdctlError(f"{profile}: no budgets to check{left}: set gate: in the recipe or pass --min-map, "
                         "--max-p90-ms, ... (see kdctl gate --help)")
    results = _results(prof)
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) and "artifact" in r
                                                                for r in results):
        key, done = {"profile": ("results", "profiled"), "export": ("artifacts", "exported")}[prof.stage]
        raise KdctlError(f"{prof.path / 'manifest.json'}: metrics.{key}: no {done} artifact to judge")
    result = _pick(results, artifact, prof.path)
    base = None
    if base_bundle is not None:
        base = next((r for r in _results(base_bundle) or [] if isinstance(r, dict)
                     and r.get("artifact") == result["artifact"]), None)
    checks = evaluate_budgets(result, merged, base)
    unusable, other = None, ""  # why the regression checks cannot use the baseline; why its mAP check cannot
    if base_bundle is not None and base is None:
        unusable = f"baseline {base_bundle.path} has no '{result['artifact']}' result: failing closed"
    elif base_bundle is not None:
        differs = _not_comparable(prof.metrics, base_bundle.metrics, prof.stage)
        if differs:
            unusable = f"baseline {base_bundle.path} was measured {differs}: not comparable, failing closed"
        other = _other_images(prof.metrics, base_bundle.metrics, prof.stage)
        if other:  # latency is still compared
            other = f"baseline {base_bundle.path} was scored {other}: mAPs not comparable, failing closed"
    for c in checks:
        if unusable and c.name.endswith("regression"):
            c.passed, c.message = False, unusable
        elif other and c.name == "max_map_regression":
            c.passed, c.message = False, other
    passed = all(c.passed for c in checks)
    context = {prof.stage: str(prof.path), "artifact": result["artifact"], "target": prof.metrics.get("target"),
               "baseline": str(base_bundle.path) if base_bundle else "none",
               "machine": prof.manifest.get("environment", {}).get("cpu")}
    context = {k: v for k, v in context.items() if v is not None}  # an eval bundle has no target
    if not_checked:
        context["not checked"] = not_checked_note(not_checked)
    xml = junit_xml(checks)
    md = markdown_summary(checks, "kdctl gate", context)
    parents = [prof] + ([base_bundle] if base_bundle else [])
    with BundleWriter(out, stage="gate", recipe=prof.recipe, parents=parents, overwrite=overwrite,
                      inputs={prof.stage: str(prof.path), "baseline": context["baseline"], "budgets": merged}) as w:
        (w.path / "junit.xml").write_text(xml)
        (w.path / "summary.md").write_text(md)
        w.metrics.update({"passed": passed, "artifact": result["artifact"], "checks": [c.to_dict() for c in checks],
                          "not_checked": not_checked})
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2))
        for role, f in (("junit", "junit.xml"), ("summary", "summary.md"), ("metrics", "metrics.json")):
            w.add_output(role, f)
    for f, text in ((junit, xml), (summary, md)):
        if f:
            remove_stale_temps(Path(f))  # a gate killed while writing it left one
            write_text_atomic(Path(f), text)
    return GateResult(passed, result["artifact"], checks, w.bundle, not_checked)
