""""Did distillation help?": the teacher, the baseline student (trained alone) and the distilled student, side by
side, and how much of the teacher-student gap distillation closed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kdctl.bundle import Bundle
from kdctl.errors import BundleError


@dataclass(frozen=True)
class TeacherRecord:
    """A teacher as the distill run scored it on its own validation images (``metrics.teacher``,
    :func:`kdctl.training._evaluate_teacher`): the user's own checkpoint (``path``; ``id`` its sha256), or a teacher
    bundle (``bundle``) whose published mAP was scored on other images or at another size. Stands in for a teacher
    bundle in the comparison."""

    path: Path
    metrics: dict
    id: str
    trained_as: str = "outside kdctl (its checkpoint, scored by the distill run)"
    bundle: Bundle | None = None

    @classmethod
    def rescored(cls, teacher: Bundle, distilled: Bundle) -> "Bundle | TeacherRecord":
        """``teacher`` with the mAP the distill run gave it, where it recorded one for that very file."""
        rec = cls.of(distilled)
        weights = field_of(teacher.manifest.get("files"), "weights.pt", "sha256")
        if rec is None or weights is None or rec.metrics.get("sha256") != weights:
            return teacher
        return cls(teacher.path, {**teacher.metrics, **rec.metrics}, teacher.id,
                   f"{trained_as(teacher.metrics)}; scored again by the distill run on its validation images at "
                   f"{rec.metrics.get('imgsz')} px{_selected(distilled)}", teacher)

    @classmethod
    def of(cls, distilled: Bundle) -> "TeacherRecord | None":
        rec = distilled.metrics.get("teacher")
        if not isinstance(rec, dict) or not isinstance(rec.get("model"), str) \
                or not isinstance(rec.get("map50_95"), (int, float)):
            return None
        return cls(Path(rec["model"]), rec, f"teacher-checkpoint:{rec.get('sha256')}",
                   cls.trained_as + _selected(distilled))

    @classmethod
    def scored_by(cls, evals: tuple[Bundle, ...], distilled: Bundle) -> "TeacherRecord | None":
        """From a ``kdctl eval`` of the teacher checkpoint given beside the bundles (a distill bundle written before
        kdctl recorded its teacher's mAP): the same file (sha256), scored on the distilled student's validation
        images and labels (their evaluation records pair) at its size."""
        sha = field_of(distilled.manifest.get("inputs"), "teacher", "sha256")
        for e in evals if sha else ():
            inputs = e.manifest.get("inputs") or {}
            if (inputs.get("model_sha256") == sha and isinstance(inputs.get("model"), str)
                    and e.metrics.get("split", "val") == "val" and e.metrics.get("imgsz") == distilled.metrics.get(
                        "imgsz") and isinstance(e.metrics.get("map50_95"), (int, float))
                    and paired_records(e, distilled) is not None):
                return cls(Path(inputs["model"]), {**e.metrics, "sha256": sha}, f"teacher-checkpoint:{sha}",
                           "outside kdctl (its checkpoint, scored by kdctl eval)")
        return None

    def file(self, role: str) -> Path:
        """The checkpoint, for the predictions panel, while it is the one the distill run read."""
        from kdctl.bundle.store import sha256_file

        if self.bundle is not None:
            return self.bundle.file(role)
        if role != "weights" or not self.path.is_file() or sha256_file(self.path) != self.metrics.get("sha256"):
            raise BundleError(f"{self.path}: the teacher checkpoint is not here as the distill run read it")
        return self.path


def _selected(distilled: Bundle) -> str:
    """How a teacher of more classes than the dataset was read (``inputs.teacher.classes``), for its row."""
    picked = classes_read(field_of(distilled.manifest.get("inputs"), "teacher", "classes"))
    return f"; read for {picked}, by name" if picked else ""


def classes_read(picked) -> str:
    """'the dataset's 3 of its 5 classes', of the record of a model of more classes read for its dataset's, by name
    (``{"model_nc": 5, "index": {class: its index}}``); '' for anything else."""
    if not isinstance(picked, dict) or not isinstance(picked.get("index"), dict):
        return ""
    n = picked.get("model_nc")
    return f"the dataset's {len(picked['index'])}{f' of its {n}' if isinstance(n, int) else ''} classes"


@dataclass
class KDComparison:
    teacher: Bundle | TeacherRecord | None
    baseline: Bundle | None
    distilled: Bundle
    evals: tuple[Bundle, ...] = ()  # eval bundles given beside them: records for bundles written without any
    other_data: tuple[Bundle, ...] = ()  # train bundles of the student's model on other data: no baseline of it

    def records_of(self, b: Bundle) -> Bundle | None:
        """The bundle holding ``b``'s evaluation records: ``b`` itself, or for a bundle written before kdctl kept
        them, a ``kdctl eval`` of it on its validation images that reproduces its published mAP50-95 exactly (the
        same evaluation, so the same detections)."""
        from kdctl.evaluate.records import has_records

        if has_records(b):
            return b
        return next((e for e in self.evals if has_records(e)
                     and any(p.get("id") == b.id and p.get("content_sha256") == b.manifest["content_sha256"]
                             for p in e.manifest.get("parents", []))
                     and e.metrics.get("split", "val") == "val"
                     and e.metrics.get("map50_95") == b.metrics.get("map50_95")), None)

    @property
    def gap_closed(self) -> float | None:
        """(distilled − baseline) / (teacher − baseline) in mAP50-95; None without both references."""
        if self.teacher is None or self.baseline is None:
            return None
        t, b, d = (x.metrics.get("map50_95") for x in (self.teacher, self.baseline, self.distilled))
        if None in (t, b, d) or t <= b:
            return None
        return (d - b) / (t - b)

    @property
    def gain(self) -> float | None:
        """Distilled − baseline mAP50-95; None without a baseline."""
        if self.baseline is None:
            return None
        return self.distilled.metrics.get("map50_95") - self.baseline.metrics.get("map50_95")

    @cached_property
    def interval(self) -> tuple[float, float, int, int] | None:
        """95 % interval of the gain (distilled − baseline mAP50-95) over resamples of the validation images, the
        number of images and of resamples: a paired bootstrap of the two bundles' evaluation records. None where
        either bundle has no records (written before kdctl kept them) or they were not scored on the same images
        and labels."""
        if self.baseline is None:
            return None
        holders = self.records_of(self.baseline), self.records_of(self.distilled)
        if None in holders:
            return None
        pair = paired_records(*holders)
        if pair is None:
            return None
        from kdctl.evaluate.coco import bootstrap_resamples, paired_bootstrap

        resamples = bootstrap_resamples(sum(len(r.image) for r in pair))
        lo, hi = paired_bootstrap(*pair, resamples=resamples)
        return lo, hi, pair[0].images, resamples

    def interval_line(self) -> str | None:
        """The report's sentence on how much of the gain resampling the validation images moves (or why there is
        no such interval)."""
        if self.baseline is None:
            return None
        if self.interval is None:
            missing = [b for b in (self.baseline, self.distilled) if self.records_of(b) is None]
            if missing:
                names = " and ".join(str(b.path) for b in missing)
                return (f"No interval for the gain: {names} {'keeps' if len(missing) == 1 else 'keep'} no evaluation "
                        "records (written before kdctl kept them): `kdctl eval` of "
                        f"{'it' if len(missing) == 1 else 'each'} writes them; give the eval "
                        f"bundle{'' if len(missing) == 1 else 's'} to the report beside the others.")
            return ("No interval for the gain: the baseline and the distilled student were not scored on the same "
                    "validation images and labels.")
        lo, hi, n, resamples = self.interval
        return (f"95% interval of the gain from resampling the {n} validation images (paired bootstrap, {resamples} "
                f"resamples): {lo * 100:+.2f} to {hi * 100:+.2f} points. It does not include the run-to-run spread "
                "of training: another seed of the baseline or of the distillation shows that.")

    def gap_line(self) -> str | None:
        """The report's "Gap closed" sentence; past 100 % it says what that means."""
        closed = self.gap_closed
        if closed is None:
            return None
        past = " (over 100%: the distilled student passes its teacher)" if closed > 1 else ""
        return f"Gap closed: {closed:.0%} of the teacher–baseline mAP50-95 gap{past}."

    def notes(self) -> list[str]:
        """What the report prints under the verdict: the gap closed, unless the verdict says it already ("Yes: ...,
        closing 45% of the gap"), and the gain's interval."""
        closed = self.gap_closed
        said = closed is not None and f"closing {closed:.0%} of the gap" in self.verdict()
        return [x for x in (None if said else self.gap_line(), self.interval_line()) if x]

    def verdict(self) -> str:
        if self.baseline is None:
            others = ", ".join(str(b.path) for b in self.other_data)
            return ("No baseline (the student trained alone) was given: pass its train bundle to compare."
                    + (f" Passed over, as trained on other data (recipe data:) than the distilled student: {others}."
                       if others else ""))
        d, b, change = self.distilled.metrics.get("map50_95"), self.baseline.metrics.get("map50_95"), self.gain
        t = self.teacher.metrics.get("map50_95") if self.teacher is not None else None
        # a teacher no better than the student trained alone has no gap to close; from a weaker detector of another
        # family, neck-level KD cost the YOLO student 13-16 points (docs/benchmarks.md, "The third GPU session")
        caveats = (f" The teacher ({t:.4f}) is not above the baseline ({b:.4f}): there is no gap for distillation "
                   "to close; distil from a stronger teacher.") if t is not None and t <= b else ""
        sizes = self.baseline.metrics.get("imgsz"), self.distilled.metrics.get("imgsz")
        if None not in sizes and sizes[0] != sizes[1]:
            caveats += (f" The baseline was scored at {sizes[0]} px and the distilled student at {sizes[1]} px: "
                        "train the baseline at the student's size for a like-for-like comparison.")
        epochs = [field_of(x.recipe, "train", "epochs") for x in (self.baseline, self.distilled)]
        if None not in epochs and epochs[0] != epochs[1]:
            caveats += (f" The baseline trained {epochs[0]} epochs and the distilled student {epochs[1]}: part of "
                        "the difference is the schedule's.")
        if change > 0 and self.interval is not None and self.interval[0] <= 0:
            return (f"Not shown: the distilled student is {change * 100:+.2f} mAP50-95 points above the baseline, "
                    f"within what resampling the {self.interval[2]} validation images moves it "
                    f"({self.interval[0] * 100:+.2f} to {self.interval[1] * 100:+.2f}).{caveats}")
        if change > 0:
            closed = self.gap_closed
            tail = f", closing {closed:.0%} of the gap to the teacher" if closed is not None else ""
            if closed is not None and closed > 1:
                above = (d - t) * 100
                tail = f", {above:.2f} points above the teacher itself"
            return f"Yes: distillation raised mAP50-95 by {change * 100:+.2f} points over the baseline{tail}.{caveats}"
        return f"No: the distilled student is {change * 100:+.2f} mAP50-95 points against the baseline.{caveats}"


def paired_records(a: Bundle, b: Bundle):
    """The two bundles' evaluation records, ``b``'s images in ``a``'s order (so a resample is the same whichever
    order ``b`` listed them in); None unless both have records of the same images and labels (the same keys)."""
    from kdctl.evaluate.records import ROLE, RecordsError, aligned, has_records, load_records

    if not (has_records(a) and has_records(b)):
        return None
    try:
        (ra, ka), (rb, kb) = load_records(a.file(ROLE)), load_records(b.file(ROLE))
    except RecordsError:
        return None
    rb = aligned(ra, ka, rb, kb)
    return None if rb is None else (ra, rb)


HEAD = ["model", "bundle", "mAP50-95", "mAP50", "params", "train time", "trained as"]


def model_row(role: str, b: Bundle) -> list[str]:
    """A row of the "Did distillation help?" table (:data:`HEAD`)."""
    m = b.metrics
    return [role, shown_name(b), f"{m.get('map50_95', float('nan')):.4f}", f"{m.get('map50', float('nan')):.4f}",
            f"{m['params']:,}" if m.get("params") else "—",
            f"{m['train_seconds']:.0f} s" if m.get("train_seconds") else "—",
            b.trained_as if isinstance(b, TeacherRecord) else trained_as(m)]


def shown_name(b: Bundle) -> str:
    """A bundle's folder name; a teacher checkpoint in an Ultralytics run's ``weights/`` folder with its run's name
    (``train3/weights/best.pt``: every run's checkpoint is ``best.pt``)."""
    p = b.path
    if isinstance(b, TeacherRecord) and p.suffix in (".pt", ".pth") and p.parent.name == "weights" \
            and p.parent.parent.name:
        return f"{p.parent.parent.name}/weights/{p.name}"
    return p.name


def trained_as(metrics: dict) -> str:
    """How a train/distill bundle was trained, from what it records: processes and device, teacher cache, QAT."""
    d = metrics.get("distributed")
    parts = [f"{d['world_size']} DDP ranks" if d else "1 process"]
    if isinstance(metrics.get("train_device"), str):  # bundles written before it was recorded say less
        parts[0] += f" on {metrics['train_device']}"
    cache = metrics.get("teacher_cache")
    if cache:
        parts.append(f"teacher cache (top {cache.get('k')} of {cache.get('anchors')} anchors)")
    if metrics.get("init"):
        parts.append(f"started from the {metrics['init'].get('from', 'teacher')}'s weights (weight selection)")
    if metrics.get("qat"):
        parts.append(f"QAT {metrics['qat'].get('quantize', 'int8')}")
    return ", ".join(parts)


def compare(chain: list[Bundle]) -> KDComparison | None:
    """The comparison for the last distill bundle of the chain (None when it has none); see :func:`compare_all`."""
    every = compare_all(chain)
    return every[-1] if every else None


def compare_all(chain: list[Bundle]) -> list[KDComparison]:
    """One comparison per distill bundle, in chain order (several students of one teacher: two recipes side by side).
    Each finds its own teacher (its recorded parent) and a baseline: a train bundle of the same student model and
    data that is not the teacher."""
    return [_compare(chain, d) for d in chain if d.stage == "distill"]


def _compare(chain: list[Bundle], distilled: Bundle) -> KDComparison:
    t_sha = field_of(distilled.manifest.get("inputs"), "teacher", "sha256")
    parents = {p.get("id") for p in distilled.manifest.get("parents", [])}
    teacher = next((b for b in chain if b.id in parents and b.stage in ("train", "distill")
                    and b.manifest["files"].get("weights.pt", {}).get("sha256") == t_sha), None)
    if teacher is None:
        teacher = next((b for b in chain if b.id in parents and b.stage in ("train", "distill")), None)
    evals = tuple(b for b in chain if b.stage == "eval")
    if teacher is None:  # the user's own checkpoint: as the distill run scored it, or a kdctl eval of it
        teacher = TeacherRecord.of(distilled) or TeacherRecord.scored_by(evals, distilled)
    else:  # a teacher bundle scored elsewhere: its row takes the distill run's numbers
        teacher = TeacherRecord.rescored(teacher, distilled)
    student = field_of(distilled.recipe, "student", "model")
    data = (distilled.recipe or {}).get("data")
    same_model = [b for b in chain if b.stage == "train" and (teacher is None or b.id != teacher.id)
                  and field_of(b.recipe, "student", "model") == student]
    candidates = [b for b in same_model if (b.recipe or {}).get("data") == data]
    other_data = tuple(b for b in same_model if (b.recipe or {}).get("data") != data)
    # one scored at the distilled student's size, where there is one (another size is another model to compare)
    candidates = [b for b in candidates if b.metrics.get("imgsz") == distilled.metrics.get("imgsz")] or candidates
    # several baselines (one per seed): the one of the distilled student's seed, the pair a seed comparison needs
    same_seed = [b for b in candidates if _seed(b) is not None and _seed(b) == _seed(distilled)]
    return KDComparison(teacher, (same_seed or candidates or [None])[0], distilled, evals, other_data)


def field_of(section, *keys):
    """``section[k1][k2]...`` where each level is a mapping, else None: a report shows what a bundle recorded in
    the shape it was written, and leaves out (never trips on) a field of another shape."""
    for k in keys:
        if not isinstance(section, dict):
            return None
        section = section.get(k)
    return section


def _seed(b: Bundle):
    return field_of(b.recipe, "train", "seed")


@dataclass
class SeedGroup:
    """Distilled students of one recipe and teacher trained on several seeds, each against the baseline of its own
    seed: the benchmark's rule on the user's runs (a gain counts where it is above the baseline on every seed and
    its mean is above the baselines' own seed-to-seed spread)."""
    cmps: list[KDComparison]

    @property
    def gains(self) -> list[float]:
        return [c.gain for c in self.cmps]

    @property
    def mean_gain(self) -> float:
        return sum(self.gains) / len(self.cmps)

    @property
    def seeds_above(self) -> int:
        return sum(g > 0 for g in self.gains)

    @property
    def spread(self) -> float:
        """Half-range of the baselines' mAP50-95 over the seeds."""
        maps = [c.baseline.metrics["map50_95"] for c in self.cmps]
        return (max(maps) - min(maps)) / 2

    @property
    def interval(self) -> tuple[float, float]:
        from kdctl.report.stats import paired_interval

        return paired_interval(self.gains)

    def verdict(self) -> str:
        gains, n, mean, above = self.gains, len(self.cmps), self.mean_gain, self.seeds_above
        lo, hi = self.interval
        names = " / ".join(c.distilled.path.name for c in self.cmps)
        facts = (f"{mean * 100:+.2f} points on average ({' / '.join(f'{g * 100:+.2f}' for g in gains)}), above the "
                 f"baseline of the same seed on {above} of {n}; the baselines' own spread (half-range) "
                 f"{self.spread * 100:.2f} points; 95% interval of the mean gain {lo * 100:+.2f} to {hi * 100:+.2f} "
                 "(Student's t over the seeds)")
        if mean > self.spread and above == n:
            word = "Yes"
        elif mean > 0:
            word = "Not shown"
        else:
            word = "No"
        return f"Over {n} seeds ({names}): {word}: {facts}."

    def to_dict(self) -> dict:
        return {"distilled": [str(c.distilled.path) for c in self.cmps],
                "baselines": [str(c.baseline.path) for c in self.cmps],
                "seeds": [_seed(c.distilled) for c in self.cmps], "gains": self.gains,
                "mean_gain": self.mean_gain, "seeds_above": self.seeds_above,
                "baseline_half_range": self.spread, "interval_95": list(self.interval), "verdict": self.verdict()}


def seed_groups(cmps: list[KDComparison]) -> list[SeedGroup]:
    """The comparisons that are one recipe on several seeds: the same teacher and recipe but for ``name`` and
    ``train.seed``, each with a baseline of its own seed (distinct baselines); two seeds at least."""
    import json

    groups: dict[str, list[KDComparison]] = {}
    for c in cmps:
        seed = _seed(c.distilled)
        if c.baseline is None or seed is None or _seed(c.baseline) != seed:
            continue
        recipe = json.loads(json.dumps(c.distilled.recipe or {}))
        recipe.pop("name", None)
        if isinstance(recipe.get("train"), dict):
            recipe["train"].pop("seed", None)
        key = json.dumps([c.teacher.id if c.teacher else None, recipe], sort_keys=True)
        if all(_seed(o.distilled) != seed for o in groups.get(key, [])):
            groups.setdefault(key, []).append(c)
    return [SeedGroup(g) for g in groups.values() if len(g) >= 2]


def side_by_side(cmps: list[KDComparison]) -> tuple[list[list[str]], list[str], list[list[str]]]:
    """The distilled students in one table: every teacher and baseline once, then each student; and per-class
    AP50-95 with a column per model (a student's column is "distilled", or its bundle's name when there are
    several). Returns (rows, per-class head, per-class rows)."""
    models: list[tuple[str, str, Bundle]] = []  # (role in the table, per-class column, bundle)
    for attr, role in (("teacher", "teacher"), ("baseline", "baseline (student alone)")):
        for c in cmps:
            b = getattr(c, attr)
            if b is not None and all(b.id != m.id for _, _, m in models):
                models.append((role, attr, b))
    models += [("distilled student", "distilled" if len(cmps) == 1 else c.distilled.path.name, c.distilled)
               for c in cmps]
    rows = [model_row(role, b) for role, _, b in models]
    head = ["class"] + _distinct([column for _, column, _ in models], [b for _, _, b in models])
    names: list[str] = []
    for c in cmps:
        names += [n for n in (c.distilled.metrics.get("per_class_ap50_95") or {}) if n not in names]
    per_class = []
    for n in names:
        vals = [(b.metrics.get("per_class_ap50_95") or {}).get(n) for _, _, b in models]
        per_class.append([n] + ["—" if v is None else f"{v:.4f}" for v in vals])
    return rows, head, per_class


def _distinct(columns: list[str], bundles: list[Bundle]) -> list[str]:
    """Per-class column headings a reader can tell apart: where two models share one (two teachers, two students in
    folders of one name), each of them is named by its bundle's folder, then its parent folder, then its id."""
    ways = (lambda c, b: f"{c} {b.path.name}" if c in ("teacher", "baseline") else b.path.name,
            lambda c, b: f"{b.path.parent.name}/{b.path.name}", lambda c, b: f"{b.path.name} ({b.id[:12]})")
    out = list(columns)
    for way in ways:
        clash = {h for h in out if out.count(h) > 1}
        if not clash:
            break
        out = [way(c, b) if h in clash else h for h, c, b in zip(out, columns, bundles)]
    return out
