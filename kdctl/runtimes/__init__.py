"""Inference runtimes: one module per runtime (ONNX Runtime, OpenVINO, TensorRT, and PyTorch as a reference row),
each opening an artifact for inference as a :data:`~kdctl.evaluate.predict.Backend` with metadata. ``kdctl export``
(which writes artifacts and checks them in their runtime) and ``kdctl profile`` (which times them) both come here;
neither imports the other. The registry holds names only, so importing it loads no runtime: a missing one is a
clear :class:`~kdctl.errors.BackendUnavailable` when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Runtime:
    name: str                      # what --runtime takes
    package: str                   # the Python package it needs
    format: str                    # the artifact format it runs (an export bundle's artifacts[].format)
    artifacts: tuple[str, ...]     # the export artifacts it runs
    module: str                    # kdctl.runtimes.<module>



def requests_to_time(requests: int, in_flight: int) -> int:
    """How many requests a throughput measurement with ``in_flight`` requests at once times: those asked
    (``profile --runs``), and at least 4 per request in flight, so every stream is busy for more than its first."""
    return max(int(requests), 4 * in_flight)


def in_flight_record(mode: str, batch: int, in_flight: int, streams: int, requests: int, seconds: float,
                     **extra) -> dict:
    """A profile's throughput entry measured with requests in flight (``profile --hint throughput``): ``mode``
    'async' (OpenVINO's THROUGHPUT hint) or 'concurrent' (ONNX Runtime from several threads), ``requests`` of
    ``batch`` images each done in ``seconds``."""
    return {"mode": mode, "hint": "throughput", "batch": int(batch), "requests_in_flight": int(in_flight),
            "streams": int(streams), **extra, "requests": requests, "seconds": seconds,
            "images_per_s": requests * int(batch) / seconds}

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", "onnxruntime", "onnx", ("onnx-fp32", "onnx-fp16", "onnx-int8"), "onnxruntime"),
    Runtime("openvino", "openvino", "openvino", ("openvino-fp32", "openvino-fp16", "openvino-bf16",
                                                "openvino-int8"), "openvino"),
    Runtime("tensorrt", "tensorrt", "tensorrt", ("tensorrt-fp16", "tensorrt-int8"), "tensorrt"),
    Runtime("pytorch", "torch", "pytorch", (), "pytorch"),
)}
ARTIFACTS: tuple[str, ...] = tuple(a for r in RUNTIMES.values() for a in r.artifacts)
DEVICE_RUNTIMES: tuple[str, ...] = tuple(n for n, r in RUNTIMES.items() if r.artifacts)  # what --runtime offers


def for_format(fmt: str) -> Runtime:
    for r in RUNTIMES.values():
        if r.format == fmt:
            return r
    raise KeyError(fmt)


def available(name: str) -> tuple[bool, str]:
    """(usable here, why not): the package is installed (and for TensorRT, cuda-python and a GPU are there)."""
    rt = RUNTIMES[name]
    if importlib.util.find_spec(rt.package) is None:
        return False, f"the '{rt.package}' package is not installed"
    if name == "tensorrt":
        from kdctl.runtimes.tensorrt import tensorrt_status

        return tensorrt_status()
    return True, ""


def check_export_metrics(bundle) -> None:
    """Refuse, by field, export metrics of a shape export never writes (a hand-edited and resealed manifest); their
    types were checked when the bundle was loaded. Profile and eval check them before running any artifact."""
    from kdctl.errors import BundleError, shown
    from kdctl.limits import IMGSZ_MAX

    m, where = bundle.metrics, bundle.path / "manifest.json"
    imgsz = m.get("imgsz")
    if imgsz is None or not 32 <= imgsz <= IMGSZ_MAX:
        raise BundleError(f"{where}: metrics.imgsz: must be the export's input size (32..{IMGSZ_MAX}), "
                          f"got {shown(imgsz)}")
    for i, a in enumerate(m.get("artifacts") or []):  # the fields' types were checked at load; these must be there
        if any(a.get(k) is None for k in ("name", "format", "precision", "files")):
            raise BundleError(f"{where}: metrics.artifacts.{i}: must be an object with string name, format, "
                              "precision and a list of files")


def artifact_mb(bundle_path, files: list) -> float | None:
    """An artifact's size on disk in MB, rounded to 3 places: its files in the export bundle (an absolute path stays
    absolute); None where it has none, or one is not there (a TensorRT engine still to be built on the device)."""
    paths = [bundle_path / f for f in files if isinstance(f, str)]
    if not paths or not all(p.is_file() for p in paths):
        return None
    return round(sum(p.stat().st_size for p in paths) / 1e6, 3)


def bundle_artifacts(bundle) -> list[dict]:
    """An export bundle's artifacts that have files to run: those the export wrote, and the TensorRT engines
    ``build_engine.sh`` built on the device after it (``model-<precision>.engine`` beside the bundle's files, which
    its manifest allows), each with its hash, since the manifest could not record one."""
    from kdctl.bundle import sha256_file
    from kdctl.bundle.store import device_engine

    arts = []
    for a in bundle.metrics.get("artifacts") or []:
        built = device_engine(a)
        if built and (bundle.path / built).is_file():
            a = {**a, "files": [built], "built_on_device": True, "engine_sha256": sha256_file(bundle.path / built)}
        if a["files"]:
            arts.append(a)
    return arts


def open_runner(root: Path, art: dict, threads: int | None, device: str):
    """:func:`open_artifact`, with a runtime's refusal to load the file turned into one line naming it (profile and
    eval run an export bundle's artifacts through here)."""
    from kdctl.errors import KdctlError, first_line, not_utf8

    if (escaped := not_utf8(root / art["files"][0])) is not None:  # the runtimes take UTF-8 paths only
        raise KdctlError(f"{escaped}: the path has bytes that are not UTF-8 text, which {art['name']}'s runtime "
                         "cannot open; move or rename the bundle")
    try:
        return open_artifact(root, art, threads, device)
    except KdctlError:
        raise
    except Exception as e:  # each runtime raises its own types for a file it cannot load
        raise KdctlError(f"{root / art['files'][0]}: {art['name']} cannot be loaded by its runtime "
                         f"({first_line(e, 200)})", exit_code=1) from None


def open_artifact(root: Path, art: dict, threads: int | None, device: str):
    """A runner for one artifact of an export bundle (``art`` as its metrics list it)."""
    from kdctl.errors import KdctlError

    try:
        rt = for_format(art["format"])
    except KeyError:
        raise KdctlError(f"unknown artifact format '{art['format']}'") from None
    mod = importlib.import_module(f"kdctl.runtimes.{rt.module}")
    path = Path(art["files"][0])
    path = path if path.is_absolute() else root / path
    if rt.name == "onnxruntime":
        return mod.onnxruntime_runner(path, threads, device)
    if rt.name == "openvino":
        return mod.openvino_runner(path, art["precision"], threads, "CPU",
                                   hint=art.get("runtime", {}).get("requested_precision"))
    if rt.name == "tensorrt":
        return mod.tensorrt_backend(path)
    return mod.pytorch_runner(path, threads, device)
