"""Does mixed precision cost the small YOLO student accuracy on a GPU? ``recipes/quickstart-student.yaml`` trained
with ``train.amp`` on and off, same seeds, same device; mAP50-95 per seed, mean and the paired difference.

An H200 session (docs/benchmarks.md, "A GPU session's runs") measured this student 6.9 points below the same recipe
on CPU, on every seed; Ultralytics' own AMP check needs downloaded weights, so offline it leaves AMP on unchecked.

    python bench/amp_check.py --device 0 --seeds 0 1 2
    python bench/gpu_session.py --benches amp --device 0      # side by side with other runs
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Job, machine, parse_seed_bench, run_and_save, runs_root, table, write_section  # noqa: E402

RECIPE = "quickstart-student"


def plan(a) -> list[Job]:
    root = runs_root(a)
    return [Job(RECIPE, "train", seed, str(root / f"amp-{'on' if amp else 'off'}-s{seed}"),
                row=f"amp {'on' if amp else 'off'}", epochs=a.epochs, train={"amp": amp})
            for seed in a.seeds for amp in (True, False)]


def parse(argv=None):
    return parse_seed_bench(argv, __doc__, 'amp', "epochs of every run; default: the recipe's")


def main(argv=None) -> None:
    a = parse(argv)
    _, res = run_and_save(plan(a), a)
    on, off = res["amp on"], res["amp off"]
    diff = [on[s]["map50_95"] - off[s]["map50_95"] for s in a.seeds]
    rows = [[name, " / ".join(f"{r[s]['map50_95']:.4f}" for s in a.seeds),
             round(statistics.mean(r[s]["map50_95"] for s in a.seeds), 4),
             round(statistics.mean(r[s]["train_s"] for s in a.seeds), 1)] for name, r in (("amp on", on), ("amp off", off))]
    body = (f"## Mixed precision and the small YOLO student\n\n{machine()}; device {a.device}. "
            f"`python bench/amp_check.py --device {a.device} --seeds {' '.join(map(str, a.seeds))}`: "
            f"`recipes/{RECIPE}.yaml` with `train.amp` on and off. AMP on − off, mAP50-95 per seed: "
            f"{' / '.join(f'{d:+.4f}' for d in diff)} (mean {statistics.mean(diff):+.4f}).\n\n"
            + table(["run", "mAP50-95 per seed", "mean", "train s"], rows) + "\n")
    print(body)
    if not a.smoke:
        write_section("amp-check", body)


if __name__ == "__main__":
    main()
