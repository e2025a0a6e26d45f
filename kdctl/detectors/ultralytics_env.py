"""Make Ultralytics safe to import here: offline, quiet, no font or weight downloads."""

from __future__ import annotations

import os


def prepare() -> None:
    """Call before the first ``import ultralytics``; idempotent."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install at run time (e.g. onnxslim)
