"""What machine and software produced a result; recorded in every manifest."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from kdctl.limits import usable_cores

PACKAGES = ("kdctl", "torch", "torchvision", "ultralytics", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt",
            "numpy")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_governor() -> str | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def gpu_names() -> list[str]:
    """GPU names if torch is already imported and sees CUDA; never imports torch just for this."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install must not break a manifest
        pass
    return []


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": usable_cores(),
        "governor": cpu_governor(),
        "gpus": gpu_names(),
        "packages": package_versions(),
    }
