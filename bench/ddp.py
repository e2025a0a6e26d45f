"""DDP vs one process at equal global batch: ``recipes/head.yaml`` (head-level KD from the quickstart teacher)
distilled in one process and on N torchrun ranks (gloo on this CPU, NCCL with ``--device 0,1``), over several seeds.
Reports mAP50-95 per seed, the spread of the one-process runs, and wall time; the question is whether DDP changes
what distillation learns (it should not, beyond the seed spread: the per-rank augmentation streams and BatchNorm
statistics differ from one process's).

    python bench/ddp.py --seeds 0 1 2                 # 2 CPU ranks vs 1 process, writes docs/benchmarks.md
    python bench/ddp.py --nproc 2 --device 0,1        # on a 2-GPU machine
    python bench/ddp.py --smoke                       # minutes: checks the script, writes no doc
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, table, write_section  # noqa: E402


def _recipe(seed: int, teacher: Path, device: str, smoke: bool, out: Path) -> Path:
    import yaml

    from kdctl.recipe import load_recipe

    d = load_recipe(ROOT / "recipes" / "head.yaml").model_dump(mode="json")
    d["train"].update(seed=seed, device=device)
    d["teacher"]["model"] = str(teacher)
    if smoke:
        d["data"]["synthetic"].update(train=32, val=16, imgsz=64)
        d["train"].update(imgsz=64, batch=4, epochs=2)
    for k in ("export", "profile", "gate"):
        d.pop(k, None)
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _distill(recipe: Path, out: Path, nproc: int) -> dict:
    """``kdctl distill`` as a user runs it (one process, or ``--nproc-per-node``); wall time of the command."""
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        argv = [sys.executable, "-m", "kdctl.cli.main", "distill", str(recipe), "--out", str(out), "-q", "--overwrite"]
        subprocess.run(argv + (["--nproc-per-node", str(nproc)] if nproc > 1 else []), check=True)
        (out.parent / f"{out.name}.wall").write_text(f"{time.perf_counter() - t0:.1f}")
    m = json.loads((out / "metrics.json").read_text())
    return {"map50_95": m["map50_95"], "train_s": m["train_seconds"],
            "wall_s": float((out.parent / f"{out.name}.wall").read_text()),
            "world": (m.get("distributed") or {}).get("world_size", 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "train" / "quickstart-teacher")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if not (a.teacher / "manifest.json").is_file():
        sys.exit(f"{a.teacher}: the quickstart teacher bundle is missing; run `make demo` (or kdctl train "
                 "recipes/quickstart-teacher.yaml --out runs/train/quickstart-teacher) first")
    root = ROOT / "runs" / "bench" / ("ddp-smoke" if a.smoke else "ddp")
    one_dev = a.device.split(",")[0] if a.device != "cpu" else "cpu"
    res: dict[str, dict[int, dict]] = {"1": {}, str(a.nproc): {}}
    for s in a.seeds:
        out1, outn = root / f"one-s{s}", root / f"ddp{a.nproc}-s{s}"
        res["1"][s] = _distill(_recipe(s, a.teacher, one_dev, a.smoke, out1), out1, 1)
        res[str(a.nproc)][s] = _distill(_recipe(s, a.teacher, a.device, a.smoke, outn), outn, a.nproc)
        assert res[str(a.nproc)][s]["world"] == a.nproc
    (root / "results.json").write_text(json.dumps(res, indent=2))
    one, many = res["1"], res[str(a.nproc)]

    def cell(rs, key, fmt):
        vals = [rs[s][key] for s in a.seeds]
        return f"{fmt(statistics.mean(vals))} ({' / '.join(fmt(v) for v in vals)})"

    spread = max(one[s]["map50_95"] for s in a.seeds) - min(one[s]["map50_95"] for s in a.seeds)
    diffs = [many[s]["map50_95"] - one[s]["map50_95"] for s in a.seeds]
    mean_diff = statistics.mean(diffs)
    rows = [["1 process", cell(one, "map50_95", lambda v: f"{v:.4f}"), cell(one, "wall_s", lambda v: f"{v:.0f}")],
            [f"{a.nproc} DDP ranks ({'gloo, CPU' if a.device == 'cpu' else 'NCCL, GPUs ' + a.device})",
             cell(many, "map50_95", lambda v: f"{v:.4f}"), cell(many, "wall_s", lambda v: f"{v:.0f}")]]
    verdict = "within" if abs(mean_diff) <= spread else "outside"
    body = (f"## Distributed distillation: {a.nproc} DDP ranks vs one process\n\n{machine()}. `python bench/ddp.py "
            f"--seeds {' '.join(map(str, a.seeds))}`: `recipes/head.yaml` (head-level KD, teacher "
            f"`{a.teacher.relative_to(ROOT) if a.teacher.is_relative_to(ROOT) else a.teacher}`), the same global "
            f"batch (train.batch) in both; wall = the whole `kdctl distill` command (launch, training, evaluation, "
            f"bundle). Mean (per seed).\n\n"
            + table(["run", "mAP50-95", "wall s"], rows)
            + f"\n\n{a.nproc} ranks − 1 process, mAP50-95 per seed: {' / '.join(f'{d:+.4f}' for d in diffs)} (mean "
            f"{mean_diff:+.4f}); the one-process runs' seed spread is {spread:.4f}: the difference is **{verdict}** "
            "the seed spread.")
    if not a.smoke:
        write_section("ddp", body)
    print(body)


if __name__ == "__main__":
    main()
