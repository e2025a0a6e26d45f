"""Teacher-output cache: the stored top-k form against hand-computed values, cached head losses equal to online ones,
deterministic augmentation views, the epoch sampler, and end to end (build, distill without the teacher, stale caches
and views that do not replay refused in one line, a killed build resumed, DDP replay)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at
from kdctl.cli.main import app
from kdctl.distill.cache import (EpochSampler, ReplayViews, TeacherCache, dense_rows, image_crc, top_k_rows,
                                 view_seed)
from kdctl.distill.losses.logit import LocalizationDistillation, SigmoidLogitDistillation


def test_top_k_rows_by_hand():
    """k=2 of 4 anchors: the two most confident anchors keep their logits; the others get each class's mean of the
    other anchors' logits; boxes are known (mask) only at the kept anchors."""
    scores = torch.tensor([[[0.0, 5.0, 1.0, -2.0],      # class 0
                            [3.0, -1.0, 0.5, -4.0]]])   # class 1 -> max per anchor: 3, 5, 1, -2 -> keep anchors 1, 0
    boxes = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 4)
    rows = top_k_rows(scores, boxes, 2)
    assert rows["anchors"].tolist() == [[1, 0]]
    assert rows["scores"].tolist() == [[[5.0, -1.0], [0.0, 3.0]]]
    assert torch.allclose(rows["rest"], torch.tensor([[(1.0 - 2.0) / 2, (0.5 - 4.0) / 2]]))
    d = dense_rows({k: v.numpy() for k, v in rows.items()}, 4)
    assert d["scores"].tolist() == [[[0.0, 5.0, -0.5, -0.5], [3.0, -1.0, -1.75, -1.75]]]
    assert d["boxes"].tolist() == [[[0.0, 1.0, 0.0, 0.0], [4.0, 5.0, 0.0, 0.0]]]
    assert d["mask"].tolist() == [[True, True, False, False]]


def _head(b=3, nc=4, a=30, reg=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"scores": torch.randn(b, nc, a, generator=g) * 3, "boxes": torch.randn(b, 4 * reg, a, generator=g) * 2}


@pytest.mark.parametrize("loss", [SigmoidLogitDistillation(temperature=3.0), SigmoidLogitDistillation(2.0, True),
                                  LocalizationDistillation(temperature=5.0), LocalizationDistillation(4.0, False)])
def test_cached_head_losses_equal_online_when_k_covers_the_anchors(loss):
    """top_k >= anchors: the rebuilt teacher is the teacher (exact in float32, within float16 rounding as stored)."""
    s, t = _head(seed=1), _head(seed=2)
    rows = top_k_rows(t["scores"], t["boxes"], 64)
    exact = dense_rows({k: v.numpy() for k, v in rows.items()}, 30)
    assert torch.equal(exact["scores"], t["scores"]) and torch.equal(exact["boxes"], t["boxes"])
    online = loss(s, t)
    assert torch.allclose(loss(s, exact), online, rtol=1e-6)
    half = dense_rows({k: (v.numpy().astype(np.float16) if v.dtype.is_floating_point else v.numpy())
                       for k, v in rows.items()}, 30)
    assert torch.allclose(loss(s, half), online, rtol=2e-3)


def test_ld_with_a_mask_is_ld_over_the_kept_anchors():
    """LD on a cache's rebuilt teacher = LD on the stored anchors only (mean, and confidence-weighted)."""
    s, t = _head(b=2, a=12, seed=3), _head(b=2, a=12, seed=4)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 4, 7]] = True
    mask[1, [0, 2]] = True
    for conf in (False, True):
        ld = LocalizationDistillation(temperature=3.0, conf_weight=conf)
        got = ld(s, {**t, "mask": mask})
        # by hand: per-anchor KL over bins, mean over sides, weighted over the kept anchors
        T = 3.0
        ls = torch.log_softmax(s["boxes"].view(2, 4, 16, 12) / T, 2)
        lt = torch.log_softmax(t["boxes"].view(2, 4, 16, 12) / T, 2)
        kl = (lt.exp() * (lt - ls)).mean(2).mean(1)
        w = (t["scores"].sigmoid().amax(1) if conf else torch.ones(2, 12)) * mask
        assert torch.allclose(got, (kl * w).sum() / w.sum() * T * T, rtol=1e-6)


def test_epoch_sampler_encodes_views_and_splits_ranks():
    one = EpochSampler(10, seed=5)
    one.set_epoch(3)
    ids = list(one)
    assert sorted(i - 30 for i in ids) == list(range(10))  # epoch 3: every image once, as view 3*10 + i
    one.set_epoch(4)
    assert [i - 40 for i in one] != [i - 30 for i in ids]  # another order each epoch
    r0, r1 = EpochSampler(10, 5, 0, 2), EpochSampler(10, 5, 1, 2)
    for r in (r0, r1):
        r.set_epoch(3)
    assert len(r0) == len(r1) == 5 and sorted(list(r0) + list(r1)) == sorted(ids)


@pytest.fixture(scope="module")
def yolo_dataset(tiny_data):
    """Ultralytics' own training dataset with every augmentation on (mosaic, mixup, HSV, flips, perspective)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    args = get_cfg(overrides={"imgsz": 64, "mosaic": 1.0, "mixup": 0.5, "degrees": 10.0, "data": str(tiny_data)})
    data = check_det_dataset(str(tiny_data))
    return build_yolo_dataset(args, data["train"], 4, data, mode="train", rect=False, stride=32)


def test_views_replay_whatever_was_loaded_before(yolo_dataset):
    views = ReplayViews(yolo_dataset, seed=7)
    n = len(views)
    first = views[2 * n + 5]["img"].clone()
    for v in (0, 3, n + 1, 2 * n + 9):  # other views in between (they fill mosaic's buffer and move the RNGs)
        views[v]
    again = views[2 * n + 5]
    assert torch.equal(first, again["img"]) and again["kd_crc"] == image_crc(first)
    assert not torch.equal(first, views[3 * n + 5]["img"])  # another epoch: another view of the same image
    state = np.random.get_state()[1].copy()
    views[1]
    assert (np.random.get_state()[1] == state).all()  # the caller's generators are left where they were
    assert view_seed(7, 2, 5) != view_seed(7, 5, 2)


def _recipe(tmp_path, data, teacher, *, cache="{path: cache, top_k: 64}", epochs=2, mosaic=1.0, losses=None,
            name="kdc", stop_epoch=None):
    losses = losses or "[{name: kd_logit, params: {temperature: 2.0}}, {name: ld, params: {temperature: 5.0}}]"
    stop = f", stop_epoch: {stop_epoch}" if stop_epoch else ""
    r = tmp_path / f"{name}.yaml"
    r.write_text(f"name: {name}\nstudent: {{model: yolov8-tiny.yaml}}\nteacher: {{model: '{teacher}'}}\n"
                 f"data: {{yolo: {data}}}\ntrain: {{epochs: {epochs}, imgsz: 64, batch: 8, workers: 0, "
                 f"mosaic: {mosaic}}}\ndistill: {{cache: {cache}, losses: {losses}{stop}}}\n")
    return r


def test_build_then_distill_replays_without_running_the_teacher(tmp_path, tiny_data, trained_bundle, monkeypatch):
    run = CliRunner()
    r = _recipe(tmp_path, tiny_data, trained_bundle)
    res = run.invoke(app, ["cache", "build", str(r), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    # 24 images x 2 epochs; 64 px -> 84 anchors, 64 kept; 3 classes + 64 DFL logits in float16 per anchor
    assert info["complete"] and info["views_per_epoch"] == 24 and info["epochs"] == 2 and info["k"] == 64
    assert 64 * (3 + 64) * 2 < info["bytes_per_view"] < 64 * (3 + 64) * 2 + 1200

    import kdctl.detectors.yolo as y

    calls = []
    real = y.teacher_forward
    monkeypatch.setattr(y, "teacher_forward", lambda m, x: calls.append(float(x.abs().sum())) or real(m, x))
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--json"])
    assert res.exit_code == 0, res.output
    assert [c for c in calls if c > 0] == []  # the teacher never saw a training image (its blank probe aside)
    from kdctl.bundle import load_bundle

    b = load_bundle(tmp_path / "kd", verify=True)
    assert b.metrics["teacher_cache"]["views_per_epoch"] == 24
    assert b.metrics["teacher_cache"]["teacher_sha256"] == info["teacher_sha256"]
    for e in b.metrics["epochs"]:
        assert e["train/kd_logit"] > 0 and e["train/kd_ld"] > 0

    # cached + feature loss: the teacher runs online for the feature term only
    calls.clear()
    r2 = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1, name="mixed", cache="{path: cache2}",
                 losses="[{name: kd_logit}, {name: cwd, params: {tau: 2.0}}]")
    res = run.invoke(app, ["distill", str(r2), "--out", str(tmp_path / "mixed"), "--json"])
    assert res.exit_code == 0, res.output
    assert [c for c in calls if c > 0]  # built the cache, then ran online for cwd


def test_cached_crosskd_runs_the_teachers_head_only(tmp_path, tiny_data, trained_bundle, monkeypatch):
    """CrossKD from a cache: the teacher's outputs come from disk, its head alone runs on the student's maps."""
    run = CliRunner()
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1, losses="[{name: crosskd}]")
    assert run.invoke(app, ["cache", "build", str(r)]).exit_code == 0
    import kdctl.detectors.yolo as y

    calls = []
    real = y.teacher_forward
    monkeypatch.setattr(y, "teacher_forward", lambda m, x: calls.append(float(x.abs().sum())) or real(m, x))
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--json"])
    assert res.exit_code == 0, res.output
    assert [c for c in calls if c > 0] == []
    from kdctl.bundle import load_bundle

    assert load_bundle(tmp_path / "kd", verify=True).metrics["epochs"][0]["train/kd_crosskd"] > 0


def test_a_cache_holds_only_the_epochs_that_distill(tmp_path, tiny_data, trained_bundle, monkeypatch):
    """After distill.stop_epoch the teacher is not asked, so the cache stores the epochs before it; a later run that
    distills longer gets the missing epochs added (the stored ones kept), and a cache of every epoch serves any stop."""
    run = CliRunner()
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=3, stop_epoch=1)
    res = run.invoke(app, ["cache", "build", str(r), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["complete"] and info["epochs"] == 3 and info["kd_epochs"] == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["epoch-0000", "meta.json"]

    import kdctl.detectors.yolo as y

    calls = []
    real = y.teacher_forward
    monkeypatch.setattr(y, "teacher_forward", lambda m, x: calls.append(float(x.abs().sum())) or real(m, x))
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "kd"), "--json"])
    assert res.exit_code == 0, res.output
    assert [c for c in calls if c > 0] == []  # epoch 1 from the cache, epochs 2-3 without a teacher
    from kdctl.bundle import load_bundle

    b = load_bundle(tmp_path / "kd", verify=True)
    assert b.metrics["teacher_cache"]["kd_epochs"] == 1
    assert [e["train/kd_logit"] > 0 for e in b.metrics["epochs"]] == [True, False, False]

    before = (tmp_path / "cache" / "epoch-0000" / "scores.npy").stat().st_mtime_ns
    longer = _recipe(tmp_path, tiny_data, trained_bundle, epochs=3, stop_epoch=2)
    res = run.invoke(app, ["cache", "build", str(longer), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kd_epochs"] == 2, res.output
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["epoch-0000", "epoch-0001", "meta.json"]
    assert (tmp_path / "cache" / "epoch-0000" / "scores.npy").stat().st_mtime_ns == before  # kept, not redone
    assert run.invoke(app, ["cache", "build", str(_recipe(tmp_path, tiny_data, trained_bundle, epochs=3)),
                            "-q"]).exit_code == 0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["complete"] and meta["kd_epochs"] == 3 and (tmp_path / "cache" / "epoch-0002").is_dir()
    res = run.invoke(app, ["cache", "build", str(r), "--json"])  # stop 1 again: served as it is
    assert res.exit_code == 0 and json.loads(res.stdout)["kd_epochs"] == 3
    meta.pop("kd_epochs")  # written before kdctl recorded it: it holds every epoch
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(meta))
    assert run.invoke(app, ["cache", "build", str(longer), "-q"]).exit_code == 0
    assert json.loads((tmp_path / "cache" / "meta.json").read_text()) == meta


def test_stale_caches_and_views_that_do_not_replay_are_refused(tmp_path, tiny_data, trained_bundle):
    run = CliRunner()
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1)
    assert run.invoke(app, ["cache", "build", str(r), "-q"]).exit_code == 0

    other = _recipe(tmp_path, tiny_data, "yolov8-tiny.yaml", epochs=1, name="other")  # another teacher, same path
    res = run.invoke(app, ["distill", str(other), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "is stale: built from another teacher" in res.output and "Traceback" not in res.output
    res = run.invoke(app, ["distill", str(_recipe(tmp_path, tiny_data, trained_bundle, epochs=1, mosaic=0.5,
                                                  name="m")),
                           "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "built with mosaic=1.0, the run has 0.5" in res.output
    res = run.invoke(app, ["distill", str(_recipe(tmp_path, tiny_data, trained_bundle, epochs=2, name="e")),
                           "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "built with epochs=1, the run has 2" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()

    # a shard file that is not what the build wrote (one byte of the anchor indices flipped: it failed inside a
    # loss as "internal error: index 196 is out of bounds"), or is gone: refused in one line naming the file
    shard = tmp_path / "cache" / "epoch-0000"
    good = (shard / "anchors.npy").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (shard / "anchors.npy").write_bytes(bytes(bad))
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    said = "".join(res.output.split())  # Rich wraps a long line at the terminal's width
    assert "".join(f"{shard / 'anchors.npy'}: not the file the cache build wrote (its sha256 differs from "
                   f"digest.json); rebuild the cache with `kdctl cache build {r} --overwrite`".split()) in said, \
        res.output  # the recipe being run, not a RECIPE placeholder
    # nothing left behind, and refused by cache build and cache info too, which took a complete meta.json for a
    # good cache
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.work").exists()
    for argv, named in ((["cache", "build", str(r)], str(r)), (["cache", "info", str(tmp_path / "cache")], "RECIPE")):
        res = run.invoke(app, argv)
        said = "".join(res.output.split())
        assert res.exit_code == 1 and "anchors.npy:notthefilethecachebuildwrote" in said, argv
        assert f"kdctlcachebuild{named}--overwrite" in said, res.output  # cache info has no recipe to name
    (shard / "anchors.npy").unlink()
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "anchors.npy:missingfromtheteachercache" in "".join(res.output.split()), res.output
    (shard / "anchors.npy").write_bytes(good)

    # a view whose image is not the one the cache saw (the shard itself intact, as its digest says): refused, not
    # silently distilled from another image
    crc = np.load(shard / "crc.npy")
    crc[:] += 1
    np.save(shard / "crc.npy", crc)
    digest = json.loads((shard / "digest.json").read_text())
    (shard / "digest.json").write_text(json.dumps({**digest, "crc.npy": hashlib.sha256((shard / "crc.npy")
                                                                                          .read_bytes()).hexdigest()}))
    res = run.invoke(app, ["distill", str(r), "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "did not replay" in res.output and "Traceback" not in res.output, res.output
    assert f"kdctlcachebuild{r}--overwrite" in "".join(res.output.split()), res.output

    # a record nested too deeply for Python's JSON parser (RecursionError: an internal error) is one line too
    meta = tmp_path / "cache" / "meta.json"
    kept = meta.read_text()
    meta.write_text("[" * 100_000 + "]" * 100_000)
    res = run.invoke(app, ["cache", "info", str(tmp_path / "cache")])
    assert res.exit_code == 2 and "meta.json:unreadable(notJSON)" in "".join(res.output.split()), res.output
    meta.write_text(kept)

    # --overwrite rebuilds a kdctl cache, and never deletes a folder kdctl did not write
    assert run.invoke(app, ["cache", "build", str(r), "--overwrite", "-q"]).exit_code == 0
    assert (np.load(tmp_path / "cache" / "epoch-0000" / "crc.npy") != crc).all()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = run.invoke(app, ["cache", "build", str(_recipe(tmp_path, tiny_data, trained_bundle, epochs=1,
                                                         cache="{path: mine}", name="mine")), "--overwrite"])
    assert res.exit_code == 2 and "is not a kdctl teacher cache" in res.output
    assert (mine / "notes.txt").read_text() == "keep"
    # ... nor a user's file put inside a real cache later
    (tmp_path / "cache" / "notes.txt").write_text("keep")
    res = run.invoke(app, ["cache", "build", str(r), "--overwrite"])
    assert res.exit_code == 2 and "also holds 'notes.txt', which kdctl did not write" in res.output, res.output
    assert (tmp_path / "cache" / "notes.txt").read_text() == "keep" and (tmp_path / "cache" / "meta.json").is_file()


def test_a_cache_path_that_is_a_file_is_named_as_the_field(tmp_path, tiny_data, trained_bundle):
    """It stopped with the OS's bare 'Not a directory', naming neither the recipe nor the field."""
    (tmp_path / "cache").write_text("a file")
    r = _recipe(tmp_path, tiny_data, trained_bundle)
    for cmd in (["cache", "build", str(r)], ["distill", str(r), "--out", str(tmp_path / "d")]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2 and f"kdc.yaml: distill.cache.path: {tmp_path / 'cache'} is a file" in res.output
    assert (tmp_path / "cache").read_text() == "a file" and not (tmp_path / "d").exists()


@pytest.mark.parametrize("losses,teacher,message", [
    ("[{name: cwd}]", None, "has no head-level loss"),
    ("[{name: pkd}]", "rtdetr-tiny.yaml", "has no head-level loss"),
    ("[{name: kd_logit}]", "rtdetr-tiny.yaml", "for YOLO detectors' dense heads; the teacher is not one"),
    ("[{name: crosskd, params: {align: true}}]", None,
     "distill.losses[0].params.align: 'crosskd' aligns the student's maps with the teacher's own, which a teacher "
     "cache does not keep; set align: false"),
])
def test_cache_recipe_errors_are_one_line(tmp_path, tiny_data, trained_bundle, losses, teacher, message):
    r = _recipe(tmp_path, tiny_data, teacher or trained_bundle, losses=losses)
    res = CliRunner().invoke(app, ["cache", "build", str(r)])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()


def test_killed_build_resumes_at_the_first_missing_epoch(tmp_path, tiny_data, trained_bundle):
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=3)
    kill_at(["cache", "build", str(r)], "cache:epoch-written@2")
    shards = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert shards == ["epoch-0000", "epoch-0001", "meta.json"]
    assert not json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"]
    before = (tmp_path / "cache" / "epoch-0000" / "scores.npy").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["cache", "build", str(r), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["complete"]
    assert (tmp_path / "cache" / "epoch-0000" / "scores.npy").stat().st_mtime_ns == before  # kept, not redone
    assert TeacherCache(tmp_path / "cache").rows([2 * 24 + 3])["scores"].shape == (1, 64, 3)


def test_ddp_ranks_replay_the_cache(tmp_path, tiny_data, trained_bundle):
    """2 gloo ranks, each its share of every epoch's views, served from the cache kdctl built before launching."""
    r = _recipe(tmp_path, tiny_data, trained_bundle, epochs=1)
    p = subprocess.run([sys.executable, "-m", "kdctl.cli.main", "distill", str(r), "--out", str(tmp_path / "kd"),
                        "--nproc-per-node", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from kdctl.bundle import load_bundle

    m = load_bundle(tmp_path / "kd", verify=True).metrics
    assert m["teacher_cache"]["k"] == 64 and m["distributed"]["world_size"] == 2
    assert all(rk["loss_items"]["kd_logit"] > 0 and rk["loss_items"]["kd_ld"] > 0
               for rk in m["distributed"]["ranks"])
    assert len({rk["student_params_sha256"] for rk in m["distributed"]["ranks"]}) == 1


def test_a_teacher_built_from_a_yaml_is_the_same_in_every_process(tmp_path, tiny_data):
    """A YAML teacher (random weights) is seeded by train.seed, so `kdctl cache build` and a later `kdctl distill`
    (or each DDP rank) see the same teacher and the cache is not stale."""
    r = _recipe(tmp_path, tiny_data, "yolov8-tiny.yaml", epochs=1, losses="[{name: kd_logit}]")
    run = [sys.executable, "-m", "kdctl.cli.main", "cache", "build", str(r), "--json"]
    first = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["teacher_sha256"] == first["teacher_sha256"]
