"""``base:`` in a recipe: start from other recipes' fields and change only what differs (mmengine's ``_base_``).

A recipe's ``base`` is a recipe file, or a list of them, relative to the recipe's folder. Mappings merge key by key
(the later base over the earlier, the recipe over its bases); a list or a value replaces the base's whole. A base may
have bases of its own. Relative paths a base names (models, data, cache, a target preset file) stay relative to the
base's own folder. The bundle records the recipe as merged, and each file read with its hash."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from kdctl.errors import RecipeError, shown
from kdctl.recipe.schema import SHORT_FORMS
from kdctl.recipe.validation import read_yaml

BASE_KEY = "base"
MAX_DEPTH = 16  # bases of bases: deeper is a mistake, not a design


def read_with_bases(path: Path) -> tuple[Any, list[dict], dict[str, str]]:
    """The recipe's fields merged over its bases' (``base`` removed); the bases read, each once, in the order they
    were merged, as ``{"file", "sha256"}``; and the fields a base set that the recipe keeps (dotted, as validation
    names them, e.g. ``train.epochs``) with the base file that set each."""
    raw, bases, origins = _read(path, ())
    return raw, [{"file": str(b), "sha256": hashlib.sha256(b.read_bytes()).hexdigest()} for b in bases], \
        {k: str(v) for k, v in origins.items()}


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[Any, list[Path], dict[str, Path]]:
    raw = read_yaml(path, "recipe")
    if not isinstance(raw, dict) or BASE_KEY not in raw:
        return raw, [], {}
    raw = dict(raw)
    spec = raw.pop(BASE_KEY)
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise RecipeError(f"{path}: {BASE_KEY}: must be a recipe file or a list of recipe files (relative to "
                          f"{path.parent}), got {shown(spec)}")
    here = (*chain, path.resolve())
    merged: dict = {}
    bases: list[Path] = []
    origins: dict[str, Path] = {}
    for name in names:
        b = path.parent / Path(name.strip()).expanduser()
        if not b.is_file():
            raise RecipeError(f"{path}: {BASE_KEY}: '{name}' " + ("is a directory; give a recipe file" if b.is_dir()
                                                                  else f"not found (looked for {b.absolute()})"))
        if b.resolve() in here:
            loop = " -> ".join(p.name for p in (*here[here.index(b.resolve()):], b.resolve()))
            raise RecipeError(f"{path}: {BASE_KEY}: '{name}' inherits from itself ({loop})")
        if len(here) > MAX_DEPTH:
            raise RecipeError(f"{path}: {BASE_KEY}: bases nested more than {MAX_DEPTH} deep")
        braw, bbases, borigins = _read(b, here)
        if not isinstance(braw, dict):
            raise RecipeError(f"{b}: expected a mapping of recipe fields at the top level (it is a {BASE_KEY} of "
                              f"{path}), got {'nothing (the file is empty)' if braw is None else type(braw).__name__}")
        braw = _rebased(braw, b.parent)
        _drop(origins, braw)
        origins.update({f: borigins.get(f, b.resolve()) for f in _leaves(braw)})
        merged = _merge(merged, braw)
        bases += [x for x in (*bbases, b.resolve()) if x not in bases]
    _drop(origins, raw)
    return _merge(merged, raw), bases, origins


def _merge(base: Any, over: Any) -> Any:
    """``over`` on ``base``: mappings key by key, anything else (a list, a value, null) replacing the base's."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def _leaves(d: dict, prefix: str = "") -> list[str]:
    """The dotted fields a mapping sets: mappings are walked, anything else (a list too) is one field."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, f"{key}.") if isinstance(v, dict) and v else [key]
    return out


def _drop(origins: dict, over: dict) -> None:
    """Forget the base of every field ``over`` sets again (and of the fields inside one it replaces)."""
    for leaf in _leaves(over):
        for k in [k for k in origins if k == leaf or k.startswith(f"{leaf}.")]:
            del origins[k]


# the fields that name files, per section; data.coco's are every string in it
_PATHS = (("teacher", "model"), ("student", "model"), ("data", "yolo"), ("distill", "cache", "path"),
          ("export", "target"))


def expand_short_forms(raw: Any) -> None:
    """``data: data.yaml`` as ``data: {yolo: data.yaml}``, ``teacher: best.pt`` as ``teacher: {model: best.pt}`` (the
    schema takes both forms; a field inside such a section is only reachable in the long one)."""
    if not isinstance(raw, dict):
        return
    for key, inner in SHORT_FORMS.items():
        if isinstance(raw.get(key), str):
            raw[key] = {inner: raw[key]}


def _rebased(raw: dict, folder: Path) -> dict:
    """A base's relative paths made absolute against its own folder, where they are there (a bare model name such
    as yolov8n.yaml, or a path that is not there, stays as written: the recipe's own rules apply to it)."""
    def fix(v):
        if not isinstance(v, str) or not v.strip():
            return v
        p = Path(v.strip()).expanduser()
        return v if p.is_absolute() or not (folder / p).exists() else str((folder / p).resolve())

    out = copy.deepcopy(raw)
    expand_short_forms(out)
    for keys in _PATHS:
        d = out
        for k in keys[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict) and keys[-1] in d:
            if keys == ("export", "target") and not str(d[keys[-1]]).endswith((".yaml", ".yml")):
                continue  # a preset's name (cpu, jetson), not a file
            d[keys[-1]] = fix(d[keys[-1]])
    coco = (out.get("data") or {}).get("coco") if isinstance(out.get("data"), dict) else None
    if isinstance(coco, dict):
        for k, v in coco.items():
            coco[k] = fix(v)
    return out


def inherited_error(message: str, source: str, inherited: dict[str, str]) -> str | None:
    """``SOURCE: FIELD: ...`` about a field the recipe took from a base, named at that base (the file to edit), or
    None where the field is the recipe's own."""
    rest = message.removeprefix(f"{source}: ")
    if rest == message:
        return None
    where = rest.split(": ", 1)[0]
    for field, base in inherited.items():
        if where == field or where.startswith((f"{field}.", f"{field}[")):
            return f"{base}: {rest} (a {BASE_KEY} of {source})"
    # a section this recipe and a base both set (data: yolo here, synthetic in the base): say which part is the base's
    inside = {f"{where}.{f[len(where) + 1:].split('.')[0]}": b for f, b in inherited.items()
              if f.startswith(f"{where}.")}
    if inside:
        parts = ", ".join(f"{f} from {b}" for f, b in inside.items())
        return f"{message} ({parts}; a null here removes a base's field, e.g. {next(iter(inside))}: null)"
    return None
