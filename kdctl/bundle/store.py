"""Artifact bundles: a directory of files plus ``manifest.json`` (inputs, outputs, hashes, env, metrics).

A bundle is built in a hidden temporary sibling directory and renamed into place only once its manifest is
written, so an interrupted stage never leaves a directory that looks like a complete bundle. ``manifest.sha256``
beside the manifest seals it (``sha256sum -c manifest.sha256`` checks it too; a detached signature of
``manifest.json``, e.g. ``cosign sign-blob``, covers the whole bundle the same way). Publishing goes through
:mod:`kdctl.bundle.output`, which never replaces anything kdctl did not write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdctl import __version__
from kdctl.bundle.environment import environment
from kdctl.errors import BundleError, parse_json

MANIFEST = "manifest.json"
SEAL = "manifest.sha256"
SCHEMA_VERSION = 2
STAGES = ("data", "train", "distill", "eval", "export", "profile", "gate", "report")
_NEXT_STAGE = {"train": "export", "distill": "export", "export": "profile", "profile": "gate"}  # the pipeline's order


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _content_hash(files: dict[str, dict]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling ``.NAME.KIND-XXXXXXXX`` to build ``path`` in before renaming it into place; kdctl's own
    naming, so :func:`stale_pattern` finds what a killed run left and nothing else."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def stale_pattern(path: Path, kinds: tuple[str, ...] = ("tmp",)) -> re.Pattern:
    """Matches the names :func:`temp_sibling` gives ``path``'s siblings of these kinds (group 1: the kind)."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.({'|'.join(kinds)})-[0-9a-f]{{8}}$")


def remove_stale_temps(path: Path) -> None:
    """Remove the ``tmp`` siblings (files or folders) of ``path`` that a killed write or build left; call it while
    nothing else writes ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pat = stale_pattern(path)
    for p in path.parent.iterdir():
        if pat.match(p.name) and not p.is_symlink():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary sibling, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class Bundle:
    """A complete bundle on disk, as read back from its manifest."""

    path: Path
    manifest: dict
    verified: bool = False  # set by verify_bundle: every listed file was re-hashed and the seal matched

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def recipe(self) -> dict | None:
        return self.manifest.get("recipe")

    def file(self, role: str) -> Path:
        """The file recorded under ``outputs[role]``."""
        rel = self.manifest.get("outputs", {}).get(role)
        if rel is None:
            raise BundleError(f"{self.path}: bundle of stage '{self.stage}' has no output '{role}'; "
                              f"it has: {', '.join(self.manifest.get('outputs', {})) or 'none'}")
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.path / MANIFEST}: outputs.{role}: '{rel}' is not a file of the bundle")
        return self.path / rel

    def ref(self) -> dict:
        """How a child bundle records this one as its parent: hashes that were re-checked, never copied."""
        if not self.verified:
            require_verified(self)
        return {"id": self.id, "stage": self.stage, "path": str(self.path.resolve()),
                "content_sha256": self.manifest["content_sha256"], "verified": True}


_EXPORTED = (".onnx", ".xml", ".engine", ".plan", ".trt", ".tflite", ".mlmodel", ".torchscript")  # model files


def _exported_model(path: Path) -> bool:
    """A model file exported outside kdctl (by its suffix; an ``.xml`` only beside its ``.bin``, as an OpenVINO IR
    is: a JUnit report is no model)."""
    suffix = path.suffix.lower()
    return suffix in _EXPORTED and path.is_file() and (suffix != ".xml" or path.with_suffix(".bin").is_file())


def load_bundle(path: str | Path, stages: Iterable[str] | None = None, *, verify: bool = False) -> Bundle:
    """Read a bundle's manifest; with ``verify=True`` also re-hash it and refuse one that fails (exit 1).

    Every stage reads its inputs with ``verify=True``: a result is never built on an edited or swapped file.
    """
    path = Path(path)
    mf = path / MANIFEST
    if path.exists() and not mf.is_file():
        inside = part_of_bundle(path)
        if inside and _holds_weights(inside[0], path):  # runs/train/t/weights.pt: that bundle, verified whole
            path, mf = inside[0], inside[0] / MANIFEST
        elif inside:  # an artifact's file or folder (model.onnx, openvino-int8/), a bundle's metrics.json
            root, artifact = inside
            what = f"artifact {artifact} of the export bundle" if artifact else "the bundle"
            raise BundleError(f"{path}: is part of {what} {root}; give the bundle directory {root}")
    if not path.is_dir():
        if _exported_model(path):  # yolo val model=best.onnx, benchmark_app -m x.xml
            raise BundleError(f"{path}: an exported model outside a kdctl export bundle; kdctl runs artifacts from "
                              "the export bundle that checked them against PyTorch (kdctl export best.pt --data "
                              "data.yaml --target cpu writes one)")
        raise BundleError(f"{path}: " + ("is a file, not a bundle directory" if path.exists()
                                          else "bundle directory not found"))
    if not mf.is_file() or mf.is_symlink():
        raise BundleError(f"{path}: not a kdctl bundle (no {MANIFEST})")
    try:
        manifest = parse_json(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf}: manifest is not a JSON object")
    for key in ("schema_version", "stage", "id", "files", "content_sha256"):
        if key not in manifest:
            raise BundleError(f"{mf}: manifest field '{key}' is missing")
    if not isinstance(manifest["schema_version"], int) or not isinstance(manifest["files"], dict):
        raise BundleError(f"{mf}: manifest fields 'schema_version'/'files' have the wrong type")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise BundleError(f"{mf}: schema_version {manifest['schema_version']} is newer than this kdctl "
                          f"understands ({SCHEMA_VERSION}); upgrade kdctl")
    problem = _shape_problem(manifest)
    if problem:
        raise BundleError(f"{mf}: {problem}")
    bundle = Bundle(path, manifest)
    if stages is not None:
        stages = tuple(stages)
        if bundle.stage not in stages:
            article = "an" if bundle.stage[:1] in "aeiou" else "a"
            then = _NEXT_STAGE.get(bundle.stage)  # a bundle one stage short of the one wanted: the command to run
            hint = f" (run kdctl {then} on it first)" if then in stages else ""
            raise BundleError(f"{path}: is {article} '{bundle.stage}' bundle; expected one of: {', '.join(stages)}"
                              f"{hint}")
    if verify:
        require_verified(bundle)
    return bundle


def part_of_bundle(path: str | Path, levels: int = 3) -> tuple[Path, str | None] | None:
    """The bundle a file or folder inside it belongs to (a folder up to ``levels`` above it with a manifest that
    lists it) and, for a file or folder of an export bundle's artifact (its ``artifacts`` record), the artifact's
    name (``runs/export/x/openvino-int8/model.xml``: ``(runs/export/x, 'openvino-int8')``, as ``yolo val
    model=best.onnx`` names a model by its file); else None. The manifest is only read here: whoever uses the bundle
    loads and verifies it."""
    path, full = Path(path), Path(os.path.abspath(path))
    for up in range(1, min(levels, len(full.parts) - 1) + 1):
        # the folder as the user named it, or above what they named (`kdctl eval model.onnx` in its folder)
        root = Path(*path.parts[:-up]) if up < len(path.parts) else Path(*full.parts[:-up])
        rel = Path(*full.parts[-up:]).as_posix()

        def holds(f) -> bool:
            return isinstance(f, str) and (f == rel or f.startswith(rel + "/"))

        try:
            manifest = parse_json((root / MANIFEST).read_text(encoding="utf-8"))
            export = manifest.get("stage") == "export"
            built = list(manifest.get("device_built") or []) if export else []  # engines build_engine.sh made
            if not any(holds(f) for f in [*manifest["files"], *built]):
                return None
            names = [n for n, a in dict(manifest.get("artifacts") if export else {}).items()
                     if any(holds(f) for f in a["files"] or [device_engine(a)])]
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            continue  # no manifest here (or none kdctl wrote): the folder above may hold one
        return root, (names[0] if len(names) == 1 else None)
    return None


def device_engine(artifact: dict) -> str | None:
    """The file a TensorRT artifact of an export bundle that was not built at export time (``files`` empty) is
    built into on the device by its ``build_engine.sh``, beside the bundle's files; None for any other artifact."""
    if artifact.get("format") != "tensorrt" or artifact.get("files"):
        return None
    return f"model-{artifact['precision']}.engine"


def weights_of_bundle(path: str | Path) -> Path | None:
    """The train/distill bundle whose model (its ``weights`` output) ``path`` is, else None: a recipe's
    ``teacher.model: runs/train/t/weights.pt``, ``kdctl eval``/``export`` of it, read as that bundle (verified, its
    lineage recorded) rather than as a loose checkpoint."""
    inside = part_of_bundle(path)
    return inside[0] if inside and _holds_weights(inside[0], path) else None


def _holds_weights(root: Path, path: str | Path) -> bool:
    """Whether ``path`` is the model (``weights`` output) of the train/distill bundle at ``root``."""
    try:
        m = parse_json((root / MANIFEST).read_text(encoding="utf-8"))
        weights = m["outputs"]["weights"] if m.get("stage") in ("train", "distill") else None
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return False
    return isinstance(weights, str) and (root / weights).resolve() == Path(path).resolve()


def artifact_given(path: str | Path, artifacts: list[str] | None) -> tuple[Path, list[str] | None]:
    """``kdctl eval``/``profile``/``gate`` given an artifact's file or folder inside an export bundle (``yolo val
    model=best.onnx``, ``benchmark_app -m model.xml``): that bundle and that artifact. Any other path, as given."""
    path = Path(path)
    inside = None if (path / MANIFEST).is_file() else part_of_bundle(path)
    if not inside or not inside[1]:
        return path, artifacts
    root, name = inside
    if artifacts and artifacts != [name]:
        raise BundleError(f"--artifact: {', '.join(artifacts)}, but {path} is artifact {name} of the export bundle "
                          f"{root}; give the bundle {root} to pick others")
    return root, [name]


def _shape_problem(m: dict) -> str:
    """What in the manifest has a shape kdctl never writes ('' if none): a hand-edited manifest, even one resealed,
    is refused by field here rather than failing somewhere in a stage that trusts the shape."""
    if not isinstance(m["stage"], str) or m["stage"] not in STAGES:
        return f"field 'stage' must be one of {', '.join(STAGES)}, got {json.dumps(m['stage'])[:40]}"
    if not isinstance(m["id"], str) or not m["id"]:
        return "field 'id' must be a non-empty string"
    if not isinstance(m["content_sha256"], str):
        return "field 'content_sha256' must be a string"
    for key in ("inputs", "environment", "metrics", "outputs", "artifacts"):
        if key in m and not isinstance(m[key], dict):
            return f"field '{key}' must be a JSON object, got {type(m[key]).__name__}"
    if m.get("recipe") is not None and not isinstance(m["recipe"], dict):
        return f"field 'recipe' must be a JSON object or null, got {type(m['recipe']).__name__}"
    parents = m.get("parents", [])
    if not isinstance(parents, list):
        return f"field 'parents' must be a list, got {type(parents).__name__}"
    for i, ref in enumerate(parents):
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) for k in ("id", "stage")):
            return f"parents.{i}: must be an object with string 'id' and 'stage'"
    for role, rel in (m.get("outputs") or {}).items():
        if not isinstance(rel, str):
            return f"outputs.{role}: must be a file name, got {type(rel).__name__}"
    built = m.get("device_built", [])
    if built is not None and not (isinstance(built, list) and all(isinstance(x, str) for x in built)):
        return "field 'device_built' must be a list of file names"
    for key, value in (m.get("metrics") or {}).items():
        problem = _kind_problem(f"metrics.{key}", value, _METRIC_KINDS.get(key))
        if problem:
            return problem
        for i, entry in enumerate(value if key in _ENTRY_KINDS and value else []):
            for k, v in entry.items():
                problem = _kind_problem(f"metrics.{key}.{i}.{k}", v, _ENTRY_KINDS[key].get(k))
                if problem:
                    return problem
    return ""


def _kind_problem(where: str, value: Any, kind: str | None) -> str:
    if value is None or kind is None or _is(value, kind):
        return ""
    return f"{where}: must be {_KIND_WORDS[kind]}, got {json.dumps(value)[:40]}"


# The metrics the stages write and read back (the report, gate, profile and export trust their types): None is
# allowed for each (a value not measured); other keys are free.
_METRIC_KINDS = {
    **dict.fromkeys(("map50_95", "map50", "map75", "gflops", "train_seconds", "pytorch_fp32_map50_95"), "number"),
    **dict.fromkeys(("eval_images", "images", "imgsz", "params", "opset"), "integer"),
    "per_class_ap50_95": "scores",
    **dict.fromkeys(("pytorch", "pytorch_fp32", "init", "settings", "skipped", "model"), "object"),
    **dict.fromkeys(("epochs", "kd_terms", "artifacts", "results", "checks"), "records"),
    **dict.fromkeys(("target", "artifact", "split", "runtime", "precision", "eval_sha256"), "string"),
    "passed": "boolean",
}
# The fields of those lists' entries that the stages read back (export's artifacts, profile's results, the gate's
# checks, training's epochs): the same rule, field by field.
_ENTRY_KINDS = {
    "artifacts": {**dict.fromkeys(("name", "format", "precision"), "string"), "files": "names",
                  **dict.fromkeys(("runtime", "settings", "metrics", "parity"), "object")},
    "results": {**dict.fromkeys(("artifact", "format", "precision"), "string"), "files": "names",
                **dict.fromkeys(("runtime", "latency_ms", "throughput", "memory", "end_to_end_ms"), "object"),
                **dict.fromkeys(("size_mb", "map50_95", "map50"), "number")},
    "checks": {**dict.fromkeys(("name", "message"), "string"), "passed": "boolean"},
    "epochs": {"epoch": "integer"},
}
_KIND_WORDS = {"number": "a number", "integer": "an integer", "scores": "an object of class name to number",
               "object": "a JSON object", "records": "a list of JSON objects", "string": "a string",
               "boolean": "true or false", "names": "a list of file names"}


def _is(value: Any, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "scores":
        return isinstance(value, dict) and all(v is None or _is(v, "number") for v in value.values())
    if kind == "object":
        return isinstance(value, dict)
    if kind == "records":
        return isinstance(value, list) and all(isinstance(x, dict) for x in value)
    if kind == "string":
        return isinstance(value, str)
    if kind == "names":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, bool)


def require_verified(bundle: Bundle) -> Bundle:
    """Verify ``bundle`` or raise a one-line :class:`BundleError` (exit 1) naming the first bad file."""
    res = verify_bundle(bundle.path, _bundle=bundle)
    if not res.ok:
        more = f" (and {len(res.problems) - 1} more)" if len(res.problems) > 1 else ""
        raise BundleError(f"{bundle.path / res.problems[0]}{more}; the bundle fails verification "
                          f"(kdctl bundle verify {bundle.path}), refusing to use it", exit_code=1)
    bundle.verified = True
    return bundle


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    device_built: list[str] = field(default_factory=list)  # declared files made on the device after export


def seal_text(manifest_bytes: bytes) -> str:
    """``manifest.sha256`` in ``sha256sum`` format."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (relative POSIX path, lstat), never following a symlink."""
    import stat as _stat

    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                st = e.stat(follow_symlinks=False)
                rel = Path(e.path).relative_to(root).as_posix()
                yield rel, st
                if _stat.S_ISDIR(st.st_mode):
                    stack.append(Path(e.path))


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def verify_bundle(path: str | Path, *, _bundle: Bundle | None = None) -> VerifyResult:
    """Check the seal over the manifest, re-hash every file it lists, and report anything changed, missing,
    unlisted, or not a regular file (a symlink, even to an identical copy, is a failure)."""
    import stat as _stat

    bundle = _bundle or load_bundle(path)
    root = bundle.path
    problems: list[str] = []
    files = bundle.manifest["files"]
    seal = root / SEAL
    if bundle.manifest["schema_version"] >= 2 or seal.exists() or seal.is_symlink():
        if seal.is_symlink() or not seal.is_file():
            problems.append(f"{SEAL}: missing (the manifest is not sealed)")
        elif seal.read_text(encoding="utf-8", errors="replace") != seal_text((root / MANIFEST).read_bytes()):
            problems.append(f"{MANIFEST}: changed (does not match {SEAL})")
    else:
        problems.append(f"{SEAL}: missing (bundle written by kdctl before 0.2; re-run the stage to seal it)")
    device_allowed = set(bundle.manifest.get("device_built") or [])
    seen_device = []
    entries = dict(_walk(root))
    for rel, st in entries.items():
        if _stat.S_ISLNK(st.st_mode):
            problems.append(f"{rel}: is a symlink (bundles hold regular files only)")
        elif _stat.S_ISDIR(st.st_mode):
            continue
        elif not _stat.S_ISREG(st.st_mode):
            problems.append(f"{rel}: is not a regular file")
        elif rel in (MANIFEST, SEAL) or rel in files:
            continue
        elif rel in device_allowed:
            seen_device.append(rel)
        else:
            problems.append(f"{rel}: not listed in manifest")
    for name, info in sorted(files.items()):
        st = entries.get(name)
        if not _safe_name(name) or not isinstance(info, dict) or "sha256" not in info or "size" not in info:
            problems.append(f"{MANIFEST}: files entry '{name}' is malformed")
        elif st is None:
            problems.append(f"{name}: missing")
        elif _stat.S_ISDIR(st.st_mode):
            problems.append(f"{name}: is a directory where the manifest lists a file")
        elif not _stat.S_ISREG(st.st_mode):
            continue  # reported above
        elif st.st_size != info["size"] or sha256_file(root / name) != info["sha256"]:
            problems.append(f"{name}: changed (sha256 differs from manifest)")
    if not problems and _content_hash(files) != bundle.manifest["content_sha256"]:
        problems.append(f"{MANIFEST}: content_sha256 does not match the listed files")
    if not problems:  # the files are the ones written: the mAP they publish is the one their records give
        from kdctl.evaluate.records import metrics_problem

        problem = metrics_problem(bundle)
        if problem:
            problems.append(problem)
    return VerifyResult(not problems, problems, len(files), seen_device)


def recorded_parent(record: Any) -> tuple[str, Bundle | None, str | None]:
    """The parent a child's manifest records (``parents[i]``), looked up at its recorded path, as (status, the
    bundle there, why): "found" when it is that very bundle (same id and content hash; not yet re-hashed),
    "missing" when nothing is there (made on another machine, moved, deleted), "unreadable" when the folder there is
    no readable bundle (its manifest broken or gone), "replaced" when another bundle took its place (e.g. a re-run
    with --overwrite)."""
    where = record.get("path") if isinstance(record, dict) else None
    if not isinstance(where, str) or not where or not Path(where).is_dir():  # no path recorded is no path ("." is not)
        return "missing", None, "not found at the recorded path (made on another machine, moved or deleted)"
    path = Path(where)
    try:
        parent = load_bundle(path)
    except BundleError as e:
        return "unreadable", None, str(e)
    if parent.id != record.get("id") or parent.manifest["content_sha256"] != record.get("content_sha256"):
        return "replaced", parent, (f"another bundle is there now (id {parent.id[:12]}, created "
                                    f"{parent.manifest.get('created', '?')})")
    return "found", parent, None


def verify_lineage(bundle: Bundle) -> list[dict]:
    """Every ancestor ``bundle`` records, nearest first, each once, as {"stage", "path", "id", "status", "problem"}:
    status "ok" (the very bundle recorded, and it verifies), "changed" (it, but it fails verification: the first
    problem), or "missing", "unreadable", "replaced" (see :func:`recorded_parent`; what that one descends from
    cannot be followed)."""
    rows: list[dict] = []
    seen: set[str] = set()
    todo = [bundle]
    while todo:
        child = todo.pop(0)
        for rec in child.manifest.get("parents", []):
            rec = rec if isinstance(rec, dict) else {}
            key = f"{rec.get('id')}:{rec.get('content_sha256')}"
            if key in seen:
                continue
            seen.add(key)
            status, parent, why = recorded_parent(rec)
            if status == "found":
                res = verify_bundle(parent.path, _bundle=parent)
                status, why = ("ok", None) if res.ok else ("changed", f"{res.problems[0]}")
                todo.append(parent)
            rows.append({"stage": rec.get("stage"), "path": rec.get("path"), "id": rec.get("id"), "status": status,
                         "problem": why})
    return rows


class BundleWriter:
    """Context manager that builds a bundle in a temporary directory and publishes it atomically.

    >>> with BundleWriter("runs/train/exp", stage="train", recipe=recipe) as w:
    ...     (w.path / "weights.pt").write_bytes(...)
    ...     w.add_output("weights", "weights.pt"); w.metrics["map50_95"] = 0.41

    ``out`` is claimed through :func:`kdctl.bundle.output.claim_output` (re-entrant, so a stage that claimed it
    before its work simply keeps the claim): parents and ``input_paths`` may not overlap it.
    """

    def __init__(self, out: str | Path, *, stage: str, recipe: dict | None = None,
                 parents: Iterable[Bundle] = (), inputs: dict | None = None, overwrite: bool = False,
                 input_paths: Iterable[str | Path] = (), bundle_id: str | None = None):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.final = Path(out)
        self.stage, self.recipe, self.parents = stage, recipe, list(parents)
        self.inputs = dict(inputs or {})
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.overwrite = overwrite
        self.input_paths = [p.path for p in self.parents] + [Path(p) for p in input_paths]
        self.bundle_id = bundle_id or uuid.uuid4().hex
        self.path = temp_sibling(self.final, "partial")
        self.bundle: Bundle | None = None
        self.claim = None

    def __enter__(self) -> "BundleWriter":
        from kdctl.bundle.output import claim_output

        self.claim = claim_output(self.final, overwrite=self.overwrite, inputs=self.input_paths).__enter__()
        try:
            self.parent_refs = [p.ref() for p in self.parents]  # verified now, before anything is built on them
            self.path = self.claim.temp_sibling("partial")
            self.path.mkdir()
        except BaseException:
            self.claim.__exit__(None, None, None)
            raise
        self.started = self.claim.since  # a stage claims its --out before its work (training, export): timed from then
        return self

    def add_output(self, role: str, rel: str | Path) -> Path:
        rel = Path(rel).as_posix()
        if not (self.path / rel).exists():
            raise FileNotFoundError(self.path / rel)
        self.outputs[role] = rel
        return self.path / rel

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                return False
            try:
                self._publish()
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
            return False
        finally:
            self.claim.__exit__(None, None, None)

    def _publish(self) -> None:
        from kdctl import faults

        files = {}
        for rel, st in _walk(self.path):
            if stat.S_ISREG(st.st_mode):
                files[rel] = {"size": st.st_size, "sha256": sha256_file(self.path / rel)}
            elif not stat.S_ISDIR(st.st_mode):
                raise BundleError(f"{self.path / rel}: a bundle holds regular files only (not symlinks)")
        now = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "id": self.bundle_id,
            "stage": self.stage,
            "kdctl_version": __version__,
            "created": now.isoformat(timespec="seconds"),
            "duration_s": round((now - self.started).total_seconds(), 3),
            "parents": self.parent_refs,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "recipe": self.recipe,
            "environment": environment(),
            "metrics": self.metrics,
            **self.extra,
            "files": dict(sorted(files.items())),
            "content_sha256": _content_hash(files),
        }
        text = json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
        write_text_atomic(self.path / MANIFEST, text)
        write_text_atomic(self.path / SEAL, seal_text(text.encode("utf-8")))
        faults.point("publish:sealed")
        self.claim.publish(self.path)
        self.bundle = Bundle(self.final, json.loads(text), verified=True)


def next_run_dir(root: str | Path, stage: str, name: str, *, reserve: bool = False) -> Path:
    """``runs/<stage>/<name>``, then ``<name>2``, ``<name>3``... as Ultralytics names its runs; a name another kdctl
    process is writing now is taken too (its bundle does not exist until it publishes; a second ``kdctl eval B``
    started meanwhile stopped on the first one's lock). ``reserve``: a stage's default ``--out``, locked for this
    process until the stage claims it (:func:`kdctl.bundle.output.reserve`), so that two runs started at the same
    instant get two names (the second chose the first one's and stopped on its lock)."""
    from kdctl.bundle.output import being_written, release_reservations
    from kdctl.bundle.output import reserve as lock

    if reserve:
        release_reservations()  # names chosen earlier in this process by stages that stopped before claiming them
    base = Path(root) / stage
    cand, i = base / name, 2
    while True:
        if not (cand.exists() or being_written(cand)) and (not reserve or lock(cand)):
            if not cand.exists():
                return cand
            release_reservations()  # it appeared between the look and the lock
        cand, i = base / f"{name}{i}", i + 1
