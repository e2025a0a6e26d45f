"""A GPU session's distillation tables in one command: the two-stage (``two_stage_kd.py``) and DETR-family
(``detr_kd.py``) benchmarks' runs trained side by side on one GPU, under a deadline, then their tables written to
docs/benchmarks.md by the benchmarks themselves.

A lent GPU comes for minutes, and one of those runs (a small detector at 128 px on a few hundred images) keeps a
big GPU mostly idle, so the runs go as parallel processes (``--jobs``): teachers first, then seed by seed (so that
a deadline leaves whole seeds), each run as soon as its teacher is there. At ``--deadline`` seconds the runs still
going get SIGTERM (a rerun on the same machine resumes them from their last epoch), and each table is written over
the seeds that finished. A SIGTERM to this script (a device call's own time limit) counts as the deadline, without
the tables. ``--out DIR`` receives docs/benchmarks.md, every run's result and timing (``gpu_session.json``,
rewritten as each run ends) and the tail of each failed run's log.

Fit a plan to one call: a device call may run at most 600 s, a warm machine is given back after 30 s idle (a second
call then starts over on a fresh one, teachers included), and the two-stage table's 32 runs need about 290 s of
teachers plus 200 s per two seeds at ``--jobs 16``, so ``--seeds 0 1 --deadline 530`` fits one call.

    python bench/gpu_session.py --device 0 --jobs 16 --mps --deadline 450 --out /tmp/gpu
    python bench/gpu_session.py --device cpu --smoke --jobs 2          # checks the script here, writes no doc

On a lent machine whose image lacks Ultralytics and kdctl's other needs, ``bench/gpu_wheels.sh`` prepares them as
wheels to carry, and its header has the device call. Run ``--smoke --device 0`` there first (a minute): every run
kind on CUDA, before the deadline-bound full run. With ``--mps`` (CUDA MPS, which worked on the H200 image on
2026-12-04) 16 runs side by side kept the GPU 87–96 % busy and the two-stage table took 600 s of run time; without
it, processes time-slice the GPU and 12 of them ran 3× slower each (2026-11-27). A second call on the still-warm
machine (within its idle window) resumes the runs a deadline stopped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import amp_check  # noqa: E402
import detr_kd  # noqa: E402
import two_stage_kd  # noqa: E402
from _common import ROOT, Job  # noqa: E402

# the RT-DETR-teacher rows (measured on CPU too, 3 seeds; a GPU session writes its own table): the YOLO-teacher rows
# are measured on CPU only (bench/detr_kd.py's other table)
BENCHES = {"two-stage": (two_stage_kd, []),
           "detr": (detr_kd, ["--runs", "query", "logit", "feature", "combined", "inherit", "rtdetr-to-yolo",
                              "rtdetr-to-yolo-det"]),
           "amp": (amp_check, [])}


MPS_DIRS = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/kdctl-mps/pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/kdctl-mps/log"}
PROBE = "import torch; x = torch.ones(256, 256, device='cuda'); print(float((x @ x).sum()))"


def _mps(cmd: str) -> None:
    ctl = shutil.which("nvidia-cuda-mps-control")
    if ctl:
        try:
            subprocess.run([ctl] + (["-d"] if cmd == "start" else []), input=None if cmd == "start" else "quit\n",
                           text=True, capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            pass


def start_mps() -> bool:
    """Start CUDA MPS, so that the runs' small kernels share the GPU side by side instead of by time-slicing, and
    check it with two CUDA processes at once (60 s at most); where it fails (no daemon, or a sandbox that does not
    let clients reach it) it is stopped again and the runs use the GPU without it. Before any CUDA call here."""
    if not shutil.which("nvidia-cuda-mps-control"):
        print("gpu_session: no nvidia-cuda-mps-control here; running without MPS", flush=True)
        return False
    for d in MPS_DIRS.values():
        os.makedirs(d, exist_ok=True)
    os.environ.update(MPS_DIRS)
    _mps("start")
    probes = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True) for _ in range(2)]
    ok, t0 = True, time.time()
    for pr in probes:
        try:
            out, _ = pr.communicate(timeout=max(1.0, 60 - (time.time() - t0)))
            ok = ok and pr.returncode == 0
            if pr.returncode:
                print("gpu_session: MPS probe failed: " + " ".join(out.strip().splitlines()[-1:]), flush=True)
        except subprocess.TimeoutExpired:
            os.killpg(pr.pid, signal.SIGKILL)
            ok = False
    if not ok:
        stop_mps()
        print("gpu_session: MPS did not work here; running without it", flush=True)
        return False
    print("gpu_session: CUDA MPS on (checked with two processes)", flush=True)
    return True


def stop_mps() -> None:
    _mps("quit")
    subprocess.run(["pkill", "-9", "-f", "nvidia-cuda-mps"], capture_output=True)
    for k in MPS_DIRS:
        os.environ.pop(k, None)


def _job_main(spec: str, device: str, smoke: bool, workers: int | None) -> None:
    """One run, in its own process: prints ``RESULT {json}`` last."""
    job = Job(**json.loads(spec))
    res = job.run(argparse.Namespace(device=device, smoke=smoke, workers=workers))
    print("RESULT " + json.dumps(res), flush=True)


class Run:
    def __init__(self, bench: str, job: Job, log: Path):
        self.bench, self.job, self.log = bench, job, log
        self.proc: subprocess.Popen | None = None
        self.state, self.result, self.t0, self.wall = "waiting", None, 0.0, None

    @property
    def name(self) -> str:
        return f"{self.bench}/{Path(self.job.out).name}"

    def start(self, a) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--job", json.dumps(self.job.to_dict()), "--device", a.device,
               "--workers", str(a.workers)]
        if a.smoke:
            cmd.append("--smoke")
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True)
        self.state, self.t0 = "running", time.time()

    def poll(self) -> bool:
        """True when the run has just ended."""
        if self.state not in ("running", "stopping") or self.proc.poll() is None:
            return False
        self.wall = round(time.time() - self.t0, 1)
        lines = self.log.read_text(errors="replace").splitlines()
        res = [ln for ln in lines if ln.startswith("RESULT ")]
        if self.proc.returncode == 0 and res:
            self.state, self.result = "done", json.loads(res[-1][7:])
        else:
            self.state = "stopped" if self.state == "stopping" else "failed"
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.state = "stopping"
            os.killpg(self.proc.pid, signal.SIGTERM)


def _bench_args(bench: str, a, seeds: list[int]) -> list[str]:
    _, extra = BENCHES[bench]
    return (extra + ["--device", a.device, "--workers", str(a.workers), "--seeds", *map(str, seeds)]
            + (["--smoke"] if a.smoke else []))


def _write_summary(a, runs: list[Run], t_start: float, tables: dict, mps: bool) -> dict:
    summary = {"seconds": round(time.time() - t_start, 1), "tables": tables, "mps": mps,
               "runs": [{"run": r.name, "recipe": r.job.recipe, "seed": r.job.seed, "state": r.state,
                         "wall_s": r.wall, **(r.result or {})} for r in runs]}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        tmp = a.out / "gpu_session.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(a.out / "gpu_session.json")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="0")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--benches", nargs="+", default=["two-stage", "detr"], choices=list(BENCHES),
                    help="amp: the YOLO student with train.amp on and off (6 short runs)")
    ap.add_argument("--jobs", type=int, default=6,
                    help="runs at once (on one H200: 12 without MPS ran 3x slower each; 16 with --mps ran well)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    ap.add_argument("--workers", type=int, default=2,
                    help="train.workers of every run: data loading, not the GPU, bounds these small runs (an H200 "
                         "session saw ~8 s per epoch with workers 0)")
    ap.add_argument("--deadline", type=float, default=450, help="seconds; runs still going then are stopped")
    ap.add_argument("--out", type=Path, help="copy the doc, the results and failed runs' logs here")
    ap.add_argument("--mps", action="store_true",
                    help="run the processes under CUDA MPS (checked first; without it where it does not work)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.job:
        _job_main(a.job, a.device, a.smoke, a.workers)
        return 0
    t_start = time.time()
    mps = a.mps and a.device != "cpu" and start_mps()
    try:
        return _session(a, t_start, mps)
    finally:
        if mps:
            stop_mps()


def _session(a, t_start: float, mps: bool) -> int:
    if a.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print("gpu_session: no CUDA device here (use --device cpu --smoke to check the script)", file=sys.stderr)
            return 2
        print(f"gpu_session: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)

    from kdctl.detectors.ultralytics_env import prepare

    prepare()  # offline; Ultralytics imported once before the runs start side by side, so that they find its
    importlib.import_module("ultralytics.utils")  # settings file written, not half-written

    runs: list[Run] = []
    for bench in a.benches:
        mod, _ = BENCHES[bench]
        ba = mod.parse(_bench_args(bench, a, a.seeds))
        for j in mod.plan(ba):
            runs.append(Run(bench, j, Path(j.out).parent / "logs" / f"{Path(j.out).name}.log"))
    by_key = {r.job.out: r for r in runs}
    # teachers first, then seed by seed (a deadline leaves whole seeds), benches interleaved within a seed
    order = sorted(runs, key=lambda r: (r.job.row is not None, r.job.seed, runs.index(r)))

    def dep(r: Run) -> Run | None:
        return by_key[str(Path(r.job.out).parent / r.job.teacher)] if r.job.teacher else None

    # the device call's own time limit ends this process with SIGTERM: take it as the deadline, so that the runs
    # are stopped (resumable) and what finished is still reported; the summary is also rewritten after every run
    # that ends, for a SIGKILL
    term = []
    signal.signal(signal.SIGTERM, lambda *_: term.append(time.time()))
    last_report, stopped_at = 0.0, None  # when the runs were told to stop (the deadline, or a SIGTERM)
    while True:
        ended = [r for r in runs if r.poll()]
        for r in ended:
            print(f"[{time.time() - t_start:6.0f}s] {r.state:7s} {r.name} ({r.wall} s)"
                  + (f" mAP50-95 {r.result['map50_95']:.4f}" if r.result else ""), flush=True)
        if ended and a.out:
            _write_summary(a, runs, t_start, {}, mps)
        for r in order:  # a run whose teacher failed cannot run
            d = dep(r)
            if r.state == "waiting" and d is not None and d.state in ("failed", "stopped", "skipped"):
                r.state = "skipped"
        if stopped_at is None and (term or time.time() - t_start > a.deadline):
            stopped_at = time.time()
            print(f"[{time.time() - t_start:6.0f}s] {'SIGTERM' if term else 'deadline'}: stopping the runs still "
                  "going", flush=True)
            for r in runs:
                r.stop()
                if r.state == "waiting":
                    r.state = "not started"
        running = [r for r in runs if r.state in ("running", "stopping")]
        if stopped_at is None:
            for r in order:
                if len(running) >= a.jobs:
                    break
                d = dep(r)
                if r.state == "waiting" and (d is None or d.state == "done"):
                    r.start(a)
                    running.append(r)
        if not running and (stopped_at is not None or all(r.state != "waiting" for r in runs)):
            break
        grace = 5 if term else 20
        if stopped_at is not None and any(r.state == "stopping" for r in runs) and time.time() > stopped_at + grace:
            for r in runs:
                if r.proc is not None and r.proc.poll() is None:
                    os.killpg(r.proc.pid, signal.SIGKILL)
        if time.time() - last_report > 30:
            last_report = time.time()
            smi = shutil.which("nvidia-smi")
            util = subprocess.run([smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip() if smi else ""
            print(f"[{time.time() - t_start:6.0f}s] running {len(running)}, done "
                  f"{sum(r.state == 'done' for r in runs)}/{len(runs)}" + (f"; GPU {util}" if util else ""), flush=True)
        time.sleep(1)

    tables = {}
    for bench in a.benches if not term else []:  # after a SIGTERM there is no time left to write tables
        mine = [r for r in runs if r.bench == bench]
        if not all(r.state == "done" for r in mine if r.job.row is None):
            continue
        seeds = [s for s in a.seeds if {r.state for r in mine if r.job.row and r.job.seed == s} == {"done"}]
        if seeds:
            mod, _ = BENCHES[bench]
            mod.main(_bench_args(bench, a, seeds))
            tables[bench] = seeds
    print(json.dumps(_write_summary(a, runs, t_start, tables, mps), indent=1))
    if a.out:
        if tables and not a.smoke and (ROOT / "docs" / "benchmarks.md").is_file():
            shutil.copy(ROOT / "docs" / "benchmarks.md", a.out / "benchmarks.md")
        failed = [r for r in runs if r.state == "failed"]
        (a.out / "failed_logs.txt").write_text("".join(
            f"==== {r.name}\n" + "\n".join(r.log.read_text(errors="replace").splitlines()[-60:]) + "\n"
            for r in failed))
    return 0 if tables else 1


if __name__ == "__main__":
    sys.exit(main())
