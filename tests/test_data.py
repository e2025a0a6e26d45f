"""Datasets: Ultralytics YAML checks, COCO-JSON conversion, the synth command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdctl.cli.main import app
from kdctl.data.resolve import coco_dataset, load_yolo_yaml, resolve_data
from kdctl.errors import DataError
from kdctl.evaluate.predict import ground_truth


def test_yolo_yaml_checks(tmp_path, tiny_data):
    ds = load_yolo_yaml(tiny_data)
    assert ds.nc == 3 and len(ds.train_images) == 24 and len(ds.val_images) == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DataError, match=f"{bad}: field 'names' is missing"):
        load_yolo_yaml(bad)
    bad.write_text(yaml.safe_dump({"path": "nowhere", "train": "a", "val": "b", "names": ["x"]}))
    with pytest.raises(DataError, match="field 'path': directory"):
        load_yolo_yaml(bad)
    bad.write_text(yaml.safe_dump({"path": str(tiny_data.parent), "train": "images/train", "val": "images/nope",
                                   "names": {0: "a", 2: "b"}}))
    with pytest.raises(DataError, match="class ids must be 0..1 without gaps"):
        load_yolo_yaml(bad)
    with pytest.raises(DataError, match="dataset YAML not found"):
        load_yolo_yaml(tmp_path / "none.yaml")
    import shutil

    nolab = tmp_path / "nolab"
    shutil.copytree(tiny_data.parent / "images", nolab / "images")
    (nolab / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match="train: none of its 24 images has a label file"):
        load_yolo_yaml(nolab / "data.yaml")


def make_coco(tmp_path: Path) -> dict:
    """A 3-image COCO dataset with non-contiguous category ids, a crowd box and a subfolder file name."""
    img_dir = tmp_path / "imgs"
    (img_dir / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        Image.fromarray(np.full((50, 100, 3), 128, np.uint8)).save(img_dir / name)
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                       {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50},
                       {"id": 7, "file_name": "sub/c.jpg", "width": 100, "height": 50}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [10, 5, 20, 10], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 1},
                            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [90, 40, 20, 20]}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return {"train_images": str(img_dir), "train_annotations": str(ann), "val_images": str(img_dir),
            "val_annotations": str(ann)}


def test_coco_conversion(tmp_path):
    ds = coco_dataset(**make_coco(tmp_path))
    assert ds.names == ["cat", "dog"] and len(ds.val_images) == 3
    gts = {p.name: g for p, g in zip(ds.val_images, ground_truth(ds.val_images))}
    a = gts["a.jpg"]
    assert a.classes.tolist() == [1]                                # dog -> 1; the crowd box is left out
    assert np.allclose(a.boxes, [[10, 5, 30, 15]], atol=1e-3)
    c = gts["sub__c.jpg"]
    assert np.allclose(c.boxes, [[90, 40, 100, 50]], atol=1e-3)    # clipped to the image
    again = resolve_data({"coco": make_coco(tmp_path), "yolo": None, "synthetic": None})
    assert again.yaml == ds.yaml                                   # cached


def test_coco_errors(tmp_path):
    spec = make_coco(tmp_path)
    data = json.loads(Path(spec["train_annotations"]).read_text())
    del data["annotations"][0]["bbox"]
    Path(spec["train_annotations"]).write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[0\].bbox is missing"):
        coco_dataset(**spec)
    spec2 = make_coco(tmp_path / "x")
    spec2["val_images"] = str(tmp_path / "missing")
    with pytest.raises(DataError, match="images directory"):
        coco_dataset(**spec2)


def test_synth_cli(tmp_path):
    out = tmp_path / "shapes"
    res = CliRunner().invoke(app, ["data", "synth", str(out), "--images", "4", "--val", "2", "--imgsz", "96", "--json"])
    assert res.exit_code == 0, res.output
    d = yaml.safe_load((out / "data.yaml").read_text())
    assert d["path"] == str(out.resolve()) and load_yolo_yaml(out / "data.yaml").nc == 6
    again = CliRunner().invoke(app, ["data", "synth", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
