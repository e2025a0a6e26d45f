"""Bad input over every command: one line naming the file and field, the right exit code, no traceback, nothing
half-written, and every file the test planted (a user's folder, an input bundle) byte-identical afterwards.

Each case builds its own inputs under ``tmp_path`` from the session's real bundles (copied, so tampering never
touches them) and returns the command line, the expected exit code, the words the error must contain, and the
paths that must be left exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from kdctl.cli.main import app


def snapshot(path: Path) -> dict:
    """Every entry under ``path`` (itself included): type, and sha256 of files and link targets."""
    out = {}
    if not os.path.lexists(path):
        return {"": "absent"}
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in entries:
        rel = p.relative_to(path).as_posix() if p != path else ""
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir",)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


@dataclass
class Ctx:
    tmp: Path
    data: Path          # tiny 3-class dataset YAML
    train: Path         # session train bundle (never modified)
    export: Path
    profile: Path
    planted: list[Path] = field(default_factory=list)

    def copy(self, bundle: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(bundle, dst, symlinks=True)
        return self.plant(dst)

    def plant(self, p: Path) -> Path:
        self.planted.append(p)
        return p

    def user_dir(self, name="thesis") -> Path:
        d = self.tmp / name
        (d / "chapter").mkdir(parents=True)
        (d / "chapter" / "one.tex").write_text("\\section{Results}\n")
        (d / "data.csv").write_bytes(b"a,b\n1,2\n")
        return self.plant(d)

    def user_file(self, name="notes.txt") -> Path:
        f = self.tmp / name
        f.write_text("my notes\n")
        return self.plant(f)

    def dataset(self, name: str, mutate: Callable[[Path], None], names="[a, b, c]") -> Path:
        """A copy of the tiny dataset with ``mutate(root)`` applied; returns its data.yaml."""
        root = self.tmp / name
        shutil.copytree(self.data.parent / "images", root / "images")
        shutil.copytree(self.data.parent / "labels", root / "labels")
        (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n")
        mutate(root)
        return self.plant(root) / "data.yaml"

    def recipe(self, name: str, data: str, student="yolov8-tiny.yaml", teacher: str | None = None,
               losses="[{name: at}]") -> Path:
        r = self.tmp / f"{name}.yaml"
        text = f"name: {name}\nstudent: {{model: {student}}}\ndata: {data}\ntrain: {{epochs: 1, imgsz: 64, batch: 4}}\n"
        if teacher:
            text += f"teacher: {{model: {teacher}}}\ndistill: {{losses: {losses}}}\n"
        r.write_text(text)
        return self.plant(r)

    def cache_folder(self, meta: str) -> Path:
        """A planted folder holding only a ``meta.json`` with ``meta`` as its text."""
        d = self.tmp / "cache"
        d.mkdir()
        (d / "meta.json").write_text(meta)
        return self.plant(d)

    def yolo_recipe(self, name, data_yaml, **kw):
        return self.recipe(name, f"{{yolo: {data_yaml}}}", **kw)

    def edit_manifest(self, bundle: Path, fn: Callable[[dict], None]) -> None:
        m = json.loads((bundle / "manifest.json").read_text())
        fn(m)
        (bundle / "manifest.json").write_text(json.dumps(m, indent=2))

    def coco(self, name: str, mutate: Callable[[dict], None]) -> Path:
        """A COCO-JSON recipe over the tiny dataset's images, with ``mutate(val_json)`` applied (what it returns, if
        not None, replaces the validation JSON)."""
        from PIL import Image

        def as_coco(split):
            imgs, anns = [], []
            for i, p in enumerate(sorted((self.data.parent / "images" / split).glob("*.png"))):
                with Image.open(p) as im:
                    w, h = im.size
                imgs.append({"id": i, "file_name": p.name, "width": w, "height": h})
                anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0})
            return {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}

        d = self.tmp / name
        d.mkdir()
        tr, va = as_coco("train"), as_coco("val")
        replaced = mutate(va)
        (d / "train.json").write_text(json.dumps(tr))
        (d / "val.json").write_text(replaced if isinstance(replaced, str) else json.dumps(va))
        self.plant(d)
        return self.recipe(name, "{coco: {train_images: %s, train_annotations: %s, val_images: %s, "
                                 "val_annotations: %s}}" % (self.data.parent / "images" / "train", d / "train.json",
                                                            self.data.parent / "images" / "val", d / "val.json"))


def _label(root: Path, split="train", line="0 0.5 0.5 0.2 0.2", index=0, append=False) -> Path:
    f = sorted((root / "labels" / split).glob("*.txt"))[index]
    f.write_text((f.read_text() if append else "") + line + "\n")
    return f


def _image(root: Path, data: bytes, split="train", index=0) -> None:
    sorted((root / "images" / split).glob("*.png"))[index].write_bytes(data)


def _profile_bundle(c: Ctx, name: str, results) -> Path:
    """A real, sealed profile bundle whose results are ``results`` (what a profile on a bare machine gives)."""
    from kdctl.bundle import BundleWriter, load_bundle

    with BundleWriter(c.tmp / name, stage="profile", parents=[load_bundle(c.export, verify=True)]) as w:
        w.metrics["results"] = results
        (w.path / "metrics.json").write_text(json.dumps(w.metrics))
        w.add_output("metrics", "metrics.json")
    return c.plant(c.tmp / name)


# Every case: ctx -> (argv, exit code, words the one-line error must contain)
Case = Callable[[Ctx], tuple[list[str], int, list[str]]]
CASES: dict[str, Case] = {}


def case(name):
    def deco(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn
    return deco


def _stage_argv(c: Ctx, cmd: str, out: Path) -> list[str]:
    if cmd == "train":
        return ["train", str(c.yolo_recipe("r", c.data)), "--out", str(out)]
    if cmd == "distill":
        return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(c.train))), "--out", str(out)]
    if cmd == "eval":
        return ["eval", str(c.train), "--out", str(out)]
    if cmd == "export":
        return ["export", str(c.train), "--target", "cpu", "--out", str(out)]
    if cmd == "profile":
        return ["profile", str(c.export), "--runs", "2", "--out", str(out)]
    if cmd == "gate":
        return ["gate", str(c.profile), "--min-map", "0", "--out", str(out)]
    return ["report", str(c.profile), "--out", str(out)]


STAGES = ("train", "distill", "eval", "export", "profile", "gate", "report")

# --- 1. --overwrite never deletes what kdctl did not write ---------------------------------------------------
for _cmd in STAGES:
    case(f"{_cmd}-overwrite-user-folder")(
        lambda c, cmd=_cmd: (_stage_argv(c, cmd, c.user_dir()) + ["--overwrite"], 2, ["thesis", "refusing to replace"]))
    case(f"{_cmd}-overwrite-user-file")(
        lambda c, cmd=_cmd: (_stage_argv(c, cmd, c.user_file()) + ["--overwrite"], 2, ["notes.txt", "is a file"]))
    case(f"{_cmd}-out-under-a-file")(
        lambda c, cmd=_cmd: (_stage_argv(c, cmd, c.user_file("f.txt") / "sub"), 2, ["f.txt", "not a directory"]))


@case("overwrite-bundle-holding-user-file")
def _(c):
    b = c.copy(c.profile, "mine")
    (b / "my-notes.md").write_text("keep me")
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(b), "--overwrite"], 2, ["my-notes.md", "did not write"]


@case("overwrite-symlink-out")
def _(c):
    link = c.tmp / "link"
    os.symlink(c.user_dir(), link)
    c.plant(link)
    return ["eval", str(c.train), "--out", str(link), "--overwrite"], 2, ["link", "symlink"]


@case("gate-out-is-its-input")
def _(c):
    p = c.copy(c.profile, "p")
    return ["gate", str(p), "--min-map", "0", "--out", str(p), "--overwrite"], 2, ["input bundle", "p"]


@case("export-out-is-its-input")
def _(c):
    t = c.copy(c.train, "t")
    return ["export", str(t), "--target", "cpu", "--out", str(t), "--overwrite"], 2, ["input bundle"]


@case("export-out-is-its-checkpoint-file")
def _(c):
    ckpt = c.plant(c.tmp / "best.pt")
    shutil.copy(c.train / "weights.pt", ckpt)
    return ["export", str(ckpt), "--data", str(c.data), "--target", "cpu", "--out", str(ckpt), "--overwrite"], 2, \
        ["--out", "is the input file", "best.pt"]


@case("export-checkpoint-file-without-data")
def _(c):
    ckpt = c.plant(c.tmp / "best.pt")
    shutil.copy(c.train / "weights.pt", ckpt)
    return ["export", str(ckpt), "--target", "cpu", "--out", str(c.tmp / "x")], 2, ["--data: required", "best.pt"]


@case("eval-export-artifact-not-in-the-bundle")
def _(c):
    return ["eval", str(c.export), "--artifact", "openvino-int8", "--out", str(c.tmp / "x")], 2, \
        ["--artifact", "'openvino-int8' is not in"]


@case("eval-out-inside-input")
def _(c):
    t = c.copy(c.train, "t")
    return ["eval", str(t), "--out", str(t / "eval")], 2, ["inside the input bundle"]


@case("profile-out-inside-input")
def _(c):
    e = c.copy(c.export, "e")
    return ["profile", str(e), "--out", str(e / "prof"), "--runs", "2"], 2, ["inside the input bundle"]


@case("gate-out-inside-another-bundle")
def _(c):
    other = c.copy(c.export, "other")  # not an input of this gate: still a bundle that must stay intact
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(other / "gate")], 2, \
        ["inside the kdctl bundle", "other"]


@case("report-out-contains-input")
def _(c):
    root = c.tmp / "reports"
    root.mkdir()
    p = c.copy(c.profile, "reports/p")
    return ["report", str(p), "--out", str(root)], 2, ["reports"]


@case("report-out-is-an-ancestor")
def _(c):
    return ["report", str(c.profile), "--out", str(c.train), "--overwrite"], 2, ["input bundle"]


@case("distill-out-is-teacher")
def _(c):
    t = c.copy(c.train, "t")
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(t))), "--out", str(t), "--overwrite"], 2, \
        ["input bundle"]


@case("gate-junit-is-a-dir")
def _(c):
    d = c.user_dir("reports")
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit", str(d)], 2, \
        ["--junit", "is a directory"]


@case("gate-junit-is-a-fifo")
def _(c):
    # temp file + rename over a device node or a pipe would replace it with a file (it did: --junit /dev/full)
    f = c.plant(c.tmp / "ci-pipe")
    os.mkfifo(f)
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit", str(f)], 2, \
        ["--junit", "is not a regular file"]


@case("gate-junit-inside-input")
def _(c):
    p = c.copy(c.profile, "p")
    return ["gate", str(p), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit", str(p / "j.xml")], 2, \
        ["--junit", "inside the input bundle"]


@case("gate-summary-inside-another-bundle")
def _(c):
    other = c.copy(c.export, "other")
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--summary",
            str(other / "s.md")], 2, ["--summary", "inside the kdctl bundle"]


@case("gate-summary-under-a-file")
def _(c):
    f = c.user_file("f.txt")
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--summary", str(f / "s.md")], 2, \
        ["--summary", "not a directory"]


# --- 2. tampered bundles are refused (exit 1) -----------------------------------------------------------------
@case("gate-edited-metrics")
def _(c):
    p = c.copy(c.profile, "p")

    def forge(m):
        for r in m["metrics"]["results"]:
            r["latency_ms"]["p90"], r["map50_95"] = 0.01, 0.9
    c.edit_manifest(p, forge)
    return ["gate", str(p), "--min-map", "0.5", "--out", str(c.tmp / "g")], 1, ["manifest.json", "verification"]


@case("gate-edited-stage")
def _(c):
    p = c.copy(c.export, "e")
    c.edit_manifest(p, lambda m: m.update(stage="profile"))
    return ["gate", str(p), "--min-map", "0", "--out", str(c.tmp / "g")], 1, ["manifest.json"]


@case("gate-tampered-baseline")
def _(c):
    b = c.copy(c.profile, "base")
    (b / "latencies.json").write_text("{}")
    return ["gate", str(c.profile), "--min-map", "0", "--baseline", str(b), "--max-latency-regression", "0.1",
            "--out", str(c.tmp / "g")], 1, ["latencies.json", "changed"]


@case("gate-missing-seal")
def _(c):
    p = c.copy(c.profile, "p")
    (p / "manifest.sha256").unlink()
    return ["gate", str(p), "--min-map", "0", "--out", str(c.tmp / "g")], 1, ["manifest.sha256", "missing"]


@case("export-altered-weights")
def _(c):
    t = c.copy(c.train, "t")
    w = t / "weights.pt"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    return ["export", str(t), "--target", "cpu", "--out", str(c.tmp / "x")], 1, ["weights.pt", "changed"]


@case("export-weights-swapped-for-symlink")
def _(c):
    t = c.copy(c.train, "t")
    copy = c.tmp / "same-weights.pt"
    shutil.copy(t / "weights.pt", copy)
    c.plant(copy)
    (t / "weights.pt").unlink()
    os.symlink(copy, t / "weights.pt")
    return ["export", str(t), "--target", "cpu", "--out", str(c.tmp / "x")], 1, ["weights.pt", "symlink"]


@case("eval-altered-weights")
def _(c):
    t = c.copy(c.train, "t")
    (t / "weights.pt").write_bytes(b"garbage")
    return ["eval", str(t), "--out", str(c.tmp / "x")], 1, ["weights.pt", "changed"]


@case("distill-tampered-teacher")
def _(c):
    t = c.copy(c.train, "teacher")
    (t / "results.csv").write_text("epoch\n1\n")
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(t))), "--out", str(c.tmp / "x")], 1, \
        ["teacher.model", "results.csv"]


@case("profile-truncated-onnx")
def _(c):
    e = c.copy(c.export, "e")
    f = e / "model-fp32.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    return ["profile", str(e), "--out", str(c.tmp / "x"), "--runs", "2"], 1, ["model-fp32.onnx"]


@case("profile-missing-onnx")
def _(c):
    e = c.copy(c.export, "e")
    (e / "model-int8.onnx").unlink()
    return ["profile", str(e), "--out", str(c.tmp / "x"), "--runs", "2"], 1, ["model-int8.onnx", "missing"]


@case("profile-added-symlinked-folder")
def _(c):
    e = c.copy(c.export, "e")
    os.symlink(c.user_dir("elsewhere"), e / "extra")
    return ["profile", str(e), "--out", str(c.tmp / "x"), "--runs", "2"], 1, ["extra", "symlink"]


@case("report-corrupt-latencies")
def _(c):
    p = c.copy(c.profile, "p")
    (p / "latencies.json").write_text("{not json")
    return ["report", str(p), "--out", str(c.tmp / "x")], 1, ["latencies.json"]


@case("gate-fifo-in-bundle")
def _(c):
    p = c.copy(c.profile, "p")
    os.mkfifo(p / "pipe")
    return ["gate", str(p), "--min-map", "0", "--out", str(c.tmp / "g")], 1, ["pipe", "not a regular file"]


@case("train-gpu-recipe-on-a-cpu-machine")
def _(c):
    """A recipe written for a GPU box run on a CPU runner stopped inside Ultralytics as an internal error."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = c.yolo_recipe("r", c.data)
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, device: '0,1'}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml: train.device: '0,1' asks for a CUDA GPU",
                                                             "set train.device: cpu"]


# --- 3. bad data: one line naming file:line (exit 2) -----------------------------------------------------------
@case("train-class-id-out-of-range")
def _(c):
    d = c.dataset("d", lambda r: _label(r, line="17 0.5 0.5 0.2 0.2"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, [".txt:1", "class id 17"]


@case("eval-four-column-label")
def _(c):
    d = c.dataset("d", lambda r: _label(r, "val", line="0 0.5 0.5 0.2"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, [".txt:1", "4 columns"]


@case("train-nan-in-label")
def _(c):
    d = c.dataset("d", lambda r: _label(r, line="1 nan 0.5 0.2 0.2", append=True))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, [".txt:", "not finite"]


@case("train-label-not-a-number")
def _(c):
    d = c.dataset("d", lambda r: _label(r, line="0 0.5 abc 0.2 0.2"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, [".txt:1", "'abc' is not a number"]


@case("train-fractional-class")
def _(c):
    d = c.dataset("d", lambda r: _label(r, line="1.5 0.5 0.5 0.2 0.2"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, [".txt:1", "class id 1.5"]


@case("train-pixel-coordinates")
def _(c):
    d = c.dataset("d", lambda r: _label(r, line="0 64 64 20 20"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, [".txt:1", "outside the image"]


@case("eval-negative-width")
def _(c):
    d = c.dataset("d", lambda r: _label(r, "val", line="0 0.5 0.5 -0.2 0.2"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, [".txt:1", "width/height"]


@case("train-non-image-jpg")
def _(c):
    def mutate(r):
        (r / "images" / "train" / "fake.jpg").write_text("this is not a JPEG")
        (r / "labels" / "train" / "fake.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    d = c.dataset("d", mutate)
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, ["fake.jpg", "cannot be decoded"]


@case("eval-empty-jpg")
def _(c):
    d = c.dataset("d", lambda r: (r / "images" / "val" / "empty.jpg").write_bytes(b""))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["empty.jpg", "cannot be decoded"]


@case("eval-truncated-png")
def _(c):
    def mutate(r):
        f = sorted((r / "images" / "val").glob("*.png"))[0]
        f.write_bytes(f.read_bytes()[:200])
    d = c.dataset("d", mutate)
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["val_", ".png", "image"]


@case("train-all-labels-empty")
def _(c):
    def mutate(r):
        for f in (r / "labels" / "train").glob("*.txt"):
            f.write_text("")
    d = c.dataset("d", mutate)
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, ["train", "no objects"]


@case("train-no-label-files")
def _(c):
    d = c.dataset("d", lambda r: shutil.rmtree(r / "labels" / "val"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, ["val", "label file"]


@case("eval-data-fewer-classes-than-model")
def _(c):
    d = c.dataset("d", lambda r: None, names="[a, b]")
    # the tiny labels use ids 0..2: a 2-class YAML is caught at the first id 2, else at the class count
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data", "class"]


@case("eval-data-more-classes-than-model")
def _(c):
    d = c.dataset("d", lambda r: None, names="[a, b, c, d, e, f]")
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["names", "6 classes", "predicts 3"]


@case("export-data-more-classes-than-model")
def _(c):
    d = c.dataset("d", lambda r: None, names="[a, b, c, d, e, f]")
    return ["export", str(c.train), "--target", "cpu", "--data", str(d), "--out", str(c.tmp / "x")], 2, \
        ["names", "predicts 3"]


@case("eval-data-missing-names")
def _(c):
    d = c.dataset("d", lambda r: (r / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "'names'"]


@case("eval-data-names-with-gap")
def _(c):
    d = c.dataset("d", lambda r: None, names="{0: a, 2: c}")
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "without gaps"]


# the session's model predicts circle, square, triangle (the synthetic set's order); Ultralytics never compares names
@case("eval-data-classes-in-another-order")
def _(c):
    d = c.dataset("d", lambda r: None, names="[square, circle, triangle]")
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml", "names", "another order", "class 0 is 'circle' there, 'square' here"]


@case("export-data-classes-in-another-order")
def _(c):
    d = c.dataset("d", lambda r: None, names="{0: Square, 1: Circle, 2: Triangle}")
    return ["export", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml", "another order", "circle, square, triangle"]


@case("distill-teacher-classes-in-another-order")
def _(c):
    """Same classes, another order: the teacher's names or the dataset's were reordered, and which cannot be told
    (a teacher of more classes has the dataset's selected by name)."""
    d = c.dataset("d", lambda r: None, names="[triangle, square, circle]")
    r = c.yolo_recipe("r", d, teacher=str(c.train), losses="[{name: kd_logit}]")
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml", "names", "the teacher", "another order"]


@case("distill-teacher-without-one-of-the-datasets-classes")
def _(c):
    """The teacher (circle, square, triangle) knows one of the dataset's two classes: they cannot be found in it by
    name, as a teacher of more classes has them selected, so head KD is refused."""
    def circles_and_stars(root):
        for f in (root / "labels").rglob("*.txt"):
            f.write_text("".join(line for line in f.read_text().splitlines(True) if line[:2] in ("0 ", "1 ")))
    d = c.dataset("d", circles_and_stars, names="[circle, star]")
    r = c.yolo_recipe("r", d, teacher=str(c.train), losses="[{name: kd_logit}]")
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, \
        ["r.yaml", "distill.losses[0]", "trained on other classes", "selected by name"]


@case("eval-data-yaml-billion-laughs")
def _(c):
    """10**10 names behind aliases in a 1 KB file: eval hung expanding them, then ran out of memory."""
    def laughs(root):
        lines = ["x: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
        (root / "data.yaml").write_text("\n".join(lines) + "\npath: .\ntrain: images/train\nval: images/val\n"
                                        "names: *a9\n")
    d = c.dataset("d", laughs)
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml", "aliases expand to more than 1,000,000 values"]


@case("report-out-name-too-long")
def _(c):
    """Path.exists() raises ENAMETOOLONG where it is first asked about such a path: it was 'internal error'."""
    return ["report", str(c.train), "--out", str(c.tmp / ("a" * 300) / "r")], 2, \
        ["File name too long", "at most 255 bytes", "shorter path"]


@case("distill-out-name-too-long-for-its-partial-bundle")
def _(c):
    """A 247-byte --out name fits the file system, but the bundle is built first in .NAME.partial-XXXXXXXX (18
    bytes more): the run trained to the end, then failed to publish. Refused before any work."""
    out = c.tmp / ("b" * 247)
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(c.train))), "--out", str(out)], 2, \
        ["a name of 247 bytes", "hidden sibling 18 bytes longer", "at most 255 bytes here: give one of at most 237"]


@case("gate-junit-name-too-long-for-its-temp-file")
def _(c):
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit",
            str(c.tmp / ("j" * 245))], 2, ["--junit", "a name of 245 bytes", "give one of at most 241"]


@case("distill-detr-logit-for-a-yolo-pair")
def _(c):
    """The hint named an RT-DETR teacher for a YOLO pair; it now names what a YOLO student learns from."""
    r = c.yolo_recipe("r", c.data, teacher=str(c.train), losses="[{name: detr_logit}]")
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, \
        ["distill.losses[0]: 'detr_logit' matches DETR decoder queries, but the student is not an RT-DETR detector",
         "a YOLO student learns from a YOLO teacher's head (kd_logit, ld, crosskd)"]


@case("data-synth-name-too-long")
def _(c):
    return ["data", "synth", str(c.tmp / ("b" * 300)), "-n", "2", "--val", "1"], 2, ["File name too long"]


@case("export-int8-at-opset-11")
def _(c):
    """ONNX Runtime wrote per-channel DequantizeLinear(axis) into the opset-11 graph and failed (exit 1)."""
    return ["export", str(c.train), "--target", "cpu", "--opset", "11", "--out", str(c.tmp / "x")], 2, \
        ["--opset 11", "onnx-int8", "needs opset 13"]


@case("eval-data-nc-mismatch")
def _(c):
    d = c.dataset("d", lambda r: (r / "data.yaml").write_text((r / "data.yaml").read_text() + "nc: 5\n"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "'nc'"]


@case("eval-data-root-is-a-list")
def _(c):
    """``train``/``val`` may list several folders, the root ``path`` may not: it was an internal error (TypeError)."""
    d = c.dataset("d", lambda r: (r / "data.yaml").write_text((r / "data.yaml").read_text().replace(
        "path: .", "path: [., ..]")))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml: field 'path': expected the dataset's root folder (one path), got a list"]


@case("train-data-channels-1")
def _(c):
    """Ultralytics' ``channels: 1`` (a grey dataset for a one-channel model) stopped training with an internal error
    (loading a 3-channel state dict into the 1-channel model)."""
    d = c.dataset("d", lambda r: (r / "data.yaml").write_text((r / "data.yaml").read_text() + "channels: 1\n"))
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, \
        ["data.yaml: field 'channels': 1: kdctl trains, scores and exports 3-channel (RGB) detectors"]


def _v8_layers() -> str:
    """The backbone and head lines of Ultralytics' yolov8.yaml, for model YAMLs of the user's own."""
    import ultralytics

    cfg = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    return "\n".join(x for x in cfg.read_text().splitlines() if x.startswith(("backbone", "head", "  -")))


@case("train-model-yaml-without-nc")
def _(c):
    """Ultralytics' KeyError: 'nc', now said as the missing field; a KeyError for a module Ultralytics does not have
    keeps its own words (next case)."""
    y = c.plant(c.tmp / "mine.yaml")
    y.write_text("scales: {n: [0.33, 0.25, 1024]}\n" + _v8_layers() + "\n")
    return ["train", str(c.recipe("r", f"{{yolo: {c.data}}}", student=str(y))), "--out", str(c.tmp / "x")], 2, \
        [f"student.model: cannot build a model from '{y}' (its field 'nc' is missing)"]


@case("train-model-yaml-unknown-module")
def _(c):
    y = c.plant(c.tmp / "mine.yaml")
    y.write_text("nc: 3\nscales: {n: [0.33, 0.25, 1024]}\n" + _v8_layers().replace("C2f", "C2fx") + "\n")
    return ["train", str(c.recipe("r", f"{{yolo: {c.data}}}", student=str(y))), "--out", str(c.tmp / "x")], 2, \
        [f"student.model: cannot build a model from '{y}' (KeyError: 'C2fx')"]


@case("eval-data-split-missing")
def _(c):
    d = c.dataset("d", lambda r: shutil.rmtree(r / "images" / "val"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "val"]


@case("eval-data-not-yaml")
def _(c):
    d = c.dataset("d", lambda r: (r / "data.yaml").write_text("train: [unclosed\n"))
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "invalid YAML"]


@case("eval-data-not-utf8")
def _(c):
    d = c.dataset("d", lambda r: (r / "data.yaml").write_bytes(b"\xff\xfe n\x00a\x00m\x00e\x00"))  # UTF-16
    return ["eval", str(c.train), "--data", str(d), "--out", str(c.tmp / "x")], 2, ["data.yaml", "not a UTF-8 text"]


@case("eval-data-is-a-device")
def _(c):
    return ["eval", str(c.train), "--data", "/dev/null", "--out", str(c.tmp / "x")], 2, [
        "/dev/null", "not a regular file"]


@case("train-image-list-names-missing-file")
def _(c):
    def mutate(r):
        (r / "train.txt").write_text("images/train/nope.png\n" + "".join(
            f"{p.relative_to(r)}\n" for p in sorted((r / "images" / "train").glob("*.png"))))
        (r / "data.yaml").write_text("path: .\ntrain: train.txt\nval: images/val\nnames: [a, b, c]\n")
    d = c.dataset("d", mutate)
    return ["train", str(c.yolo_recipe("r", d)), "--out", str(c.tmp / "x")], 2, ["nope.png", "not found"]


@case("train-coco-negative-bbox")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][0].update(bbox=[5, 5, -3, 10]))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "annotations[0].bbox", ">= 0 (got -3, 10)"]


@case("train-coco-bbox-strings")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][1].update(bbox=["1", "2", "3", "4"]))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "annotations[1].bbox", "finite numbers"]


@case("train-coco-unknown-category")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][0].update(category_id=9))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "category_id", "9"]


@case("train-coco-unknown-image")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][0].update(image_id=999))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "image_id", "999"]


@case("train-coco-bad-width")
def _(c):
    r = c.coco("coco", lambda v: v["images"][0].update(width="wide"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "images[0].width"]


@case("train-coco-duplicate-image-id")
def _(c):
    r = c.coco("coco", lambda v: v["images"][1].update(id=0))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "images[1].id"]


@case("train-coco-bbox-outside-image")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][0].update(bbox=[5000, 5, 3, 10]))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "outside"]


@case("train-coco-json-is-a-list")
def _(c):
    r = c.coco("coco", lambda v: json.dumps(v["images"]))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "expected a COCO object", "got a list"]


@case("train-coco-json-nested-too-deeply")
def _(c):
    r = c.coco("coco", lambda v: "[" * 100_000 + "]" * 100_000)
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "not valid JSON (nested too deeply)"]


@case("train-coco-image-id-a-list")
def _(c):
    r = c.coco("coco", lambda v: v["annotations"][0].update(image_id=[0]))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["val.json", "annotations[0].image_id", "[0]"]


# --- 4. models and bundles of the wrong kind (exit 2) --------------------------------------------------------
@case("train-student-yaml-is-a-dataset")
def _(c):
    return ["train", str(c.yolo_recipe("r", c.data, student=str(c.data))), "--out", str(c.tmp / "x")], 2, \
        ["student.model", "not a model YAML"]


@case("train-student-pt-corrupt")
def _(c):
    f = c.tmp / "broken.pt"
    f.write_bytes(b"\x80\x02not a checkpoint")
    c.plant(f)
    r = c.yolo_recipe("r", c.data, teacher=str(f))
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, ["teacher.model", "broken.pt"]


@case("distill-teacher-is-export-bundle")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(c.export))), "--out", str(c.tmp / "x")], 2, \
        ["teacher.model", "'export' bundle"]


@case("eval-not-a-bundle")
def _(c):
    return ["eval", str(c.user_dir()), "--out", str(c.tmp / "x")], 2, ["thesis", "not a kdctl bundle"]


@case("eval-bundle-manifest-not-json")
def _(c):
    t = c.copy(c.train, "t")
    (t / "manifest.json").write_text("{broken")
    return ["eval", str(t), "--out", str(c.tmp / "x")], 2, ["manifest.json", "not valid JSON"]


@case("profile-train-bundle")
def _(c):
    return ["profile", str(c.train), "--out", str(c.tmp / "x")], 2, ["'train' bundle", "export"]


@case("gate-profile-without-results")
def _(c):
    p = _profile_bundle(c, "p", [])
    return ["gate", str(p), "--min-map", "0", "--out", str(c.tmp / "g")], 2, ["results", "no profiled artifact"]


@case("gate-unknown-artifact")
def _(c):
    return ["gate", str(c.profile), "--min-map", "0", "-a", "nope", "--out", str(c.tmp / "g")], 2, \
        ["--artifact", "nope"]


@case("gate-no-budgets")
def _(c):
    return ["gate", str(c.profile), "--out", str(c.tmp / "g")], 2, ["no budgets"]


@case("export-unknown-artifact")
def _(c):
    return ["export", str(c.train), "-a", "onnx-int4", "--out", str(c.tmp / "x")], 2, ["--artifact", "onnx-int4"]


@case("export-unknown-target")
def _(c):
    return ["export", str(c.train), "--target", "xbox", "--out", str(c.tmp / "x")], 2, ["xbox"]


@case("profile-unknown-runtime")
def _(c):
    return ["profile", str(c.export), "--runtime", "tvm", "--out", str(c.tmp / "x")], 2, ["--runtime", "tvm"]


@case("profile-runtime-that-runs-none-of-its-artifacts")
def _(c):
    """An ONNX Runtime export profiled with --runtime openvino said 'no artifact can run here (none exported)'."""
    return ["profile", str(c.export), "--runtime", "openvino", "--out", str(c.tmp / "x")], 2, \
        [f"--runtime openvino: no artifact of {c.export} runs in openvino:", "onnx-int8 (onnxruntime)"]


@case("profile-unknown-artifact")
def _(c):
    return ["profile", str(c.export), "-a", "nope", "--out", str(c.tmp / "x")], 2, ["--artifact", "nope"]


@case("gate-empty-artifact-name")
def _(c):  # an empty name is a name that was not profiled, not "the default artifact"
    return ["gate", str(c.profile), "--min-map", "0", "-a", "", "--out", str(c.tmp / "g")], 2, ["--artifact: ''"]


@case("profile-empty-runtime-name")
def _(c):
    return ["profile", str(c.export), "--runtime", "", "--out", str(c.tmp / "x")], 2, ["--runtime: ''"]


@case("report-missing-bundle")
def _(c):
    return ["report", str(c.tmp / "nowhere"), "--out", str(c.tmp / "x")], 2, ["nowhere", "not found"]


@case("resume-nothing-there-refuses-foreign-out")
def _(c):
    return ["train", str(c.yolo_recipe("r", c.data)), "--out", str(c.user_dir()), "--resume"], 2, \
        ["thesis", "refusing to replace"]


@case("eval-imgsz-not-a-stride-multiple")
def _(c):
    return ["eval", str(c.train), "--imgsz", "100", "--out", str(c.tmp / "x")], 2, ["--imgsz", "100", "multiple of 32"]


@case("export-imgsz-not-a-stride-multiple")
def _(c):
    return ["export", str(c.train), "--imgsz", "129", "--out", str(c.tmp / "x")], 2, ["--imgsz", "129"]


@case("train-student-yaml-does-not-build")
def _(c):
    y = c.tmp / "broken-model.yaml"
    y.write_text("nc: 3\nbackbone:\n  - [-1, 1, NoSuchModule, [16, 3, 2]]\nhead:\n  - [-1, 1, Detect, [nc]]\n")
    c.plant(y)
    return ["train", str(c.yolo_recipe("r", c.data, student=str(y))), "--out", str(c.tmp / "x")], 2, \
        ["student.model", "broken-model.yaml"]


@case("train-imgsz-not-a-multiple-of-a-p6-stride")
def _(c):
    # Ultralytics trained at 128 (rounded up) and kdctl's evaluation at 96 failed with an internal error after it
    r = c.plant(c.tmp / "p6.yaml")
    r.write_text(f"name: p6\nstudent: {{model: yolov8n-p6.yaml}}\ndata: {{yolo: {c.data}}}\n"
                 "train: {epochs: 1, imgsz: 96, batch: 4}\n")
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["p6.yaml: train.imgsz: 96 is not a multiple of 64",
                                                              "use 128 or 64"]


@case("distill-imgsz-not-a-multiple-of-the-teacher-stride")
def _(c):
    r = c.plant(c.tmp / "p6t.yaml")
    r.write_text(f"name: p6t\nteacher: {{model: yolov8n-p6.yaml}}\nstudent: {{model: yolov8-tiny.yaml}}\n"
                 f"data: {{yolo: {c.data}}}\ntrain: {{epochs: 1, imgsz: 96, batch: 4}}\n"
                 "distill: {losses: [{name: cwd}]}\n")
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, ["train.imgsz: 96", "the teacher's largest stride"]


@case("train-student-pt-not-a-checkpoint")
def _(c):
    f = c.tmp / "student.pt"
    f.write_text("not a checkpoint")
    c.plant(f)
    return ["train", str(c.yolo_recipe("r", c.data, student=str(f))), "--out", str(c.tmp / "x")], 2, \
        ["student.model", "student.pt"]


def _saved(c, name: str, what) -> Path:
    """A planted ``.pt`` holding ``what(model)`` for the session train bundle's model."""
    import torch

    from kdctl.detectors import load_detector

    f = c.tmp / name
    torch.save(what(load_detector(c.train / "weights.pt")), f)
    return c.plant(f)


@case("distill-teacher-pt-is-a-state-dict")
def _(c):
    """torch.save(model.state_dict()): Ultralytics' own message pointed at downloading 'yolo26n.pt'."""
    f = _saved(c, "sd.pt", lambda m: {"state_dict": m.state_dict(), "epoch": 3})
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(f))), "--out", str(c.tmp / "x")], 2, \
        ["teacher.model", "sd.pt", "holds only weight tensors (a state_dict), not the model"]


@case("train-student-pt-is-a-model-pickled-whole")
def _(c):
    """torch.save(model): Ultralytics read the model's layers (an nn.Sequential) as the model."""
    f = _saved(c, "whole.pt", lambda m: m)
    return ["train", str(c.yolo_recipe("r", c.data, student=str(f))), "--out", str(c.tmp / "x")], 2, \
        ["student.model", "whole.pt", "holds a model pickled whole (torch.save(model))"]


@case("distill-teacher-pt-without-a-model")
def _(c):
    f = _saved(c, "empty.pt", lambda m: {"model": None, "ema": None, "epoch": 3, "train_args": {}})
    return ["distill", str(c.yolo_recipe("r", c.data, teacher=str(f))), "--out", str(c.tmp / "x")], 2, \
        ["teacher.model", "empty.pt", "its 'model' and 'ema' entries hold no model"]


@case("distill-rtdetr-student-with-a-yolo-head-loss")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, student="rtdetr-tiny.yaml", teacher="yolov8-tiny.yaml",
                                         losses="[{name: ld}]")), "--out", str(c.tmp / "x")], 2, \
        ["distill.losses[0]", "'ld' is a dense-head loss"]


@case("train-qat-int4")
def _(c):
    r = c.yolo_recipe("r", c.data, student="rtdetr-tiny.yaml")
    r.write_text(r.read_text() + "distill: {quantize: int4}\n")
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["distill.quantize"]


@case("train-torchvision-builder-does-not-exist")
def _(c):
    return ["train", str(c.yolo_recipe("r", c.data, student="'torchvision:fasterrcnn_resnet9000_fpn'")), "--out",
            str(c.tmp / "x")], 2, ["student.model", "fasterrcnn_resnet9000_fpn", "valid:"]


@case("train-torchvision-nominal-batch")
def _(c):
    """Gradient accumulation is Ultralytics' (train.nbs); kdctl's Faster R-CNN loop would have ignored it."""
    r = c.yolo_recipe("r", c.data, student="'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'")
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, nbs: 16}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml: train.nbs: 16", "steps the optimizer every batch"]


@case("train-torchvision-ultralytics-augmentation")
def _(c):
    """Ultralytics' augmentation settings (degrees, hsv_*, ...) would be ignored by kdctl's Faster R-CNN loop."""
    r = c.yolo_recipe("r", c.data, student="'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'")
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, fliplr: 0.0, lrf: 0.1, cos_lr: true, degrees: 10}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, [
        "r.yaml: train.degrees: a setting of Ultralytics' trainer, which kdctl's", "does not apply (of these it takes "
        "lrf, cos_lr, momentum, weight_decay, fliplr); leave it out"]


@case("train-flip-probability-above-one")
def _(c):
    r = c.yolo_recipe("r", c.data)
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, fliplr: 1.5}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml: train.fliplr", "less than or equal to 1"]


@case("train-threads-zero")
def _(c):
    r = c.yolo_recipe("r", c.data)
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, threads: 0}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml", "train.threads"]


@case("train-torchvision-val-off")
def _(c):
    r = c.yolo_recipe("r", c.data, student="'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'")
    r.write_text(r.read_text().replace("batch: 4}", "batch: 4, val: false}"))
    return ["train", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml: train.val: false", "validates every epoch"]


@case("distill-torchvision-student-yolo-teacher")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, student="'torchvision:fasterrcnn_mobilenet_v3_large_320_fpn'",
                                         teacher="yolov8-tiny.yaml")), "--out", str(c.tmp / "x")], 2, \
        ["teacher.model", "YOLO teacher", "torchvision student", "not available yet"]


@case("distill-yolo-head-loss-from-rtdetr-teacher")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, teacher="rtdetr-tiny.yaml", losses="[{name: kd_logit}]")),
            "--out", str(c.tmp / "x")], 2, ["distill.losses[0]", "kd_logit", "dense-head loss", "detr_logit"]


@case("distill-stop-epoch-at-the-last-epoch")
def _(c):
    r = c.yolo_recipe("r", c.data, teacher="yolov8-tiny.yaml", losses="[{name: at}]")
    r.write_text(r.read_text().replace("distill: {", "distill: {stop_epoch: 1, "))
    return ["distill", str(r), "--out", str(c.tmp / "x")], 2, ["r.yaml", "distill.stop_epoch", "below train.epochs"]


@case("distill-detr-query-with-a-yolo-teacher")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, student="rtdetr-tiny.yaml", teacher="yolov8-tiny.yaml",
                                         losses="[{name: detr_query}]")),
            "--out", str(c.tmp / "x")], 2, ["distill.losses[0]", "detr_query", "needs an RT-DETR teacher"]


@case("distill-detr-logit-for-a-yolo-student")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, student="yolov8-tiny.yaml", teacher="rtdetr-tiny.yaml",
                                         losses="[{name: detr_logit}]")),
            "--out", str(c.tmp / "x")], 2, ["distill.losses[0]", "detr_logit", "student is not an RT-DETR"]


@case("train-rtdetr-checkpoint-of-wrong-family-as-yaml")
def _(c):
    f = c.tmp / "rtdetr-like.yaml"
    f.write_text("nc: 3\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\nhead:\n  - [[0], 1, RTDETRDecoder, [nc, 0]]\n")
    c.plant(f)
    return ["train", str(c.yolo_recipe("r", c.data, student=str(f))), "--out", str(c.tmp / "x")], 2, \
        ["student.model", "rtdetr-like.yaml"]


@case("distill-teacher-is-segmentation-yaml")
def _(c):
    return ["distill", str(c.yolo_recipe("r", c.data, teacher="yolov8n-seg.yaml")), "--out", str(c.tmp / "x")], 2, \
        ["teacher.model", "segmentation model"]


@case("bundle-show-not-a-bundle")
def _(c):
    return ["bundle", "show", str(c.user_dir())], 2, ["thesis", "not a kdctl bundle"]


@case("cache-info-meta-not-json")
def _(c):
    return ["cache", "info", str(c.cache_folder("{bad"))], 2, ["cache/meta.json", "unreadable (not JSON)"]


@case("cache-info-meta-not-a-cache-record")
def _(c):
    d = c.cache_folder('{"complete": true}')  # someone's JSON, not what a cache build writes
    return ["cache", "info", str(d)], 2, ["cache/meta.json", "not a kdctl teacher cache record (no 'version')"]


@case("distill-cache-meta-is-a-list")
def _(c):
    d = c.cache_folder("[]")
    r = c.yolo_recipe("cached", c.data, teacher=str(c.train), losses="[{name: kd_logit}]")
    r.write_text(r.read_text().replace("losses:", f"cache: {{path: {d}}}, losses:"))
    return ["distill", str(r), "--out", str(c.tmp / "kd")], 2, ["cache/meta.json", "not a kdctl teacher cache"]


@case("gate-junit-and-summary-one-file")
def _(c):
    # the Markdown summary replaced the JUnit XML that CI was told to read, and the gate passed
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit", str(c.tmp / "gate.out"),
            "--summary", str(c.tmp / "." / "gate.out")], 2, ["--summary", "is also the --junit file"]


@case("gate-baseline-is-the-profile-itself")
def _(c):
    # a copy of the profile as its own baseline: every regression check passed by construction
    same = c.copy(c.profile, "main-profile")
    return ["gate", str(c.profile), "--baseline", str(same), "--max-latency-regression", "0.03", "--out",
            str(c.tmp / "g")], 2, ["--baseline", "is the profile being gated"]


@case("gate-junit-in-a-folder-that-takes-no-files")
def _(c):
    """The junit file was written after the bundle was published: the gate exited 2 with its bundle left behind
    and an error naming a temp file."""
    return ["gate", str(c.profile), "--min-map", "0", "--out", str(c.tmp / "g"), "--junit", "/proc/kdctl.xml"], 2, \
        ["--junit /proc/kdctl.xml", "cannot create files in /proc"]


@case("report-out-two-folders-deep-under-proc")
def _(c):
    # the lock's folder could not be made: the error named the missing folder only
    return ["report", str(c.profile), "--out", "/proc/kdctl-runs/report"], 2, ["/proc: cannot create files there"]


@case("data-synth-into-a-folder-that-takes-no-files")
def _(c):
    """/proc takes no new files: the lock's create failed with ENOENT, which was read as a lost race and retried
    forever (one core at 100 %)."""
    return ["data", "synth", "/proc/kdctl-shapes"], 2, ["/proc: cannot create files there"]


@pytest.fixture
def ctx(tmp_path, tiny_data, trained_bundle, export_cpu, profile_cpu):
    c = Ctx(tmp_path, tiny_data, trained_bundle, export_cpu, profile_cpu)
    c.planted += [trained_bundle, export_cpu, profile_cpu]
    return c


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ctx):
    argv, code, words = CASES[name](ctx)
    before = {p: snapshot(p) for p in ctx.planted}
    siblings = {p.name for p in ctx.tmp.iterdir()}
    res = CliRunner().invoke(app, argv)
    out = res.output
    assert res.exit_code == code, f"{argv}: exit {res.exit_code}, expected {code}\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    for w in words:
        assert w in errors[0], f"{w!r} not in: {errors[0]}"
    for p, snap in before.items():
        assert snapshot(p) == snap, f"{p} changed"
    new = {p.name for p in ctx.tmp.iterdir()} - siblings
    assert not new, f"left behind: {new}"  # no bundle, no .partial/.work/.lock


def test_a_model_of_other_than_3_input_channels_is_one_line_in_every_role(tmp_path, tiny_data, trained_bundle):
    """A grey model (Ultralytics' ``channels: 1``): a checkpoint to score, export or teach from, or a model YAML
    to train, stopped with an internal error (a 3-channel batch into its 1-channel first convolution)."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from conftest import refused_in_one_line

    grey = tmp_path / "grey.pt"
    m = DetectionModel("yolov8n.yaml", ch=1, nc=3, verbose=False)
    m.names = {0: "circle", 1: "square", 2: "triangle"}
    torch.save({"model": m, "train_args": {"imgsz": 64}}, grey)
    cfg = tmp_path / "grey8n.yaml"
    cfg.write_text("channels: 1\nnc: 3\nscales: {n: [0.33, 0.25, 1024]}\n" + "\n".join(
        line for line in (Path(__import__("ultralytics").__file__).parent / "cfg/models/v8/yolov8.yaml").read_text()
        .splitlines() if line.startswith(("backbone", "head", "  -"))))
    says = "takes images of 1 channel; kdctl trains, scores and exports 3-channel (RGB) detectors"
    out = tmp_path / "x"
    for argv, where in ((["eval", str(grey), "--data", str(tiny_data)], f"kdctl eval: model ('{grey}')"),
                        (["export", str(grey), "--data", str(tiny_data), "--target", "cpu"],
                         f"kdctl export: model ('{grey}')")):
        assert refused_in_one_line([*argv, "--out", str(out)], out) == f"Error: {where}: {says}"
    for role, spec in (("teacher", grey), ("student", cfg)):
        r = tmp_path / f"{role}.yaml"
        r.write_text(f"name: r\nstudent: {{model: {cfg if role == 'student' else 'yolov8-tiny.yaml'}}}\n"
                     f"teacher: {{model: {grey if role == 'teacher' else trained_bundle}}}\n"
                     f"data: {{yolo: {tiny_data}}}\n"
                     "train: {epochs: 1, imgsz: 64, batch: 4}\ndistill: {losses: [{name: kd_logit}]}\n")
        line = refused_in_one_line(["distill", str(r), "--out", str(out)], out)
        assert line == f"Error: {r}: {role}.model ('{spec}'): {says}", line


def test_a_checkpoint_with_an_impossible_stride_is_one_line(tmp_path, tiny_data):
    """A checkpoint whose model records stride 0 (damaged or edited) ended in an internal ZeroDivisionError when its
    input size was checked."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from conftest import refused_in_one_line

    p = tmp_path / "zero.pt"
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    m.names, m.stride = {0: "circle", 1: "square", 2: "triangle"}, torch.zeros(3)
    torch.save({"model": m}, p)
    out = tmp_path / "x"
    assert refused_in_one_line(["eval", str(p), "--data", str(tiny_data), "--out", str(out)], out) == (
        f"Error: kdctl eval: model ('{p}'): its largest stride is 0, which no detector has (the checkpoint is damaged "
        "or was edited)")


def test_damaged_or_foreign_checkpoints_are_named_in_one_short_line(tmp_path, tiny_data):
    """Ultralytics' error for a damaged .pt is two lines of its own ('ERROR ❌️ PATH is not a loadable checkpoint ...
    (RuntimeError: ... If you are seeing this error, there is a high likelihood ...)' and a fix to run) and a
    TorchScript file brought three warnings first: each is now what was found, in one line, and nothing else."""
    import warnings

    import torch

    from conftest import refused_in_one_line
    from kdctl.detectors import load_detector

    whole = tmp_path / "whole.pt"
    torch.save({"epoch": 3, "x": torch.zeros(4096)}, whole)
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    (tmp_path / "short.pt").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 8])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "image.pt").write_bytes(next((tiny_data.parent / "images" / "val").glob("*.png")).read_bytes())
    (tmp_path / "notes.pt").write_text("garbage\n")  # torch.load's own error: 'invalid literal for int()'
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4f1c\nsize 6534387\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's own deprecation, not kdctl's
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "script.pt"))
    found = {"cut.pt": "the file is empty, truncated or corrupted (OSError: [Errno 22] Invalid argument)",
             "short.pt": "the file is empty, truncated or corrupted (RuntimeError: PytorchStreamReader failed reading "
                         "zip archive: failed finding central directory)",
             "empty.pt": "the file is empty, truncated or corrupted (EOFError: Ran out of input)",
             "script.pt": "it is a TorchScript archive, not an Ultralytics PyTorch checkpoint",
             "image.pt": "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file starts "
                         "with b'\\x89PNG\\r\\n\\x1a\\n')",
             "notes.pt": "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file starts "
                         "with b'garbage\\n')",
             "lfs.pt": "a Git LFS pointer file, not the checkpoint itself (`git lfs pull` fetches it)"}
    for name, why in found.items():
        out = tmp_path / "ev"
        line = refused_in_one_line(["eval", str(tmp_path / name), "--data", str(tiny_data), "--out", str(out)], out)
        assert line == f"Error: kdctl eval: model: cannot load checkpoint '{tmp_path / name}': {why}", line
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(Exception):
                load_detector(tmp_path / name)
        assert not seen, [f"{name}: {w.message}" for w in seen]
