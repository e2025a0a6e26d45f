"""The loss registry: strict names, filled by decorator, listable with ``kdctl list losses``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class LossEntry:
    name: str
    cls: type
    levels: tuple[str, ...]   # taxonomy levels the loss may be attached at; the first is its default
    kind: str                 # "feature": (student map, teacher map) pairs; "head": detection-head outputs;
                              # "cross_head": the student head's input maps through the teacher's head, against
                              # the teacher head's outputs;
                              # "rpn" / "roi": a two-stage detector's RPN outputs / RoI head on the student's proposals;
                              # "detr": a DETR decoder's per-layer predictions (student) and final ones (teacher);
                              # "detr_query": both decoders' answers to one shared set of distillation queries;
                              # "detections": the teacher's final detections, as targets of the student's own loss
    params: dict              # parameter name -> default, read from the constructor
    paper: str

    @property
    def default_level(self) -> str:
        return self.levels[0]


LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, levels: tuple[str, ...], kind: str):
    if kind not in ("feature", "head", "cross_head", "rpn", "roi", "detr", "detr_query", "detections"):
        raise ValueError(kind)

    def deco(cls):
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        sig = inspect.signature(cls.__init__)
        params = {k: p.default for k, p in sig.parameters.items()
                  if k not in ("self", "s_channels", "t_channels") and p.default is not inspect.Parameter.empty}
        LOSSES[name] = LossEntry(name, cls, levels, kind, params, _citation(cls.__doc__ or ""))
        cls.registry_name = name
        return cls

    return deco


def _citation(doc: str) -> str:
    """The docstring's first paragraph on one line, up to the end of its first parenthesis (the paper), else whole."""
    import re

    first = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.search(r"\)[.:,]?(\s|$)", first)
    return first[:m.start() + 1] if m else first


# What a parameter's value must be, by name (every loss uses these names in the same sense): a recipe with a
# value outside its range is refused at `recipe check`, before it would turn into NaN or a silent no-op in training.
POSITIVE = ("temperature", "box_temperature", "tau", "temp", "p", "scale")
NON_NEGATIVE = ("cls_weight", "l1_weight", "giou_weight", "box_weight", "background_weight", "bound_weight",
                "alpha", "beta", "gamma", "lam", "margin", "vlr_weight")
RANGES = {"ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "psi": (lambda v: 0 < v <= 1, "in (0, 1]"),
          "min_score": (lambda v: 0 <= v < 1, "in [0, 1)")}
COUNTS = {"teacher_queries": 1, "random_queries": 0}


def param_problem(entry: LossEntry, name: str, value) -> str | None:
    """Why ``value`` cannot be ``entry``'s parameter ``name`` (its type and range), or None when it can."""
    import math

    from kdctl.errors import shown

    default = entry.params[name]
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {shown(value)}"
    if not math.isfinite(value):
        return f"must be finite, got {value}"
    if name in COUNTS:
        if value != int(value) or value < COUNTS[name]:
            return f"must be a whole number ≥ {COUNTS[name]}, got {value}"
    elif name in POSITIVE and value <= 0:
        return f"must be > 0, got {value}"
    elif name in NON_NEGATIVE and value < 0:
        return f"must be ≥ 0, got {value}"
    elif name in RANGES and not RANGES[name][0](value):
        return f"must be {RANGES[name][1]}, got {value}"
    return None


def weighted_mean(x, w):
    """``Σ w·x / Σ w`` over all elements (tensors of one shape); 0, still in the graph, where every weight is 0."""
    return (x * w).sum() / w.sum().clamp(min=1e-6)


def kd_item(term: str) -> str:
    """The loss-item name a KD term is logged under (``kd_cwd``; ``kd_logit`` stays as it is)."""
    return term if term.startswith("kd_") else f"kd_{term}"


def last_distilled_epoch(metrics: dict) -> dict:
    """A distill bundle's per-epoch row whose KD terms to show: the last epoch, or the last before
    ``distill.stop_epoch`` (the terms are 0 after it); {} without epochs."""
    epochs = (metrics.get("epochs") or [])[:metrics.get("kd_stop_epoch") or None]
    return epochs[-1] if epochs else {}
