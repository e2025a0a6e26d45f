"""The distillation criterion: Σ weight·term over the recipe's losses, each term a registered loss applied to
pairs of (student layer, teacher layer) outputs. Adapters live inside the terms, so they train with the student
and are left out of the exported model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdctl.distill.losses import LOSSES
from kdctl.distill.taps import head_outputs, pair_same_size


# terms that read a family's own outputs under these keys (``s_out["roi"]`` ...) rather than tapped modules
PSEUDO_KINDS = ("rpn", "roi", "detr", "detr_query", "detections")
PSEUDO_KEY = {"rpn": "rpn", "roi": "roi", "detr": "query", "detr_query": "distill_queries", "detections": "detections"}


@dataclass
class DistillContext:
    """What some losses need beyond the maps: ground-truth boxes (xyxy, input pixels) per image and input size; for
    a dense head, the student's own label assignment of this batch (``assigned``: ``pos_weight`` N×A, the assigner's
    target score on its positives and 0 elsewhere, and ``vlr`` N×A, anchor points inside a ground-truth box that are
    not positives), filled by the family when a term asks for it (:attr:`DistillationCriterion.needs_assignment`);
    the teacher itself (``teacher``), for a term that runs its head on the student's maps."""

    imgsz: int
    boxes: list[torch.Tensor] = field(default_factory=list)
    assigned: dict | None = None
    teacher: nn.Module | None = None  # the frozen teacher, for terms that run part of it (crosskd: its head)

    @classmethod
    def from_batch(cls, batch: dict) -> "DistillContext":
        img = batch["img"]
        n, _, h, w = img.shape
        boxes = []
        bi, bb = batch.get("batch_idx"), batch.get("bboxes")
        for i in range(n):
            if bb is None or not len(bb):
                boxes.append(torch.zeros(0, 4))
                continue
            b = bb[bi.view(-1) == i].float().cpu()
            xyxy = torch.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                                (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], 1)
            boxes.append(xyxy)
        return cls(imgsz=w, boxes=boxes)


def check_params(params: dict) -> None:
    """Raise ``ValueError`` (one line, naming the parameter) for a value no loss can use: the ranges a recipe is
    checked against (``kdctl.distill.losses.registry``), for a criterion built in Python without one."""
    from kdctl.distill.losses.registry import COUNTS, NON_NEGATIVE, POSITIVE, RANGES

    for k, v in params.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if k in POSITIVE and not (number and v > 0):
            raise ValueError(f"{k}: {v!r} must be a number above 0")
        if k in RANGES and not (number and RANGES[k][0](v)):
            raise ValueError(f"{k}: {v!r} must be a number {RANGES[k][1]}")
        if k in COUNTS and not (isinstance(v, int) and not isinstance(v, bool) and v >= COUNTS[k]):
            raise ValueError(f"{k}: {v!r} must be a whole number, {COUNTS[k]} or more")
        if (k in NON_NEGATIVE or k.endswith("_weight")) and not isinstance(v, bool) and not (number and v >= 0):
            raise ValueError(f"{k}: {v!r} must be a number, 0 or more")


class DistillTerm(nn.Module):
    """One recipe entry: a loss per layer pair, averaged over the pairs."""

    def __init__(self, name: str, loss: str, s_layers: list[int], t_layers: list[int], weight: float,
                 params: dict, s_channels: list[int], t_channels: list[int]):
        super().__init__()
        check_params(params)
        entry = LOSSES[loss]
        self.name, self.loss_name, self.kind = name, loss, entry.kind
        self.s_layers, self.t_layers, self.weight = list(s_layers), list(t_layers), float(weight)
        # a head term between heads of different pyramid levels (P2, P6): the anchors of the levels both have
        self.register_buffer("anchor_index", None, persistent=False)          # teacher's
        self.register_buffer("student_anchor_index", None, persistent=False)
        self.teacher_anchors = self.student_anchors = 0
        if entry.kind == "cross_head":  # one loss over the head's levels, an adapter per level
            self.losses = nn.ModuleList([entry.cls(s_channels, t_channels, **params)])
        elif entry.kind in PSEUDO_KINDS or entry.kind == "head":
            # one loss over the whole head; a RoI feature loss gets its adapter's channel counts
            self.losses = nn.ModuleList([entry.cls(s_channels[0], t_channels[0], **params) if s_channels else
                                         entry.cls(**params)])
        else:
            self.losses = nn.ModuleList(entry.cls(sc, tc, **params) for sc, tc in zip(s_channels, t_channels))

    def forward(self, s_out: dict, t_out: dict, ctx: DistillContext) -> torch.Tensor:
        if self.kind == "head":
            s, t = head_outputs(s_out[self.s_layers[0]]), head_outputs(t_out[self.t_layers[0]])
            if self.anchor_index is not None:
                t = select_anchors(t, self.anchor_index, self.teacher_anchors)
            if getattr(self.losses[0], "uses_assignment", False):
                if ctx.assigned is None:
                    raise ValueError(f"{self.name}: this detector's training loss has no label assigner to read the "
                                     "positives from; set positives: false")
                s = {**s, "pos_weight": ctx.assigned["pos_weight"], "vlr": ctx.assigned["vlr"]}
            if self.student_anchor_index is not None:
                s = select_anchors(s, self.student_anchor_index, self.student_anchors)
            return self.losses[0](s, t, ctx)
        if self.kind == "cross_head":  # the student head's inputs (its neck maps) against the teacher head's outputs
            s, t = head_outputs(s_out[self.s_layers[0]]), head_outputs(t_out[self.t_layers[0]])
            if self.anchor_index is not None:  # the teacher's outputs at the levels the student has too
                t = select_anchors(t, self.anchor_index, self.teacher_anchors)
            return self.losses[0](s["feats"], t, ctx)
        if self.kind in PSEUDO_KINDS:
            return self.losses[0](s_out[PSEUDO_KEY[self.kind]], t_out[PSEUDO_KEY[self.kind]], ctx)
        vals = [loss(s_out[si], t_out[ti], ctx) for loss, si, ti in zip(self.losses, self.s_layers, self.t_layers)]
        return torch.stack(vals).mean()


def select_anchors(head: dict, index: torch.Tensor, anchors: int) -> dict:
    """A dense head's outputs (``scores`` B×nc×A, ``boxes`` B×C×A, a cache's ``mask`` B×A) at the anchors ``index``
    of its ``anchors``; what is not per anchor (``feats``) is left as it is."""
    return {k: v.index_select(-1, index) if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[-1] == anchors
            else v for k, v in head.items()}


def level_anchor_index(student_feats: list, teacher_feats: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Student and teacher anchor indices that line up, level by level, when the heads have different pyramid
    levels (a P2 or P6 model on one side, P3-P5 on the other): Ultralytics' heads flatten each level's map in order
    and concatenate the levels, so levels of equal map size correspond (paired as feature maps are, by
    :func:`~kdctl.distill.taps.pair_same_size`). Levels only one side has are left out. None if the heads share no
    level."""
    def levels(feats):  # {level: (C, H, W)} and each level's anchor range
        offsets = [0]
        for f in feats:
            offsets.append(offsets[-1] + f.shape[2] * f.shape[3])
        return {i: tuple(f.shape[1:]) for i, f in enumerate(feats)}, offsets

    (s_maps, s_off), (t_maps, t_off) = levels(student_feats), levels(teacher_feats)
    pairs_s, pairs_t = pair_same_size(list(s_maps), s_maps, t_maps)
    if not pairs_s:
        return None
    return tuple(torch.cat([torch.arange(off[i], off[i + 1]) for i in pairs])
                 for pairs, off in ((pairs_s, s_off), (pairs_t, t_off)))


def make_term(spec, seen: dict, s_layers: list, t_layers: list, s_channels: list[int], t_channels: list[int],
              where: str) -> DistillTerm:
    """The term of one recipe loss (a second ``cwd`` is named ``cwd2``); a parameter out of range is a one-line
    ``RecipeError`` at ``where.params``."""
    from kdctl.errors import RecipeError

    name = spec.name if spec.name not in seen else f"{spec.name}{seen[spec.name] + 1}"
    seen[spec.name] = seen.get(spec.name, 0) + 1
    try:
        return DistillTerm(name, spec.name, s_layers, t_layers, spec.weight, dict(spec.params), s_channels, t_channels)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}.params: {e}") from None


class DistillationCriterion(nn.Module):
    """Computes every term, each times its recipe weight and its auto-balance scale.

    ``balance`` (a fraction) sets each scale so that ``scale·term ≈ balance · task_loss`` over the first
    ``balance_batches`` batches: the ratio of the *medians* over those batches, so one heavy-tailed batch (neck
    features vary 15-35x between batches) cannot fix a weight 100x too large; until then the running medians are
    used. The scales are then fixed, saved and reused on ``--resume``. Afterwards no term may exceed ``cap`` times
    its share (``cap · balance · weight · task``) on any batch: a larger value is scaled down (its gradient keeps its
    direction), so a rare outlier batch cannot blow up the student's gradients.
    """

    def __init__(self, terms: list[DistillTerm], balance: float | None = None, balance_batches: int = 8,
                 cap: float = 4.0):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.balance, self.balance_batches, self.cap = balance, balance_batches, cap
        self.scales: list[float] | None = None if balance else [1.0] * len(terms)
        self._seen: list[tuple[float, list[float]]] = []   # (task, raw terms) of the balance batches
        self.stopped = False  # distill.stop_epoch reached: the trainer's epoch callback sets it, models then skip KD
        self.ramp = 1.0       # distill.warmup_epochs: the share of their weights the terms have in this epoch

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def student_layers(self) -> list[int]:
        """The student modules to tap (terms reading RPN/RoI/decoder outputs are fed by the family instead)."""
        return sorted({i for t in self.terms if t.kind not in PSEUDO_KINDS for i in t.s_layers}, key=str)

    def teacher_layers(self) -> list[int]:
        return sorted({i for t in self.terms if t.kind not in PSEUDO_KINDS for i in t.t_layers}, key=str)

    def teacher_head_layers(self) -> list:
        """Teacher layers read by head-level terms (what a teacher cache can serve)."""
        return sorted({t.t_layers[0] for t in self.terms if t.kind in ("head", "cross_head")}, key=str)

    @property
    def needs_assignment(self) -> bool:
        """Whether a term reads the student's label assignment (``DistillContext.assigned``)."""
        return any(getattr(t.losses[0], "uses_assignment", False) for t in self.terms if t.kind == "head")

    def kinds(self) -> set[str]:
        return {t.kind for t in self.terms}

    def _balance_scales(self, task_loss: float, raw: list[torch.Tensor]) -> list[float]:
        import statistics

        from kdctl.distributed import all_gather

        # under DDP every rank adds every rank's batch, so all ranks settle on the same scales (one KD objective)
        self._seen.extend(all_gather((task_loss, [max(float(r.detach()), 1e-12) for r in raw])))
        task = statistics.median(t for t, _ in self._seen)
        scales = [self.balance * task / statistics.median(v[i] for _, v in self._seen) for i in range(len(raw))]
        self.current = scales
        if len(self._seen) >= self.balance_batches:
            self.scales, self._seen = scales, []
        return scales

    def balance_state(self) -> dict:
        """What ``--resume`` needs to continue balancing exactly where the killed run was."""
        return {"names": self.names, "scales": self.scales, "seen": self._seen,
                "current": self.scales or getattr(self, "current", None), "batches": self.balance_batches}

    def load_balance_state(self, state: dict) -> None:
        self.scales = state.get("scales")
        self._seen = [(float(t), [float(x) for x in v]) for t, v in state.get("seen") or []]
        if state.get("current"):
            self.current = state["current"]

    def at_epoch(self, epoch: int, stop_epoch: int | None, warmup_epochs: int | None = None) -> None:
        """Before 0-based ``epoch``: KD is off from epoch ``stop_epoch`` on (``distill.stop_epoch``; None: never);
        with ``warmup_epochs`` (``distill.warmup_epochs``) every term has ``(epoch + 1) / warmup_epochs`` of its
        weight until that reaches 1."""
        self.stopped = stop_epoch is not None and epoch >= stop_epoch
        self.ramp = 1.0 if not warmup_epochs else min(1.0, (epoch + 1) / warmup_epochs)

    def forward(self, s_out: dict, t_out: dict, ctx: DistillContext, task_loss: float) -> dict[str, torch.Tensor]:
        raw = [term(s_out, t_out, ctx) for term in self.terms]
        scales = self.scales if self.scales is not None else self._balance_scales(task_loss, raw)
        out = {}
        for t, r, s in zip(self.terms, raw, scales):
            v = r * t.weight * s
            if self.balance and self.cap and task_loss > 0:
                limit = self.cap * self.balance * t.weight * task_loss
                if float(v.detach()) > limit:
                    v = v * (limit / float(v.detach()))
            out[t.name] = v * self.ramp if self.ramp != 1.0 else v
        return out
