"""Shared fixtures: everything runs on CPU with tiny data made here; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The longest runs (marked ``long``) first, then the other end-to-end runs (``slow``): under pytest-xdist they
    then overlap the short ones instead of running alone at the end. The same order in every worker, as xdist
    requires (the sort is stable)."""
    items.sort(key=lambda item: (item.get_closest_marker("long") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Synthetic data and COCO conversions go to a per-session cache, never the user's."""
    cache = tmp_path_factory.mktemp("kdctl-cache")
    old = os.environ.get("KDCTL_CACHE")
    os.environ["KDCTL_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("KDCTL_CACHE", None)
    else:
        os.environ["KDCTL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 24/8-image synthetic YOLO dataset at 128 px; returns its data.yaml."""
    from kdctl.data.synth import write_dataset

    out = tmp_path_factory.mktemp("tiny-data")
    return write_dataset(out, train=24, val=8, seed=3, imgsz=128, classes=3)


def kill_at(argv: list[str], fault: str) -> None:
    """Run ``kdctl ARGV`` in a subprocess that ``kdctl.faults`` SIGKILLs at the named point; assert it died there."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "KDCTL_FAULT": fault}
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", *argv, "-q"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, f"not killed at {fault}: rc {p.returncode}\n{p.stderr[-2000:]}"


def refused_in_one_line(argv: list[str], out: Path) -> str:
    """Run ``kdctl ARGV`` in this process and assert a refusal before any work: exit 2, one line, nothing at ``out``
    nor its work folder. Returns that line, its whitespace collapsed (Rich wraps long lines)."""
    from typer.testing import CliRunner

    from kdctl.cli.main import app

    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists() and not (out.parent / f".{out.name}.work").exists()
    return " ".join(res.output.split())


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def superset_checkpoint(bundle: Path, path: Path, order: list[str]) -> Path:
    """The bundle's model as a checkpoint of the classes ``order`` (its own among others, in another order): each
    of its classes keeps its class-branch weights, each new one gets random ones."""
    import torch
    from torch import nn

    from kdctl.detectors.yolo import load_detector, save_checkpoint

    m = load_detector(bundle / "weights.pt")
    own = [m.names[i] for i in sorted(m.names)]
    head, g = m.model[-1], torch.Generator().manual_seed(0)
    for seq in head.cv3:
        last, new = seq[-1], nn.Conv2d(seq[-1].in_channels, len(order), 1)
        with torch.no_grad():
            for j, name in enumerate(order):
                if name in own:
                    new.weight[j], new.bias[j] = last.weight[own.index(name)], last.bias[own.index(name)]
                else:
                    new.weight[j] = torch.randn(new.weight[j].shape, generator=g) * 0.1
        seq[-1] = new
    head.nc, head.no = len(order), len(order) + head.reg_max * 4
    m.names, m.yaml = dict(enumerate(order)), {**m.yaml, "nc": len(order)}
    save_checkpoint(m, path, {})
    return path


def superset_frcnn(model, order: list[str]):
    """A copy of a Faster R-CNN (kdctl's ``TorchvisionDetector``) of the classes ``order``: its own among others, in
    another order. Each of its classes keeps its classifier and box-regression rows; each new one never scores (a
    zero weight and a bias of -30: a softmax share of about e^-30 of the others'), so its detections are the
    model's own."""
    import copy

    import torch

    big = copy.deepcopy(model)
    own = [model.names[i] for i in range(model.nc)]
    p = big.net.roi_heads.box_predictor
    rows = [0] + [own.index(n) + 1 if n in own else None for n in order]  # row 0: the background
    cls = torch.nn.Linear(p.cls_score.in_features, len(rows))
    box = torch.nn.Linear(p.bbox_pred.in_features, 4 * len(rows))
    with torch.no_grad():
        for t, src in enumerate(rows):
            if src is None:
                cls.weight[t], cls.bias[t] = 0.0, -30.0
            else:
                cls.weight[t], cls.bias[t] = p.cls_score.weight[src], p.cls_score.bias[src]
                box.weight[4 * t:4 * t + 4] = p.bbox_pred.weight[4 * src:4 * src + 4]
                box.bias[4 * t:4 * t + 4] = p.bbox_pred.bias[4 * src:4 * src + 4]
    p.cls_score, p.bbox_pred = cls, box
    big.nc, big.names = len(order), dict(enumerate(order))
    return big


def _trained(tmp_path_factory, name: str, student: str, data: Path, train: str) -> Path:
    """A real train bundle: ``student`` trained on ``data`` with the recipe's ``train`` mapping."""
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    d = tmp_path_factory.mktemp(name)
    r = write_recipe(d / f"{name}.yaml", f"name: {name}\nstudent: {{model: {student}}}\ndata: {{yolo: {data}}}\n"
                                          f"train: {train}\n")
    return run_training(load_recipe(r), stage="train", source=str(r), out=d / name).path


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, tiny_data) -> Path:
    """One epoch of the tiny student on tiny data: a real train bundle to export, evaluate and distill from."""
    return _trained(tmp_path_factory, "tiny", "yolov8-tiny.yaml", tiny_data,
                    "{epochs: 1, imgsz: 128, batch: 8, workers: 0}")


@pytest.fixture(scope="session")
def export_cpu(tmp_path_factory, trained_bundle) -> Path:
    from kdctl.export.stage import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("exp") / "cpu"
    return export_bundle(trained_bundle, ExportOptions(target="cpu", calibration_images=8), out=out).path


@pytest.fixture(scope="session")
def export_jetson(tmp_path_factory, trained_bundle) -> Path:
    """The Jetson package (ONNX FP32/FP16, TensorRT-form Q/DQ INT8, build_engine.sh), without TensorRT here."""
    from kdctl.export.stage import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("exp") / "jetson"
    return export_bundle(trained_bundle, ExportOptions(target="jetson", calibration_images=8), out=out).path


@pytest.fixture(scope="session")
def profile_cpu(tmp_path_factory, export_cpu) -> Path:
    from kdctl.profile.stage import profile_bundle

    out = tmp_path_factory.mktemp("prof") / "cpu"
    return profile_bundle(export_cpu, warmup=2, runs=20, e2e_runs=4, out=out).path


@pytest.fixture(scope="session")
def kd_chain(tmp_path_factory, tiny_data, trained_bundle) -> dict:
    """A baseline (student alone) and a distilled student from ``trained_bundle`` as the teacher: 1 epoch each."""
    from kdctl.recipe import load_recipe
    from kdctl.training import run_training

    d = tmp_path_factory.mktemp("kdchain")
    base = write_recipe(d / "base.yaml", f"""
name: base
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
""")
    kd = write_recipe(d / "kd.yaml", f"""
name: kd
teacher: {{model: {trained_bundle}}}
student: {{model: yolov8-tiny.yaml}}
data: {{yolo: {tiny_data}}}
train: {{epochs: 1, imgsz: 128, batch: 8, workers: 0, seed: 1}}
distill: {{auto_balance: 0.25, losses: [{{name: at}}]}}
""")
    return {"teacher": trained_bundle,
            "baseline": run_training(load_recipe(base), stage="train", source=str(base), out=d / "base").path,
            "distilled": run_training(load_recipe(kd), stage="distill", source=str(kd), out=d / "kd").path}


def _frcnn_start(path: Path, data: Path, imgsz: int) -> Path:
    """A Faster R-CNN checkpoint whose BatchNorm running statistics are measured on the training images: built at
    random, its running statistics (mean 0, variance 1) make a MobileNetV3 in eval mode output the same features for
    every input (they differed by 1e-8 relative), and a few training steps do not move them enough, so every image
    got the same, tied detections and parity became a coin toss between tied boxes."""
    import numpy as np
    import torch

    from kdctl.detectors.torchvision import TorchvisionDetector
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input

    torch.manual_seed(0)
    m = TorchvisionDetector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, imgsz)
    norms = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for b in norms:
        b.momentum = None  # a plain average over the batches below
    images = sorted((data.parent / "images" / "train").glob("*.png"))
    x = torch.from_numpy(to_input([letterbox(load_rgb(p), imgsz)[0] for p in images]))
    m.net.train()
    with torch.no_grad():
        for i in range(0, len(x), 8):
            m.net.backbone(m.net.transform(list(x[i:i + 8]))[0].tensors)
    for b in norms:
        b.momentum = 0.1
    torch.save(m.checkpoint(), path)
    return path


@pytest.fixture(scope="session")
def frcnn_bundle(tmp_path_factory, tiny_data) -> Path:
    """torchvision's Faster R-CNN (MobileNetV3 320 FPN) trained 2 epochs at 128 px by kdctl's own loop, from a
    checkpoint with measured BatchNorm statistics (:func:`_frcnn_start`): barely trained, but its detections depend on
    the image, so FP32 exports are held to PyTorch's outputs (fp16 and bf16 are judged on mAP: ``PARITY_ON_MAP``)."""
    start = _frcnn_start(tmp_path_factory.mktemp("fr-start") / "start.pt", tiny_data, 128)
    return _trained(tmp_path_factory, "fr", f"'{start}'", tiny_data,
                    "{epochs: 2, imgsz: 128, batch: 8, lr0: 0.01, optimizer: SGD}")


@pytest.fixture(scope="session")
def rtdetr_bundle(tmp_path_factory, tiny_data) -> Path:
    """kdctl's tiny RT-DETR trained 1 epoch at 64 px through Ultralytics' RT-DETR trainer."""
    return _trained(tmp_path_factory, "rt", "rtdetr-tiny.yaml", tiny_data,
                    "{epochs: 1, imgsz: 64, batch: 8, optimizer: AdamW, lr0: 0.0005}")
