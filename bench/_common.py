"""Shared by the benchmarks: machine description and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from kdctl.report.stats import paired_interval  # noqa: F401  (the benches' tables take it from here)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    from kdctl.bundle.environment import cpu_model, package_versions

    v = package_versions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return (f"{cpu_model()}, {cores} cores available{gpu}, torch {v['torch']}, ultralytics {v['ultralytics']}, "
            f"onnxruntime {v['onnxruntime']}, openvino {v['openvino']}, nncf {v['nncf']}; "
            f"measured {dt.date.today().isoformat()}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench:name -->`` markers."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nRun with `make bench` (or one script in `bench/`).\n"
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def median(xs) -> float:
    return float(statistics.median(xs))



def ort_p50s(paths: dict, x) -> dict[str, float]:
    """ONNX Runtime CPU p50 in ms of each ONNX graph on input ``x`` (batch 1): the median of 5 interleaved repeats
    (so drift on the host hits every graph alike) of the median of 60 runs after 5 warm-up runs."""
    import time

    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    reps = {k: [] for k in paths}
    for _ in range(5):
        for k, s in sessions.items():
            for _ in range(5):
                s.run(None, {"images": x})
            t = []
            for _ in range(60):
                t0 = time.perf_counter_ns()
                s.run(None, {"images": x})
                t.append((time.perf_counter_ns() - t0) / 1e6)
            reps[k].append(median(t))
    return {k: median(v) for k, v in reps.items()}

def table(head: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows])


def finished_run(out: Path, recipe):
    """The finished bundle of exactly ``recipe`` at ``out``, which a benchmark then reads instead of training again;
    None where there is none. A bundle of another recipe there (the recipe file changed since it ran, or two screens
    whose run folders share a name) stops the benchmark, naming the first field that differs, rather than filling a
    row with another run's result."""
    from kdctl.bundle import load_bundle
    from kdctl.training import recipe_difference

    if not (out / "manifest.json").is_file():
        return None
    bundle = load_bundle(out)
    diff = recipe_difference(bundle.recipe, recipe)
    if diff:
        raise SystemExit(f"{out}: a finished run of another recipe ({diff} differs from this benchmark's); move it "
                         "away to train this one there")
    for parent in bundle.manifest.get("parents") or []:  # a teacher is named by its folder: same recipe, new teacher
        path = parent.get("path")
        if path and (Path(path) / "manifest.json").is_file() and \
                load_bundle(path).manifest.get("id") != parent.get("id"):
            raise SystemExit(f"{out}: a finished run from an earlier {path} (trained again since); move it away to "
                             "train this one there")
    return bundle


def finished_or_trained(out: Path, recipe, stage: str, source: str):
    """The finished bundle of ``recipe`` at ``out`` (:func:`finished_run`), else a fresh run of it there: an
    interrupted run's work folder is discarded, not resumed."""
    import shutil

    from kdctl.training import run_training

    bundle = finished_run(out, recipe)
    if bundle is None:
        shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
        bundle = run_training(recipe, stage=stage, source=source, out=out)
    return bundle


def recipe_run(name: str, stage: str, seed: int, teacher: Path | None, out: Path, *, device: str = "cpu",
               epochs: int | None = None, smoke: bool = False, workers: int | None = None,
               train: dict | None = None) -> dict:
    """Train (``stage='train'``) or distill ``recipes/<name>.yaml`` at ``train.seed = seed`` into ``out``, unless a
    bundle of this very recipe is already there (``finished_run``; benchmarks resume where they stopped, a
    half-trained run from its last epoch); ``teacher`` replaces the recipe's teacher, ``smoke`` shrinks the data to
    32/16 images at 64 px. Returns mAP50-95, train seconds and seconds per epoch (results.csv's time is cumulative,
    so per epoch comes from the total)."""
    import shutil

    from kdctl.errors import ResumeMismatch
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    d = r.model_dump()
    d["train"].update(seed=seed, device=device)
    if epochs:
        d["train"]["epochs"] = epochs
    if workers is not None:  # data-loading processes: speed only (the augmentation stream differs, not its law)
        d["train"]["workers"] = workers
    d["train"].update(train or {})  # what a benchmark varies on purpose (e.g. amp)
    if smoke:
        d["data"]["synthetic"].update(train=32, val=16, imgsz=64)
        d["train"].update(imgsz=64, batch=4)
    if teacher is not None and d.get("teacher"):
        d["teacher"]["model"] = str(teacher)
    recipe = type(r).model_validate(d)
    bundle = finished_run(out, recipe)
    if bundle is None:
        try:  # a run stopped by a deadline or killed continues from its last epoch (a finished one publishes)
            bundle = run_training(recipe, stage=stage, source=name, out=out, resume=True)
        except ResumeMismatch as e:  # an interrupted run of another recipe (e.g. other epochs): start over; any
            # other error (data, a non-finite loss) is the run's own and stops the benchmark, its work kept
            print(f"{out}: not resumed ({e}); starting over", flush=True)
            shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
            bundle = run_training(recipe, stage=stage, source=name, out=out)
    m = bundle.metrics
    return {"map50_95": m["map50_95"], "train_s": m["train_seconds"],
            "epoch_s": m["train_seconds"] / max(1, len(m.get("epochs") or []))}


@dataclass
class Job:
    """One training run of a seed-table benchmark. ``row`` is the table row it fills (None for a teacher, which is
    trained once and keyed by its recipe); ``teacher`` names the teacher job's recipe whose bundle replaces the
    recipe's teacher."""

    recipe: str
    stage: str
    seed: int
    out: str
    row: str | None = None
    teacher: str | None = None
    epochs: int | None = None
    train: dict | None = None  # train-section settings this run changes (e.g. {"amp": False})

    def run(self, a) -> dict:
        teacher = Path(self.out).parent / self.teacher if self.teacher else None
        return recipe_run(self.recipe, self.stage, self.seed, teacher, Path(self.out), device=a.device,
                          epochs=self.epochs, smoke=a.smoke, workers=getattr(a, "workers", None), train=self.train)

    def to_dict(self) -> dict:
        return asdict(self)


def run_plan(jobs: list[Job], a) -> tuple[dict, dict]:
    """Run a benchmark's jobs (each resumes: a finished bundle is read, not retrained): the teachers first, in
    order, then the rest in order or, with ``a.jobs`` > 1, that many at a time in their own processes (cores /
    jobs threads each). Returns the teachers ``{recipe: (bundle path, result)}`` and the rows
    ``{row: {seed: result}}``."""
    teachers, res = {}, {}
    for j in jobs:
        if j.row is None:
            teachers[j.recipe] = (Path(j.out), j.run(a))
    rest = [j for j in jobs if j.row is not None]
    n = getattr(a, "jobs", 1) or 1
    if n <= 1:
        for j in rest:
            res.setdefault(j.row, {})[j.seed] = j.run(a)
        return teachers, res
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, len(os.sched_getaffinity(0)) // n)
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_set_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(j.run, a): j for j in rest}
        for f in as_completed(futures):
            j = futures[f]
            res.setdefault(j.row, {})[j.seed] = f.result()
    order = sorted(res, key=lambda row: _first_index(rest, row))
    return teachers, {row: dict(sorted(res[row].items())) for row in order}


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _first_index(jobs: list[Job], row: str) -> int:
    """Where ``row`` first appears in the plan (rows keep the plan's order whatever order the runs end in)."""
    return next(i for i, j in enumerate(jobs) if j.row == row)


def parse_seed_bench(argv, doc: str, root: str, epochs_help: str, more=None):
    """The arguments of a seed-table benchmark: ``--seeds``, what ``more(parser)`` adds, and :func:`add_run_args`'
    (a smoke run already shrunk to its seed and epochs)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if more:
        more(ap)
    add_run_args(ap, root, epochs_help)
    a = ap.parse_args(argv)
    runs_root(a)
    return a


def run_and_save(jobs: list[Job], a) -> tuple[dict, dict]:
    """:func:`run_plan`, with the rows kept in the runs' root as results.json."""
    import json

    teachers, res = run_plan(jobs, a)
    (runs_root(a) / "results.json").write_text(json.dumps(res, indent=1))
    return teachers, res


def add_run_args(ap, root: str, epochs_help: str) -> None:
    """The options the GPU-sized distillation benchmarks share: device, epochs, a smoke mode and the runs' root."""
    ap.add_argument("--device", default="cpu", help="train.device for every run, e.g. 0 for the first GPU")
    ap.add_argument("--epochs", type=int, default=None, help=epochs_help)
    ap.add_argument("--smoke", action="store_true", help="tiny data and 1 epoch: checks the script, no doc written")
    ap.add_argument("--workers", type=int, default=None,
                    help="train.workers of every run (default: the recipes'); e.g. 2 on a GPU, where loading is the "
                         "bottleneck")
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench" / root))
    ap.add_argument("--jobs", type=int, default=1, help="runs at once after the teachers, each in its own process "
                    "with cores/jobs threads; their train s are then times on shared cores")


def runs_root(a) -> Path:
    """Where the runs of :func:`add_run_args`' arguments go (a GPU's apart from the CPU's); a smoke run is one seed,
    1 epoch unless told."""
    if a.smoke:
        a.epochs, a.seeds = a.epochs or 1, a.seeds[:1]
    return Path(a.root) / ("smoke" if a.smoke else "full" if a.device == "cpu" else "full-gpu")


def gap_closed_cell(per_seed: dict, base: dict, teacher_map: float, mark_below: bool = True) -> str:
    """"mean % (per seed %)" of (student_KD − baseline) / (teacher − baseline), seed by seed, and whether the KD run
    is above its baseline on every seed; n/a where the teacher is not above the baseline (no gap to close)."""
    if any(teacher_map <= base[s]["map50_95"] for s in per_seed):
        return "n/a (teacher not above the baseline)"
    gaps = [(per_seed[s]["map50_95"] - base[s]["map50_95"]) / (teacher_map - base[s]["map50_95"]) for s in per_seed]
    above = all(per_seed[s]["map50_95"] > base[s]["map50_95"] for s in per_seed)
    return (f"{100 * sum(gaps) / len(gaps):.0f} % ({' / '.join(f'{100 * g:.0f}' for g in gaps)})"
            + ("" if above or not mark_below else ", not above baseline on every seed"))



KD_SEED_HEAD = ["run", "role", "mAP50-95 per seed", "mean", "± half-range", "gap closed (mean, per seed)",
                "train s", "epoch time / baseline"]


def seed_jobs(runs: dict, names: list[str], seeds: list[int], root: Path, epochs: int | None,
              base_dirs: dict | None = None) -> list[Job]:
    """Per seed, the baselines the runs ``names`` are measured against, then those runs; ``runs`` maps a run to its
    (recipe, teacher recipe, baseline recipe). Run folders ``<run>-s<seed>``, a baseline's ``<base_dirs[b] or
    b>-s<seed>``."""
    jobs = []
    for seed in seeds:
        jobs += [Job(b, "train", seed, str(root / f"{(base_dirs or {}).get(b, b)}-s{seed}"), row=b, epochs=epochs)
                 for b in dict.fromkeys(runs[r][2] for r in names)]
        jobs += [Job(runs[r][0], "distill", seed, str(root / f"{r}-s{seed}"), row=r, teacher=runs[r][1],
                     epochs=epochs) for r in names]
    return jobs


def seed_rows(runs: dict, names: list[str], res: dict, teachers: dict) -> tuple[list[list], dict]:
    """:data:`KD_SEED_HEAD` rows of the baselines of ``names`` then of each run against its baseline and teacher
    (``runs`` as for :func:`seed_jobs`), and each baseline's half-range over seeds."""
    rows, spreads = [], {}
    for b in dict.fromkeys(runs[r][2] for r in names):
        row, spreads[b] = seed_row(b, "baseline", res[b])
        rows.append(row)
    for r in names:
        _, teacher, base = runs[r]
        rows.append(seed_row(r, f"vs {base}, teacher {teacher}", res[r], res[base],
                             teachers[teacher][1]["map50_95"])[0])
    return rows, spreads


def teacher_rows(teachers: dict) -> list[list]:
    """:data:`KD_SEED_HEAD` rows of teachers trained once: ``{name: (path, recipe_run result)}``."""
    return [[t, "teacher", f"{r['map50_95']:.4f}", "", "", "", round(r["train_s"], 1), ""]
            for t, (_, r) in teachers.items()]


def seed_row(name: str, role: str, per_seed: dict, base: dict | None = None,
             teacher_map: float | None = None) -> tuple[list, float]:
    """A :data:`KD_SEED_HEAD` row of one run over seeds (a baseline when ``base`` is None) and its mAP half-range:
    mAP per seed, mean, half-range, gap closed against ``teacher_map`` and the seeds' baseline, mean train seconds,
    median epoch time over the baseline's."""
    maps = [per_seed[s]["map50_95"] for s in sorted(per_seed)]
    half = (max(maps) - min(maps)) / 2
    train_s = round(statistics.mean(per_seed[s]["train_s"] for s in per_seed), 1)
    row = [name, role, " / ".join(f"{m:.4f}" for m in maps), round(sum(maps) / len(maps), 4),
           round(half, 4) if len(maps) > 1 else ""]
    if base is None:
        return row + ["", train_s, "1.00"], half
    ratio = median(per_seed[s]["epoch_s"] for s in per_seed) / median(base[s]["epoch_s"] for s in base)
    return row + [gap_closed_cell(per_seed, base, teacher_map), train_s, f"{ratio:.2f}"], half
