"""Datasets: Ultralytics YAML checks, COCO-JSON conversion, the synth command."""

from __future__ import annotations

import json
import re
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
    with pytest.raises(DataError, match="field 'path': directory") as e:
        load_yolo_yaml(bad)
    assert "--data" not in str(e.value)
    # a bundle's copy of the dataset it was trained on (export, eval read it), the dataset moved since
    kept = tmp_path / "bundle"
    kept.mkdir()
    (kept / "manifest.json").write_text("{}")
    (kept / "data.yaml").write_text(bad.read_text())
    with pytest.raises(DataError, match=r"bundle/data.yaml: field 'path': directory .* not found; it is the copy a "
                                        r"kdctl bundle keeps .* moved or been removed since: give --data"):
        load_yolo_yaml(kept / "data.yaml")
    bad.write_text(yaml.safe_dump({"path": str(tiny_data.parent), "train": "images/train", "val": "images/nope",
                                   "names": {0: "a", 2: "b"}}))
    with pytest.raises(DataError, match="class ids must be 0..1 without gaps"):
        load_yolo_yaml(bad)
    with pytest.raises(DataError, match="dataset YAML not found"):
        load_yolo_yaml(tmp_path / "none.yaml")
    # only nc: Ultralytics names the classes class_0.. itself; kdctl refused the dataset as 'names' missing
    bad.write_text(yaml.safe_dump({"path": str(tiny_data.parent), "train": "images/train", "val": "images/val",
                                   "nc": 3}))
    assert load_yolo_yaml(bad).names == ["class_0", "class_1", "class_2"]
    bad.write_text(yaml.safe_dump({"path": str(tiny_data.parent), "train": "images/train", "val": "images/val",
                                   "nc": 0}))
    with pytest.raises(DataError, match=r"field 'names' is missing \(or give nc, the class count\)"):
        load_yolo_yaml(bad)
    for nc, problem in [("'3'", None), ("3.0", None),  # Ultralytics takes integer-like counts
                        ("3.5", r"field 'nc': 3.5 is not a whole number"), ("three", "'three' is not a whole number"),
                        ("4", "field 'nc': 4 does not match the 3 names")]:
        bad.write_text(f"path: {tiny_data.parent}\ntrain: images/train\nval: images/val\nnc: {nc}\nnames: [a, b, c]\n")
        if problem is None:
            assert load_yolo_yaml(bad).nc == 3
        else:
            with pytest.raises(DataError, match=problem):
                load_yolo_yaml(bad)
    root = str(tiny_data.parent)
    for names, problem in [({"0": "a", 1: "b", 2: "c"}, None),  # Ultralytics reads ids with int(): '0' is 0
                           ({0: "a", "zero": "b"}, "class id 'zero' is not a whole number"),
                           ({0: "a", "0": "b", 1: "c"}, "class id 0 is given twice"),
                           ({0: "a", 1: "b", 2: "a"}, None),  # a name two classes share: Ultralytics trains it
                           (["a", "b", "b"], None)]:
        bad.write_text(yaml.safe_dump({"path": root, "train": "images/train", "val": "images/val", "names": names}))
        if problem is None:
            assert load_yolo_yaml(bad).names == (list(names.values()) if isinstance(names, dict) else names)
        else:
            with pytest.raises(DataError, match=f"field 'names': {problem}"):
                load_yolo_yaml(bad)
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
    assert a.classes.tolist() == [1, 0]                             # dog -> 1, then the crowd region (cat)
    assert a.crowd.tolist() == [False, True]                        # an ignore region for the evaluator...
    assert np.allclose(a.boxes, [[10, 5, 30, 15], [0, 0, 100, 50]], atol=1e-3)
    from kdctl.data.resolve import label_path

    a_img = next(p for p in ds.val_images if p.name == "a.jpg")
    assert label_path(a_img).read_text().count("\n") == 1            # ...and no object to train on (Ultralytics)
    from kdctl.detectors.torchvision import _Images

    _, target = _Images([a_img], 128, augment=False)[0]                # nor for kdctl's torchvision loop
    assert target["labels"].tolist() == [2]                            # dog (1) + torchvision's background
    c = gts["sub__c.jpg"]
    assert np.allclose(c.boxes, [[90, 40, 100, 50]], atol=1e-3)    # clipped to the image
    assert c.crowd is None
    again = resolve_data({"coco": make_coco(tmp_path), "yolo": None, "synthetic": None})
    assert again.yaml == ds.yaml                                   # cached


def test_coco_images_sharing_a_stem_keep_their_own_labels(tmp_path):
    """a.jpg and a.png once wrote one a.txt: the second image's boxes replaced the first's."""
    spec = make_coco(tmp_path)
    img_dir = Path(spec["train_images"])
    Image.fromarray(np.full((50, 100, 3), 90, np.uint8)).save(img_dir / "a.png")
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["images"].append({"id": 8, "file_name": "a.png", "width": 100, "height": 50})
    coco["annotations"].append({"id": 4, "image_id": 8, "category_id": 3, "bbox": [50, 10, 40, 30]})
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    ds = coco_dataset(**spec)
    gts = {p.name: g for p, g in zip(ds.val_images, ground_truth(ds.val_images))}
    assert len(gts) == 4 and gts["a.jpg"].classes[~gts["a.jpg"].crowd].tolist() == [1]
    (png,) = [n for n in gts if n.endswith(".png")]
    assert gts[png].classes.tolist() == [0] and np.allclose(gts[png].boxes, [[50, 10, 90, 40]], atol=1e-3)

    coco["images"].append({"id": 9, "file_name": "a.png", "width": 100, "height": 50})
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: images: 'a.png' is listed twice \(ids 8 and 9\)"):
        coco_dataset(**spec)


def test_coco_file_names_with_the_images_folder_in_them_are_found(tmp_path):
    """Exports write 'images/a.jpg' or 'train2017/a.jpg' into file_name; given that folder as the images folder,
    kdctl refused the set ('not found'). Now the base name is looked up there when the path as written is not."""
    spec = make_coco(tmp_path)
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["images"][0]["file_name"] = "train2017/a.jpg"   # only the base name is in the images folder
    coco["images"][1]["file_name"] = "imgs/b.jpg"
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    ds = coco_dataset(**spec)
    gts = {p.name: g for p, g in zip(ds.val_images, ground_truth(ds.val_images))}
    assert sorted(gts) == ["imgs__b.jpg", "sub__c.jpg", "train2017__a.jpg"]
    assert gts["train2017__a.jpg"].classes[~gts["train2017__a.jpg"].crowd].tolist() == [1]
    linked = {p.name: p.resolve() for p in ds.val_images}
    assert linked["train2017__a.jpg"] == (Path(spec["val_images"]) / "a.jpg").resolve()
    coco["images"][0]["file_name"] = "train2017/gone.jpg"
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: image 'train2017/gone.jpg' \(id 1\) not found in .*imgs"):
        coco_dataset(**spec)


def test_coco_images_without_width_and_height_take_them_from_their_files(tmp_path, monkeypatch):
    """width and height are optional in some exports; the boxes are normalised by them, so kdctl reads them from the
    file's header (it refused the set as 'images[0].width is missing'), once: not again to check them."""
    import kdctl.data.validate as validate

    opened = []
    real_open = validate.open_image
    monkeypatch.setattr(validate, "open_image", lambda f: opened.append(Path(f).name) or real_open(f))
    spec = make_coco(tmp_path)
    coco_dataset(**spec)
    with_sizes, opened[:] = sorted(opened), []
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    for im in coco["images"]:
        del im["width"], im["height"]
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    ds = coco_dataset(**spec)
    assert sorted(opened) == with_sizes  # each header read as often as when the JSON has the sizes
    gts = {p.name: g for p, g in zip(ds.val_images, ground_truth(ds.val_images))}
    a = gts["a.jpg"]
    assert np.allclose(a.boxes[~a.crowd], [[10, 5, 30, 15]], atol=1e-3)  # bbox [10, 5, 20, 10] on the 100x50 file
    assert np.allclose(gts["sub__c.jpg"].boxes, [[90, 40, 100, 50]], atol=1e-3)  # clipped to the file's size
    coco["images"][0]["file_name"] = "gone.jpg"
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: images\[0\]: width and height are missing and '.*gone.jpg' "
                                        r"cannot be read for them \(FileNotFoundError\)"):
        coco_dataset(**spec)
    coco["images"][0].update(file_name="a.jpg", width=100)
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: images\[0\].height is missing"):
        coco_dataset(**spec)


def test_coco_image_sizes_are_checked_against_the_files(tmp_path):
    """Boxes are normalised by the JSON's width and height: images resized after annotation trained on misplaced
    boxes without a word. A mismatch is an invalid image (one line, or skipped and listed with --skip-invalid);
    a split left without objects names the user's JSON, not kdctl's cache."""
    spec = make_coco(tmp_path)
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["images"][1]["width"] = 200  # b.jpg is 100x50
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: images\[1\] \('b.jpg'\): width x height 200x50 differs from "
                                        r"the file's 100x50; its boxes would be scaled wrongly"):
        coco_dataset(**spec)
    ds = coco_dataset(**spec, skip_invalid=True)
    assert len(ds.val_images) == 2 and any("'b.jpg'" in why for why in ds.skipped["val"])
    coco["images"][1]["width"] = 100
    coco["annotations"] = []
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"ann.json: no objects"):
        coco_dataset(**spec)


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


def _copy(tmp_path, tiny_data) -> Path:
    """A copy of the tiny dataset to break: its root, with a relative data.yaml."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_data.parent / "images", root / "images")
    shutil.copytree(tiny_data.parent / "labels", root / "labels")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    return root


def _broken_copy(tmp_path, tiny_data):
    root = _copy(tmp_path, tiny_data)
    tr = sorted((root / "labels" / "train").glob("*.txt"))
    tr[0].write_text("17 0.5 0.5 0.2 0.2\n")                 # class out of range
    tr[1].write_text("0 0.5 0.5 0.2\n")                      # 4 columns
    (root / "images" / "train" / "fake.png").write_text("not an image")
    va = sorted((root / "labels" / "val").glob("*.txt"))
    va[0].write_text("0 0.5 0.5 0.2 nan\n")
    return root / "data.yaml", tr


def test_a_git_lfs_pointer_in_place_of_an_image_says_so(tmp_path, tiny_data):
    """A dataset cloned without `git lfs pull` holds pointer files where its images should be: named as such."""
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.data.validate import check_image
    from kdctl.errors import DataError

    root = _copy(tmp_path, tiny_data)
    pointer = sorted((root / "images" / "val").glob("*.png"))[0]
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4f1c\nsize 6534\n")
    why = "cannot be decoded as an image: a Git LFS pointer file, not the image itself (`git lfs pull` fetches it)"
    assert check_image(pointer) == why
    with pytest.raises(DataError, match=re.escape(f"{pointer}: {why}")):
        load_yolo_yaml(root / "data.yaml")


def test_skip_invalid_leaves_bad_samples_out_and_lists_them(tmp_path, tiny_data):
    from kdctl.data.resolve import load_yolo_yaml, normalised_yaml
    from kdctl.errors import DataError

    data, tr = _broken_copy(tmp_path, tiny_data)
    with pytest.raises(DataError, match=r"fake.png: cannot be decoded as an image \(not a format Pillow reads\)"):
        load_yolo_yaml(data)
    ds = load_yolo_yaml(data, skip_invalid=True)
    assert len(ds.train_images) == 24 - 2 and len(ds.val_images) == 8 - 1
    skipped = ds.describe()["skipped"]
    assert skipped["train"]["count"] == 3 and skipped["val"]["count"] == 1
    assert any("fake.png: cannot be decoded" in s for s in skipped["train"]["items"])
    assert any("train_000001.txt:1: has 4 columns" in s for s in skipped["train"]["items"])
    y = yaml.safe_load(normalised_yaml(ds, tmp_path / "work.yaml").read_text())
    listed = Path(y["train"]).read_text().split()
    assert len(listed) == 22 and str((tmp_path / "d" / "images" / "train" / "train_000000.png").resolve()) not in listed


@pytest.mark.slow
def test_train_with_skip_invalid_records_the_skipped_and_true_counts(tmp_path, tiny_data):
    from typer.testing import CliRunner

    from kdctl.cli.main import app

    data, _ = _broken_copy(tmp_path, tiny_data)
    r = tmp_path / "r.yaml"
    r.write_text(f"student: {{model: yolov8-tiny.yaml}}\ndata: {{yolo: {data}, skip_invalid: true}}\n"
                 "train: {epochs: 1, imgsz: 64, batch: 8}\n")
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    d = m["inputs"]["data"]
    assert d["train_images"] == 22 and d["val_images"] == 7 and d["skipped"]["train"]["count"] == 3
    assert m["metrics"]["eval_images"] == 7
    bundle_yaml = yaml.safe_load((tmp_path / "o" / "data.yaml").read_text())
    assert bundle_yaml["kdctl_skip_invalid"] is True and bundle_yaml["train"] == "images/train"  # no work-dir paths
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "o"), "--out", str(tmp_path / "e0"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["images"] == 7  # the bundle's data skips them again
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "o"), "--data", str(data), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "val_000000.txt:1" in res.output and "not finite" in res.output
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "o"), "--data", str(data), "--skip-invalid",
                                   "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["images"] == 7


def test_polygon_labels_are_boxed_and_checked(tmp_path):
    from kdctl.data.validate import LabelError, parse_labels

    f = tmp_path / "a.txt"
    f.write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n\n0 0 0 1.0 0 1.0 1.0 0 1.0\n")
    rows = parse_labels(f, nc=3)
    np.testing.assert_allclose(rows, [[2, 0.3, 0.4, 0.4, 0.4], [0, 0.5, 0.5, 1.0, 1.0]])
    # boxes and polygons in one file: Ultralytics' check drops the image ('labels mix segment and detection rows')
    f.write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n\n0 0.5 0.5 1.0 1.0\n")
    with pytest.raises(LabelError, match=r"a.txt:3: mixes box rows \(5 columns, line 3\) and polygon rows \(line 1\)"):
        parse_labels(f, nc=3)
    f.write_text("0 0.5 0.5 0.2 0.2\n0 0.1 0.2 0.5 0.2 0.3\n")
    with pytest.raises(LabelError, match=r"a.txt:2: has 6 columns"):
        parse_labels(f, nc=3)
    # Ultralytics bounds the values (1 % tolerance), not the box's extent: a box overhanging the edge is an object
    from ultralytics.data.utils import verify_image_label

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    for row, ok in (("0 1.005 0.5 0.02 0.2", True), ("0 0.98 0.5 0.1 0.2", True), ("0 0.9 0.1 0.4 0.4", True),
                    ("0 1.02 0.5 0.1 0.2", False), ("0 0.5 -0.02 0.1 0.2", False), ("0 0.5 0.5 1.1 0.2", False)):
        f.write_text(row + "\n")
        theirs = verify_image_label((str(tmp_path / "images" / "a.png"), str(f), "", False, 1, 0, 0, False))
        assert (theirs[1] is not None) == ok, row
        if ok:
            np.testing.assert_allclose(parse_labels(f, nc=1), theirs[1], rtol=1e-6)
        else:
            with pytest.raises(LabelError, match="outside the image"):
                parse_labels(f, nc=1)


def test_zero_size_boxes_are_kept_as_ultralytics_keeps_them_and_negative_ones_refused(tmp_path):
    """Ultralytics' dataset check accepts a zero-width row (a point, a line polygon) and its COCO converter skips a
    zero-size bbox; kdctl refused the whole dataset for either. A negative size is still an error."""
    from kdctl.data.validate import LabelError, parse_labels

    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0 0.2\n")  # zero width
    np.testing.assert_allclose(parse_labels(f, nc=2), [[0, 0.5, 0.5, 0, 0.2]])
    f.write_text("1 0.1 0.2 0.1 0.4 0.1 0.6\n")  # a polygon on one vertical line
    np.testing.assert_allclose(parse_labels(f, nc=2), [[1, 0.1, 0.4, 0, 0.4]])
    f.write_text("0 0.5 0.5 0.2 -0.1\n")
    with pytest.raises(LabelError, match=r"a.txt:1: box width/height must be >= 0 \(got 0.2, -0.1\)"):
        parse_labels(f, nc=1)
    spec = make_coco(tmp_path)
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["annotations"].append({"id": 5, "image_id": 2, "category_id": 3, "bbox": [0, 5, 0, 10]})
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    ds = coco_dataset(**spec)
    gts = {p.name: g for p, g in zip(ds.val_images, ground_truth(ds.val_images))}
    assert len(gts["b.jpg"].boxes) == 0  # skipped, not an object that no detection could match
    coco["annotations"][-1]["bbox"] = [0, 5, -1, 10]
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"bbox: width and height must be >= 0 \(got -1, 10\)"):
        coco_dataset(**spec)


def test_a_folder_named_like_an_image_is_not_an_image(tmp_path, tiny_data):
    """``images/train/extra.jpg/`` (a folder) was listed as an image and refused the dataset as undecodable."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_data.parent, root)
    (root / "images" / "train" / "extra.jpg").mkdir()
    y = root / "data.yaml"
    y.write_text(yaml.safe_dump({**yaml.safe_load(tiny_data.read_text()), "path": str(root)}))
    assert len(load_yolo_yaml(y).train_images) == 24


def test_repeated_label_rows_count_once_as_ultralytics_counts_them(tmp_path):
    """Ultralytics' dataset drops a row given twice (training and validation); scored twice it is a ground truth no
    detection can match, and mAP drops (0.2223 -> 0.2037 on an 8-image set with one repeat)."""
    from kdctl.data.validate import parse_labels

    f = tmp_path / "a.txt"
    f.write_text("1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.3\n")
    np.testing.assert_allclose(parse_labels(f, nc=2), [[1, 0.5, 0.5, 0.2, 0.2], [0, 0.3, 0.3, 0.1, 0.1],
                                                       [1, 0.5, 0.5, 0.2, 0.3]])  # file order kept


def test_label_file_with_a_byte_order_mark_is_read_as_ultralytics_reads_it(tmp_path):
    """Notepad saves UTF-8 with a BOM. Ultralytics (from 8.4.183, kdctl's floor) reads such labels; kdctl refused
    the dataset, naming the file."""
    from ultralytics.data.utils import verify_image_label

    from kdctl.data.validate import parse_labels

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    f = tmp_path / "labels" / "a.txt"
    f.write_bytes(b"\xef\xbb\xbf1 0.5 0.5 0.2 0.2\n0 0.25 0.25 0.1 0.1\n")
    assert parse_labels(f, nc=2).tolist() == [[1, 0.5, 0.5, 0.2, 0.2], [0, 0.25, 0.25, 0.1, 0.1]]
    theirs = verify_image_label((str(tmp_path / "images" / "a.png"), str(f), "", False, 2, 0, 0, False))
    assert np.allclose(theirs[1], parse_labels(f, nc=2)) and theirs[-1] == ""  # read, not dropped with a message


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_photo_is_read_upright_as_ultralytics_reads_it(tmp_path, orientation):
    """A phone photo stores its pixels sideways with an EXIF orientation; OpenCV (Ultralytics' training and
    validation) turns it upright, and the labels are drawn on the upright image: evaluation, calibration and
    ground truth must see that same image."""
    from ultralytics.utils.patches import imread

    from kdctl.evaluate.predict import load_rgb

    upright = np.zeros((60, 100, 3), np.uint8)        # H 60, W 100; a red box at x 10-40, y 5-25
    upright[5:25, 10:40] = (255, 0, 0)
    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    stored = Image.fromarray(upright).transpose(inverse[orientation])  # what the camera wrote
    exif = stored.getexif()
    exif[0x0112] = orientation
    img = tmp_path / "images" / "phone.jpg"
    img.parent.mkdir()
    stored.save(img, quality=100, exif=exif.tobytes())
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "phone.txt").write_text("0 0.25 0.25 0.3 0.3333333\n")  # the red box, upright frame

    pixels = load_rgb(img)
    assert pixels.shape == (60, 100, 3)
    np.testing.assert_allclose(pixels.astype(int), imread(str(img))[..., ::-1].astype(int), atol=2)  # as OpenCV
    gt = ground_truth([img])[0]
    x1, y1, x2, y2 = np.round(gt.boxes[0]).astype(int)
    assert (x1, y1, x2, y2) == (10, 5, 40, 25)
    assert pixels[y1 + 2:y2 - 2, x1 + 2:x2 - 2, 0].min() > 200 and pixels[y1 + 2:y2 - 2, x1 + 2:x2 - 2, 2].max() < 60


def test_a_huge_image_header_is_named_without_pillows_warning(tmp_path):
    """A PNG whose header gives 12000 x 12000 px (over Pillow's warning size, under its refusal size) and holds no
    pixels: named as truncated in one line, and Pillow's DecompressionBombWarning (two lines of Python warning on
    stderr, in every command that read the image) is not emitted."""
    import struct
    import warnings
    import zlib

    from kdctl.data.validate import check_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    p = tmp_path / "big.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        problem = check_image(p)
    assert problem == "cannot be decoded as an image (OSError: image file is truncated (0 bytes not processed))"
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)], seen


def test_images_in_other_formats_ultralytics_trains_on_are_listed_and_read(tmp_path):
    """AVIF, JPEG 2000 and MPO are in Ultralytics' IMG_FORMATS: a split of them must be evaluated, not skipped."""
    from ultralytics.data.utils import IMG_FORMATS

    from kdctl.evaluate.predict import load_rgb

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for suffix in (".avif", ".jp2", ".png"):
            assert suffix[1:] in IMG_FORMATS
            img = tmp_path / "images" / split / f"a{suffix[1:]}{suffix}"
            Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(img)
            (tmp_path / "labels" / split / f"{img.stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [thing]\n")
    ds = load_yolo_yaml(tmp_path / "data.yaml")
    assert sorted(p.suffix for p in ds.val_images) == [".avif", ".jp2", ".png"]
    assert all(load_rgb(p).shape == (48, 64, 3) for p in ds.val_images)
    assert all(len(g.boxes) == 1 for g in ground_truth(ds.val_images))


def test_images_of_more_than_8_bits_are_read_as_ultralytics_reads_them_or_refused(tmp_path):
    """16-bit grey (thermal, depth): OpenCV, which Ultralytics trains and validates with, keeps the high byte, where
    Pillow's convert('RGB') clipped it at 255, so kdctl scored a model on white images. Float and 32-bit integer
    TIFFs: Pillow reads them, OpenCV cannot, so training stopped at 'Image Not Found' after the check passed."""
    import cv2
    from ultralytics.utils.patches import imread

    from kdctl.data.validate import check_image
    from kdctl.evaluate.predict import load_rgb

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (40, 52), dtype=np.uint16)
    for name in ("g16.png", "g16.tif"):
        cv2.imwrite(str(tmp_path / name), grey)
        assert Image.open(tmp_path / name).mode == "I;16" and check_image(tmp_path / name) is None
        ours, theirs = load_rgb(tmp_path / name), imread(str(tmp_path / name))[..., ::-1]
        assert ours.shape == theirs.shape == (40, 52, 3) and (ours == theirs).all()
        assert (ours[..., 0] == grey >> 8).all()
    cv2.imwrite(str(tmp_path / "rgb16.png"), rng.integers(0, 65536, (40, 52, 3), dtype=np.uint16))
    assert (load_rgb(tmp_path / "rgb16.png") == imread(str(tmp_path / "rgb16.png"))[..., ::-1]).all()
    Image.fromarray(grey.astype(np.float32) / 65535).save(tmp_path / "f32.tif")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32.tif")
    for name, mode in (("f32.tif", "F"), ("i32.tif", "I")):
        assert imread(str(tmp_path / name)) is None
        assert check_image(tmp_path / name) == (f"Pillow reads its {mode} pixels but OpenCV, which Ultralytics trains "
                                                "with, cannot (save it with 8 or 16 bits per channel)")
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for name in ("g16.png", "f32.tif"):
            (tmp_path / "images" / split / name).write_bytes((tmp_path / name).read_bytes())
            (tmp_path / "labels" / split / f"{Path(name).stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [thing]\n")
    with pytest.raises(DataError, match=r"images/train/f32.tif: Pillow reads its F pixels but OpenCV"):
        load_yolo_yaml(tmp_path / "data.yaml")
    ds = load_yolo_yaml(tmp_path / "data.yaml", skip_invalid=True)
    assert [p.name for p in ds.val_images] == ["g16.png"] and "f32.tif: Pillow reads its F" in ds.skipped["val"][0]


def test_model_names_in_another_order_are_refused():
    """Only a reordering of the dataset's own names is refused (it is certainly the wrong class map); other words
    and a YAML-built model's placeholders ('0', '1', ...) are not judged."""
    from kdctl.data.resolve import Dataset
    from kdctl.errors import DataError

    ds = Dataset(Path("d/data.yaml"), ["cat", "dog", "bird"], [], [])
    ds.check_model_names({0: "cat", 1: "dog", 2: "bird"}, "m")
    ds.check_model_names({0: "Cat ", 1: "DOG", 2: "bird"}, "m")  # case and spaces are not an order
    ds.check_model_names({0: "feline", 1: "canine", 2: "avian"}, "m")
    ds.check_model_names(None, "m")
    with pytest.raises(DataError, match=r"d/data.yaml: names: m has this dataset's classes in another order \(class 1 "
                                        r"is 'bird' there, 'dog' here\).*order is cat, bird, dog"):
        ds.check_model_names({0: "cat", 1: "bird", 2: "dog"}, "m")
    with pytest.raises(DataError, match="another order"):
        ds.check_model_names(["Dog", "cat", "bird"], "m")
    digits = Dataset(Path("d/data.yaml"), ["2", "1", "0"], [], [])
    digits.check_model_names({0: "0", 1: "1", 2: "2"}, "m")  # what Ultralytics names a model built from a YAML
    with pytest.raises(DataError, match="3 classes but m predicts 2"):
        ds.check_model_classes(2, "m")


def _ultralytics_sees(data_yaml: Path) -> dict:
    """What Ultralytics' own dataset reads from a data YAML: split -> (image files, object count)."""
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    out = {}
    for split in ("train", "val"):
        ds = YOLODataset(img_path=data[split], imgsz=64, data=data, augment=False, cache=False)
        out[split] = (sorted(lab["im_file"] for lab in ds.labels), sum(len(lab["cls"]) for lab in ds.labels))
    return out


def test_image_lists_with_relative_lines_train_on_the_images_kdctl_checked(tmp_path, tiny_data, monkeypatch):
    """A .txt list's relative lines (no './') are found beside it; Ultralytics looked for them in the working
    directory, so a list kdctl had checked trained on nothing ('No valid images found'). The trainer now gets absolute
    lists. A byte-order mark is allowed (Ultralytics reads lists as utf-8-sig); a line only the working directory
    holds is found there, as Ultralytics finds it."""
    import shutil

    from kdctl.data.resolve import label_path, normalised_yaml
    from kdctl.data.validate import parse_labels

    root = tmp_path / "set"
    shutil.copytree(tiny_data.parent / "images", root / "images")
    shutil.copytree(tiny_data.parent / "labels", root / "labels")
    tr = sorted(p.name for p in (root / "images" / "train").iterdir())
    va = sorted(p.name for p in (root / "images" / "val").iterdir())
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("\ufeff" + "".join(f"../images/train/{n}\n" for n in tr[:20]))
    (root / "lists" / "val.txt").write_text("".join(f"./../images/val/{n}\n" for n in va[:6]) +
                                            f"images/val/{va[6]}\n")  # this one relative to the working directory
    (root / "data.yaml").write_text("path: .\ntrain: lists/train.txt\nval: lists/val.txt\nnames: [a, b, c]\n")
    monkeypatch.chdir(root)
    ds = load_yolo_yaml(root / "data.yaml")
    assert [p.name for p in ds.train_images] == tr[:20] and [p.name for p in ds.val_images] == va[:7]
    work = tmp_path / "work"
    work.mkdir()
    y = normalised_yaml(ds, work / "data.yaml")
    monkeypatch.chdir(tmp_path)  # the trainer runs elsewhere
    seen = _ultralytics_sees(y)
    assert [Path(f).name for f in seen["train"][0]] == tr[:20] and [Path(f).name for f in seen["val"][0]] == va[:7]
    assert seen["train"][1] == sum(len(parse_labels(label_path(p))) for p in ds.train_images) > 0
    # the bundle's record keeps the dataset's own form (no paths into a work folder)
    kept = yaml.safe_load(normalised_yaml(ds, work / "record.yaml", image_lists=False).read_text())
    assert kept["train"] == "lists/train.txt"
    (root / "lists" / "val.txt").write_text("../images/val/gone.png\nelsewhere/gone.png\n")
    with pytest.raises(DataError,
                       match=r"val: none of its 2 listed images exists \(first: .*/set/images/val/gone.png\)"):
        load_yolo_yaml(root / "data.yaml")


def test_hidden_files_in_image_folders_are_not_images(tmp_path, tiny_data):
    """macOS's '._x.jpg' resource forks and '.ipynb_checkpoints/' copies: Ultralytics' glob never sees them; kdctl
    stopped on them ('cannot be decoded') or counted a checkpoint copy twice."""
    import shutil

    root = tmp_path / "d"
    for folder in ("images", "labels"):
        shutil.copytree(tiny_data.parent / folder, root / folder)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    train = root / "images" / "train"
    first = sorted(train.iterdir())[0]
    (train / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (train / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, train / ".ipynb_checkpoints" / first.name)
    ds = load_yolo_yaml(root / "data.yaml")
    assert len(ds.train_images) == 24 and not any(part.startswith(".") for p in ds.train_images
                                                  for part in p.relative_to(train).parts)


def test_a_split_folder_reached_through_a_link_trains_on_its_labels(tmp_path, tiny_data):
    """images/train a link to the images' real place (shared storage): Ultralytics resolves the split and looked for
    labels beside the link's target ('No labels found'), after `kdctl data check` had passed. The trainer now gets the
    images as kdctl found them, their labels beside the link; labels beside the target only are read there."""
    import shutil

    from kdctl.data.resolve import normalised_yaml

    root = tmp_path / "d"
    shutil.copytree(tiny_data.parent / "labels", root / "labels")
    (root / "images").mkdir()
    shutil.copytree(tiny_data.parent / "images" / "val", root / "images" / "val")
    store = tmp_path / "store" / "train"
    shutil.copytree(tiny_data.parent / "images" / "train", store)
    (root / "images" / "train").symlink_to(store)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    ds = load_yolo_yaml(root / "data.yaml")
    work = tmp_path / "work"
    work.mkdir()
    seen = _ultralytics_sees(normalised_yaml(ds, work / "data.yaml"))
    objects = sum(len(p.read_text().splitlines()) for p in (root / "labels" / "train").glob("*.txt"))
    assert len(seen["train"][0]) == 24 and seen["train"][1] == objects > 0
    plain = yaml.safe_load(normalised_yaml(ds, work / "kept.yaml", image_lists=False).read_text())
    assert plain["train"] == "images/train"  # the bundle's record keeps the YAML's own split
    # labels beside the link's target only (where Ultralytics reads them): kdctl reads them there too, where it
    # refused the split ("none of its images has a label file")
    shutil.move(root / "labels" / "train", store.parent / "labels" / "train")
    (store.parent / "images").mkdir()
    shutil.move(store, store.parent / "images" / "train")
    (root / "images" / "train").unlink()
    (root / "images" / "train").symlink_to(store.parent / "images" / "train")
    ds = load_yolo_yaml(root / "data.yaml")
    assert all(p.is_relative_to(store.parent / "images" / "train") for p in ds.train_images)
    seen = _ultralytics_sees(normalised_yaml(ds, work / "data2.yaml"))
    assert len(seen["train"][0]) == 24 and seen["train"][1] == objects


def test_coco_set_with_skipped_images_trains_on_its_converted_labels(tmp_path):
    """With images left out, the trainer gets lists of the kept images: they once named the user's original files
    (the converted layout's links followed), beside which Ultralytics found no labels and trained on background."""
    from kdctl.data.resolve import normalised_yaml

    spec = make_coco(tmp_path)
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["annotations"].append({"id": 9, "image_id": 2, "category_id": 3, "bbox": [500, 5, 10, 10]})  # outside
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    ds = coco_dataset(**{**spec, "train_annotations": str(bad)}, skip_invalid=True)
    assert len(ds.train_images) == 2 and len(ds.skipped["train"]) == 1
    work = tmp_path / "work"
    work.mkdir()
    seen = _ultralytics_sees(normalised_yaml(ds, work / "data.yaml"))
    assert all(str(ds.yaml.parent) in f for f in seen["train"][0] + seen["val"][0])  # the converted layout
    assert seen["train"][1] == 2 and seen["val"][1] == 2   # a.jpg: the dog (crowd left out), c.jpg: the cat


def test_roboflow_layout_and_ultralytics_path_lookups_are_read_as_ultralytics_reads_them(tmp_path, tiny_data,
                                                                                         monkeypatch):
    """Roboflow's export: no 'path', 'train: ../train/images' beside train/ (Ultralytics drops the '../' when that is
    not there), its YOLOv5-era 'validation' key; and a relative 'path' found only under Ultralytics' datasets_dir.
    kdctl refused the first as 'neither an image directory nor a .txt image list', and the last as not found."""
    import shutil

    import ultralytics.utils

    from kdctl.data.resolve import normalised_yaml

    rf = tmp_path / "rf"
    for split, src in (("train", "train"), ("valid", "val")):
        shutil.copytree(tiny_data.parent / "images" / src, rf / split / "images")
        shutil.copytree(tiny_data.parent / "labels" / src, rf / split / "labels")
    (rf / "data.yaml").write_text("train: ../train/images\nvalidation: ../valid/images\n"
                                  "nc: 3\nnames: ['a', 'b', 'c']\n")
    ds = load_yolo_yaml(rf / "data.yaml")
    assert len(ds.train_images) == 24 and len(ds.val_images) == 8
    assert all(p.is_relative_to(rf / "train" / "images") for p in ds.train_images)
    monkeypatch.chdir(tmp_path)
    seen = _ultralytics_sees(normalised_yaml(ds, tmp_path / "norm.yaml"))
    assert seen["train"][0] == sorted(str(p) for p in ds.train_images)
    assert seen["val"][0] == sorted(str(p) for p in ds.val_images)
    # a '../' that is there is kept: the split beside the dataset folder
    (rf / "data.yaml").write_text("path: sub\ntrain: ../train/images\nval: ../valid/images\nnames: [a, b, c]\n")
    (rf / "sub").mkdir()
    assert load_yolo_yaml(rf / "data.yaml").train_images[0].parent.resolve() == (rf / "train" / "images").resolve()
    # a relative path neither beside the YAML nor in the working directory: Ultralytics' datasets_dir
    store = tmp_path / "store"
    shutil.copytree(tiny_data.parent, store / "tiny")
    elsewhere = tmp_path / "yamls"
    elsewhere.mkdir()
    (elsewhere / "tiny.yaml").write_text("path: tiny\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    monkeypatch.setattr(ultralytics.utils, "DATASETS_DIR", store)
    ds = load_yolo_yaml(elsewhere / "tiny.yaml")
    assert len(ds.train_images) == 24 and ds.val_images[0].is_relative_to(store / "tiny")
    assert yaml.safe_load(normalised_yaml(ds, tmp_path / "n2.yaml").read_text())["path"] == str(store / "tiny")
    monkeypatch.setattr(ultralytics.utils, "DATASETS_DIR", tmp_path / "empty")
    with pytest.raises(DataError, match=f"field 'path': directory '{elsewhere / 'tiny'}' not found"):
        load_yolo_yaml(elsewhere / "tiny.yaml")


def test_an_ultralytics_dataset_by_name_is_read_where_its_images_are_and_never_downloaded(tmp_path, tiny_data,
                                                                                          monkeypatch):
    """``data: coco8.yaml`` as Ultralytics users write it: the YAML Ultralytics ships, its images found in its
    datasets_dir (or the working directory), as ``yolo train data=coco8.yaml`` finds them; where they are not there
    one line says where Ultralytics would download them and that kdctl does not. A file of that name here wins."""
    import shutil

    import ultralytics

    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(ultralytics.utils, "DATASETS_DIR", store)
    with pytest.raises(DataError) as e:
        load_yolo_yaml("coco8.yaml")
    assert str(e.value) == (f"coco8.yaml: dataset YAML not found here; Ultralytics ships one by that name and "
                            f"downloads its images into {store / 'coco8'} on first use, but kdctl downloads no data: "
                            "put the dataset there, or give the path of a dataset YAML on this machine")
    with pytest.raises(DataError, match="^nosuch.yaml: dataset YAML not found$"):
        load_yolo_yaml("nosuch.yaml")
    shutil.copytree(tiny_data.parent, store / "coco8")
    ds = load_yolo_yaml("coco8.yaml")
    assert ds.nc == 80 and ds.names[:3] == ["person", "bicycle", "car"]
    assert len(ds.train_images) == 24 and all(p.is_relative_to(store / "coco8") for p in ds.val_images)
    shutil.copy(tiny_data, work / "coco8.yaml")  # the user's own file of that name
    assert load_yolo_yaml("coco8.yaml").nc == 3


def test_pose_rows_of_a_dataset_with_kpt_shape_are_refused_not_read_as_polygons(tmp_path, tiny_data):
    """A pose dataset (kpt_shape) trained as a detector: Ultralytics keeps each row's box. With 2-D keypoints the row
    has an odd length, which kdctl read as a polygon: a box around the keypoints and the box numbers together."""
    import shutil

    from ultralytics.data.utils import verify_image_label

    root = tmp_path / "pose"
    for folder in ("images", "labels"):
        shutil.copytree(tiny_data.parent / folder, root / folder)
    label = sorted((root / "labels" / "val").iterdir())[0]
    row = "0 0.5 0.5 0.2 0.2 0.45 0.45 0.55 0.45 0.9 0.9"  # box, then three (x, y) keypoints
    label.write_text(row + "\n")
    image = next((root / "images" / "val").glob(label.stem + ".*"))
    theirs = verify_image_label((str(image), str(label), "", False, 3, 3, 2, False))
    np.testing.assert_allclose(theirs[1], [[0, 0.5, 0.5, 0.2, 0.2]], rtol=1e-6)  # Ultralytics: the box
    data = "path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n"
    (root / "data.yaml").write_text(data + "kpt_shape: [3, 2]\n")
    with pytest.raises(DataError, match=rf"{label.name}:1: has 11 columns: a box with keypoints \(the dataset's "
                                        "kpt_shape\\); kdctl reads detection labels: keep each row's first 5 columns"):
        load_yolo_yaml(root / "data.yaml")
    assert load_yolo_yaml(root / "data.yaml", skip_invalid=True).skipped["val"][0].startswith(str(label))
    label.write_text("0 0.5 0.5 0.2 0.2\n")  # box rows in a dataset that names keypoints: read as boxes
    assert len(load_yolo_yaml(root / "data.yaml").val_images) == 8
    (root / "data.yaml").write_text(data + "kpt_shape: [3, 4]\n")
    with pytest.raises(DataError, match=r"field 'kpt_shape': expected \[keypoints, 2 or 3\], got \[3, 4\]"):
        load_yolo_yaml(root / "data.yaml")



def test_data_check_reads_each_label_file_once(tiny_data, monkeypatch):
    """The reader validates every label file and keeps the counts per class; ``data check`` reports those, where it
    parsed every label file a second time to count (a COCO-sized set: 118k files twice)."""
    import kdctl.data.validate as validate
    from kdctl.data.check import check_dataset

    parsed = []
    real = validate.parse_labels
    monkeypatch.setattr(validate, "parse_labels", lambda path, *a, **k: parsed.append(path) or real(path, *a, **k))
    r = check_dataset(tiny_data)
    assert len(parsed) == len(set(parsed)) == r["splits"]["train"]["images"] + r["splits"]["val"]["images"]

def test_data_check_lists_every_problem_and_counts_per_class(tmp_path, tiny_data):
    """``kdctl data check``: exit 0 and the counts on a clean set; on a broken copy every invalid image and label line
    (training stops at the first), the counts of what is left, a class without objects; exit 2 for an unusable
    path; a recipe's data section is checked the same way."""
    import shutil

    def counts(root: Path, split: str) -> tuple[int, list[int], int]:
        rows = [np.loadtxt(f, ndmin=2) for f in sorted((root / "labels" / split).glob("*.txt"))]
        per = [sum(int((r[:, 0] == c).sum()) for r in rows if r.size) for c in range(3)]
        return len(rows), per, sum(1 for r in rows if not r.size)

    run = CliRunner()
    res = run.invoke(app, ["data", "check", str(tiny_data), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    root = tiny_data.parent
    for split in ("train", "val"):
        n, per, background = counts(root, split)
        s = r["splits"][split]
        assert (s["images"], s["usable"], s["skipped"]) == (n, n, 0)
        assert list(s["per_class"].values()) == per and s["objects"] == sum(per)
        assert s["background_images"] == background
    assert r["ok"] is True and r["problems"] == {}

    bad = tmp_path / "bad"
    shutil.copytree(root / "images", bad / "images")
    shutil.copytree(root / "labels", bad / "labels")
    (bad / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    imgs = sorted((bad / "images" / "train").glob("*.*"))
    imgs[0].write_bytes(b"not an image")
    (bad / "labels" / "train" / f"{imgs[1].stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    for f in (bad / "labels" / "val").glob("*.txt"):  # no 'c' left in val
        keep = [line for line in f.read_text().splitlines() if line and not line.startswith("2 ")]
        f.write_text("".join(f"{line}\n" for line in keep))
    res = run.invoke(app, ["data", "check", str(bad / "data.yaml"), "--json"])
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["ok"] is False and len(r["problems"]["train"]) == 2 and "val" not in r["problems"]
    assert r["problems"]["train"][0].startswith(f"{imgs[0]}: cannot be decoded as an image")
    assert r["problems"]["train"][1].startswith(f"{bad / 'labels' / 'train' / imgs[1].stem}.txt:2: class id 7")
    n, _, _ = counts(root, "train")
    assert (r["splits"]["train"]["images"], r["splits"]["train"]["usable"]) == (n, n - 2)
    assert r["splits"]["val"]["classes_without_objects"] == ["c"] and r["splits"]["val"]["per_class"]["c"] == 0
    plain = run.invoke(app, ["data", "check", str(bad / "data.yaml")])
    assert plain.exit_code == 1 and "train: 2 invalid image(s):" in plain.output and "val: no objects of c" in \
        plain.output

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstudent: {model: yolov8-tiny.yaml}\n"
                      "data: {synthetic: {train: 8, val: 4, imgsz: 64, classes: 2, seed: 0, scene: clear}}\n")
    res = run.invoke(app, ["data", "check", str(recipe), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["splits"]["train"]["images"] == 8, res.output
    # a recipe naming its dataset in the short form, one whose fields come from a base: recipes too (they were read
    # as dataset YAMLs: "field 'train' is missing")
    (tmp_path / "short.yaml").write_text(f"name: s\nstudent: yolov8-tiny.yaml\ndata: {tiny_data}\n")
    (tmp_path / "derived.yaml").write_text("base: short.yaml\nname: d\n")
    want = json.loads(run.invoke(app, ["data", "check", str(tiny_data), "--json"]).stdout)["splits"]
    for r in ("short.yaml", "derived.yaml"):
        res = run.invoke(app, ["data", "check", str(tmp_path / r), "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["splits"] == want, (r, res.output)
    res = run.invoke(app, ["data", "check", str(tmp_path)])
    assert res.exit_code == 2 and f"{tmp_path}: is a directory; give its data.yaml" in res.output
    # a COCO annotation file where a dataset YAML is asked for (it read as a YAML without 'train': "field 'train'
    # is missing")
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    res = run.invoke(app, ["data", "check", str(ann)])  # as eval's and export's --data read it
    assert res.exit_code == 2 and f"{ann}: a COCO annotation file, not a dataset YAML; a recipe names a COCO " \
        "dataset as data.coco: train_images" in " ".join(res.output.split()), res.output
    # a recipe as --data: "field 'train': expected a path or a list of paths"
    with pytest.raises(DataError, match=re.escape(f"{recipe}: a kdctl recipe, not a dataset YAML; give it to kdctl "
                                                  "train or distill; its dataset is the YAML its data: names")):
        load_yolo_yaml(recipe)


def test_cache_folder_follows_kdctl_cache_then_xdg_and_an_empty_variable_is_unset(tmp_path, monkeypatch):
    """An empty KDCTL_CACHE meant the working directory: a `synthetic/` folder appeared wherever kdctl ran."""
    from pathlib import Path

    from kdctl.data.resolve import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KDCTL_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("KDCTL_CACHE", "")
    assert cache_dir() == tmp_path / "xdg" / "kdctl"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "kdctl"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the XDG specification says
    assert cache_dir() == tmp_path / "home" / ".cache" / "kdctl"
    monkeypatch.delenv("KDCTL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path(tmp_path / "home" / ".cache" / "kdctl")


def test_a_name_two_classes_share_keeps_both_classes_apart(tmp_path, tiny_data, trained_bundle):
    """Ultralytics trains a dataset whose names repeat (a COCO export with two categories of one name); kdctl refused
    it. Per-class results now key such classes by name and id, so neither overwrites the other: ``data check``'s
    counts and ``eval``'s AP are the same numbers, class by class, as under distinct names."""
    from kdctl.bundle import load_bundle

    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"path": str(tiny_data.parent), "train": "images/train", "val": "images/val",
                                     "names": ["car", "bus", "car"]}))
    run = CliRunner()
    checks = []
    for data in (tiny_data, twice):
        res = run.invoke(app, ["data", "check", str(data), "--json"])
        assert res.exit_code == 0, res.output
        checks.append(json.loads(res.stdout)["splits"]["train"]["per_class"])
    assert list(checks[1]) == ["car (class 0)", "bus", "car (class 2)"]
    assert list(checks[1].values()) == list(checks[0].values()) and sum(checks[0].values()) > 0
    plain = run.invoke(app, ["data", "check", str(twice)])
    assert plain.exit_code == 0 and "2 car" in plain.output, plain.output
    aps = []
    for i, data in enumerate((tiny_data, twice)):
        res = run.invoke(app, ["eval", str(trained_bundle), "--data", str(data), "--out", str(tmp_path / f"ev{i}")])
        assert res.exit_code == 0, res.output
        aps.append(load_bundle(tmp_path / f"ev{i}", verify=True).metrics["per_class_ap50_95"])
    assert list(aps[1]) == ["car (class 0)", "bus", "car (class 2)"]
    assert list(aps[1].values()) == list(aps[0].values())
    spec = make_coco(tmp_path)  # a COCO set whose two categories share a name converts and loads too
    coco = json.loads(Path(spec["train_annotations"]).read_text())
    coco["categories"] = [{"id": 3, "name": "pet"}, {"id": 9, "name": "pet"}]
    Path(spec["train_annotations"]).write_text(json.dumps(coco))
    assert coco_dataset(**spec).names == ["pet", "pet"]


@pytest.mark.parametrize("nc, says", [
    (1, "class id 1 is out of range (the dataset has 1 class: 0)"),
    (3, "class id 3 is out of range (the dataset has 3 classes: 0..2)"),
    (None, "class id -1 is out of range (class ids are whole numbers from 0)"),
])
def test_a_class_id_out_of_range_says_which_ids_are_in_it(tmp_path, nc, says):
    """'dataset has 1 classes: 0..0', and 'dataset has None classes' where labels were read without the names."""
    from kdctl.data.validate import LabelError, parse_labels

    f = tmp_path / "a.txt"
    f.write_text(f"0 0.5 0.5 0.2 0.2\n{-1 if nc is None else nc} 0.5 0.5 0.2 0.2\n")
    with pytest.raises(LabelError) as e:
        parse_labels(f, nc)
    assert str(e.value).endswith(says), str(e.value)


def test_data_check_names_the_class_names_yaml_reads_as_booleans_or_null(tmp_path, tiny_data):
    """`names: [yes, no, off]` (a mask/helmet/switch set): YAML 1.1, which PyYAML and Ultralytics read, makes them
    True and False, so two classes share the name 'False'. kdctl reads them as Ultralytics does (a checkpoint
    trained there is named so) and `data check` says which classes, and to quote the words."""
    y = tmp_path / "d.yaml"
    y.write_text(f"path: {tiny_data.parent}\ntrain: images/train\nval: images/val\nnames: [yes, 'no', ~]\n")
    res = CliRunner().invoke(app, ["data", "check", str(y), "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == 0 and d["names"] == ["True", "no", "None"], res.output
    assert d["notes"] == [
        f"{y}: field 'names': class 0 is named 'True': the YAML gives it as a boolean (a bare yes/no/on/off/true/false: "
        "YAML 1.1, as PyYAML and Ultralytics read it); quote the word to name the class by it",
        f"{y}: field 'names': class 2 is named 'None': the YAML gives it no value (empty, or ~)"]
    res = CliRunner().invoke(app, ["data", "check", str(y)], env={"COLUMNS": "300"})
    assert "class 0 is named 'True'" in res.output and "class 2 is named 'None'" in res.output
    assert json.loads(CliRunner().invoke(app, ["data", "check", str(tiny_data), "--json"]).stdout)["notes"] == []


def test_data_check_names_boxes_of_zero_size(tmp_path, tiny_data):
    """A zero-width or zero-height box is a valid line (Ultralytics keeps it) that no detection can overlap: scored,
    each is a miss; in training augmentation drops it. `data check` passed it in silence; it now counts them per split
    and names the first file, and the check still passes."""
    import shutil

    root = tmp_path / "z"
    for folder in ("images", "labels"):
        shutil.copytree(tiny_data.parent / folder, root / folder)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    val = sorted((root / "labels" / "val").glob("*.txt"))
    for f, line in ((val[1], "1 0.5 0.5 0 0.2\n"), (val[1], "2 0.3 0.3 0.1 0\n"), (val[3], "0 0.2 0.2 0 0\n")):
        f.write_text(f.read_text() + line)
    res = CliRunner().invoke(app, ["data", "check", str(root / "data.yaml"), "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == 0 and d["ok"], res.output
    assert (d["splits"]["train"]["zero_size_boxes"], d["splits"]["val"]["zero_size_boxes"]) == (0, 3)
    assert d["notes"] == [f"val: 3 boxes of zero width or height (first: {val[1]}); each is a miss no detection can "
                          "match in mAP: give the object its extent or remove the line"]


def test_a_yaml_whose_download_script_fetches_the_data_says_kdctl_does_not(tmp_path):
    """A dataset YAML with Ultralytics' `download:` (a URL or a script it runs on first use), its images not there
    yet: the missing folder is named, and that kdctl does not run the download, with where to put the dataset."""
    y = tmp_path / "d.yaml"
    y.write_text("path: mine\ntrain: images/train\nval: images/val\nnames: [a]\ndownload: https://example.com/m.zip\n")
    with pytest.raises(DataError) as e:
        load_yolo_yaml(y)
    assert str(e.value) == (f"{y}: field 'path': directory '{tmp_path / 'mine'}' not found; the YAML's download: "
                            f"fetches it in Ultralytics, but kdctl downloads no data: put the dataset in "
                            f"{tmp_path / 'mine'} first")
    (tmp_path / "mine").mkdir()  # the folder made, its images not in it
    with pytest.raises(DataError, match=r"train: '.*images/train' is neither an image directory nor a \.txt image "
                                        r"list; the YAML's download: fetches it in Ultralytics, but kdctl downloads"):
        load_yolo_yaml(y)
    y.write_text(y.read_text().replace("download: https://example.com/m.zip\n", ""))
    with pytest.raises(DataError) as e:
        load_yolo_yaml(y)
    assert "downloads no data" not in str(e.value)
