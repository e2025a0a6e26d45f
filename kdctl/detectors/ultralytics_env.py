"""Make Ultralytics safe to import here: offline, quiet, no font or weight downloads; and the facts of its
environment the data and model checks need without importing a detector: its datasets folder, its image reader, the
model and dataset YAMLs it ships."""

from __future__ import annotations

import os
import threading
from pathlib import Path


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
    # and torch 2.14's deprecation notice for the torch.jit.script calls ModelOpt makes as it is imported
    warnings.filterwarnings("ignore", message=r".*`torch\.jit\.script` is deprecated.*", category=FutureWarning)
    import logging

    # the same notice through torch's logger ("No CUDA runtime is found, using CUDA_HOME=...") when ModelOpt or
    # NNCF import torch's extension builder on a machine without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def datasets_dir() -> Path:
    """Ultralytics' ``datasets_dir`` setting: where it looks for a dataset YAML's relative ``path`` last."""
    prepare()
    from ultralytics import utils

    return Path(utils.DATASETS_DIR)


def ships_model(name: str) -> bool:
    """Whether Ultralytics builds a model YAML of this bare name from its own configs (``yolov8n.yaml``: its
    ``yolov8.yaml`` at scale n); False where it is not installed (a device)."""
    try:
        prepare()
        from ultralytics.nn.tasks import yaml_model_load

        yaml_model_load(name)
    except (ImportError, FileNotFoundError, OSError):
        return False
    return True


def shipped_dataset(name: str) -> Path | None:
    """The dataset YAML Ultralytics ships by this bare name (``coco8.yaml``), without importing it; None where there
    is none, or no Ultralytics."""
    import importlib.util

    found = importlib.util.find_spec("ultralytics")
    if not found or not found.origin or Path(name).suffix not in (".yaml", ".yml"):
        return None
    shipped = Path(found.origin).parent / "cfg" / "datasets" / name
    return shipped if shipped.is_file() else None


def opencv_reads(path: Path) -> bool | None:
    """Whether Ultralytics' image reader (OpenCV, Pillow for a few formats) decodes the file; None where Ultralytics
    is not installed (a device runs kdctl's profiler without it)."""
    try:
        prepare()
        from cv2.utils import logging as cv_log
        from ultralytics.utils.patches import imread
    except ImportError:
        return None
    with _OPENCV_QUIET:  # OpenCV would print its own warning about the file above kdctl's one-line error
        level = cv_log.getLogLevel()
        cv_log.setLogLevel(min(level, cv_log.LOG_LEVEL_ERROR))
        try:
            return imread(str(path)) is not None
        finally:
            cv_log.setLogLevel(level)


_OPENCV_QUIET = threading.Lock()
