"""TensorRT: build engines when the ``tensorrt`` package and a GPU are here; otherwise (and always, for the
device) write ``build_engine.sh`` that runs ``trtexec`` on the device with matching flags."""

from __future__ import annotations

from pathlib import Path


def tensorrt_status() -> tuple[bool, str]:
    """(available, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        return False, "torch is not installed"
    return True, ""


def build_engine(onnx_path: Path, engine_path: Path, precision: str, workspace_mb: int = 1024,
                 dla_core: int | None = None) -> dict:
    """Build a serialized engine with the TensorRT Python API; INT8 comes from the QDQ model's scales."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))
    return {"tensorrt_version": trt.__version__, "precision": precision, "workspace_mb": workspace_mb,
            "dla_core": dla_core, "source": onnx_path.name}


def trtexec_commands(artifacts: dict[str, str], workspace_mb: int, dla_core: int | None) -> list[str]:
    """``trtexec`` lines for each engine: FP16 from the FP32 ONNX, INT8 from the QDQ ONNX (explicit scales)."""
    dla = f" --useDLACore={dla_core} --allowGPUFallback" if dla_core is not None else ""
    lines = []
    if "onnx-fp32" in artifacts:
        lines.append(f'"$TRTEXEC" --onnx={artifacts["onnx-fp32"]} --saveEngine=model-fp16.engine --fp16 '
                     f"--memPoolSize=workspace:{workspace_mb}{dla}")
    if "onnx-int8" in artifacts:
        lines.append(f'"$TRTEXEC" --onnx={artifacts["onnx-int8"]} --saveEngine=model-int8.engine --int8 --fp16 '
                     f"--memPoolSize=workspace:{workspace_mb}{dla}")
    return lines


def write_device_package(root: Path, artifacts: dict[str, str], preset, imgsz: int, engines_built: bool) -> list[str]:
    """``build_engine.sh`` and ``README-device.md``; returns the files written (relative to ``root``)."""
    cmds = trtexec_commands(artifacts, preset.tensorrt.workspace_mb, preset.tensorrt.dla_core)
    script = root / "build_engine.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      "# Build TensorRT engines ON THE DEVICE: an engine runs only with the TensorRT version and GPU\n"
                      "# it was built on, so engines built elsewhere are not shipped. Needs JetPack's trtexec.\n"
                      "set -euo pipefail\n"
                      'cd "$(dirname "$0")"\n'
                      'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"\n'
                      + "\n".join(cmds) + "\n"
                      'echo "Engines built. Profile them with: kdctl profile . --runtime tensorrt"\n')
    script.chmod(0o755)
    readme = root / "README-device.md"
    readme.write_text(
        f"# {preset.description or preset.name}\n\n"
        f"Input: `images`, float32, 1x3x{imgsz}x{imgsz}, RGB 0..1, letterboxed (grey 114). Output: `output0`, "
        f"(1, 4 + classes, anchors): cx, cy, w, h in input pixels, then class probabilities. NMS runs after "
        f"the model (kdctl's post-processing, IoU 0.7).\n\n"
        "## Build the engines on the device\n\n```bash\n./build_engine.sh\n```\n\n"
        "Engines must be built on the device itself, with its own TensorRT version: an engine runs only on the "
        "TensorRT version and GPU it was built with, so none is shipped. `model-fp16.engine` comes from the FP32 ONNX with `--fp16`; `model-int8.engine` "
        "from the QDQ ONNX, whose INT8 scales were calibrated by kdctl (the head's box decoding stays FP16).\n\n"
        + ("Engines were also built on the export machine and are included for reference only.\n\n" if engines_built
           else "")
        + "## Profile\n\n```bash\nkdctl profile . --json > profile.json\n```\n")
    return ["build_engine.sh", "README-device.md"]
