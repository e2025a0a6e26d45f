"""Distillation losses by level; importing this package fills :data:`LOSSES`."""

from kdctl.distill.losses.registry import LOSSES, LossEntry, register_loss
from kdctl.distill.losses import detections, detr, feature, logit, two_stage  # noqa: F401  (registration side effect)

__all__ = ["LOSSES", "LossEntry", "register_loss"]
