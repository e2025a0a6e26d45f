"""Mutation check: each edit below is a plausible bug in a loss (a dropped T², a lost batch scale, pairs summed
instead of averaged, FGD's temperature flipped, balance from the first batch, LD's regions taken wrong, det_kd's
soft targets left hard, CrossKD's box weight dropped); the loss tests must catch every one.

Each mutant is a copy of the package (with the tests) with one edit; the copied tests run against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_losses.py", "tests/test_distill.py::test_kd_part_of_the_loss_is_scaled_by_batch_size",
         "tests/test_distill.py::test_ld_positives_are_the_task_losss_own_assignment",
         "tests/test_det_kd.py::test_soft_targets_are_the_assigned_score_times_the_teachers_probabilities"]

MUTANTS = {
    "cwd-without-T2": ("kdctl/distill/losses/feature.py", "* self.tau ** 2 / (n * c)", "/ (n * c)"),
    "kd_logit-without-T2": ("kdctl/distill/losses/logit.py",
                            "return (pt * (pt_log - ps_log) + (1 - pt) * (pt_log_neg - ps_log_neg)).sum(1) * T * T",
                            "return (pt * (pt_log - ps_log) + (1 - pt) * (pt_log_neg - ps_log_neg)).sum(1)"),
    "ld-without-T2": ("kdctl/distill/losses/logit.py", "return (lt.exp() * (lt - ls)).mean(2).mean(1) * T * T",
                      "return (lt.exp() * (lt - ls)).mean(2).mean(1)"),
    "crosskd-box-unweighted": ("kdctl/distill/losses/logit.py", "+ self.box_weight * box", "+ box"),
    "ld-vlr-keeps-positives": ("kdctl/detectors/yolo.py", "\"vlr\": inside & ~fg_mask.bool()", "\"vlr\": inside"),
    "ld-positives-unweighted": ("kdctl/detectors/yolo.py", "pos_weight = (target_scores.sum(-1) * fg_mask).detach()",
                                "pos_weight = fg_mask.float()"),
    "ld-sums-bins": ("kdctl/distill/losses/logit.py", "(lt.exp() * (lt - ls)).mean(2).mean(1)",
                     "(lt.exp() * (lt - ls)).sum(2).mean(1)"),
    "kd-without-batch-scale": ("kdctl/detectors/yolo.py", "(kd_total * batch[\"img\"].shape[0]).view(1)",
                               "kd_total.view(1)"),
    "pairs-summed": ("kdctl/distill/criterion.py", "return torch.stack(vals).mean()", "return torch.stack(vals).sum()"),
    "fgd-temp-flipped": ("kdctl/distill/losses/feature.py", "(a.mean(1).flatten(1) / self.temp)",
                         "(a.mean(1).flatten(1) * self.temp)"),
    "balance-from-first-batch": ("kdctl/distill/criterion.py",
                                 "statistics.median(v[i] for _, v in self._seen)", "self._seen[0][1][i]"),
    "det-kd-hard-targets": ("kdctl/distill/losses/detections.py",
                            "soft = scores.sum(-1, keepdim=True) * p.to(scores.dtype) * fg[..., None].to(scores.dtype)",
                            "soft = scores"),
    "fgd-box-one-cell-short": ("kdctl/distill/losses/feature.py", "slice(max(c1, 0), max(min(c2 + 1, w), 0))",
                               "slice(max(c1, 0), max(min(c2, w), 0))"),
}


def _run(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    rel, old, new = MUTANTS.get(name, ("kdctl/__init__.py", "", ""))
    for d in ("kdctl", "tests", "recipes"):  # a tree of its own: nothing resolves back to the checkout
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    src = (tmp_path / rel).read_text()
    if name in MUTANTS:
        assert src.count(old) == 1, f"mutation site for {name} not found once in {rel}: update MUTANTS"
        (tmp_path / rel).write_text(src.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import kdctl; print(kdctl.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip().startswith(str(tmp_path)), "the mutant is not the package under test"
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_the_unmutated_copy_passes(tmp_path):
    r = _run(tmp_path, "none")
    assert r.returncode == 0, r.stdout[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_loss_tests_catch_the_mutant(tmp_path, name):
    r = _run(tmp_path, name)
    assert r.returncode == 1, f"mutant '{name}' survived the loss tests:\n{r.stdout[-1500:]}"
