"""Distributed (DDP) training on torchrun: ``kdctl distill recipe.yaml --nproc-per-node N``.

The kdctl process prepares the run (recipe, data, work dir) and launches ``torch.distributed.run`` in a child
process; every rank rebuilds the trainer from the recipe (student *and* teacher loaded from disk, KD criterion built
on the unwrapped student, adapters trained as DDP-synchronised parameters), rank 0 writes the checkpoints, and the kdctl
process publishes the bundle once all ranks are done. CPU ranks talk over gloo, CUDA ranks over NCCL.

Processes die with their parent (``PR_SET_PDEATHSIG``): a ``kill -9`` of ``kdctl`` takes the launcher and every rank
with it, so ``--resume`` never races a survivor. At the end of each epoch every rank reports a digest of its student's
parameters, of the teacher's weights and its mean KD terms; rank 0 writes them to ``ranks.json`` and the bundle keeps
them (the bundle is refused when the ranks' students differ or a teacher changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from kdctl.errors import CheckFailed, KdctlError, RecipeError
from kdctl.limits import usable_cores

DDP_DIR = "ddp"           # in the work dir: launch specs, per-rank errors, ranks.json
RANKS_FILE = "ranks.json"
TIMEOUT = timedelta(hours=3)  # a rank waits this long for the others (rank 0 validating on CPU can take a while)


@dataclass(frozen=True)
class Launch:
    """How many processes, on how many machines, and where they meet."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def as_indices(device: str) -> str:
    """A device as written, lower-cased, with torch's ``cuda:`` prefix read as Ultralytics' ``select_device`` reads
    it: ``cuda:0`` is GPU ``0``, ``cuda:0,1`` GPUs ``0,1``; anything else as it is."""
    d = str(device).strip().lower()
    return d[len("cuda:"):].strip() if d.startswith("cuda:") else d


def _gpu_list(device: str) -> list[str]:
    return [d.strip() for d in str(device).split(",") if d.strip().isdigit()]


def trained_on(device: str | None) -> str:
    """Where a run with this ``train.device`` trains here, for the bundle's record: 'mps' only where Apple's GPU is
    (Ultralytics, and kdctl's loops, fall back to the CPU silently), GPUs as listed (``cuda:0,1``)."""
    d = str(device or "").strip().lower()
    if d in ("", "cpu"):
        return "cpu"
    if d == "mps":
        import torch

        return "mps" if torch.backends.mps.is_available() else "cpu"
    return "cuda:" + (",".join(_gpu_list(d)) or "0")


def check_device(device: str, where: str, fix: str = "set train.device: cpu") -> None:
    """``train.device`` names a device this machine has: 'cpu' and 'mps' always (Ultralytics runs 'mps' on the CPU
    where there is none); 'cuda' and GPU indices only where CUDA sees those GPUs. A recipe written for a GPU
    machine and run on a CPU one (a CI runner) stopped inside Ultralytics with an internal error. ``fix``: what to
    do without a GPU (a flag's own words where ``where`` is a flag)."""
    d = str(device).strip().lower()
    if d in ("cpu", "", "mps"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise RecipeError(f"{where}: '{device}' asks for a CUDA GPU, but this machine has none that torch "
                          f"{torch.__version__} can use; {fix}")
    missing = [g for g in ([0] if d == "cuda" else map(int, _gpu_list(d))) if g >= n]
    if missing:
        raise RecipeError(f"{where}: GPU {missing[0]} does not exist here; this machine has {n} "
                          f"(0{f'..{n - 1}' if n > 1 else ''})")


def plan(device: str, nproc_per_node: int | None = None, nnodes: int = 1, node_rank: int = 0,
         rdzv_endpoint: str | None = None, source: str = "recipe", batch: int | None = None) -> Launch | None:
    """The launch for these options (``None``: one process, no torchrun). ``train.device: '0,1'`` alone means one
    process per listed GPU, as Ultralytics users expect; the options are checked here, in one line each."""
    gpus = _gpu_list(device)
    if nproc_per_node is not None and nproc_per_node < 1:
        raise KdctlError(f"--nproc-per-node: must be at least 1, got {nproc_per_node}")
    if nnodes < 1:
        raise KdctlError(f"--nnodes: must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise KdctlError(f"--node-rank: {node_rank} is not in 0..{nnodes - 1} (--nnodes {nnodes})")
    nproc = nproc_per_node or max(len(gpus), 1)
    if len(gpus) > 1 and nproc != len(gpus):
        raise RecipeError(f"{source}: train.device: '{device}' lists {len(gpus)} GPUs, but --nproc-per-node is "
                          f"{nproc}; DDP runs one process per GPU")
    if str(device) == "mps" and nproc * nnodes > 1:
        raise RecipeError(f"{source}: train.device: 'mps' trains in one process; drop --nproc-per-node/--nnodes")
    if nnodes > 1 and not rdzv_endpoint:
        raise KdctlError(f"--rdzv-endpoint: --nnodes {nnodes} needs HOST:PORT of node 0, the same on every node")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise KdctlError(f"--rdzv-endpoint: '{rdzv_endpoint}' is not HOST:PORT")
        if not 1 <= int(port) <= 65535:  # torchrun failed on it in each rank, and the job ended as 'killed'
            raise KdctlError(f"--rdzv-endpoint: port {int(port)} is not in 1..65535")
    if nproc * nnodes == 1:
        return None
    if batch is not None and batch < nproc * nnodes:
        raise RecipeError(f"{source}: train.batch: {batch} is the global batch, split across {nproc * nnodes} "
                          f"processes; give at least {nproc * nnodes}")
    return Launch(nproc, nnodes, node_rank, rdzv_endpoint)


# ---- inside a rank ------------------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    """True in a rank of a multi-process torchrun job."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "-1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "-1"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str):
    """This rank's device: the LOCAL_RANK-th of the listed GPUs (or GPU LOCAL_RANK for 'cuda'/'0'), or the CPU."""
    import torch

    device = str(device).strip().lower()
    if device in ("cpu", "", "mps"):
        return torch.device("cpu")
    gpus = _gpu_list(device)
    index = int(gpus[local_rank()]) if len(gpus) > 1 else local_rank()
    return torch.device("cuda", index)


def init_process_group(device) -> str:
    """Join the job's process group (NCCL for a CUDA device, gloo on the CPU); returns the backend."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT, rank=rank(), world_size=world_size())
    return backend


def all_gather(obj) -> list:
    """Every rank's ``obj`` (a list of one item outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _digest(named_tensors) -> str:
    """sha256 over (name, float32 bytes) of each tensor, in order."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, v in named_tensors:
            h.update(name.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def params_digest(model) -> str:
    """sha256 of a model's parameters in order (BatchNorm statistics are per rank under Ultralytics' DDP and excluded)."""
    return _digest(model.named_parameters())


def weights_digest(model) -> str:
    """sha256 of every tensor in a model's state dict (parameters and buffers)."""
    return _digest((k, v) for k, v in model.state_dict().items() if hasattr(v, "detach"))


class RankReporter:
    """Callbacks for a trainer: per-epoch mean of each loss item on this rank, and at each epoch end every rank's
    student/teacher digests gathered on rank 0, which writes ``ranks.json`` into ``out_dir`` (collective: every rank
    runs the same epochs)."""

    def __init__(self, out_dir: Path, teacher=None, student_of=None):
        self.out_dir, self.teacher = Path(out_dir), teacher
        self.student_of = student_of or (lambda tr: getattr(tr.model, "module", tr.model))
        self.teacher_before = weights_digest(teacher) if teacher is not None else None
        self.sums: dict[str, float] = {}
        self.n = 0

    def attach(self, trainer) -> None:
        trainer.add_callback("on_train_epoch_start", self._reset)
        trainer.add_callback("on_train_batch_end", self._batch)
        trainer.add_callback("on_train_epoch_end", self._epoch_end)

    def _reset(self, tr) -> None:
        self.sums, self.n = {}, 0

    def _batch(self, tr) -> None:
        for k, v in (tr.loss_items or {}).items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def _epoch_end(self, tr) -> None:
        from kdctl.bundle import write_json_atomic

        mine = {"rank": rank(), "local_rank": local_rank(), "host": socket.gethostname(), "epoch": int(tr.epoch) + 1,
                "batches": self.n, "loss_items": {k: v / max(self.n, 1) for k, v in self.sums.items()},
                "student_params_sha256": params_digest(self.student_of(tr))}
        from kdctl.detectors.yolo import kd_criterion

        kd = kd_criterion(tr)
        if kd is not None:
            mine["kd_scales"] = kd.scales if kd.scales is not None else getattr(kd, "current", None)
        if self.teacher is not None:
            mine["teacher_sha256_before"] = self.teacher_before
            mine["teacher_sha256_after"] = weights_digest(self.teacher)
        ranks = all_gather(mine)
        if rank() in (-1, 0):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / RANKS_FILE, sorted(ranks, key=lambda r: r["rank"]))


def check_ranks(ranks: list[dict], world: int, stage: str) -> dict:
    """What the bundle records about a DDP run, after checking it: every rank reported, all ranks' students are
    identical and their KD scales equal, no teacher changed, and (distill) every rank computed KD terms."""
    if len(ranks) != world:
        raise CheckFailed(f"distributed training: {len(ranks)} of {world} ranks reported; refusing to publish")
    digests = {r["student_params_sha256"] for r in ranks}
    if len(digests) != 1:
        raise CheckFailed("distributed training: the ranks' students differ after training (DDP out of sync); "
                          "refusing to publish")
    if len({json.dumps(r.get("kd_scales")) for r in ranks}) != 1:
        raise CheckFailed("distributed training: the ranks settled on different KD auto-balance scales; refusing to "
                          "publish")
    if len({r.get("teacher_sha256_before") for r in ranks}) != 1:
        raise CheckFailed("distributed training: the ranks distilled from different teachers; refusing to publish")
    changed = [r["rank"] for r in ranks if r.get("teacher_sha256_before") != r.get("teacher_sha256_after")]
    if changed:
        raise CheckFailed(f"distributed training: the teacher's weights changed on rank {changed[0]}; refusing to "
                          "publish")
    if stage == "distill":
        for r in ranks:
            if not any(k.startswith("kd_") for k in r["loss_items"]):
                raise CheckFailed(f"distributed training: rank {r['rank']} computed no KD terms; refusing to publish")
    return {"world_size": world, "epoch": ranks[0]["epoch"], "ranks": ranks}


# ---- the kdctl process: launch and wait ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed kdctl must not leave ranks training)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def spec_path(work: Path, node_rank: int) -> Path:
    return work / DDP_DIR / f"launch-node{node_rank}.json"


def run(launch: Launch, node_dir: Path, spec: dict) -> None:
    """Run ``spec`` (what every rank needs to rebuild the trainer) on ``launch``'s ranks and wait for them; the
    launch files and the ranks' errors of this node go to ``node_dir``. A rank's failure becomes one line (its own
    error message when it raised a kdctl error)."""
    from kdctl.bundle import write_json_atomic

    spec = {**spec, "node_dir": str(Path(node_dir).resolve())}
    ddp = node_dir / DDP_DIR
    ddp.mkdir(parents=True, exist_ok=True)
    for f in ddp.glob("error-rank*"):
        f.unlink()
    path = spec_path(node_dir, launch.node_rank)
    write_json_atomic(path, {**spec, "launch": asdict(launch)})
    env = dict(os.environ)
    threads = max(1, usable_cores() // launch.nproc_per_node)  # the cores this process may use, not the host's
    env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would force 1 (and warn)
    p = subprocess.Popen([sys.executable, "-m", "kdctl.distributed", "launch", str(path)], env=env,
                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        rc = p.wait()
    except BaseException:  # Ctrl-C: stop the ranks before leaving
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        raise
    if rc != 0:
        raise _job_error(launch, ddp, rc)


def _job_error(launch: Launch, ddp: Path, rc: int) -> KdctlError:
    """One line for a failed job. A rank's own kdctl error (bad input, failed check) wins; else a rank of this node
    that ended without reporting (killed, out of memory) is named, since the others' errors are then only their
    lost connection to it; else the first internal error."""
    reports = {}
    for f in ddp.glob("error-rank*.json"):
        try:
            reports[int(f.stem.removeprefix("error-rank"))] = json.loads(f.read_text())
        except (ValueError, OSError):
            continue
    for r in sorted(reports):
        if reports[r].get("kind") == "kdctl":
            return KdctlError(reports[r]["message"], exit_code=int(reports[r].get("exit_code", 2)))
    mine = range(launch.node_rank * launch.nproc_per_node, (launch.node_rank + 1) * launch.nproc_per_node)
    silent = [r for r in mine if r not in reports]
    if silent:
        return KdctlError(f"distributed training failed: rank {silent[0]} stopped without an error (killed, or out "
                          "of memory) and the job ended; --resume continues from the last epoch checkpoint")
    if reports:
        first = reports[min(reports)]
        return KdctlError(first["message"], exit_code=int(first.get("exit_code", 1)))
    return KdctlError(f"distributed training failed (torchrun exit {rc}) before a rank reported an error; "
                      "--resume continues from the last epoch checkpoint")


def torchrun_args(launch: Launch, path: Path) -> list[str]:
    """``torch.distributed.run`` arguments for this launch (single node: a standalone rendezvous on a free port).
    torchrun's own log folder goes beside the launch spec in the work dir, which goes once the bundle is published
    (by default torchrun makes a ``torchelastic_*`` folder in the system's temp dir on every launch and leaves it)."""
    args = [f"--nproc-per-node={launch.nproc_per_node}", "--max-restarts=0", f"--log-dir={path.parent / 'torchrun'}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        args.append("--standalone")
    else:
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        args += [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", f"--master-addr={host}",
                 f"--master-port={port}"]
    return args + ["--module", "kdctl.distributed", "worker", str(path)]


def _launch_main(path: str) -> int:
    """The launcher process: torchrun's ``run`` in-process, its failure report reduced to an exit code (each rank
    has written its own one-line error)."""
    import logging

    _die_with_parent()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.ERROR)
    spec = json.loads(Path(path).read_text())
    try:
        torchrun(parse_args(torchrun_args(Launch(**spec["launch"]), Path(path))))
    except ChildFailedError:
        return 1
    return 0


def _worker_main(path: str) -> int:
    """One rank: rebuild the trainer from the recipe and train (rank 0 writes checkpoints and ranks.json)."""
    _die_with_parent()
    from kdctl.detectors.ultralytics_env import prepare

    prepare()
    spec = json.loads(Path(path).read_text())
    err = Path(spec["node_dir"]) / DDP_DIR / f"error-rank{max(rank(), 0)}.json"

    def report(kind: str, message: str, code: int) -> int:
        err.write_text(json.dumps({"kind": kind, "message": message, "exit_code": code}))
        return code

    try:
        from kdctl.training import fit_rank

        fit_rank(spec)
    except KdctlError as e:  # the kdctl process exits with this line and code, as a one-process run would
        return report("kdctl", str(e), e.exit_code)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return report("kdctl", f"{e.filename or ''}: {e.strerror or e}", 2)
    except BaseException as e:  # a bug, or a lost peer: one line, the traceback on request (as kdctl's CLI)
        import traceback

        from kdctl.errors import first_line

        if os.environ.get("KDCTL_DEBUG"):
            traceback.print_exc()
        return report("internal", f"internal error on rank {rank()}: {first_line(e)} (set KDCTL_DEBUG=1 for the "
                      "traceback)", 1)
    return 0


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    sys.exit(_launch_main(arg) if cmd == "launch" else _worker_main(arg))
