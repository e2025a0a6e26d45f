"""Target presets (``deploy/targets/*.yaml``): what to export for a device, validated like recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from kdctl.errors import RecipeError
from kdctl.recipe.validation import read_yaml, refuse_other_kind, validate
from kdctl.recipe.schema import ARTIFACTS, Strict
def _targets_dir() -> Path:
    """The source tree's deploy/targets, else the copy a wheel install puts under <prefix>/share/kdctl."""
    import sys

    for d in (Path(__file__).resolve().parents[2] / "deploy" / "targets", Path(sys.prefix) / "share" / "kdctl" / "targets"):
        if d.is_dir():
            return d
    return Path(__file__).resolve().parents[2] / "deploy" / "targets"


TARGETS_DIR = _targets_dir()


class TensorRTSettings(Strict):
    workspace_mb: int = Field(1024, ge=64)
    dla_core: int | None = Field(None, ge=0, le=1)


class TargetPreset(Strict):
    name: str
    description: str = ""
    runtime: Literal["onnxruntime", "openvino", "tensorrt"]
    artifacts: list[str]
    opset: int = Field(17, ge=11, le=23)
    imgsz: int | None = Field(None, ge=32, le=4096)
    batch: int = Field(1, ge=1, le=256)
    dynamic: bool = False
    nms: Literal["outside"] = Field("outside", description="NMS runs in kdctl's post-processing, outside the graph")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    keep_head_fp: bool = True
    onnx_int8: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        "auto", description="Q/DQ form of onnx-int8: 'tensorrt' = symmetric int8 activations, zero points 0, float "
                            "biases (TensorRT's explicit quantization; ONNX Runtime runs it too, slowly on CPU); "
                            "'onnxruntime' = uint8 activations with zero points (ONNX Runtime's fast CPU kernels); "
                            "'auto' = tensorrt for TensorRT targets, else onnxruntime")
    openvino_int8_precision: Literal["f32", "bf16"] = Field(
        "f32", description="Precision OpenVINO uses for the layers an INT8 model keeps in floating point; bf16 "
                           "applies only where the CPU has BF16, and the precision actually used is recorded")
    threads: int | None = Field(None, ge=1)
    tensorrt: TensorRTSettings = Field(default_factory=TensorRTSettings)

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARTIFACTS]
        if bad:
            raise ValueError(f"unknown artifact '{bad[0]}'; valid: {', '.join(ARTIFACTS)}")
        if not v:
            raise ValueError("list at least one artifact")
        return v


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(target: str) -> TargetPreset:
    """A preset by name (``cpu``, ``intel``, ``jetson``...) or by path to a preset YAML."""
    p = Path(target)
    if p.suffix in (".yaml", ".yml"):
        path = p
    else:
        path = TARGETS_DIR / f"{target}.yaml"
        if not path.is_file():
            there = (f": '{target}' is a {'folder' if p.is_dir() else 'file'} here, not a preset YAML (.yaml)"
                     if p.exists() and target not in ("", ".") else " does not exist")
            raise RecipeError(f"target '{target}'{there}; valid: {', '.join(available_targets())} "
                              "(or a path to a preset YAML)")
    data = read_yaml(path, "target preset")
    refuse_other_kind(data, path, "a target preset")
    return validate(data, TargetPreset, str(path))


def onnx_int8_scheme(preset: TargetPreset, artifacts: list[str]) -> str:
    """The Q/DQ form for ``onnx-int8``: TensorRT's whenever a TensorRT engine will be built from it."""
    if preset.onnx_int8 != "auto":
        return preset.onnx_int8
    return "tensorrt" if preset.runtime == "tensorrt" or any(a.startswith("tensorrt") for a in artifacts) \
        else "onnxruntime"
