"""Detector families: everything that knows a detector library lives here, one module per family.

Only modules in this package import Ultralytics (or, later, ``torchvision.models.detection``); a test fails if any
other module does. A family module provides:

- build / load: ``build_detector(cfg, nc)`` from a model YAML (nothing downloaded), ``load_detector(path)`` from a
  checkpoint, ``check_model_name(name, field, source)`` for a name the library resolves itself;
- fit: the trainer (``KDTrainer``, ``KDRTDETRTrainer``, torchvision's ``Trainer``) with the KD criterion and the
  frozen teacher attached;
- facts about a model: ``num_classes``, ``max_stride``, ``gflops``; ``plain_student`` strips KD parts;
- deployment: ``save_checkpoint`` (a checkpoint the library loads as its own), ``float_tail`` (graph nodes INT8
  quantization must leave in float: the box decoding).

Families: Ultralytics YOLO (:mod:`kdctl.detectors.yolo`), Ultralytics RT-DETR (:mod:`kdctl.detectors.rtdetr`) and
torchvision's Faster R-CNN (:mod:`kdctl.detectors.torchvision`, its distillation in
:mod:`kdctl.detectors.torchvision_kd`); RT-DETR's KD model and trainer live in its module.
:func:`family` picks the module for a model, a model YAML or a ``torchvision:`` name.
"""

from __future__ import annotations

import errno
import re
import warnings
from types import ModuleType


def family(model_or_cfg) -> ModuleType:
    """The family module of a built model or of a model YAML (path, name or dict): :mod:`.rtdetr` for an
    RT-DETR head, else :mod:`.yolo` (which refuses other tasks with one line in ``check_family``)."""
    from kdctl.detectors import yolo

    if (isinstance(model_or_cfg, str) and model_or_cfg.startswith("torchvision:")) or \
            type(model_or_cfg).__name__ == "TorchvisionDetector":
        from kdctl.detectors import torchvision

        return torchvision
    try:
        head = yolo.head_name(model_or_cfg)
    except Exception:  # a YAML that does not parse: the YOLO builder reports it in one line
        return yolo
    if head in ("RTDETRDecoder",):
        from kdctl.detectors import rtdetr

        return rtdetr
    return yolo


def build_criterion(student, setup, imgsz: int):
    """The KD criterion of a ``DistillSetup`` for this student's family (layers resolved, adapters sized, every
    loss's pair and level checked; a mismatch is a one-line ``RecipeError``)."""
    from kdctl.detectors import torchvision

    if family(student) is torchvision:
        from kdctl.detectors.torchvision_kd import build_criterion as build
    else:
        from kdctl.detectors.yolo import build_criterion as build  # YOLO and RT-DETR share Ultralytics' layer list
    return build(student, setup.teacher, setup.losses, setup.balance, imgsz, setup.source, setup.balance_batches,
                 setup.balance_cap)


def keep_classes(model, index: list[int], names: list[str]):
    """A copy of ``model`` predicting only its classes ``index``, in that order, named ``names`` (the family's
    ``keep_classes``: a YOLO or RT-DETR head cut to those classes' sigmoids, a Faster R-CNN's detections of other
    classes dropped); None for a head it does not know."""
    fn = getattr(family(model), "keep_classes", None)
    try:
        return fn(model, index, names) if fn is not None else None
    except ValueError:
        return None


def dense_module(model):
    """A module whose eval output is kdctl's dense layout ``(N, 4 + nc, A)`` (boxes in input pixels, class
    probabilities), for the evaluator and parity checks."""
    fam = family(model)
    return fam.DenseOutput(model) if hasattr(fam, "DenseOutput") else model


def traceable_copy(model):
    """A copy of a detector to trace for export: FP32, eval mode, BatchNorm folded where the family folds it (into
    the fake-quantized convolutions too, for a QAT student), no gradients."""
    import copy

    m = copy.deepcopy(model).float().eval()
    m = m.fuse(verbose=False) if hasattr(m, "fuse") else m
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def export_module(model, imgsz: int, batch: int = 1, *, dynamic: bool = False, fmt: str = "onnx"):
    return family(model).export_module(model, imgsz, batch, dynamic=dynamic, fmt=fmt)


def float_tail(nodes, model) -> list[str]:
    return family(model).float_tail(nodes, model)


def min_opset(model) -> int:
    return getattr(family(model), "MIN_OPSET", 11)


def set_output(model) -> bool:
    """True when positions in the dense output are a set (DETR queries, two-stage detections), not fixed anchors:
    parity checks then pair outputs before comparing them."""
    return getattr(family(model), "SET_OUTPUT", False)


def parity_on_map(model, precision: str) -> bool:
    """True when the family's outputs at ``precision`` are judged on mAP instead of against PyTorch's raw outputs
    (its ``PARITY_ON_MAP``): a discrete selection after the rounding (proposals, NMS) picks other detections."""
    return precision in getattr(family(model), "PARITY_ON_MAP", ())


class NotACheckpoint(ValueError):
    """A ``.pt`` file that loads but holds no whole model kdctl can use (its message says what it holds)."""


WHOLE_MODEL = ("kdctl reads whole-model checkpoints: an Ultralytics .pt (a training run's weights/best.pt, or "
               "YOLO(...).save()), a kdctl bundle's weights.pt, or a bundle (and torchvision Faster R-CNN weights)")


def _weights_only(ckpt) -> bool:
    """A state dict (``torch.save(model.state_dict())``), bare or under one key as training scripts save it."""
    import torch

    def tensors(d):
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    return tensors(ckpt) or (isinstance(ckpt, dict) and any(tensors(ckpt.get(k)) for k in
                                                            ("state_dict", "model", "ema", "model_state_dict")))


def load_detector(path):
    """A trained detector of any family from a ``.pt`` file, FP32, eval mode."""
    import torch

    from kdctl.detectors import torchvision, yolo

    try:
        with warnings.catch_warnings():  # a TorchScript archive's 'dispatching to torch.jit.load', deprecations
            warnings.simplefilter("ignore")
            model = yolo.load_detector(path)
    except Exception as first:  # not an Ultralytics checkpoint: a kdctl torchvision one, or a broken file
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception:
            raise first from None
        model = torchvision.from_saved(ckpt)  # kdctl's checkpoint, or a user's own Faster R-CNN weights
        if model is not None:
            return model
        if _weights_only(ckpt):
            raise NotACheckpoint(f"it holds only weight tensors (a state_dict), not the model; {WHOLE_MODEL}") from None
        if isinstance(ckpt, dict) and "model" in ckpt and not any(isinstance(ckpt.get(k), torch.nn.Module)
                                                                  for k in ("model", "ema")):
            raise NotACheckpoint("its 'model' and 'ema' entries hold no model") from None
        raise  # Ultralytics' own error for a file that is none of these
    if isinstance(model, torch.nn.Sequential):  # Ultralytics reads a non-checkpoint object's .model: its layers
        raise NotACheckpoint(f"it holds a model pickled whole (torch.save(model)), not a checkpoint; {WHOLE_MODEL}")
    return model


def load_problem(e: Exception, path=None) -> str:
    """Why :func:`load_detector` failed on ``path``, in one short line for an error message. Ultralytics wraps a
    damaged file's error in two lines of its own (``ERROR ❌️ PATH is not a loadable checkpoint — the file is empty,
    truncated or corrupted (RuntimeError: PytorchStreamReader failed reading zip archive: ... If you are seeing this
    error, ...)`` and a fix to run); what is said here is what it found, to the end of its first sentence."""
    if isinstance(e, NotACheckpoint):
        return str(e)
    foreign = _not_torch_file(path)
    if foreign:
        return foreign
    text = str(e).splitlines()[0].strip() if str(e).strip() else ""
    damaged = re.search(r"is not a loadable checkpoint\W+the file is empty, truncated or corrupted \((.*)\)\.?$", text)
    if damaged:
        return f"the file is empty, truncated or corrupted ({_first_sentence(damaged.group(1))})"
    if isinstance(e, OSError) and e.errno == errno.EINVAL:  # torch's zip reader seeking before the start of a
        return f"the file is empty, truncated or corrupted ({type(e).__name__}: {e})"  # file cut short
    ours = re.sub(r"^ERROR[\s\u274c\ufe0f]*", "", text)  # Ultralytics' words for a user, less its prefix and emoji
    if ours != text:
        if path is not None and ours.startswith(f"{path} "):  # the file the message names already
            ours = "it" + ours[len(str(path)):]
        return _first_sentence(ours)
    return f"{type(e).__name__}: {_first_sentence(text)}" if text else type(e).__name__


def _not_torch_file(path) -> str | None:
    """Why a file is none of the formats ``torch.load`` reads (a zip archive, as torch.save writes since 1.6, or a
    pickle, as before it), from its first bytes: an image, a JSON or text file given as the model. None where it
    may be one (or cannot be read: the loader's own error says why)."""
    from kdctl.data.validate import LFS_POINTER

    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except (OSError, TypeError):
        return None
    if not head or head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    if head == LFS_POINTER:  # a clone without `git lfs pull`
        return "a Git LFS pointer file, not the checkpoint itself (`git lfs pull` fetches it)"
    return f"not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file starts with {head[:8]!r})"


def _first_sentence(text: str) -> str:
    head, dot, rest = text.partition(". ")
    return head if dot and rest else text.rstrip(".")


def save_checkpoint(model, path, train_args: dict) -> None:
    from kdctl.detectors import yolo

    getattr(family(model), "save_checkpoint", yolo.save_checkpoint)(model, path, train_args)
