"""How much of a per-seed difference between two runs is which validation images were scored.

For the runs of a families bench (``<run>-s<seed>`` folders, as ``bench/distill_families.py`` leaves them), each run
is scored again by ``kdctl eval`` (its bundle keeps the evaluation records) and set against the baseline of its seed
with the report's paired bootstrap over the validation images: the gain, its 95 % interval, and on how many seeds
the interval leaves out 0. Baselines of two seeds are set against each other the same way: the size of "another
seed" next to that of "other validation images".

    python bench/val_noise.py --runs runs/bench/full/clear --families distill-cwd head --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_section  # noqa: E402


def records(run: Path, evals: Path, data: Path | None = None):
    """The run's evaluation records: its own, or those of a ``kdctl eval`` of it (made once, then reused); on
    ``data`` (another dataset's validation images) always the eval's."""
    from kdctl.bundle import load_bundle
    from kdctl.errors import BundleError
    from kdctl.evaluate.records import ROLE, has_records, load_records
    from kdctl.evaluate.stage import evaluate_bundle

    b = load_bundle(run, verify=True)
    if data is not None or not has_records(b):
        out = evals / run.name
        try:
            b = load_bundle(out, verify=True)
        except BundleError:
            b = evaluate_bundle(run, data=data, out=out, overwrite=out.exists())
    return load_records(b.file(ROLE))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="a families bench's run folder (base-s0, <run>-s0, ...)")
    ap.add_argument("--families", nargs="+", required=True, help="runs to set against the baseline")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--baseline", default="base", help="the baseline's folder prefix")
    ap.add_argument("--section", default=None, help="docs/benchmarks.md section (default: val-noise-<runs folder>)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--data", type=Path, help="score every run on this dataset's validation images instead (e.g. "
                    "the held-out set distill_families.py --heldout 1000 writes: <runs>/heldout-1000/data.yaml)")
    a = ap.parse_args(argv)
    from kdctl.evaluate.coco import map_from_records, paired_bootstrap

    evals = a.runs / ("eval-records" if a.data is None else f"eval-records-{a.data.parent.name}")
    base = {s: records(a.runs / f"{a.baseline}-s{s}", evals, a.data) for s in a.seeds}
    for s in a.seeds[1:]:
        if base[s][1] != base[a.seeds[0]][1]:
            raise SystemExit(f"{a.runs}: the baselines were scored on other images")

    def cell(ra, rb) -> tuple[str, bool]:
        gain = map_from_records(rb)["map50_95"] - map_from_records(ra)["map50_95"]
        lo, hi = paired_bootstrap(ra, rb, resamples=a.resamples)
        return f"{100 * gain:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", lo > 0 or hi < 0

    rows = []
    pairs = list(zip(a.seeds, a.seeds[1:]))
    cells = [cell(base[s][0], base[t][0]) for s, t in pairs]
    rows.append([f"{a.baseline} of the next seed", " / ".join(f"s{t}−s{s}" for s, t in pairs),
                 " / ".join(c for c, _ in cells), f"{sum(x for _, x in cells)}/{len(cells)}"])
    for fam in a.families:
        got = {s: records(a.runs / f"{fam}-s{s}", evals, a.data) for s in a.seeds}
        if any(got[s][1] != base[s][1] for s in a.seeds):
            raise SystemExit(f"{a.runs}: {fam} was scored on other images than the baseline")
        cells = [cell(base[s][0], got[s][0]) for s in a.seeds]
        rows.append([fam, " / ".join(f"s{s}" for s in a.seeds), " / ".join(c for c, _ in cells),
                     f"{sum(x for _, x in cells)}/{len(cells)}"])
    n = base[a.seeds[0]][0].images
    name = a.section or f"val-noise-{a.runs.name}" + (f"-{a.data.parent.name}" if a.data else "")
    scored = "validation images the runs were scored on" if a.data is None else f"validation images of {a.data}"
    runs = f"{a.runs.name}: {', '.join(a.families)}"
    body = (f"## Per-seed differences against resampling the validation images ({runs})\n\n"
            f"{machine()}. `python bench/val_noise.py --runs {a.runs} --families {' '.join(a.families)} --seeds "
            f"{' '.join(map(str, a.seeds))}" + (f" --data {a.data}" if a.data else "") + f"`: each run against the "
            f"baseline of its seed, on the {n} {scored}: gain in mAP50-95 points and its 95 % interval from a paired "
            f"bootstrap of the images ({a.resamples} resamples, the report's interval); \"interval without 0\": on how "
            f"many seeds the interval leaves out 0. The first row sets each baseline against the next seed's.\n\n"
            + table(["run", "seeds", "gain [95 % interval], points", "interval without 0"], rows) + "\n")
    write_section(name, body)
    print(body)


if __name__ == "__main__":
    main()
