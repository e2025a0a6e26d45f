"""``kdctl export``: turn a train/distill bundle into a verified export bundle for a target device.

Every artifact is run in its own runtime on real validation images and compared with PyTorch (raw outputs for
FP32/FP16) and scored with the same COCO evaluation as ``kdctl eval``; an export that fails either check, or
loses more mAP than ``max_map_drop``, fails as a whole and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from kdctl.bundle import Bundle, BundleWriter, claim_output, load_bundle, next_run_dir
from kdctl.errors import BackendUnavailable, CheckFailed, DataError
from kdctl.export.base import Artifact, file_size_mb, validate_outputs
from kdctl.export.targets import ARTIFACTS, TargetPreset, load_target, onnx_int8_scheme
from kdctl.progress import Step

MIN_CALIBRATION = 8  # fewer images than this give scales that swing with every image


@dataclass
class ExportOptions:
    target: str = "cpu"
    artifacts: list[str] | None = None
    imgsz: int | None = None
    opset: int | None = None
    calibration_images: int = 64
    calibration_method: str | None = None
    max_map_drop: float | None = None
    data: str | None = None
    eval_images: int | None = None  # cap on validation images for mAP (None: all)
    parity_images: int = 8
    skip_invalid: bool = False

    @classmethod
    def from_recipe(cls, recipe: dict | None, **overrides) -> "ExportOptions":
        base = dict((recipe or {}).get("export") or {})
        opts = cls(**{k: v for k, v in base.items() if k in cls.__dataclass_fields__ and v is not None})
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        return opts


def _need(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BackendUnavailable(f"{what} needs the '{module}' package, which is not installed "
                                 f"(pip install {module})")


def _preprocess(paths: list[Path], imgsz: int) -> list[np.ndarray]:
    from kdctl.evaluate.predict import letterbox, load_rgb, to_input

    return [to_input([letterbox(load_rgb(p), imgsz)[0]]) for p in paths]


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spread over the list (deterministic, covers the whole set)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def export_bundle(bundle: str | Path, options: ExportOptions, *, out: str | Path | None = None,
                  runs_dir: str | Path = "runs", overwrite: bool = False, progress=None) -> Bundle:
    src = load_bundle(bundle, stages=("train", "distill"), verify=True)
    preset = load_target(options.target)
    out = Path(out) if out else next_run_dir(runs_dir, "export", f"{src.path.resolve().name}-{preset.name}")
    with claim_output(out, overwrite=overwrite, inputs=[src.path]):
        return _export(src, preset, options, out, overwrite, progress)


def _export(src: Bundle, preset: TargetPreset, options: ExportOptions, out: Path, overwrite: bool,
            progress) -> Bundle:
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.evaluate import evaluate_backend, torch_backend
    from kdctl.detectors import yolo
    from kdctl.models import check_imgsz, load_bundle_weights, model_classes

    wanted = options.artifacts or preset.artifacts
    bad = [a for a in wanted if a not in ARTIFACTS]
    if bad:
        raise DataError(f"--artifact: unknown artifact '{bad[0]}'; valid: {', '.join(ARTIFACTS)}")
    if any(a.startswith("openvino") for a in wanted):
        _need("openvino", "OpenVINO export")
    if "openvino-int8" in wanted:
        _need("nncf", "OpenVINO INT8 export")
    _need("onnxruntime", "ONNX export checks")

    ds = load_yolo_yaml(options.data or src.file("data"), skip_invalid=options.skip_invalid)
    model = load_bundle_weights(src)
    ds.check_model_classes(model_classes(model), f"the model of {src.path}")
    imgsz = check_imgsz(options.imgsz or preset.imgsz or int(src.metrics.get("imgsz") or 640), model)
    opset = options.opset or preset.opset
    method = options.calibration_method or preset.calibration_method
    needs_calib = any(a.endswith("int8") for a in wanted)
    calib_pool = ds.train_images or ds.val_images
    if needs_calib and options.calibration_images < MIN_CALIBRATION:
        raise DataError(f"export.calibration_images: {options.calibration_images} is too few for INT8 calibration "
                        f"(at least {MIN_CALIBRATION})")
    if needs_calib and len(calib_pool) < options.calibration_images:
        raise DataError(f"{ds.yaml}: export.calibration_images: {options.calibration_images} calibration images "
                        f"requested, but the dataset's train split has only {len(calib_pool)}")
    val_images = _spread(ds.val_images, options.eval_images) if options.eval_images else ds.val_images
    keep_float = (lambda nodes: yolo.float_tail(nodes, model)) if preset.keep_head_fp else None
    reference = torch_backend(model)
    parity_batches = _preprocess(val_images[:options.parity_images], imgsz)

    plan = Step(progress, f"export → {preset.name}", total=len(wanted) + 1)
    ev_total = len(val_images) * (len(wanted) + 1)
    ev = Step(progress, "evaluate artifacts (COCO mAP)", total=ev_total)
    ref_metrics = evaluate_backend(reference, val_images, ds.names, imgsz, progress=ev.advance)
    plan.advance()
    calibration = _preprocess(_spread(calib_pool, options.calibration_images), imgsz) if needs_calib else []

    with BundleWriter(out, stage="export", recipe=src.recipe, parents=[src], overwrite=overwrite,
                      inputs={"target": preset.model_dump(), "weights": str(src.file("weights")),
                              "data": ds.describe()}) as w:
        arts = _build(w.path, model, preset, wanted, imgsz, opset, method, calibration, keep_float, plan,
                      options, val_images, ds.names, ref_metrics)
        for a in arts:
            if a.format == "tensorrt" and not a.files:
                continue
            backend = a.runtime.pop("_backend", None)
            if backend is None:
                continue
            a.parity = validate_outputs(reference, backend, parity_batches, imgsz, a.precision)
            if a.parity.get("ok") is False:
                raise CheckFailed(f"export {a.name}: outputs differ from PyTorch beyond tolerance "
                                  f"({json.dumps({k: v for k, v in a.parity.items() if k != 'ok'})})")
            a.metrics = evaluate_backend(backend, val_images, ds.names, imgsz, progress=ev.advance)
            drop = ref_metrics["map50_95"] - a.metrics["map50_95"]
            a.metrics["map50_95_drop"] = drop
            if options.max_map_drop is not None and a.precision != "fp32" and drop > options.max_map_drop:
                raise CheckFailed(f"export {a.name}: mAP50-95 {a.metrics['map50_95']:.4f} is {drop:.4f} below "
                                  f"PyTorch FP32 ({ref_metrics['map50_95']:.4f}); export.max_map_drop is "
                                  f"{options.max_map_drop}")
            a.settings["size_mb"] = round(file_size_mb(w.path, a.files), 3)
        device_files = []
        if preset.runtime == "tensorrt" or any(a.startswith("tensorrt") for a in wanted):
            from kdctl.export.tensorrt import write_device_package

            onnx_files = {a.name: a.files[0] for a in arts if a.format == "onnx"}
            device_files = write_device_package(w.path, onnx_files, preset, imgsz,
                                                any(a.format == "tensorrt" and a.files for a in arts), out.name)
        (w.path / "target.yaml").write_text(yaml.safe_dump(preset.model_dump(), sort_keys=False))
        for a in arts:
            for f in a.files:
                w.add_output(a.name if len(a.files) == 1 else f"{a.name}:{Path(f).name}", f)
        for f in device_files:
            w.add_output(Path(f).stem.lower().replace("_", "-"), f)
        w.metrics.update({
            "target": preset.name, "imgsz": imgsz, "opset": opset, "pytorch_fp32": _short(ref_metrics),
            "params": sum(p.numel() for p in model.parameters()), "gflops": yolo.gflops(model, imgsz),
            "artifacts": [a.to_dict() for a in arts], "eval_images": len(val_images),
            "names": ds.names,
        })
        w.extra["artifacts"] = {a.name: {"files": a.files, "format": a.format, "precision": a.precision}
                                for a in arts}
        # engines build_engine.sh makes on the device: allowed beside the bundle's files, hashed by profile
        w.extra["device_built"] = [f"model-{a.precision}.engine" for a in arts if a.format == "tensorrt" and not a.files]
        (w.path / "metrics.json").write_text(json.dumps(w.metrics, indent=2, default=str))
        w.add_output("metrics", "metrics.json")
    return w.bundle


def _short(m: dict) -> dict:
    return {k: m[k] for k in ("map50_95", "map50", "map75")}


def _build(root: Path, model, preset: TargetPreset, wanted: list[str], imgsz: int, opset: int, method: str,
           calibration: list[np.ndarray], keep_float, plan: Step, options: ExportOptions,
           val_images: list[Path], names: list[str], ref_metrics: dict) -> list[Artifact]:
    """Write each artifact into ``root``; each carries a backend (under runtime['_backend']) to verify it."""
    from kdctl.export.onnx import export_onnx, onnxruntime_backend

    import onnxruntime as ort

    arts: list[Artifact] = []
    ort_rt = {"runtime": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider"}
    fp32 = root / "model-fp32.onnx"
    export_onnx(model, fp32, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic)
    settings = {"opset": opset, "batch": preset.batch, "dynamic": preset.dynamic, "nms": preset.nms,
                "simplified": "onnxslim"}
    needs_onnx_fp32 = "onnx-fp32" in wanted or any(a.startswith("tensorrt") for a in wanted)
    if needs_onnx_fp32:
        arts.append(Artifact("onnx-fp32", "onnx", "fp32", [fp32.name],
                             {**ort_rt, "inference_precision": "fp32", "_backend": onnxruntime_backend(fp32)},
                             settings=dict(settings)))
        plan.advance()
    if "onnx-fp16" in wanted:
        p = export_onnx(model, root / "model-fp16.onnx", imgsz, opset=opset, batch=preset.batch,
                        dynamic=preset.dynamic, half=True)
        arts.append(Artifact("onnx-fp16", "onnx", "fp16", [p.name],
                             {**ort_rt, "inference_precision": "fp16", "_backend": onnxruntime_backend(p)},
                             settings={**settings, "io": "fp32"}))
        plan.advance()
    if "onnx-int8" in wanted or "tensorrt-int8" in wanted:
        from kdctl.export.quantize import quantize_onnx_int8

        p = root / "model-int8.onnx"
        q = quantize_onnx_int8(fp32, p, calibration, keep_float, method=method, scheme=onnx_int8_scheme(preset, wanted))
        if q["scheme"] == "tensorrt":
            from kdctl.export.quantize import tensorrt_qdq_problems

            problems = tensorrt_qdq_problems(p)
            if problems:
                raise CheckFailed(f"export onnx-int8: the Q/DQ model breaks TensorRT's rules: {problems[0]}")
        arts.append(Artifact("onnx-int8", "onnx", "int8", [p.name],
                             {**ort_rt, "inference_precision": "int8 (QDQ)", "_backend": onnxruntime_backend(p)},
                             settings={**settings, **q}))
        plan.advance()
    for prec in ("fp32", "fp16", "int8"):
        if f"openvino-{prec}" not in wanted:
            continue
        from kdctl.export.openvino import export_openvino, openvino_backend, quantize_openvino_int8

        d = root / f"openvino-{prec}"
        if prec == "int8":
            validation = None
            if options.max_map_drop is not None:
                validation = (val_images, _map_validator(imgsz, names))
            q = quantize_openvino_int8(fp32, d, calibration, keep_float, validation=validation,
                                       max_drop=options.max_map_drop)
        else:
            export_openvino(fp32, d, prec)
            q = {"compress_to_fp16": prec == "fp16"}
        hint = preset.openvino_int8_precision if prec == "int8" else None
        backend = openvino_backend(d / "model.xml", prec, threads=preset.threads, hint=hint)
        rt = dict(backend.runtime)
        arts.append(Artifact(f"openvino-{prec}", "openvino", prec,
                             [f"{d.name}/model.xml", f"{d.name}/model.bin"], {**rt, "_backend": backend},
                             settings=q))
        plan.advance()
    for prec in ("fp16", "int8"):
        if f"tensorrt-{prec}" not in wanted:
            continue
        from kdctl.export.tensorrt import build_engine, tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            arts.append(Artifact(f"tensorrt-{prec}", "tensorrt", prec, [],
                                 {"runtime": "tensorrt", "engine_built": False, "reason": why},
                                 settings={"build_on_device": "build_engine.sh"}))
        else:
            import tensorrt as trt

            from kdctl.export.tensorrt import strongly_typed, tensorrt_version

            src = root / "model-int8.onnx"
            if prec == "fp16" and strongly_typed(tensorrt_version(trt.__version__)):
                src = root / "model-fp16.onnx"  # a typed network takes its precision from the ONNX
                if not src.is_file():
                    export_onnx(model, src, imgsz, opset=opset, batch=preset.batch, dynamic=preset.dynamic, half=True)
            elif prec == "fp16":
                src = fp32
            info = build_engine(src, root / f"model-{prec}.engine", prec, preset.tensorrt.workspace_mb,
                                preset.tensorrt.dla_core)
            from kdctl.profile.runners import tensorrt_backend

            be = tensorrt_backend(root / f"model-{prec}.engine")
            arts.append(Artifact(f"tensorrt-{prec}", "tensorrt", prec, [f"model-{prec}.engine"],
                                 {"runtime": "tensorrt", "engine_built": True, "version": info["tensorrt_version"],
                                  "inference_precision": prec, "_backend": be}, settings=info))
        plan.advance()
    if not needs_onnx_fp32:
        fp32.unlink()  # only the intermediate for OpenVINO; not part of this target's package
    return arts


def _map_validator(imgsz: int, names: list[str]):
    """NNCF accuracy-control validation: COCO mAP50-95 of a compiled OpenVINO model on the given images."""
    from kdctl.evaluate import evaluate_backend

    from kdctl.export.openvino import compiled_backend

    def validate(compiled_model, items) -> float:
        return evaluate_backend(compiled_backend(compiled_model), list(items), names, imgsz)["map50_95"]

    return validate
