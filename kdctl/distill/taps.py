"""Where distillation reads a detector: layer indices or roles (backbone / neck / head), and forward hooks
that capture those layers' outputs only while a ``FeatureTaps`` context is open (so EMA copies and pickled
checkpoints never carry stale hooks)."""

from __future__ import annotations

import torch
from torch import nn


def detect_head(model: nn.Module) -> nn.Module:
    layers = getattr(model, "model", None)
    if layers is None or not len(layers):
        raise ValueError(f"{type(model).__name__} is not an Ultralytics layer-sequence model")
    head = layers[-1]
    if not hasattr(head, "f") or not isinstance(head.f, (list, tuple)):
        raise ValueError(f"last layer of {type(model).__name__} is {type(head).__name__}, not a detection head")
    return head


def backbone_layers(model: nn.Module, imgsz: int = 256) -> list[int]:
    """The last backbone layer at each of the strides the head uses (P3/P4/P5 for YOLOv8: 4, 6, 9)."""
    n_backbone = len(model.yaml.get("backbone", [])) if hasattr(model, "yaml") else 0
    if not n_backbone:
        raise ValueError("model has no backbone section to resolve the 'backbone' role")
    idx = list(range(n_backbone))
    p = next(model.parameters())
    with FeatureTaps(model, idx) as taps, torch.no_grad():
        was = model.training
        model.eval()
        model.predict(torch.zeros(1, model.yaml.get("channels", 3), imgsz, imgsz, device=p.device, dtype=p.dtype))
        model.train(was)
    last_at: dict[int, int] = {}
    for i in idx:
        out = taps.outputs.get(i)
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            last_at[imgsz // out.shape[-1]] = i
    head_strides = [int(s) for s in getattr(detect_head(model), "stride", torch.tensor([8, 16, 32])).tolist()] or [8, 16, 32]
    found = [last_at[s] for s in head_strides if s in last_at]
    if not found:
        raise ValueError("no backbone layer matches the head's strides")
    return found


def resolve_layers(model: nn.Module, layers, role_default: str, imgsz: int) -> list[int]:
    """Turn a recipe's ``layers`` (indices, module paths, a role, or None) into tap keys of ``model``: layer
    indices, and module paths kept as given."""
    n = len(model.model)
    role = layers if isinstance(layers, str) else (role_default if layers is None else None)
    if role == "neck":
        return [int(i) % n for i in detect_head(model).f]
    if role == "head":
        return [n - 1]
    if role == "backbone":
        return backbone_layers(model, imgsz)
    if role is not None:
        raise ValueError(f"unknown role '{role}'; valid: backbone, neck, head")
    out = []
    for i in layers:
        if isinstance(i, str):  # a module path: any submodule, e.g. model.6.m.0 (a bottleneck inside a C2f)
            try:
                model.get_submodule(i)
            except AttributeError:
                raise ValueError(f"no module '{i}' in {type(model).__name__}; module paths look like model.4 or "
                                 f"model.6.m.0 (layers model.0..model.{n - 1})") from None
            out.append(i)
        elif not -n <= i < n:
            raise IndexError(f"layer {i} is out of range: the model has {n} layers (0..{n - 1})")
        else:
            out.append(i % n)
    return out


def split_key(layer) -> tuple[object, str | None]:
    """``'net.backbone[0]'`` -> (``'net.backbone'``, ``'0'``): a module whose output is a dict of maps (an FPN) and
    the entry to read; any other key -> (key, None)."""
    if isinstance(layer, str) and layer.endswith("]") and "[" in layer:
        path, key = layer[:-1].split("[", 1)
        return path, key
    return layer, None


def tap_module(model: nn.Module, layer) -> nn.Module:
    """The module a layer key names: an index into the layer list, a module path, or ``path[key]``."""
    layer, _ = split_key(layer)
    return model.get_submodule(layer) if isinstance(layer, str) else model.model[layer]


def head_outputs(out) -> dict:
    """A detection head's raw dict (``boxes``, ``scores``) from its train-mode dict or eval-mode (y, dict) tuple."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[1]
    if isinstance(out, dict) and "one2many" in out:
        out = out["one2many"]
    if not isinstance(out, dict) or "scores" not in out:
        raise ValueError("layer output is not a detection head's raw predictions")
    return out


def pair_same_size(s_layers: list, s_sites: dict, t_sites: dict) -> tuple[list, list]:
    """Each student layer with the first unused teacher site whose map has its height and width (``*_sites``:
    ``{layer: (C, H, W)}`` or None for a non-map); student layers without one are left out."""
    pairs_s, pairs_t = [], []
    for sl in s_layers:
        if s_sites.get(sl) is None:
            continue
        match = [tk for tk, v in t_sites.items() if v is not None and v[1:] == s_sites[sl][1:] and tk not in pairs_t]
        if match:
            pairs_s.append(sl)
            pairs_t.append(match[0])
    return pairs_s, pairs_t


def keep_strides(s_layers: list, t_layers: list, s_shapes: dict, strides: list[int] | None,
                 imgsz: int) -> tuple[list, list]:
    """The layer pairs whose student map is at one of ``strides`` (``imgsz`` / map width, rounded: 8 is P3), in
    their order; ``strides`` None: all of them. ``s_shapes``: ``{layer: (C, H, W)}``; a layer without a map (None)
    is kept, for the caller's check to refuse. Raises ValueError naming the strides the pairs have when none
    matches."""
    if strides is None:
        return s_layers, t_layers
    at = {sl: round(imgsz / s_shapes[sl][2]) for sl in s_layers if s_shapes.get(sl) is not None}
    keep = [(sl, tl) for sl, tl in zip(s_layers, t_layers) if sl not in at or at[sl] in strides]
    if not keep:
        have = ", ".join(str(s) for s in sorted(set(at.values()))) or "none"
        raise ValueError(f"no student map of layers {s_layers} is at stride {', '.join(map(str, strides))} at imgsz "
                         f"{imgsz}; their strides: {have}")
    return [sl for sl, _ in keep], [tl for _, tl in keep]


def map_shapes(model: nn.Module, layers, forward) -> dict:
    """``{layer: (C, H, W)}`` of the tapped outputs while ``forward()`` runs (no gradients); None for an output that is
    not a feature map."""
    with torch.no_grad(), FeatureTaps(model, layers) as taps:
        forward()
    return {k: tuple(v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim == 4 else None
            for k, v in taps.outputs.items()}


class FeatureTaps:
    """``with FeatureTaps(model, [4, 6, 9]) as taps: model(x)`` then ``taps.outputs[4]`` etc.; a key
    ``'net.backbone[0]'`` holds entry ``'0'`` of that module's dict output."""

    def __init__(self, model: nn.Module, layers):
        self.model, self.layers = model, sorted(set(layers), key=str)
        self.outputs: dict[int, object] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureTaps":
        for i in self.layers:
            self._handles.append(tap_module(self.model, i).register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i):
        key = split_key(i)[1]

        def hook(module, inputs, output):
            self.outputs[i] = output if key is None else output[key]
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
