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

LABEL = "RT-DETR"
MIN_OPSET = 16  # grid_sample in the deformable attention
SET_OUTPUT = True  # queries are a set: parity pairs them first (kdctl.export.base.align_sets)


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
    from kdctl.detectors import traceable_copy

    net = DenseOutput(traceable_copy(model)).eval()
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
