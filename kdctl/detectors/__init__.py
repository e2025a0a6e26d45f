"""Detector families: everything that knows a detector library lives here, one module per family.

Only modules in this package import Ultralytics (or, later, ``torchvision.models.detection``); a test fails if any
other module does. A family module provides:

- build / load: ``build_detector(cfg, nc)`` from a model YAML (nothing downloaded), ``load_detector(path)`` from a
  checkpoint, ``check_model_name(name, field, source)`` for a name the library resolves itself;
- fit: the trainer (``KDTrainer``) with the KD criterion and the frozen teacher attached;
- facts about a model: ``num_classes``, ``max_stride``, ``gflops``; ``plain_student`` strips KD parts;
- deployment: ``save_checkpoint`` (a checkpoint the library loads as its own), ``float_tail`` (graph nodes INT8
  quantization must leave in float: the box decoding).

Today the family is Ultralytics YOLO (:mod:`kdctl.detectors.yolo`); RT-DETR and torchvision's two-stage detectors
come in as modules of their own behind the same names.
"""
