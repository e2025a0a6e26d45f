"""Weight selection: start a YOLO student from its teacher's weights instead of a random draw.

Xu, Liu, Lin & Darrell, "Initializing Models with Larger Ones" (ICLR 2024): every student weight tensor is the
teacher tensor with the same role, cut down to the student's shape by keeping evenly spaced elements of each
dimension (their "uniform selection"),

    W_s[o, i, :, :] = W_t[sel(O_t → O_s)[o], sel(I_t → I_s)[i], :, :],   sel(n → k)[j] = ⌊j · n / k⌋,

and every layer keeps the same channels of a tensor that the layer writing it kept ("consistency"), so a
residual sum, a split or a concatenation lines up in the student as it does in the teacher. The paper finds the
initialisation adds to knowledge distillation's gain; NVIDIA's Minitron (Muralidharan et al., 2024) prunes a
teacher and then distils in the same spirit.

A channel dimension made of parts is cut part by part: C2f's two split chunks and the (2 + n) chunks its last
convolution reads, SPPF's four pooled copies, C3's and C2's two branches, GhostConv's two halves, the neck's Concat
of two layers and the attention's heads (whole heads kept); residual sums must keep the same channels on both sides. Where the student has fewer blocks in a stage it keeps the teacher's first ones (the
paper's first-N layer selection). The pair must share the layer layout (same module types, wiring and kernel sizes;
e.g. yolov8n → kdctl's yolov8-tiny, yolov8s or yolov8m → yolov8n, yolo11s → yolo11n, yolo26s → yolo26n), each
student layer no wider and no deeper than the teacher's, and the same class count; anything else is refused with
one line naming the layer. Across Ultralytics families with one backbone and neck layout (YOLOv8 ↔ kdctl's
tiny RT-DETR, yolov8n-rtdetr → rtdetr-tiny) everything up to the head is selected and an RT-DETR decoder (on
either side) keeps its random initialisation, recorded as such.
"""

from __future__ import annotations

import torch
from torch import nn

from kdctl.errors import RecipeError

FIELD = "distill.init"
# Ultralytics modules whose channel parts kdctl knows; a pair with any other module is refused
SUPPORTED = ("Conv", "DWConv", "GhostConv", "Concat", "Upsample", "MaxPool2d", "C2", "C2f", "C3k2", "C3", "C3k",
             "C3x", "C3Ghost", "SPPF", "Bottleneck", "GhostBottleneck", "C2PSA", "PSABlock", "SCDown", "Detect")

Segments = list  # [(teacher channels, student channels), ...]: a channel dimension as consecutive parts


class _Mismatch(Exception):
    pass


def sel(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices of ``n`` (the identity when ``k == n``)."""
    if not 0 <= k <= n:
        raise _Mismatch(f"the student has {k} channels where the teacher has {n}")
    return torch.arange(k) * n // k


def _indices(segs: Segments) -> torch.Tensor:
    out, offset = [], 0
    for t, s in segs:
        out.append(offset + sel(t, s))
        offset += t
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _total(segs: Segments, side: int) -> int:
    return sum(p[side] for p in segs)


def _copy_conv2d(t: nn.Conv2d, s: nn.Conv2d, in_segs: Segments, out_segs: Segments | None = None) -> Segments:
    """Copy ``t`` into ``s`` reading input parts ``in_segs``; returns the output's parts: one, or ``out_segs`` for
    an output that is later split (C2f's ``cv1``, attention's ``qkv``), kept part by part."""
    if t.kernel_size != s.kernel_size or t.stride != s.stride:
        raise _Mismatch(f"kernel {t.kernel_size}/stride {t.stride} in the teacher, "
                        f"{s.kernel_size}/{s.stride} in the student")
    if (_total(in_segs, 0), _total(in_segs, 1)) != (t.in_channels, s.in_channels):
        raise _Mismatch(f"reads {t.in_channels} → {s.in_channels} channels where its input has "
                        f"{_total(in_segs, 0)} → {_total(in_segs, 1)}")
    if out_segs is not None and (_total(out_segs, 0), _total(out_segs, 1)) != (t.out_channels, s.out_channels):
        raise _Mismatch("split parts that do not add up to the convolution's outputs")
    if t.groups == 1 and s.groups == 1:
        out_segs = out_segs or [(t.out_channels, s.out_channels)]
        o, i = _indices(out_segs), _indices(in_segs)
        w = t.weight.detach()[o][:, i]
    elif out_segs is None and t.groups == t.in_channels == t.out_channels and \
            s.groups == s.in_channels == s.out_channels:
        out_segs = in_segs  # depthwise: output channel j is input channel j's filter
        o = _indices(out_segs)
        w = t.weight.detach()[o]
    else:
        raise _Mismatch(f"grouped convolution ({t.groups} → {s.groups} groups)")
    with torch.no_grad():
        s.weight.copy_(w)
        if s.bias is not None and t.bias is not None:
            s.bias.copy_(t.bias.detach()[o])
    return out_segs


def _copy_bn(t: nn.BatchNorm2d, s: nn.BatchNorm2d, segs: Segments) -> None:
    o = _indices(segs)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            dst, src = getattr(s, name), getattr(t, name)
            if dst is not None and src is not None:
                dst.copy_(src.detach()[o])
        s.num_batches_tracked.copy_(t.num_batches_tracked)


def _conv(t, s, in_segs: Segments, out_segs: Segments | None = None) -> Segments:
    """Ultralytics' Conv/DWConv (conv + BN + activation) or a bare Conv2d."""
    if isinstance(t, nn.Conv2d):
        return _copy_conv2d(t, s, in_segs, out_segs)
    if not (hasattr(t, "bn") and hasattr(s, "bn")):
        raise _Mismatch("a fused convolution (BatchNorm folded into it): select from the unfused model")
    out = _copy_conv2d(t.conv, s.conv, in_segs, out_segs)
    _copy_bn(t.bn, s.bn, out)
    return out


def _same_channels(a: Segments, b: Segments) -> None:
    """Two tensors added together (a residual) must keep the same teacher channels, in the same order."""
    if _total(a, 0) != _total(b, 0) or not torch.equal(_indices(a), _indices(b)):
        raise _Mismatch("a residual sum whose two sides keep different channels")


def _first_blocks(t, s) -> int:
    """A shallower student keeps the teacher's first blocks (the paper's first-N layer selection); returns how
    many teacher blocks it drops."""
    if len(s) > len(t):
        raise _Mismatch(f"{len(t)} blocks in the teacher, {len(s)} in the student")
    return len(t) - len(s)


def _block(t: nn.Module, s: nn.Module, in_segs: Segments) -> Segments:
    kind = type(t).__name__
    if type(s).__name__ != kind:
        raise _Mismatch(f"{kind} in the teacher, {type(s).__name__} in the student")
    if kind in ("Conv", "DWConv", "Conv2d"):
        return _conv(t, s, in_segs)
    if kind == "Sequential":  # convolutions (or nested Sequentials) applied one after the other
        if len(t) != len(s):
            raise _Mismatch(f"{len(t)} blocks in the teacher, {len(s)} in the student")
        for a, b in zip(t, s):
            in_segs = _block(a, b, in_segs)
        return in_segs
    if kind == "SCDown":  # YOLOv10's downsampling: pointwise, then a depthwise stride-2 convolution
        return _conv(t.cv2, s.cv2, _conv(t.cv1, s.cv1, in_segs))
    if kind == "Bottleneck":
        mid = _conv(t.cv1, s.cv1, in_segs)
        out = _conv(t.cv2, s.cv2, mid)
        if t.add:  # a residual sum needs the same channels on both sides
            _same_channels(out, in_segs)
        return out
    if kind in ("C2f", "C3k2"):
        dropped = _first_blocks(t.m, s.m)
        chunk = [(t.c, s.c)]
        _conv(t.cv1, s.cv1, in_segs, chunk * 2)
        parts = chunk * 2
        cur = chunk
        for a, b in zip(t.m, s.m):
            cur = _block(a, b, cur)
            parts = parts + cur
        return _conv(t.cv2, s.cv2, parts + [(t.c, 0)] * dropped)  # the dropped blocks' chunks: none of theirs
    if kind == "C2":  # split in two, blocks on the first chunk, then [blocks(a), b]
        return _split_in_two(t, s, in_segs, blocks_on_first=True)
    if kind == "GhostConv":  # half the channels from a convolution, half from a depthwise one on those
        y = _conv(t.cv1, s.cv1, in_segs)
        return y + _conv(t.cv2, s.cv2, y)
    if kind == "GhostBottleneck":
        out = _block(t.conv, s.conv, in_segs)
        _same_channels(_block(t.shortcut, s.shortcut, in_segs), out)
        return out
    if kind == "Identity":
        return in_segs
    if kind in ("C3", "C3k", "C3x", "C3Ghost"):
        _first_blocks(t.m, s.m)
        a = _conv(t.cv1, s.cv1, in_segs)
        b = _conv(t.cv2, s.cv2, in_segs)
        for x, y in zip(t.m, s.m):
            a = _block(x, y, a)
        return _conv(t.cv3, s.cv3, a + b)
    if kind == "SPPF":
        if t.m.kernel_size != s.m.kernel_size or getattr(t, "n", 3) != getattr(s, "n", 3):
            raise _Mismatch("a different pooling kernel or count")
        mid = _conv(t.cv1, s.cv1, in_segs)
        out = _conv(t.cv2, s.cv2, mid * (1 + getattr(t, "n", 3)))  # cv1's output and its n pooled copies
        if getattr(t, "add", False):
            _same_channels(out, in_segs)
        return out
    if kind == "C2PSA":  # split in two, attention blocks on the second chunk, then [a, blocks(b)]
        return _split_in_two(t, s, in_segs, blocks_on_first=False)
    if kind == "PSABlock":
        att = _attention(t.attn, s.attn, in_segs)
        out = _conv(t.ffn[1], s.ffn[1], _conv(t.ffn[0], s.ffn[0], att))
        _same_channels(att, in_segs)
        _same_channels(out, in_segs)
        return out
    raise _Mismatch(f"{kind} is not a module weight selection knows ({', '.join(SUPPORTED)})")


def _split_in_two(t, s, in_segs: Segments, blocks_on_first: bool) -> Segments:
    """C2 / C2PSA: ``cv1``'s output split in two chunks, ``m`` on one of them, ``cv2`` reading both."""
    _first_blocks(t.m, s.m)
    chunk = [(t.c, s.c)]
    _conv(t.cv1, s.cv1, in_segs, chunk * 2)
    cur = chunk
    for a, b in zip(t.m, s.m):
        cur = _block(a, b, cur)
    return _conv(t.cv2, s.cv2, cur + chunk if blocks_on_first else chunk + cur)


def _attention(t, s, in_segs: Segments) -> Segments:
    """Ultralytics' Attention: ``qkv`` writes, per head, its query, key and value channels; the student keeps
    evenly spaced heads (and channels within each), so ``pe`` (depthwise on the values) and ``proj`` read the
    values of the kept heads."""
    keep = set(sel(t.num_heads, s.num_heads).tolist())
    qkv, values = [], []
    for h in range(t.num_heads):
        on = h in keep
        key, value = (t.key_dim, s.key_dim if on else 0), (t.head_dim, s.head_dim if on else 0)
        qkv += [key, key, value]
        values.append(value)
    _conv(t.qkv, s.qkv, in_segs, qkv)
    _conv(t.pe, s.pe, values)
    return _conv(t.proj, s.proj, values)


def _detect(t, s, inputs: list) -> None:
    if (t.nc, t.nl, t.reg_max) != (s.nc, s.nl, s.reg_max):
        raise _Mismatch(f"a head with {t.nc} classes, {t.nl} levels and reg_max {t.reg_max} in the teacher, "
                        f"{s.nc}, {s.nl} and {s.reg_max} in the student")
    for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        tb, sb = getattr(t, branch, None), getattr(s, branch, None)
        if tb is None and sb is None:
            continue
        if tb is None or sb is None:
            raise _Mismatch(f"Detect.{branch} on one side only")
        for k in range(t.nl):
            _block(tb[k], sb[k], inputs[k])
    # DFL's projection is fixed (not trained): both heads already hold arange(reg_max)


def select_weights(student: nn.Module, teacher: nn.Module, source: str = "recipe") -> dict:
    """Overwrite ``student``'s weights (and BatchNorm statistics) with the teacher's, selected as above. Returns
    what was done (layers and parameters copied, the share of the teacher's parameters kept). A pair that cannot
    be matched raises one :class:`RecipeError` line naming the layer."""
    t_layers, s_layers = getattr(teacher, "model", None), getattr(student, "model", None)
    if not isinstance(t_layers, nn.Sequential) or not isinstance(s_layers, nn.Sequential):
        raise RecipeError(f"{source}: {FIELD}: weight selection needs an Ultralytics YOLO teacher and student")
    if len(t_layers) != len(s_layers):
        raise RecipeError(f"{source}: {FIELD}: the teacher has {len(t_layers)} layers and the student "
                          f"{len(s_layers)}; weight selection needs the same layer layout (e.g. yolov8n → "
                          "yolov8-tiny)")
    parts: list[Segments] = []
    i, head = 0, "selected"
    try:
        for i, (t, s) in enumerate(zip(t_layers, s_layers)):
            if getattr(t, "f", None) != getattr(s, "f", None):
                raise _Mismatch(f"reads layer(s) {t.f} in the teacher, {s.f} in the student")
            froms = t.f if isinstance(t.f, list) else [t.f]
            ins = [[(3, 3)] if i == 0 else parts[i - 1] if f == -1 else parts[f] for f in froms]
            kind = type(t).__name__
            decoder = i == len(t_layers) - 1 and "RTDETRDecoder" in (kind, type(s).__name__)
            if type(s).__name__ != kind and not decoder:
                raise _Mismatch(f"{kind} in the teacher, {type(s).__name__} in the student")
            if kind == "Concat":
                parts.append([p for segs in ins for p in segs])
            elif kind in ("Upsample", "MaxPool2d", "Identity"):
                parts.append(ins[0])
            elif decoder:
                head = f"{type(s).__name__} (random start: {kind} in the teacher; decoders are not selected)"
                parts.append([])
            elif kind == "Detect":
                _detect(t, s, ins)
                parts.append([])
            else:
                if len(ins) != 1:
                    raise _Mismatch(f"{kind} reading {len(ins)} layers")
                parts.append(_block(t, s, ins[0]))
    except _Mismatch as e:
        raise RecipeError(f"{source}: {FIELD}: layer {i} ({type(t_layers[i]).__name__}): {e}; weight selection "
                          "needs the same layer layout, each student layer at most as wide and deep as the teacher's") from None
    selected = s_layers if head == "selected" else s_layers[:-1]
    n_s = sum(p.numel() for p in selected.parameters())  # the student's parameters that came from the teacher
    n_t = sum(p.numel() for p in teacher.parameters())
    return {"method": "weight selection (Xu et al. 2024)", "layers": len(s_layers), "head": head,
            "selected_params": n_s, "teacher_params": n_t, "kept": round(n_s / max(n_t, 1), 4)}
