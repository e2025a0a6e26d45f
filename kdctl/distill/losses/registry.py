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
                              # "rpn" / "roi": a two-stage detector's RPN outputs / RoI head on the student's proposals;
                              # "detr": a DETR decoder's per-layer predictions (student) and final ones (teacher);
                              # "detr_query": both decoders' answers to one shared set of distillation queries
    params: dict              # parameter name -> default, read from the constructor
    paper: str

    @property
    def default_level(self) -> str:
        return self.levels[0]


LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, levels: tuple[str, ...], kind: str):
    if kind not in ("feature", "head", "rpn", "roi", "detr", "detr_query"):
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


def kd_item(term: str) -> str:
    """The loss-item name a KD term is logged under (``kd_cwd``; ``kd_logit`` stays as it is)."""
    return term if term.startswith("kd_") else f"kd_{term}"
