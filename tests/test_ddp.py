"""Distributed distillation on torchrun: two gloo ranks on the CPU (YOLO through Ultralytics' trainer, Faster R-CNN
through kdctl's loop, and two "nodes" on localhost), a SIGKILL + --resume under DDP, the launch options, the checks a
DDP bundle must pass, and the Ultralytics behaviour the CPU path relies on. NCCL runs where a machine has 2+ GPUs."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app

ENV = {**os.environ, "YOLO_OFFLINE": "1"}


def _recipe(tmp_path: Path, data: Path, teacher, epochs: int = 2, student: str = "yolov8-tiny.yaml",
            losses: str = "[{name: cwd, params: {tau: 2.0}}, {name: kd_logit, weight: 0.5}]", batch: int = 8,
            device: str = "cpu", extra: str = "auto_balance: 0.25, balance_batches: 2, ") -> Path:
    r = tmp_path / "ddp.yaml"
    r.write_text(f"name: ddp\nstudent: {{model: '{student}'}}\nteacher: {{model: '{teacher}'}}\n"
                 f"data: {{yolo: {data}}}\ntrain: {{epochs: {epochs}, imgsz: 64, batch: {batch}, workers: 0, "
                 f"device: '{device}'}}\ndistill: {{{extra}losses: {losses}}}\n")
    return r


def _kdctl(*argv: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv], env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def _distributed(bundle: Path) -> dict:
    from kdctl.bundle import load_bundle

    b = load_bundle(bundle, verify=True)
    return b.metrics["distributed"]


def _assert_ranks_agree(d: dict, world: int, kd_terms: list[str]) -> None:
    assert d["world_size"] == world and [r["rank"] for r in d["ranks"]] == list(range(world))
    for r in d["ranks"]:  # every rank distilled: each KD term is positive on each rank
        for t in kd_terms:
            assert r["loss_items"][f"kd_{t}"] > 0, (r["rank"], t)
    assert len({r["student_params_sha256"] for r in d["ranks"]}) == 1  # DDP kept the students identical
    assert len({r["teacher_sha256_before"] for r in d["ranks"]}) == 1
    assert all(r["teacher_sha256_after"] == r["teacher_sha256_before"] for r in d["ranks"])  # teacher untouched
    assert len({json.dumps(r["kd_scales"]) for r in d["ranks"]}) == 1  # one auto-balance for the job


def test_two_gloo_ranks_distill_yolo(tmp_path, tiny_data, trained_bundle):
    """2 CPU ranks: both report KD terms, their students are identical after training, the teacher's weights are
    the ones on disk and unchanged, both settled on the same auto-balance scales; the bundle verifies (its weights
    are rank 0's EMA of that student, as in a one-process run). The student is a narrower twin of the teacher
    started from its weights (distill.init): every rank selects the same start, rank 0 records it."""
    from kdctl.detectors import load_detector
    from kdctl.distributed import weights_digest

    narrow = tmp_path / "narrow.yaml"
    narrow.write_text((Path(__file__).resolve().parents[1] / "kdctl/assets/models/yolov8-tiny.yaml").read_text()
                      .replace("t: [0.33, 0.125, 1024]", "t: [0.33, 0.0625, 1024]"))
    out = tmp_path / "kd"
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1, student=str(narrow),
                extra="init: teacher, auto_balance: 0.25, balance_batches: 2, ")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = _kdctl("distill", str(r), "--out", str(out), "--nproc-per-node", "2", "--json", env={**ENV, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert res["world_size"] == 2 and all(v > 0 for v in res["kd_terms"].values())
    assert res["init"] == "teacher"
    assert not list(tmp.glob("torchelastic_*"))  # torchrun's log folder was the work dir's, gone with it
    d = _distributed(out)
    _assert_ranks_agree(d, 2, ["cwd", "logit"])
    teacher = load_detector(trained_bundle / "weights.pt").float()
    assert d["ranks"][0]["teacher_sha256_before"] == weights_digest(teacher)
    # 24 training images, global batch 8: each rank saw 12 images in 3 batches of 4 per epoch
    assert [r["batches"] for r in d["ranks"]] == [3, 3]
    assert not (tmp_path / ".kd.work").exists()


def _rank_processes(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.long
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ranks die with kdctl through PR_SET_PDEATHSIG")
def test_sigkill_under_ddp_then_resume(tmp_path, tiny_data, trained_bundle):
    """kill -9 of kdctl after the first epoch checkpoint takes the launcher and both ranks with it; --resume continues
    on 2 ranks from that checkpoint and publishes a verified bundle with every epoch."""
    out = tmp_path / "kd"
    recipe = _recipe(tmp_path, tiny_data, trained_bundle, epochs=2)
    argv = ["distill", str(recipe), "--out", str(out), "--nproc-per-node", "2", "-q"]
    p = subprocess.Popen([sys.executable, "-m", "kdctl.cli.main", *argv], env=ENV, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / ".kd.work" / "train" / "weights" / "last.pt"
    t0 = time.time()
    while not last.is_file() and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.1)
    assert last.is_file(), p.stderr.read().decode()[-2000:] if p.poll() is not None else "no checkpoint in time"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    marker = str(tmp_path / ".kd.work")
    t0 = time.time()
    while _rank_processes(marker) and time.time() - t0 < 20:
        time.sleep(0.2)
    assert _rank_processes(marker) == []  # no rank kept training after kdctl died
    assert not (out / "manifest.json").exists()

    r = _kdctl(*argv[:-1], "--resume", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    d = _distributed(out)
    _assert_ranks_agree(d, 2, ["cwd", "logit"])
    from kdctl.bundle import load_bundle

    assert [e["epoch"] for e in load_bundle(out).metrics["epochs"]] == [1, 2]


def test_two_gloo_ranks_distill_faster_rcnn(tmp_path, tiny_data):
    """kdctl's own loop under DDP: RPN-, RoI- and neck-level terms on both ranks, identical students."""
    import torch

    from kdctl.detectors.torchvision import TorchvisionDetector, save_checkpoint

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", nc=3, imgsz=64), teacher, {})
    r = _recipe(tmp_path, tiny_data, teacher, epochs=1, student="torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                losses="[{name: rpn_kd, params: {temperature: 2.0}}, {name: roi_kd}, {name: pkd, level: neck}]",
                extra="auto_balance: 0.25, balance_batches: 4, ")
    out = tmp_path / "kd"
    p = _kdctl("distill", str(r), "--out", str(out), "--nproc-per-node", "2", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_ranks_agree(_distributed(out), 2, ["rpn_kd", "roi_kd", "pkd"])


def test_two_gloo_ranks_stop_distilling_together(tmp_path, tiny_data, trained_bundle):
    """distill.stop_epoch under DDP: both ranks distill epoch 1 and train epoch 2 on the task loss alone (the KD
    adapters then get no gradient, which DDP must accept), and their students stay identical."""
    out = tmp_path / "kd"
    r = _recipe(tmp_path, tiny_data, trained_bundle, extra="stop_epoch: 1, auto_balance: 0.25, balance_batches: 2, ")
    p = _kdctl("distill", str(r), "--out", str(out), "--nproc-per-node", "2", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    d = _distributed(out)
    assert len({r["student_params_sha256"] for r in d["ranks"]}) == 1
    assert all(r["loss_items"][f"kd_{t}"] == 0 for r in d["ranks"] for t in ("cwd", "logit"))  # epoch 2's last batch
    from kdctl.bundle import load_bundle

    first, second = load_bundle(out).metrics["epochs"]
    assert first["train/kd_cwd"] > 0 and first["train/kd_logit"] > 0
    assert second["train/kd_cwd"] == 0 and second["train/kd_logit"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(tmp_path, tiny_data, trained_bundle):
    """--nnodes 2: the same command on each node with its --node-rank; node 0 publishes, node 1 only trains."""
    recipe = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1)
    out, port = tmp_path / "kd", _free_port()
    common = ["distill", str(recipe), "--out", str(out), "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--json"]
    node1 = subprocess.Popen([sys.executable, "-m", "kdctl.cli.main", *common, "--node-rank", "1"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node0 = _kdctl(*common, "--node-rank", "0")
    o1, e1 = node1.communicate(timeout=120)
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-2000:], e1[-2000:])
    assert json.loads(o1)["bundle"] is None and json.loads(node0.stdout)["world_size"] == 2
    _assert_ranks_agree(_distributed(out), 2, ["cwd", "logit"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.yaml", "kd"]  # no node's work dir left behind


@pytest.mark.parametrize("argv,device,message", [
    (["--nproc-per-node", "3"], "0,1", "train.device: '0,1' lists 2 GPUs, but --nproc-per-node is 3"),
    (["--nnodes", "2"], "cpu", "--rdzv-endpoint: --nnodes 2 needs HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "cpu", "--node-rank: 2 is not in 0..1"),
    (["--nproc-per-node", "2", "--rdzv-endpoint", "nohost"], "cpu", "--rdzv-endpoint: 'nohost' is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:99999"], "cpu", "--rdzv-endpoint: port 99999 is not in 1..65535"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:0"], "cpu", "--rdzv-endpoint: port 0 is not in 1..65535"),
])
def test_bad_launch_options_are_one_line(tmp_path, tiny_data, trained_bundle, argv, device, message):
    r = _recipe(tmp_path, tiny_data, trained_bundle, device=device)
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), *argv])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "kd").exists() and not (tmp_path / ".kd.work").exists()


@pytest.mark.long
def test_a_rank_killed_mid_run_is_one_line_and_resumable(tmp_path, tiny_data, trained_bundle):
    """Rank 0 SIGKILLed right after its first checkpoint: the job stops, kdctl says so in one line (no traceback),
    the run is kept, and --resume finishes it."""
    out = tmp_path / "kd"
    argv = ["distill", str(_recipe(tmp_path, tiny_data, trained_bundle)), "--out", str(out), "--nproc-per-node", "2"]
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv], capture_output=True, text=True, timeout=300,
                       env={**ENV, "KDCTL_FAULT": "train:epoch-saved"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "distributed training failed" in p.stderr and "--resume" in p.stderr
    assert (tmp_path / ".kd.work" / "train" / "weights" / "last.pt").is_file()
    r = _kdctl(*argv, "--resume", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_ranks_agree(_distributed(out), 2, ["cwd", "logit"])


def test_global_batch_smaller_than_the_ranks_is_refused(tmp_path, tiny_data, trained_bundle):
    r = _recipe(tmp_path, tiny_data, trained_bundle, batch=1)
    res = CliRunner().invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--nproc-per-node", "2"])
    assert res.exit_code == 2 and "train.batch: 1 is the global batch" in res.output
    assert not (tmp_path / ".kd.work").exists()


def test_plan():
    from kdctl.distributed import Launch, plan

    assert plan("cpu") is None and plan("0") is None and plan("cuda") is None
    assert plan("0,1") == Launch(2, 1, 0, None)  # one process per listed GPU, as Ultralytics' device=0,1
    assert plan("cpu", 2) == Launch(2, 1, 0, None)
    assert plan("cpu", 1, 2, 1, "10.0.0.1:29500") == Launch(1, 2, 1, "10.0.0.1:29500")


def test_torchrun_arguments():
    from kdctl.distributed import Launch, torchrun_args

    single = torchrun_args(Launch(2), Path("/w/spec.json"))
    assert single[:4] == ["--nproc-per-node=2", "--max-restarts=0", "--log-dir=/w/torchrun", "--standalone"]
    assert single[-4:] == ["--module", "kdctl.distributed", "worker", "/w/spec.json"]
    multi = torchrun_args(Launch(4, 2, 1, "node0:29400"), Path("s"))
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=node0", "--master-port=29400"} <= set(multi)
    assert "--standalone" not in multi


def test_check_ranks_refuses_a_run_out_of_sync():
    from kdctl.distributed import check_ranks
    from kdctl.errors import CheckFailed

    good = {"rank": 0, "epoch": 2, "loss_items": {"kd_cwd": 0.1}, "student_params_sha256": "a",
            "teacher_sha256_before": "t", "teacher_sha256_after": "t", "kd_scales": [1.0]}
    assert check_ranks([good, {**good, "rank": 1}], 2, "distill")["world_size"] == 2
    for bad, why in [({"student_params_sha256": "b"}, "students differ"),
                     ({"teacher_sha256_after": "u"}, "teacher's weights changed on rank 1"),
                     ({"teacher_sha256_before": "u", "teacher_sha256_after": "u"}, "different teachers"),
                     ({"kd_scales": [2.0]}, "different KD auto-balance scales"),
                     ({"loss_items": {"box_loss": 1.0}}, "rank 1 computed no KD terms")]:
        with pytest.raises(CheckFailed, match=why):
            check_ranks([good, {**good, "rank": 1, **bad}], 2, "distill")
    with pytest.raises(CheckFailed, match="1 of 2 ranks reported"):
        check_ranks([good], 2, "distill")


def test_ultralytics_ddp_behaviour_the_cpu_path_relies_on():
    """Pins what kdctl.detectors.yolo overrides: Ultralytics sizes DDP by the local device count (0 on the CPU),
    skips its own launcher when LOCAL_RANK is set, wraps the model with ``device_ids=[self.device.index]`` (None on
    the CPU, which torch refuses), sets up NCCL/CUDA in ``_setup_ddp``, and its final validation assumes a GPU on a
    DDP rank."""
    from ultralytics.engine import trainer, validator

    init = inspect.getsource(trainer.BaseTrainer.__init__)
    assert 'if self.device.type in {"cpu", "mps"}:\n            world_size = 0' in init
    assert "self.ddp = world_size > 1 and LOCAL_RANK == -1" in init
    setup = inspect.getsource(trainer.BaseTrainer._setup_train)
    assert "nn.parallel.DistributedDataParallel(" in setup and "device_ids=[self.device.index]" in setup
    assert "self.accelerator.set_device(index)" in inspect.getsource(trainer.BaseTrainer._setup_ddp)
    assert 'bn = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)' in inspect.getsource(
        trainer.BaseTrainer.build_optimizer)  # called inside _setup_train, where kdctl swaps nn.parallel on CPU
    assert "self.validator(model=model)" in inspect.getsource(trainer.BaseTrainer.final_eval)
    assert "get_torch_device_backend(device_type).current_device()" in inspect.getsource(validator.BaseValidator.__call__)


def test_cpu_ddp_wrap_passes_no_device_ids(monkeypatch):
    import torch
    import ultralytics.engine.trainer as ut

    from kdctl.detectors.yolo import _cpu_ddp_wrap

    seen = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, device_ids=None, **kw: seen.update(
        device_ids=device_ids, **kw) or m)
    before = ut.nn
    with _cpu_ddp_wrap():
        ut.nn.parallel.DistributedDataParallel("model", device_ids=[None], find_unused_parameters=True)
        assert ut.nn.Module is torch.nn.Module
        # Ultralytics' build_optimizer exempts the norm layers it finds in nn.__dict__ from weight decay: a proxy
        # without torch.nn's namespace silently put BatchNorm weights in the decayed group under CPU DDP
        norms = {k for k, v in ut.nn.__dict__.items() if "Norm" in k}
        assert norms == {k for k in torch.nn.__dict__ if "Norm" in k} and "BatchNorm2d" in norms
    assert ut.nn is before and seen == {"device_ids": None, "find_unused_parameters": True}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="NCCL DDP needs 2 CUDA GPUs")
def test_two_nccl_ranks_distill_yolo(tmp_path, tiny_data, trained_bundle):
    out = tmp_path / "kd"
    p = _kdctl("distill", str(_recipe(tmp_path, tiny_data, trained_bundle, device="0,1")), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_ranks_agree(_distributed(out), 2, ["cwd", "logit"])


def test_which_rank_error_kdctl_reports(tmp_path):
    """A rank's own kdctl error wins; else a rank that ended silently (killed) is named rather than the lost-peer
    errors of the others; else the first internal error."""
    from kdctl.distributed import Launch, _job_error

    def write(r, kind, msg, code):
        (tmp_path / f"error-rank{r}.json").write_text(json.dumps({"kind": kind, "message": msg, "exit_code": code}))

    launch = Launch(2)
    write(1, "internal", "internal error on rank 1: RuntimeError: Connection closed by peer [pair.cc:561]", 1)
    e = _job_error(launch, tmp_path, 1)
    assert "rank 0 stopped without an error" in str(e) and "--resume" in str(e) and e.exit_code == 2
    write(0, "internal", "internal error on rank 0: ValueError: x", 1)
    assert str(_job_error(launch, tmp_path, 1)).startswith("internal error on rank 0")
    write(1, "kdctl", "r.yaml: distill.cache: stale", 2)
    e = _job_error(launch, tmp_path, 1)
    assert str(e) == "r.yaml: distill.cache: stale" and e.exit_code == 2
    for f in tmp_path.iterdir():
        f.unlink()
    # no report at all: both ranks silent -> the first one is named
    assert "rank 0 stopped" in str(_job_error(launch, tmp_path, 1))
