"""Teacher-output cache: the teacher runs once per (image, augmentation view) of a whole distillation run, and
training replays exactly those views, so a head-level KD step costs about what a plain student step costs.

**Views.** Under the cache, the training set is a :class:`ReplayViews` dataset: the view of image ``i`` in epoch
``e`` is Ultralytics' own augmentation pipeline run with ``random``/``numpy``/``torch`` seeded from
``(train.seed, e, i)`` (and mosaic drawing its partners from the whole set rather than from the loader's history,
which depends on the order images were loaded), and an :class:`EpochSampler` hands out view ids ``e·N + i``, so a
view is the same whatever the worker count, the rank, or a ``--resume`` in between. Each view carries a CRC-32 of its
augmented image; training checks it against the cache's, so a view that does not replay is refused, never silently
distilled from another image's teacher outputs.

**What is stored** per view (float16): the teacher head's class logits and box (DFL) logits at its ``top_k`` most
confident anchors, the anchors' indices, and the mean class logit of the other anchors; one shard of memory-mapped
``.npy`` files per epoch that distills (every epoch, or those before ``distill.stop_epoch``: the teacher is not
asked after it), written to a temporary folder and renamed when complete (a killed build resumes at the first
missing epoch; a later stop epoch adds the epochs missing). Each shard's ``digest.json`` holds the sha256 of its
files; training checks them when it first reads the shard, so an edited or corrupted file is refused in one line.
Rebuilt dense for a batch, the other anchors get that mean class logit and are masked out of box distillation
(``ld``); with ``top_k`` at least the anchor count the cache is exact up to float16.

**Keys.** ``meta.json`` records the teacher's weights digest, the training images and labels, every augmentation
setting (with the epochs, the seed and the Ultralytics version) and ``top_k``; a cache whose record differs from
the recipe's is refused in one line naming the difference. Feature-level losses (backbone, neck) read the teacher's
inner maps, which are too large to store: they stay online (the teacher still runs for them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from kdctl import faults
from kdctl.errors import CheckFailed, KdctlError, RecipeError, parse_json

CACHE_VERSION = 2  # 2: each epoch shard carries the sha256 of its files (digest.json)
META = "meta.json"
AUGMENT_KEYS = ("imgsz", "epochs", "seed", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                "perspective", "flipud", "fliplr", "bgr", "mosaic", "mixup", "cutmix", "copy_paste",
                "copy_paste_mode", "close_mosaic", "multi_scale", "fraction", "augmentations")


# ---- deterministic views ------------------------------------------------------------------------------------------

def view_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed ``random``, ``numpy`` and ``torch`` for one view; the caller's generators continue where they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _no_mosaic_buffer(transform) -> None:
    """Mosaic picks its partner images from a buffer of recently loaded ones (history-dependent); make it pick from
    the whole dataset, which the view's seed then determines."""
    seen, stack = set(), [transform]
    while stack:
        t = stack.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if hasattr(t, "buffer_enabled"):
            t.buffer_enabled = False
        stack.extend(getattr(t, "transforms", None) or [])
        stack.append(getattr(t, "pre_transform", None))


def image_crc(img) -> int:
    """CRC-32 of an augmented uint8 image (what a cached view is checked against)."""
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


class ReplayViews(torch.utils.data.Dataset):
    """An Ultralytics training dataset whose item ``e·N + i`` is view ``e`` of image ``i`` (deterministic); its
    length stays N (Ultralytics sizes epochs by it) and other attributes are the wrapped dataset's."""

    def __init__(self, base, seed: int):
        self.base, self.seed, self.n = base, int(seed), len(base)

    def __len__(self) -> int:
        return self.n

    @property
    def mosaic(self):
        return self.base.mosaic

    @mosaic.setter
    def mosaic(self, v) -> None:  # Ultralytics' close_mosaic sets it on the loader's dataset
        self.base.mosaic = v

    def __getattr__(self, name):
        if name in ("base", "seed", "n") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, v: int) -> dict:
        epoch, i = divmod(int(v), self.n)
        _no_mosaic_buffer(self.base.transforms)
        with _seeded(view_seed(self.seed, epoch, i)):
            out = self.base[i]
        out["kd_view"] = int(v)
        out["kd_crc"] = image_crc(out["img"])
        return out


class EpochSampler(torch.utils.data.Sampler):
    """View ids ``epoch·N + i`` over a permutation seeded by (seed, epoch), this rank's share of it (every rank the
    same count, as torch's DistributedSampler). ``set_epoch`` before each epoch (the trainer's callback does)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, int(seed), max(rank, 0), max(world, 1), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = len(self) * self.world
        perm += perm[: total - self.n]
        return perm[self.rank:total:self.world]

    def __iter__(self):
        return iter([self.epoch * self.n + i for i in self.order(self.epoch)])


class ReplayLoader(torch.utils.data.DataLoader):
    """A DataLoader with the ``reset()`` Ultralytics calls when it closes mosaic (a new iterator each epoch reads
    the dataset's current transforms anyway)."""

    def reset(self) -> None:
        pass


# ---- what the cache is for ----------------------------------------------------------------------------------------

def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def expected_meta(teacher_digest: str, images: list[Path], args, top_k: int, distilled: int) -> dict:
    """What a cache for this run must record; ``distilled``: the epochs that distill (``distill.stop_epoch``, else
    all), the first ones, whose views it must hold."""
    from kdctl.data.resolve import images_digest
    from kdctl.detectors.yolo import library_version

    augment = {k: getattr(args, k, None) for k in AUGMENT_KEYS}
    # the training set by names, sizes and labels (an image edited in place at the same size: the per-view CRC)
    return {"version": CACHE_VERSION, "teacher_sha256": teacher_digest, "data_sha256": images_digest(images),
            "images": len(images), "augment": augment, "ultralytics": library_version(), "top_k": int(top_k),
            "kd_epochs": int(distilled)}


def kd_epochs(meta: dict) -> int:
    """The epochs a cache holds views for (a cache written before ``kd_epochs`` was recorded holds them all)."""
    return int(meta.get("kd_epochs") or meta.get("epochs") or meta["augment"].get("epochs") or 0)


def _difference(have: dict, want: dict) -> str | None:
    """What makes a cache stale for this run, in words (None: usable)."""
    if have.get("version") != want["version"]:
        return f"cache format {have.get('version')}, this kdctl writes {want['version']}"
    if have.get("teacher_sha256") != want["teacher_sha256"]:
        return "built from another teacher (its weights differ)"
    if have.get("data_sha256") != want["data_sha256"] or have.get("images") != want["images"]:
        return "built from other training images or labels"
    for k in AUGMENT_KEYS:
        if (have.get("augment") or {}).get(k) != want["augment"].get(k):
            return f"built with {k}={(have.get('augment') or {}).get(k)!r}, the run has {want['augment'].get(k)!r}"
    if have.get("ultralytics") != want["ultralytics"]:
        return f"built with ultralytics {have.get('ultralytics')} (augmentations may differ), this is {want['ultralytics']}"
    if have.get("top_k") != want["top_k"]:
        return f"built with top_k={have.get('top_k')}, the recipe has {want['top_k']}"
    return None


def _short(have: dict, want: dict) -> bool:
    """A cache for the run that holds fewer distilling epochs than it needs (built for an earlier
    ``distill.stop_epoch``): :func:`build` adds the missing ones."""
    return kd_epochs(have) < want["kd_epochs"]


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


_OWN = re.compile(rf"{re.escape(META)}|\.{re.escape(META)}\.tmp-[0-9a-f]+|epoch-\d{{4,}}|\.epoch-\d{{4,}}\.\d+\.tmp")


def foreign_entries(path: Path) -> list[str]:
    """Names in a cache folder that a cache build did not write (its meta.json, epoch shards and their temporaries)."""
    return sorted(p.name for p in path.iterdir() if not _OWN.fullmatch(p.name))


def _shard(path: Path, epoch: int) -> Path:
    return path / f"epoch-{epoch:04d}"


FILES = ("scores", "boxes", "anchors", "rest", "crc")
DIGEST = "digest.json"  # in each epoch shard: the sha256 of its files, written before the shard is renamed into place


def _file_digests(shard: Path) -> dict:
    from kdctl.bundle.store import sha256_file

    return {f"{f}.npy": sha256_file(shard / f"{f}.npy") for f in FILES}


def _rebuild(recipe: str) -> str:
    """How to rebuild a cache: with the recipe being run where there is one (``kdctl cache info`` has none)."""
    return f"`kdctl cache build {recipe} --overwrite`"


def _verified(shard: Path, recipe: str = "RECIPE") -> None:
    """Refuse, in one line naming the file, an epoch shard whose files are not the ones its build wrote (edited,
    truncated, bit-flipped or missing): their values would be read as the teacher's outputs, and a corrupted anchor
    index fails deep inside a loss."""
    fix = f"rebuild the cache with {_rebuild(recipe)}"
    try:
        recorded = parse_json((shard / DIGEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckFailed(f"{shard / DIGEST}: missing or unreadable, so the shard cannot be verified; {fix}") from None
    missing = [f"{f}.npy" for f in FILES if not (shard / f"{f}.npy").is_file()]
    if missing:
        raise CheckFailed(f"{shard / missing[0]}: missing from the teacher cache; {fix}")
    for name, digest in _file_digests(shard).items():
        if not isinstance(recorded, dict) or recorded.get(name) != digest:
            raise CheckFailed(f"{shard / name}: not the file the cache build wrote (its sha256 differs from {DIGEST}); "
                              f"{fix}")


def verify(path: Path, meta: dict, recipe: str = "RECIPE") -> None:
    """Every epoch shard of the complete cache at ``path`` checked against its ``digest.json``: refused in one line
    naming the first shard missing or file altered (``cache build`` and ``cache info`` took a cache on its
    ``meta.json`` alone, and reported a corrupted one complete)."""
    for e in range(kd_epochs(meta)):
        shard = _shard(path, e)
        if not shard.is_dir():
            raise CheckFailed(f"{shard}: missing from the teacher cache; rebuild it with {_rebuild(recipe)}")
        _verified(shard, recipe)


def top_k_rows(scores: torch.Tensor, boxes: torch.Tensor, k: int) -> dict:
    """The stored form of dense head outputs ``scores`` (B, nc, A) and ``boxes`` (B, C, A): the ``k`` anchors with
    the highest class logit, their logits, and the mean class logit of the others."""
    b, nc, a = scores.shape
    k = min(k, a)
    conf = scores.amax(1)                                                     # B, A
    idx = conf.topk(k, dim=1).indices                                         # B, k
    s_top = scores.gather(2, idx[:, None, :].expand(b, nc, k))                # B, nc, k
    b_top = boxes.gather(2, idx[:, None, :].expand(b, boxes.shape[1], k))     # B, C, k
    rest = ((scores.sum(2) - s_top.sum(2)) / (a - k)) if a > k else torch.zeros(b, nc, dtype=scores.dtype,
                                                                                 device=scores.device)
    return {"scores": s_top.transpose(1, 2), "boxes": b_top.transpose(1, 2), "anchors": idx.int(), "rest": rest}


def dense_rows(rows: dict, anchors: int, device=None) -> dict:
    """Rebuild dense head outputs from stored rows: ``scores`` (B, nc, A) with the other anchors at their mean logit,
    ``boxes`` (B, C, A) zero there, and ``mask`` (B, A) true where the teacher's boxes are known."""
    s = torch.as_tensor(rows["scores"], device=device).float()               # B, k, nc
    bx = torch.as_tensor(rows["boxes"], device=device).float()               # B, k, C
    idx = torch.as_tensor(rows["anchors"], device=device).long()             # B, k
    rest = torch.as_tensor(rows["rest"], device=device).float()              # B, nc
    b, k, nc = s.shape
    scores = rest[:, :, None].expand(b, nc, anchors).clone()
    scores.scatter_(2, idx[:, None, :].expand(b, nc, k), s.transpose(1, 2))
    boxes = torch.zeros(b, bx.shape[2], anchors, device=s.device)
    boxes.scatter_(2, idx[:, None, :].expand(b, bx.shape[2], k), bx.transpose(1, 2))
    mask = torch.zeros(b, anchors, dtype=torch.bool, device=s.device)
    mask.scatter_(1, idx, True)
    return {"scores": scores, "boxes": boxes, "mask": mask}


# ---- reading --------------------------------------------------------------------------------------------------------

class TeacherCache:
    """A complete cache, opened read-only (memory-mapped shards)."""

    def __init__(self, path: Path, meta: dict | None = None, recipe: str = "RECIPE"):
        self.path, self.recipe = Path(path), recipe  # recipe: the one being run, named in the rebuild hints
        self.meta = json.loads((self.path / META).read_text()) if meta is None else meta  # meta: already read
        self.n, self.anchors = int(self.meta["views_per_epoch"]), int(self.meta["anchors"])
        self._open: dict[int, dict] = {}

    def _arrays(self, epoch: int) -> dict:
        if epoch not in self._open:
            shard = _shard(self.path, epoch)
            if not shard.is_dir():
                raise CheckFailed(f"{self.path}: teacher cache has no views for epoch {epoch + 1}; rebuild it with "
                                  f"{_rebuild(self.recipe)}")
            _verified(shard, self.recipe)  # once per epoch and process: a shard is read whole once to hash it
            self._open[epoch] = {f: np.load(shard / f"{f}.npy", mmap_mode="r") for f in FILES}
        return self._open[epoch]

    def rows(self, views, crcs=None) -> dict:
        """Stored rows of these view ids; with ``crcs`` (of the images being trained) each view is checked first."""
        out = {f: [] for f in FILES}
        for j, v in enumerate(views):
            epoch, i = divmod(int(v), self.n)
            a = self._arrays(epoch)
            if crcs is not None and int(a["crc"][i]) != int(crcs[j]):
                raise CheckFailed(f"{self.path}: the cached view of training image {i} in epoch {epoch + 1} is not the "
                                  "image being trained (its augmentation did not replay); rebuild the cache with "
                                  f"{_rebuild(self.recipe)}")
            for f in FILES:
                out[f].append(np.asarray(a[f][i]))
        return {f: np.stack(v) for f, v in out.items()}

    def teacher_head(self, views, crcs, device) -> dict:
        """Dense teacher head outputs for a batch of views (what head-level losses read)."""
        return dense_rows(self.rows(views, crcs), self.anchors, device)

    def __getstate__(self):  # travels to dataloader workers / checkpoints as a path
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def read_meta(path: Path, fix: str) -> dict:
    """A cache folder's ``meta.json``, or one line naming it (``fix``: what to do) when it is not a kdctl cache's
    record: not JSON, not an object, or without the keys every build writes."""
    meta = path / META
    try:
        have = parse_json(meta.read_text())
    except (ValueError, UnicodeDecodeError):
        raise KdctlError(f"{meta}: unreadable (not JSON); {fix}") from None
    missing = [k for k in ("version", "teacher_sha256", "augment", "complete") if not isinstance(have, dict)
               or k not in have]
    if missing or not isinstance(have.get("augment"), dict):
        raise KdctlError(f"{meta}: not a kdctl teacher cache record (no '{(missing or ['augment'])[0]}'); {fix}")
    return have


def open_cache(path: Path, want: dict, source: str) -> tuple[TeacherCache | None, dict]:
    """The complete cache at ``path`` for this run, or None when there is none (or a partial build, which
    :func:`build` resumes), with the record read (``{}`` where there is none); a stale one is refused in one line."""
    meta = path / META
    if not meta.is_file():
        if path.exists() and any(path.iterdir()):
            raise KdctlError(f"{source}: distill.cache.path: {path} is not a kdctl teacher cache (no {META}); "
                             "choose an empty or new folder")
        return None, {}
    have = read_meta(path, f"rebuild with {_rebuild(source)}")
    why = _difference(have, want)
    if why:
        raise KdctlError(f"{source}: distill.cache: {path} is stale: {why}; rebuild it with {_rebuild(source)}")
    if have.get("complete") and not _short(have, want):
        return TeacherCache(path, have, source), have
    return None, have


# ---- building -------------------------------------------------------------------------------------------------------

def cache_path(recipe) -> Path:
    """``distill.cache.path``, or ``$KDCTL_CACHE/teacher-outputs/<recipe name>``."""
    from kdctl.data.resolve import cache_dir

    c = recipe.distill.cache
    return Path(c.path) if c is not None and c.path else cache_dir() / "teacher-outputs" / recipe.name


def check_recipe(recipe, source: str, student=None, teacher=None) -> None:
    """The cache serves head-level terms of a YOLO teacher; say so in one line otherwise."""
    from kdctl.distill.losses import LOSSES

    where = cache_path(recipe)
    if where.exists() and not where.is_dir():
        raise RecipeError(f"{source}: distill.cache.path: {where} is a file; give a folder (it is created if missing)")
    heads = [i for i, s in enumerate(recipe.distill.losses) if LOSSES[s.name].kind in ("head", "cross_head")]
    if not heads:
        raise RecipeError(f"{source}: distill.cache: the teacher cache stores the teacher's head outputs, and "
                          "distill.losses has no head-level loss (kd_logit, ld, crosskd); feature losses always run "
                          "online")
    for i, spec in enumerate(recipe.distill.losses):
        if LOSSES[spec.name].kind == "cross_head" and spec.params.get("align") is True:
            raise RecipeError(f"{source}: distill.losses[{i}].params.align: '{spec.name}' aligns the student's maps "
                              "with the teacher's own, which a teacher cache does not keep; set align: false")
    for name, m in (("teacher", teacher), ("student", student)):
        if m is not None:
            from kdctl.detectors import family, yolo
            from kdctl.detectors.yolo import DETECT_HEADS, head_name

            if family(m) is not yolo or head_name(m) not in DETECT_HEADS:
                raise RecipeError(f"{source}: distill.cache: the teacher cache is for YOLO detectors' dense heads; the "
                                  f"{name} is not one")


def build(recipe, source: str, teacher, data_yaml: Path, images: list[Path], path: Path, *, progress=None,
          overwrite: bool = False, check: bool = False) -> TeacherCache:
    """Run ``teacher`` over every view of the run ``recipe`` describes and store its head outputs at ``path``
    (resuming a killed build); returns the opened cache. ``overwrite`` replaces a stale kdctl cache (never a folder
    kdctl did not write). ``check`` (``kdctl cache build``) verifies a complete cache's every shard now; a
    distillation leaves that to the epochs, each verified as it is first read, so no shard is hashed twice."""
    from kdctl.bundle import write_json_atomic
    from kdctl.detectors.yolo import train_args, train_dataset
    from kdctl.distributed import weights_digest
    from kdctl.progress import Step
    from kdctl.training import _overrides

    cfg = recipe.distill.cache
    args = train_args({k: v for k, v in _overrides(recipe, data_yaml, "x.yaml", path).items()
                       if k not in ("model", "project", "name", "exist_ok", "pretrained", "quantize")})
    teacher = teacher.float().eval()
    epochs = int(recipe.train.epochs)
    distilled = recipe.distill.stop_epoch or epochs  # after distill.stop_epoch the teacher is not asked
    want = expected_meta(weights_digest(teacher), images, args, cfg.top_k, distilled)
    if overwrite and (path / META).is_file():
        foreign = foreign_entries(path)
        if foreign:  # --overwrite replaces what kdctl wrote, never a user's file put beside it
            raise KdctlError(f"{source}: distill.cache.path: {path} also holds {foreign[0]!r}, which kdctl did not "
                             f"write; refusing to replace the cache (move it, or choose another path)")
        shutil.rmtree(path)
    cache, have = open_cache(path, want, source)
    if cache is not None:
        if check:
            verify(path, have, source)
        return cache
    path.mkdir(parents=True, exist_ok=True)

    base = train_dataset(args, data_yaml, recipe.train.batch, max(int(teacher.stride.max()), 32))
    views = ReplayViews(base, recipe.train.seed)
    n = len(views)
    head = len(teacher.model) - 1
    dev = next(teacher.parameters()).device
    from kdctl.distill.taps import FeatureTaps, head_outputs
    from kdctl.detectors.yolo import teacher_forward

    with torch.no_grad(), FeatureTaps(teacher, [head]) as taps:
        teacher_forward(teacher, torch.zeros(1, 3, recipe.train.imgsz, recipe.train.imgsz, device=dev))
        probe = head_outputs(taps.outputs[head])
    nc, box_ch, anchors = probe["scores"].shape[1], probe["boxes"].shape[1], probe["scores"].shape[2]
    k = min(cfg.top_k, anchors)
    meta = {**want, "views_per_epoch": n, "epochs": epochs, "anchors": anchors, "nc": nc, "box_channels": box_ch,
            "k": k, "head_layer": head, "seed_rule": "view seed = SeedSequence([train.seed, epoch, image]) "
            "(kdctl.distill.cache.view_seed)", "complete": False, "build_seconds": have.get("build_seconds", 0.0)}
    write_json_atomic(path / META, meta)

    bar = Step(progress, "teacher cache: epoch", total=distilled)
    t0 = time.perf_counter()
    closed = not recipe.train.close_mosaic
    for e in range(distilled):
        if not closed and e >= epochs - recipe.train.close_mosaic:  # as Ultralytics' trainer closes mosaic
            closed = True
            from copy import copy

            base.mosaic = False
            base.close_mosaic(hyp=copy(args))
        if _shard(path, e).is_dir():
            bar.advance()
            continue
        _write_epoch(path, e, views, base.collate_fn, teacher, head, (k, nc, box_ch), recipe.train)
        faults.point("cache:epoch-written")
        bar.advance()
    for stale in path.glob(".epoch-*.tmp"):  # left by killed builds (not by one still running)
        if not _alive(stale.name.split(".")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.glob("epoch-*/*.npy"))
    meta.update(complete=True, build_seconds=round(meta["build_seconds"] + time.perf_counter() - t0, 2),
                bytes=size, bytes_per_view=round(size / max(1, n * distilled), 1))
    write_json_atomic(path / META, meta)
    return TeacherCache(path, recipe=source)


def _write_epoch(path: Path, e: int, views, collate_fn, teacher, head: int, shape: tuple, train) -> None:
    """Epoch ``e``'s shard: the teacher's top-``k`` head rows of each of its ``len(views)`` views (``shape``: k,
    classes, box channels), written in a temp folder of this process and renamed into place with its digests."""
    from kdctl.bundle import write_json_atomic
    from kdctl.detectors.yolo import teacher_forward
    from kdctl.distill.taps import FeatureTaps, head_outputs

    (k, nc, box_ch), n, dev = shape, len(views), next(teacher.parameters()).device
    tmp = path / f".epoch-{e:04d}.{os.getpid()}.tmp"  # per process: two builds of one cache do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arr = {"scores": np.lib.format.open_memmap(tmp / "scores.npy", "w+", np.float16, (n, k, nc)),
           "boxes": np.lib.format.open_memmap(tmp / "boxes.npy", "w+", np.float16, (n, k, box_ch)),
           "anchors": np.lib.format.open_memmap(tmp / "anchors.npy", "w+", np.int32, (n, k)),
           "rest": np.lib.format.open_memmap(tmp / "rest.npy", "w+", np.float16, (n, nc)),
           "crc": np.lib.format.open_memmap(tmp / "crc.npy", "w+", np.uint32, (n,))}
    loader = torch.utils.data.DataLoader(views, batch_size=train.batch, shuffle=False,
                                         sampler=[e * n + i for i in range(n)], collate_fn=collate_fn,
                                         num_workers=train.workers)
    for batch in loader:
        ids = np.asarray(batch["kd_view"]) - e * n
        img = batch["img"].to(dev).float() / 255
        with torch.no_grad(), FeatureTaps(teacher, [head]) as taps:
            teacher_forward(teacher, img)
        h = head_outputs(taps.outputs[head])
        rows = top_k_rows(h["scores"].float(), h["boxes"].float(), k)
        for f in ("scores", "boxes", "rest"):
            arr[f][ids] = rows[f].cpu().numpy().astype(np.float16)
        arr["anchors"][ids] = rows["anchors"].cpu().numpy()
        arr["crc"][ids] = np.asarray(batch["kd_crc"], dtype=np.uint32)
    for a in arr.values():
        a.flush()
    del arr
    write_json_atomic(tmp / DIGEST, _file_digests(tmp))
    try:
        tmp.replace(_shard(path, e))
    except OSError:  # another build of this cache finished the epoch first: same content, keep theirs
        if not _shard(path, e).is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
