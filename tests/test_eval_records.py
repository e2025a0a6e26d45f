"""Evaluation records (``eval-records.npz``): the per-image matching a bundle's mAP was integrated from, the mAP of
a resample of the images from them, and the report's paired bootstrap of a distillation gain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdctl.evaluate.coco import (Detections, GroundTruth, MatchRecords, drop_interval, evaluate_map, map_from_records,
                                 match_records, paired_bootstrap)
from kdctl.evaluate.records import RECORDS_FILE, ROLE, RecordsError, load_records, save_records


def _random_images(rng, n, nc=3, crowd=False):
    dets, gts = [], []
    for _ in range(n):
        k, m = int(rng.integers(0, 6)), int(rng.integers(0, 12))
        xy, wh = rng.uniform(0, 100, (k, 2)), rng.uniform(5, 40, (k, 2))
        g = GroundTruth(np.c_[xy, xy + wh], rng.integers(0, nc, k),
                        (rng.random(k) < 0.2) if crowd and k else None)
        j = rng.integers(0, max(k, 1), m)
        base = g.boxes[j] if k else rng.uniform(0, 100, (m, 4))
        cls = np.where(rng.random(m) < 0.8, g.classes[j] if k else 0, rng.integers(0, nc, m))
        dets.append(Detections(base + rng.normal(0, 4, (m, 4)), rng.random(m), cls))
        gts.append(g)
    return dets, gts


@pytest.mark.parametrize("crowd", [False, True])
def test_a_resample_scores_as_the_image_list_holding_each_image_that_many_times(crowd):
    """``map_from_records(r, weights)`` is mAP over the image list with image i repeated weights[i] times (0: left
    out), to the last digit, crowd regions included; without weights it is ``evaluate_map`` itself."""
    rng = np.random.default_rng(3)
    dets, gts = _random_images(rng, 30, crowd=crowd)
    r = match_records(dets, gts, 3)
    assert map_from_records(r) == evaluate_map(dets, gts, 3)
    for _ in range(5):
        w = rng.integers(0, 4, len(dets))
        repeated = [(d, g) for d, g, k in zip(dets, gts, w) for _ in range(k)]
        want = evaluate_map([d for d, _ in repeated], [g for _, g in repeated], 3)
        assert map_from_records(r, w) == want
        assert want != evaluate_map(dets, gts, 3)


def _one_object_images(found: list[bool]) -> MatchRecords:
    """Images with one class-0 object each; the model finds it exactly (IoU 1, score 0.9) where ``found``."""
    dets = [Detections(np.array([[10.0, 10, 50, 50]]) if f else np.zeros((0, 4)), np.array([0.9] if f else []),
                       np.array([0] if f else [], int)) for f in found]
    gts = [GroundTruth(np.array([[10.0, 10, 50, 50]]), np.array([0])) for _ in found]
    return match_records(dets, gts, 1)


def test_paired_bootstrap_against_a_hand_enumeration():
    """Two images, one object each; A finds image 0's, B both. A resample is (2, 0), (1, 1) or (0, 2) copies with
    probabilities 1/4, 1/2, 1/4; A's AP50-95 on them is 1, 51/101 (recall 0.5 at precision 1: recall points 0 to
    0.50 of 101) and 0, B's is 1 on all: differences 0, 50/101 and 1. With a quarter of the mass on each end,
    the 2.5 and 97.5 percentiles are 0 and 1."""
    a, b = _one_object_images([True, False]), _one_object_images([True, True])
    assert map_from_records(a, np.array([2, 0]))["map50_95"] == 1.0
    assert map_from_records(a, np.array([1, 1]))["map50_95"] == pytest.approx(51 / 101, abs=1e-12)
    assert map_from_records(a, np.array([0, 2]))["map50_95"] == 0.0
    assert paired_bootstrap(a, b) == (0.0, 1.0)
    assert paired_bootstrap(b, a) == (-1.0, 0.0)
    assert paired_bootstrap(a, a) == (0.0, 0.0)
    # 40 images, B finding 10 more objects than A: every resample favours B, by about a quarter (the point estimate)
    a40, b40 = _one_object_images([True] * 20 + [False] * 20), _one_object_images([True] * 30 + [False] * 10)
    lo, hi = paired_bootstrap(a40, b40)
    point = map_from_records(b40)["map50_95"] - map_from_records(a40)["map50_95"]
    assert point == pytest.approx(25 / 101, abs=1e-12)  # recall 0.75 against 0.5: 76 against 51 recall points
    assert 0.1 < lo < point < hi < 0.4
    with pytest.raises(ValueError, match="not of the same images"):
        paired_bootstrap(a40, _one_object_images([True] * 39))


def test_drop_interval_is_the_reference_minus_the_export_and_nothing_where_the_ranking_is_the_same():
    """An export's drop interval: mAP of the PyTorch reference minus the artifact's, positive where the artifact
    finds less; an artifact whose scores differ only in their last digits, ranking every detection as PyTorch does
    (an FP32 export), gets exactly 0 to 0, and one ranking them otherwise does not."""
    a40, b40 = _one_object_images([True] * 20 + [False] * 20), _one_object_images([True] * 30 + [False] * 10)
    assert drop_interval(b40, a40) == list(paired_bootstrap(a40, b40)) and drop_interval(b40, a40)[0] > 0.1
    assert drop_interval(a40, b40) == list(paired_bootstrap(b40, a40)) and drop_interval(a40, b40)[1] < -0.1
    rng = np.random.default_rng(3)
    ref = match_records(*_random_images(rng, 30), 3)
    fp32 = MatchRecords(ref.image, ref.classes, ref.scores * (1 - 1e-6), ref.tp, ref.ignored, ref.n_gt)
    assert drop_interval(ref, fp32) == [0.0, 0.0]
    swapped = ref.scores.copy()  # two detections of one class and other images trade places in the ranking
    c0 = np.nonzero((ref.classes == 0) & ref.tp[0])[0]
    c1 = np.nonzero((ref.classes == 0) & ~ref.tp[0])[0]
    i, j = c0[0], c1[np.nonzero(ref.image[c1] != ref.image[c0[0]])[0][0]]
    swapped[i], swapped[j] = min(ref.scores[i], ref.scores[j]) - 1e-3, max(ref.scores[i], ref.scores[j]) + 1e-3
    lo, hi = drop_interval(ref, MatchRecords(ref.image, ref.classes, swapped, ref.tp, ref.ignored, ref.n_gt))
    assert lo < hi and hi > 0  # a true positive fell below a false one: AP at IoU 0.5 drops on most resamples


def test_records_round_trip_and_a_foreign_file_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    dets, gts = _random_images(rng, 12, crowd=True)
    r = match_records(dets, gts, 3)
    keys = [f"{i:016x}" for i in range(12)]
    save_records(tmp_path / RECORDS_FILE, r, keys)
    back, k = load_records(tmp_path / RECORDS_FILE)
    assert k == keys and map_from_records(back) == map_from_records(r)
    for field in ("image", "classes", "scores", "tp", "ignored", "n_gt"):
        assert np.array_equal(getattr(back, field), getattr(r, field)), field
    with pytest.raises(ValueError, match="image keys"):
        save_records(tmp_path / "x.npz", r, keys[:-1])
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(RecordsError, match="not kdctl evaluation records"):
        load_records(tmp_path / "text.npz")
    z = dict(np.load(tmp_path / RECORDS_FILE))
    np.savez(tmp_path / "floats.npz", **{**z, "tp": z["tp"].astype(np.float32)})
    with pytest.raises(RecordsError, match="arrays of other types"):
        load_records(tmp_path / "floats.npz")
    np.savez(tmp_path / "short.npz", **{**z, "scores": z["scores"][:-1]})
    with pytest.raises(RecordsError, match="do not fit together"):
        load_records(tmp_path / "short.npz")
    np.savez(tmp_path / "fewer-flags.npz", **{**z, "ignored": z["ignored"][:-1]})
    with pytest.raises(RecordsError, match="do not fit together"):
        load_records(tmp_path / "fewer-flags.npz")
    np.savez(tmp_path / "format-list.npz", **{**z, "format": np.array([1, 1])})
    with pytest.raises(RecordsError, match="not kdctl evaluation records"):
        load_records(tmp_path / "format-list.npz")
    np.savez(tmp_path / "later.npz", **{**z, "format": np.array(2)})
    with pytest.raises(RecordsError, match="format 2"):
        load_records(tmp_path / "later.npz")


def test_a_train_bundle_keeps_the_records_of_its_mAP(trained_bundle):
    """The records in a train bundle give back its published mAP50-95 to the last digit, one key per image."""
    from kdctl.bundle import load_bundle

    b = load_bundle(trained_bundle, verify=True)
    assert b.manifest["outputs"][ROLE] == RECORDS_FILE
    r, keys = load_records(b.file(ROLE))
    m = map_from_records(r)
    assert m["map50_95"] == b.metrics["map50_95"] and m["map50"] == b.metrics["map50"]
    assert len(keys) == r.images == b.metrics["eval_images"] and len(set(keys)) == len(keys)


def test_an_eval_bundle_keeps_its_records(trained_bundle, tmp_path):
    from kdctl.evaluate.stage import evaluate_bundle

    e = evaluate_bundle(trained_bundle, out=tmp_path / "e")
    r, _ = load_records(e.file(ROLE))
    assert map_from_records(r)["map50_95"] == e.metrics["map50_95"]


def _bundle(tmp_path, name, stage, m, records=None, keys=None, parents=()):
    from kdctl.bundle import BundleWriter, load_bundle

    with BundleWriter(tmp_path / name, stage=stage, parents=parents,
                      recipe={"student": {"model": "s.yaml" if name != "t" else "big.yaml"},
                              "data": {"yolo": "d.yaml"}}) as w:
        (w.path / "weights.pt").write_bytes(name.encode())
        w.add_output("weights", "weights.pt")
        if records is not None:
            save_records(w.path / RECORDS_FILE, records, keys or [f"{i:016x}" for i in range(records.images)])
            w.add_output(ROLE, RECORDS_FILE)
        w.metrics.update(map50_95=m, map50=m, params=10)
    return load_bundle(tmp_path / name)


def test_the_verdict_weighs_the_gain_against_resampling_the_validation_images(tmp_path):
    """A gain whose interval stays above 0 is a "Yes" with the interval beside it; one whose interval reaches 0 is
    "Not shown"; bundles without records, or scored on other images, get the verdict they always had; a distilled
    bundle whose images were listed in another order is paired image by image all the same."""
    from kdctl.report.kd_summary import compare

    found = [True] * 20 + [False] * 20
    base = _one_object_images(found)
    mb = map_from_records(base)["map50_95"]
    t = _bundle(tmp_path, "t", "train", 0.9)
    b = _bundle(tmp_path, "b", "train", mb, base)
    better = _one_object_images([True] * 30 + [False] * 10)
    d = _bundle(tmp_path, "d", "distill", map_from_records(better)["map50_95"], better, parents=[t])
    c = compare([b, t, d])
    lo, hi = paired_bootstrap(base, better)
    assert c.interval == (lo, hi, 40, 1000)
    assert c.verdict().startswith("Yes: distillation raised mAP50-95 by +24.75 points over the baseline")
    assert c.interval_line() == (f"95% interval of the gain from resampling the 40 validation images (paired "
                                 f"bootstrap, 1000 resamples): {lo * 100:+.2f} to {hi * 100:+.2f} points. It does "
                                 "not include the run-to-run spread of training: another seed of the baseline or of "
                                 "the distillation shows that.")
    # one more object found in 40 images: recall 0.525 against 0.5, 53 recall points against 51, +1.98 points;
    # its interval starts at 0
    slight = _one_object_images([True] * 21 + [False] * 19)
    s = _bundle(tmp_path, "s", "distill", map_from_records(slight)["map50_95"], slight, parents=[t])
    lo, hi = paired_bootstrap(base, slight)
    assert lo == 0.0 < hi
    assert compare([b, t, s]).verdict() == (
        f"Not shown: the distilled student is +1.98 mAP50-95 points above the baseline, within what resampling the "
        f"40 validation images moves it ({lo * 100:+.2f} to {hi * 100:+.2f}).")
    # the same records, the images listed in reverse: the same pairs, so the same interval
    rev = list(range(39, -1, -1))
    from kdctl.evaluate.records import reorder

    keys = [f"{i:016x}" for i in range(40)]
    moved = _bundle(tmp_path, "m", "distill", map_from_records(better)["map50_95"], reorder(better, rev),
                    keys=[keys[i] for i in rev], parents=[t])
    assert compare([b, t, moved]).interval == c.interval
    # no records, or records of other images: no interval and the plain verdict
    plain = _bundle(tmp_path, "p", "distill", map_from_records(slight)["map50_95"], parents=[t])
    other = _bundle(tmp_path, "o", "distill", map_from_records(slight)["map50_95"], slight,
                    keys=[f"{i + 1:016x}" for i in range(40)], parents=[t])
    for x in (plain, other):
        assert compare([b, t, x]).interval is None
        assert compare([b, t, x]).verdict().startswith("Yes: distillation raised mAP50-95 by +1.98 points")
    assert compare([b, t, plain]).interval_line() == (
        f"No interval for the gain: {plain.path} keeps no evaluation records (written before kdctl kept them): "
        "`kdctl eval` of it writes them; give the eval bundle to the report beside the others.")
    assert compare([b, t, other]).interval_line() == (
        "No interval for the gain: the baseline and the distilled student were not scored on the same validation "
        "images and labels.")


def test_an_eval_bundle_gives_the_records_a_bundle_written_without_them_lacks(tmp_path):
    """A train/distill bundle from before kdctl kept evaluation records gets its interval from a ``kdctl eval`` of it
    given beside it, but only from one that reproduces its published mAP (the same evaluation): an eval at another
    size or of another bundle is not its evidence."""
    from kdctl.report.kd_summary import compare

    base = _one_object_images([True] * 20 + [False] * 20)
    better = _one_object_images([True] * 30 + [False] * 10)
    mb, md = map_from_records(base)["map50_95"], map_from_records(better)["map50_95"]
    t = _bundle(tmp_path, "t", "train", 0.9)
    b = _bundle(tmp_path, "b", "train", mb)  # neither keeps records
    d = _bundle(tmp_path, "d", "distill", md, parents=[t])
    assert compare([b, t, d]).interval_line() == (
        f"No interval for the gain: {b.path} and {d.path} keep no evaluation records (written before kdctl kept "
        "them): `kdctl eval` of each writes them; give the eval bundles to the report beside the others.")
    from typer.testing import CliRunner

    from kdctl.cli.main import app

    res = CliRunner().invoke(app, ["report", str(b.path), str(d.path), "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0 and "`kdctl eval` of each writes them" in " ".join(res.output.split())
    eb = _bundle(tmp_path, "eb", "eval", mb, base, parents=[b])
    ed = _bundle(tmp_path, "ed", "eval", md, better, parents=[d])
    lo, hi = paired_bootstrap(base, better)
    res = CliRunner().invoke(app, ["report", str(b.path), str(d.path), str(eb.path), str(ed.path), "--json",
                                   "--out", str(tmp_path / "r2")])
    kd = json.loads(res.stdout)["kd"]
    assert kd["gain_interval_95"] == [lo, hi] and kd["interval_images"] == 40 and kd["interval_note"] is None
    assert compare([b, t, d, eb, ed]).interval == (lo, hi, 40, 1000)
    assert compare([b, t, d, eb, ed]).verdict().startswith("Yes: distillation raised mAP50-95 by +24.75 points")
    wrong = [_bundle(tmp_path, "ex", "eval", md + 0.01, better, parents=[d]),  # another size: another mAP
             _bundle(tmp_path, "ey", "eval", md, better, parents=[t])]  # of another bundle
    for e in wrong:
        assert compare([b, t, d, eb, e]).interval is None
    assert compare([b, t, d, eb, wrong[0]]).interval_line().startswith(f"No interval for the gain: {d.path} keeps")


def test_bootstrap_resamples_shrink_only_for_large_validation_sets():
    from kdctl.evaluate.coco import bootstrap_resamples

    assert bootstrap_resamples(0) == bootstrap_resamples(60_000) == bootstrap_resamples(100_000) == 1000
    assert bootstrap_resamples(250_000) == 400 and bootstrap_resamples(10_000_000) == 200


def test_report_json_carries_the_interval(kd_chain, tmp_path):
    from typer.testing import CliRunner

    from kdctl.cli.main import app

    res = CliRunner().invoke(app, ["report", str(kd_chain["baseline"]), str(kd_chain["distilled"]),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    kd = json.loads((tmp_path / "r" / "manifest.json").read_text())["metrics"]["kd"]
    lo, hi = kd["gain_interval_95"]
    assert kd["interval_images"] > 0 and lo <= hi
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"95% interval of the gain from resampling the {kd['interval_images']} validation images" in md
    assert kd["verdict"].startswith("Not shown" if kd["gain"] > 0 and lo <= 0 else ("Yes" if kd["gain"] > 0 else "No"))


def test_verify_rederives_the_published_map_from_the_records(trained_bundle, tmp_path):
    """A bundle whose files hash correctly but whose published mAP is not what its records give (written so, e.g.
    by hand with every hash recomputed) fails verification, one line naming the metric; the real one passes."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle, verify_bundle
    from kdctl.errors import BundleError

    src = load_bundle(trained_bundle, verify=True)
    assert verify_bundle(trained_bundle).ok

    def copy(name, **metrics):
        with BundleWriter(tmp_path / name, stage="train", recipe=src.recipe) as w:
            for role in ("weights", "data", ROLE):
                shutil.copy(src.file(role), w.path / src.file(role).name)
                w.add_output(role, src.file(role).name)
            w.metrics.update({**src.metrics, **metrics})
        return tmp_path / name

    assert verify_bundle(copy("same")).ok
    res = verify_bundle(copy("better", map50_95=src.metrics["map50_95"] + 0.1))
    assert not res.ok and res.problems == [
        f"manifest.json: metrics.map50_95 {src.metrics['map50_95'] + 0.1!r} is not what {RECORDS_FILE} gives "
        f"({src.metrics['map50_95']!r})"]
    res = verify_bundle(copy("more", eval_images=src.metrics["eval_images"] + 1))
    assert res.problems == [f"manifest.json: metrics.eval_images {src.metrics['eval_images'] + 1}, but "
                            f"{RECORDS_FILE} holds {src.metrics['eval_images']} images"]
    with pytest.raises(BundleError, match="is not what eval-records.npz gives"):  # every stage that reads it
        load_bundle(tmp_path / "better", verify=True)

    def dropped(name, key):
        out = copy(name)
        with BundleWriter(tmp_path / f"{name}2", stage="train", recipe=src.recipe) as w:
            for rel in ("weights.pt", "data.yaml", RECORDS_FILE):
                shutil.copy(out / rel, w.path / rel)
            for role in ("weights", "data", ROLE):
                w.add_output(role, src.file(role).name)
            w.metrics.update({k: v for k, v in src.metrics.items() if k != key})
        return tmp_path / f"{name}2"

    assert verify_bundle(dropped("nomap50", "map50")).ok  # only mAP50-95 is always written beside the records
    assert verify_bundle(dropped("nomap", "map50_95")).problems == [
        f"manifest.json: metrics.map50_95 is missing, though {RECORDS_FILE} holds the evaluation it came from"]


def test_verify_names_records_that_cannot_be_read(trained_bundle, tmp_path):
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle, verify_bundle

    src = load_bundle(trained_bundle, verify=True)
    with BundleWriter(tmp_path / "b", stage="train", recipe=src.recipe) as w:
        shutil.copy(src.file("weights"), w.path / "weights.pt")
        w.add_output("weights", "weights.pt")
        (w.path / RECORDS_FILE).write_bytes(b"not numpy")
        w.add_output(ROLE, RECORDS_FILE)
        w.metrics.update(src.metrics)
    assert verify_bundle(tmp_path / "b").problems == [f"{RECORDS_FILE}: not kdctl evaluation records (ValueError)"]


def test_kdctl_eval_of_a_bundle_without_records_gives_the_interval_its_records_would(kd_chain, tmp_path):
    """The fallback's premise on real models: ``kdctl eval`` of a train/distill bundle reproduces its published mAP to
    the last digit, so bundles written before records (here: copies without them) get, through an eval of each, the
    very interval their own records give."""
    import shutil

    from kdctl.bundle import BundleWriter, load_bundle
    from kdctl.evaluate.stage import evaluate_bundle
    from kdctl.report.kd_summary import compare

    def without_records(src, name):
        b = load_bundle(src, verify=True)
        parents = [load_bundle(p["path"], verify=True) for p in b.manifest["parents"]]
        with BundleWriter(tmp_path / name, stage=b.stage, recipe=b.recipe, parents=parents,
                          inputs=b.manifest["inputs"]) as w:
            for role in ("weights", "data"):
                shutil.copy(b.file(role), w.path / b.file(role).name)
                w.add_output(role, b.file(role).name)
            w.metrics.update(b.metrics)
        return load_bundle(tmp_path / name, verify=True)

    teacher, base, kd = (load_bundle(kd_chain[k], verify=True) for k in ("teacher", "baseline", "distilled"))
    own = compare([teacher, base, kd])
    assert own.interval is not None
    old_base, old_kd = without_records(base.path, "old-base"), without_records(kd.path, "old-kd")
    assert compare([teacher, old_base, old_kd]).interval is None
    evals = [evaluate_bundle(b.path, out=tmp_path / f"eval-{b.path.name}") for b in (old_base, old_kd)]
    assert [e.metrics["map50_95"] for e in evals] == [base.metrics["map50_95"], kd.metrics["map50_95"]]
    assert compare([teacher, old_base, old_kd, *evals]).interval == own.interval
