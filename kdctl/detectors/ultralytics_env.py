"""Make Ultralytics safe to import here: offline, quiet, no font or weight downloads."""

from __future__ import annotations

import os


def prepare() -> None:
    """Call before the first ``import ultralytics``; idempotent."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install at run time (e.g. onnxslim)
    import warnings

    # NVIDIA ModelOpt (quantization-aware training) on a CPU-only machine without transformers: harmless notices
    for text in ("Could not identify the device for TensorQuantizer", "Cannot find transformers package",
                 "No CUDA runtime is found"):
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    import logging

    # the same notice through torch's logger ("No CUDA runtime is found, using CUDA_HOME=...") when ModelOpt or
    # NNCF import torch's extension builder on a machine without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
