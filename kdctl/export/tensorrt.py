"""TensorRT: build engines when the ``tensorrt`` package and a GPU are here; otherwise (and always, for the
device) write ``build_engine.sh`` that runs ``trtexec`` on the device with matching flags."""

from __future__ import annotations

from pathlib import Path


def tensorrt_version(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def strongly_typed(version: tuple[int, int]) -> bool:
    """Typed networks (precision from the ONNX types) from TensorRT 10.12, where the FP16/INT8 builder flags were
    deprecated (and are gone in 11); 8.6 to 10.11 use the flags, which also let non-quantized layers run FP16."""
    return version >= (10, 12)


def dynamic_max_batch(preset) -> int:
    """The largest batch a dynamic-batch engine is built for: the preset's batch, or 8 where it gives 1."""
    return preset.batch if preset.batch > 1 else 8


def trtexec_shapes(preset, imgsz: int) -> str:
    """trtexec's optimisation profile for a dynamic batch axis (batch 1 optimal, as latency is measured; up to
    :func:`dynamic_max_batch`); empty for a static graph, whose shape is in the ONNX. Without these flags
    trtexec builds a dynamic ONNX for batch 1 alone."""
    if not preset.dynamic:
        return ""
    from kdctl.export.onnx import INPUT

    one, top = f"{INPUT}:1x3x{imgsz}x{imgsz}", f"{INPUT}:{dynamic_max_batch(preset)}x3x{imgsz}x{imgsz}"
    return f" --minShapes={one} --optShapes={one} --maxShapes={top}"


def build_engine(onnx_path: Path, engine_path: Path, precision: str, workspace_mb: int = 1024,
                 dla_core: int | None = None, max_batch: int = 8) -> dict:
    """Build a serialized engine with the TensorRT Python API (8.6, 10.x, 11).

    ``onnx_path`` is the FP16 ONNX for ``fp16`` and the Q/DQ ONNX for ``int8`` when the network is strongly typed;
    with the 8.6-10.11 flags it is the FP32 ONNX for ``fp16`` (the builder picks FP16 kernels).
    """
    import tensorrt as trt

    version = tensorrt_version(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version < (10, 0) and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    typed = strongly_typed(version)
    if typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if not typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    inp = network.get_input(0)
    if any(d < 0 for d in inp.shape):  # dynamic batch: one optimisation profile, batch 1..max_batch, optimal 1
        fixed = [d for d in inp.shape][1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, *fixed), (1, *fixed), (max_batch, *fixed))
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(blob))
    return {"tensorrt_version": trt.__version__, "precision": precision, "workspace_mb": workspace_mb,
            "dla_core": dla_core, "source": onnx_path.name, "strongly_typed": typed,
            "batch": f"1..{max_batch}" if any(d < 0 for d in inp.shape) else int(inp.shape[0])}


def trtexec_commands(artifacts: dict[str, str], workspace_mb: int, dla_core: int | None,
                     shapes: str = "") -> list[str]:
    """Shell lines that build each engine with the device's ``trtexec``, whatever its TensorRT version:
    ``--stronglyTyped`` from 10.12 (FP16 engine from the FP16 ONNX, INT8 from the Q/DQ ONNX), the
    ``--fp16``/``--int8`` flags on 8.6-10.11 (FP16 engine from the FP32 ONNX)."""
    dla = f" --useDLACore={dla_core} --allowGPUFallback" if dla_core is not None else ""
    common = f"--memPoolSize=workspace:{workspace_mb}{dla}{shapes}"
    typed, flags = [], []
    if "onnx-fp16" in artifacts:
        typed.append(f'"$TRTEXEC" --onnx={artifacts["onnx-fp16"]} --saveEngine=model-fp16.engine --stronglyTyped {common}')
    if "onnx-fp32" in artifacts:
        flags.append(f'"$TRTEXEC" --onnx={artifacts["onnx-fp32"]} --saveEngine=model-fp16.engine --fp16 {common}')
        if "onnx-fp16" not in artifacts:
            typed.append(f'"$TRTEXEC" --onnx={artifacts["onnx-fp32"]} --saveEngine=model-fp32.engine --stronglyTyped {common}')
    if "onnx-int8" in artifacts:
        typed.append(f'"$TRTEXEC" --onnx={artifacts["onnx-int8"]} --saveEngine=model-int8.engine --stronglyTyped {common}')
        flags.append(f'"$TRTEXEC" --onnx={artifacts["onnx-int8"]} --saveEngine=model-int8.engine --int8 --fp16 {common}')
    return [
        '# "[TensorRT v8601]" (8.6.1) or "[TensorRT v100300]" (10.3.0) in trtexec\'s banner',
        'TRT_V="$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p\' | head -n 1)"',
        'if [ -z "$TRT_V" ]; then echo "build_engine.sh: cannot read the TensorRT version from $TRTEXEC" >&2; exit 1; fi',
        'if [ "$TRT_V" -ge 100000 ]; then TRT_MAJOR=$((TRT_V / 10000)); TRT_MINOR=$((TRT_V / 100 % 100)); '
        'else TRT_MAJOR=$((TRT_V / 1000)); TRT_MINOR=$((TRT_V / 100 % 10)); fi',
        'echo "TensorRT $TRT_MAJOR.$TRT_MINOR ($TRTEXEC)"',
        'if [ "$TRT_MAJOR" -gt 10 ] || { [ "$TRT_MAJOR" -eq 10 ] && [ "$TRT_MINOR" -ge 12 ]; }; then',
        *(f"  {c}" for c in typed),
        "else",
        *(f"  {c}" for c in flags),
        "fi",
    ]


def write_device_package(root: Path, artifacts: dict[str, str], preset, imgsz: int, engines_built: bool,
                         bundle_name: str = "BUNDLE") -> list[str]:
    """``build_engine.sh`` and ``README-device.md``; returns the files written (relative to ``root``)."""
    cmds = trtexec_commands(artifacts, preset.tensorrt.workspace_mb, preset.tensorrt.dla_core,
                            trtexec_shapes(preset, imgsz))
    batch = f"N (1 to {dynamic_max_batch(preset)})" if preset.dynamic else str(preset.batch)
    script = root / "build_engine.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      "# Build TensorRT engines ON THE DEVICE: an engine runs only with the TensorRT version and GPU\n"
                      "# it was built on, so engines built elsewhere are not shipped. Needs JetPack's trtexec.\n"
                      "set -euo pipefail\n"
                      'cd "$(dirname "$0")"\n'
                      'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"\n'
                      'if [ ! -x "$TRTEXEC" ]; then echo "build_engine.sh: trtexec not found; set TRTEXEC=/path/to/trtexec" >&2; exit 1; fi\n'
                      + "\n".join(cmds) + "\n"
                      'echo "Engines built. Profile them from the folder above: kdctl profile $(basename "$PWD") --runtime tensorrt --device cuda"\n')
    script.chmod(0o755)
    readme = root / "README-device.md"
    readme.write_text(
        f"# {preset.description or preset.name}\n\n"
        f"Input: `images`, float32, {batch}x3x{imgsz}x{imgsz}, RGB 0..1, letterboxed (grey 114). Output: "
        f"`output0`, ({batch.split(' ')[0]}, 4 + classes, anchors): cx, cy, w, h in input pixels, then class "
        f"probabilities. NMS runs after "
        f"the model (kdctl's post-processing, IoU 0.7).\n\n"
        "## Build the engines on the device\n\n```bash\n./build_engine.sh\n```\n\n"
        "Engines must be built on the device itself, with its own TensorRT version: an engine runs only on the "
        "TensorRT version and GPU it was built with, so none is shipped. The script reads trtexec's version: from "
        "TensorRT 10.12 it builds strongly typed engines (`model-fp16.engine` from the FP16 ONNX, `model-int8.engine` "
        "from the Q/DQ ONNX); on 8.6 to 10.11 it uses `--fp16` (from the FP32 ONNX) and `--int8 --fp16`. The Q/DQ "
        "ONNX follows TensorRT's explicit-quantization rules: symmetric INT8 (zero points 0), per-channel weights, "
        "float biases, scales calibrated by kdctl; the head's box decoding stays in float.\n\n"
        + ("Engines were also built on the export machine and are included for reference only.\n\n" if engines_built
           else "")
        + "## Profile\n\nFrom the folder above this one (a profile bundle is never written inside its input):\n\n"
        f"```bash\nkdctl profile {bundle_name} --runtime tensorrt --device cuda --json > profile.json\n```\n")
    return ["build_engine.sh", "README-device.md"]
