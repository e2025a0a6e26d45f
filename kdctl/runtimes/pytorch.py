"""PyTorch: the model an export was made from, as a reference row in a profile."""

from __future__ import annotations

from pathlib import Path

NAME, PACKAGE, FORMAT = "pytorch", "torch", "pytorch"


def pytorch_runner(weights: Path, threads: int | None, device: str = "cpu"):
    import torch

    from kdctl.detectors import load_detector
    from kdctl.evaluate import torch_backend

    if threads:
        torch.set_num_threads(threads)
    model = load_detector(weights)
    model = model.fuse() if hasattr(model, "fuse") else model
    run = torch_backend(model, device=device)
    run.info = {"runtime": "pytorch", "version": torch.__version__, "device": device,
                "threads": torch.get_num_threads()}
    return run
