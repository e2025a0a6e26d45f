"""Artifact bundles: a directory of files plus ``manifest.json`` (inputs, outputs, hashes, env, metrics).

A bundle is built in a hidden temporary sibling directory and renamed into place only once its manifest is
written, so an interrupted stage never leaves a directory that looks like a complete bundle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdctl import __version__
from kdctl.bundle.environment import environment
from kdctl.errors import BundleError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
STAGES = ("data", "train", "distill", "eval", "export", "profile", "gate", "report")


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary sibling, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class Bundle:
    """A complete bundle on disk, as read back from its manifest."""

    path: Path
    manifest: dict

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
        return self.path / rel

    def ref(self) -> dict:
        """How a child bundle records this one as its parent."""
        return {"id": self.id, "stage": self.stage, "path": str(self.path.resolve()),
                "content_sha256": self.manifest["content_sha256"]}


def load_bundle(path: str | Path, stages: Iterable[str] | None = None) -> Bundle:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    if not mf.is_file():
        raise BundleError(f"{path}: not a kdctl bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: manifest is not valid JSON ({e})") from None
    for key in ("schema_version", "stage", "id", "files", "content_sha256"):
        if key not in manifest:
            raise BundleError(f"{mf}: manifest field '{key}' is missing")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise BundleError(f"{mf}: schema_version {manifest['schema_version']} is newer than this kdctl "
                          f"understands ({SCHEMA_VERSION}); upgrade kdctl")
    bundle = Bundle(path, manifest)
    if stages is not None:
        stages = tuple(stages)
        if bundle.stage not in stages:
            raise BundleError(f"{path}: is a '{bundle.stage}' bundle; expected one of: {', '.join(stages)}")
    return bundle


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0


def verify_bundle(path: str | Path) -> VerifyResult:
    """Re-hash every file the manifest lists; report changed, missing and unlisted files."""
    bundle = load_bundle(path)
    problems: list[str] = []
    files = bundle.manifest["files"]
    for name, info in sorted(files.items()):
        p = bundle.path / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            problems.append(f"{name}: changed (sha256 differs from manifest)")
    for p in sorted(bundle.path.rglob("*")):
        rel = p.relative_to(bundle.path).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"{rel}: not listed in manifest")
    if _content_hash(files) != bundle.manifest["content_sha256"]:
        problems.append(f"{MANIFEST}: content_sha256 does not match the listed files")
    return VerifyResult(not problems, problems, len(files))


class BundleWriter:
    """Context manager that builds a bundle in a temporary directory and publishes it atomically.

    >>> with BundleWriter("runs/train/exp", stage="train", recipe=recipe) as w:
    ...     (w.path / "weights.pt").write_bytes(...)
    ...     w.add_output("weights", "weights.pt"); w.metrics["map50_95"] = 0.41
    """

    def __init__(self, out: str | Path, *, stage: str, recipe: dict | None = None,
                 parents: Iterable[Bundle] = (), inputs: dict | None = None, overwrite: bool = False):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.final = Path(out)
        if self.final.exists() and not overwrite:
            raise BundleError(f"{self.final}: already exists; choose another --out or pass --overwrite")
        self.stage, self.recipe, self.parents = stage, recipe, list(parents)
        self.inputs = dict(inputs or {})
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.overwrite = overwrite
        self.path = self.final.parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:8]}"
        self.bundle: Bundle | None = None

    def __enter__(self) -> "BundleWriter":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        self.started = _dt.datetime.now(_dt.timezone.utc)
        return self

    def add_output(self, role: str, rel: str | Path) -> Path:
        rel = Path(rel).as_posix()
        if not (self.path / rel).exists():
            raise FileNotFoundError(self.path / rel)
        self.outputs[role] = rel
        return self.path / rel

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return False

    def _publish(self) -> None:
        files = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.path).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        now = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "id": uuid.uuid4().hex,
            "stage": self.stage,
            "kdctl_version": __version__,
            "created": now.isoformat(timespec="seconds"),
            "duration_s": round((now - self.started).total_seconds(), 3),
            "parents": [p.ref() for p in self.parents],
            "inputs": self.inputs,
            "outputs": self.outputs,
            "recipe": self.recipe,
            "environment": environment(),
            "metrics": self.metrics,
            **self.extra,
            "files": files,
            "content_sha256": _content_hash(files),
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        if self.final.exists():  # overwrite: move the old one aside first so a crash keeps one of the two
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        self.bundle = Bundle(self.final, manifest)


def next_run_dir(root: str | Path, stage: str, name: str) -> Path:
    """``runs/<stage>/<name>``, then ``<name>2``, ``<name>3``... as Ultralytics names its runs."""
    base = Path(root) / stage
    cand, i = base / name, 2
    while cand.exists():
        cand, i = base / f"{name}{i}", i + 1
    return cand
