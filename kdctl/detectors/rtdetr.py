"""Ultralytics RT-DETR as a kdctl detector family (train, eval, export, profile; distillation levels come with the
DETR-family KD losses).

RT-DETR shares Ultralytics' checkpoint format and model-YAML parsing with YOLO (:mod:`kdctl.detectors.yolo` loads
and saves both); what differs lives here: the trainer (Ultralytics' ``RTDETRTrainer``: Hungarian matching,
denoising queries), the output and its export, and which graph nodes INT8 quantization leaves in float.

Output: kdctl's evaluator, parity checks and runtimes take one dense layout for every family, ``(N, 4 + nc, Q)``
with ``cx, cy, w, h`` in input pixels and class probabilities. :class:`DenseOutput` turns RT-DETR's last decoder
layer (normalised boxes, class logits per query) into it, in PyTorch and in every exported graph, so the same
post-processing runs everywhere (RT-DETR is NMS-free; the evaluator's class-aware NMS at IoU 0.7 only removes
near-duplicate queries).
"""

from __future__ import annotations

import torch
from torch import nn

from kdctl.detectors.ultralytics_env import prepare

prepare()

from ultralytics.models.rtdetr.train import RTDETRTrainer  # noqa: E402
from ultralytics.nn.tasks import RTDETRDetectionModel  # noqa: E402

HEADS = ("RTDETRDecoder",)
MIN_OPSET = 16  # grid_sample in the deformable attention


class DenseOutput(nn.Module):
    """RT-DETR in eval mode -> ``(N, 4 + nc, Q)``: boxes ``cx, cy, w, h`` in input pixels, class probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, raw = self.model(x)
        boxes, logits = raw[0][-1], raw[1][-1]  # last decoder layer: (N, Q, 4) normalised, (N, Q, nc)
        scale = torch.tensor([x.shape[3], x.shape[2], x.shape[3], x.shape[2]], dtype=boxes.dtype, device=boxes.device)
        return torch.cat([boxes * scale, logits.sigmoid()], -1).transpose(1, 2)


def is_rtdetr(model: nn.Module) -> bool:
    return isinstance(model, RTDETRDetectionModel) or type(getattr(model, "model", [None])[-1]).__name__ in HEADS


def build_detector(cfg, nc: int) -> nn.Module:
    return RTDETRDetectionModel(str(cfg), nc=nc, verbose=False)


def trainer(overrides: dict, callbacks=None):
    """Ultralytics' RT-DETR trainer (plain training: KD for DETR-family detectors is not there yet)."""
    return RTDETRTrainer(overrides=overrides, _callbacks=callbacks)


def plain_student(model: nn.Module) -> nn.Module:
    return model.float().eval()


def export_module(model: nn.Module, imgsz: int, batch: int = 1, *, dynamic: bool = False,
                  fmt: str = "onnx") -> tuple[nn.Module, torch.Tensor]:
    """A copy ready to trace: BatchNorm folded, the dense output, no gradients; anchors built for ``imgsz``."""
    import copy

    m = copy.deepcopy(model).float().eval()
    m = m.fuse(verbose=False) if hasattr(m, "fuse") else m
    for p in m.parameters():
        p.requires_grad_(False)
    net = DenseOutput(m).eval()
    x = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        net(x)
    return net, x


def float_tail(nodes: list[tuple[str, str | None]], model: nn.Module) -> list[str]:
    """Graph nodes INT8 quantization leaves in float: the whole transformer decoder (query selection, deformable
    attention, box refinement), where INT8 costs accuracy out of proportion to its share of the time; the CNN
    backbone and neck are quantized. ``nodes`` are (name, op type) of an ONNX graph or OpenVINO names."""
    from kdctl.detectors.yolo import _module_path

    head = f"model.{len(model.model) - 1}"
    out = []
    for name, _op in nodes:
        path = _module_path(name)
        if path.startswith("model.model."):  # traced through DenseOutput: model.model.<i>
            path = path[len("model."):]
        if path == head or path.startswith(head + ".") or not path.startswith("model."):
            out.append(name)  # the decoder, and DenseOutput's own arithmetic
    return out


UNMATCHED_BOX = 0.05      # a pair whose boxes differ by more than 5 % of the image is two different queries
MAX_UNMATCHED = 0.10      # ... and up to 10 % of the compared queries may be such pairs


def align_outputs(reference, candidate):
    """Pair a runtime's queries with PyTorch's before comparing them; returns both (restricted to the pairs whose
    comparison is well defined) and what was left out.

    A DETR output is a set, so each image's candidate queries are reordered by Hungarian matching (box L1 in units
    of the image size, plus score L1). Its queries come from a top-k over the encoder's anchor scores, and which
    anchors make the cut can change with float rounding where scores nearly tie (common in barely trained models):
    the least confident half of the queries is not compared, nor are up to 10 % of the rest whose matched boxes
    are more than 5 % of the image apart (a different query, not a numerical error). Beyond 10 %, all are
    compared, and the check fails. The mAP check sees every query."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    refs, cands, dropped, compared = [], [], 0, 0
    for i in range(reference.shape[0]):
        r, c = reference[i].T, candidate[i].T  # (Q, 4 + nc)
        conf = r[:, 4:].max(1)
        keep = np.flatnonzero(conf >= np.median(conf))
        scale = max(float(np.abs(r[:, :4]).max()), 1.0)
        box = np.abs(r[keep, None, :4] - c[None, :, :4]).sum(-1) / scale
        ri, ci = linear_sum_assignment(box + np.abs(r[keep, None, 4:] - c[None, :, 4:]).sum(-1))
        far = np.abs(r[keep[ri], :4] - c[ci, :4]).max(1) / scale > UNMATCHED_BOX
        if far.sum() <= MAX_UNMATCHED * len(ri):
            ri, ci, dropped = ri[~far], ci[~far], dropped + int(far.sum())
        compared += len(ri)
        refs.append(r[keep[ri]])
        cands.append(c[ci])
    n = min(len(x) for x in refs)  # images keep different counts: compare the first n of each
    pack = lambda xs: np.stack([x[:n] for x in xs]).transpose(0, 2, 1)  # noqa: E731
    return pack(refs), pack(cands), {"queries_compared": compared, "queries_unmatched": dropped}
