"""Load a recipe YAML into a validated :class:`Recipe`, turning every problem into one line."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from kdctl.errors import LINK_LOOP, KdctlError, RecipeError, shown
from kdctl.recipe.schema import SHORT_FORMS, Recipe
from kdctl.recipe.validation import _model_in, load_value, read_yaml, refuse_other_kind, validate

__all__ = ["load_recipe", "read_yaml", "validate", "recipe_json_schema", "parse_override", "apply_overrides",
           "set_field", "overrides_named", "set_suggestion"]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe; relative data/model paths are resolved against the recipe's folder.
    ``overrides``: ``KEY=VALUE`` texts (``kdctl train --set``) applied to the file's fields before validation; a
    problem with an overridden field names the ``--set`` it came from."""
    from kdctl.recipe.bases import BASE_KEY, read_with_bases

    path = Path(path)
    for text in overrides:
        if parse_override(text)[0][0] == BASE_KEY:
            raise RecipeError(f"--set {text}: {BASE_KEY} is read with the recipe file, before any --set; write it in "
                              f"{path}")
    raw, bases, inherited = read_with_bases(path)
    refuse_other_kind(raw, path, "a kdctl recipe")  # a dataset YAML read as a recipe lacking its student
    if overrides:
        if not isinstance(raw, dict):
            validate(raw, Recipe, str(path))  # its own error: not a mapping of fields
        apply_overrides(raw, overrides)
    _mark_bare_bundle_dirs(raw, path.parent)
    with overrides_named(str(path), overrides, inherited):
        recipe = validate(raw, Recipe, str(path))
        _check_losses(recipe, str(path))
        _check_target(recipe, path)
    recipe = _resolve_paths(recipe, path.parent, str(path))
    recipe._origin = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "set": list(overrides), **({"bases": bases} if bases else {})}
    recipe._inherited = inherited
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=5`` -> (['train', 'epochs'], 5): a dotted recipe field and its value, read as YAML (``[1, 2]``,
    ``null``, ``'0'`` as a string); a number in the key indexes a list (``distill.losses.0.params.temperature=4``)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise RecipeError(f"--set '{text}': expected KEY=VALUE with a dotted recipe field, e.g. train.epochs=5")
    try:
        return [q for p in parts for q in _indexed(p.strip())], load_value(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key.strip()}: the value '{value}' is not valid YAML "
                          f"({str(e).splitlines()[0]})") from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set each ``KEY=VALUE`` in the recipe's fields, in order (a later one wins). The result is validated as a
    recipe by the caller."""
    from kdctl.recipe.bases import expand_short_forms
    from kdctl.recipe.schema import DATA_SOURCES

    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) > 1:  # a field inside a section given in its short form (data: data.yaml)
            expand_short_forms(raw)
        data = raw.get("data")
        if len(parts) > 1 and parts[0] == "data" and parts[1] in DATA_SOURCES and value is not None \
                and isinstance(data, dict) and data.get(parts[1]) is None:
            # a dataset given by --set is the one to run on: the recipe's other source goes (Ultralytics' data=)
            raw["data"] = {k: v for k, v in data.items() if k not in DATA_SOURCES}
        set_field(raw, parts, value)
    return raw


def set_field(raw: dict, parts: list[str], value: Any) -> None:
    """``raw[parts[0]][parts[1]]... = value``: a section the file leaves out (its defaults) is made, a list is indexed
    within its length; anything else is one line naming the field."""
    node: Any = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not _is_index(part) or int(part) >= len(node):
                raise RecipeError(f"--set {'.'.join(parts)}: {here} is a list of {len(node)}; index it with "
                                  f"0..{len(node) - 1}, got '{part}'")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {'.'.join(parts)}: {here} is {shown(node)}, not a section with fields")
        if depth == len(parts) - 1:
            node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            if _is_index(parts[depth + 1]):  # an entry of a list the recipe does not have
                raise RecipeError(f"--set {'.'.join(parts)}: the recipe has no {_override_field(parts[:depth + 1])} "
                                  f"list to change an entry of; give the whole list (--set "
                                  f"{_override_field(parts[:depth + 1])}='[...]')")
            node[part] = {}
        node = node[part]


def set_suggestion(words: Sequence[str]) -> str | None:
    """``epochs=5 batch=4`` (Ultralytics' way of changing a setting, given to a kdctl command as extra arguments) as
    the ``--set`` options that do it: ``--set train.epochs=5 --set train.batch=4``; a bare key is looked for in the
    recipe's top-level fields, then in its sections (train first). Ultralytics' ``model=`` (and ``nc=``) is the
    model trained: the student's; ``teacher=X`` names the teacher's model. None when no word is KEY=VALUE."""
    sections = ["train", "student"] + [k for k in Recipe.model_fields if k not in ("train", "student")]
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            continue
        if key in ("teacher", "student"):  # a section: the model it names is what a value there can be
            key = f"{key}.model"
        elif "." not in key and key not in Recipe.model_fields:
            for section in sections:
                model = _model_in(Recipe.model_fields[section].annotation)
                if model is not None and key in model.model_fields:
                    key = f"{section}.{key}"
                    break
        out.append(f"--set {key}={value}")
    return " ".join(out) or None


def _indexed(part: str) -> list[str]:
    """``losses[0]`` (a field as kdctl's errors name it) as ``losses``, ``0``; any other part as it is."""
    m = re.fullmatch(r"([^\[\]]+)((?:\[[0-9]+\])+)", part)
    return [m.group(1), *re.findall(r"[0-9]+", m.group(2))] if m else [part]


def _override_field(parts: list[str]) -> str:
    """``['distill', 'losses', '0', 'name']`` as validation errors name it: ``distill.losses[0].name``."""
    return "".join(f"[{p}]" if _is_index(p) else ("." if i else "") + p for i, p in enumerate(parts))


def _is_index(part: str) -> bool:
    return re.fullmatch(r"[0-9]+", part) is not None


@contextmanager
def overrides_named(source: str, overrides: Sequence[str], inherited: dict[str, str] | None = None) -> Iterator[None]:
    """Around work on a recipe read with ``overrides``: an error about a field a ``--set`` gave (a field inside it,
    or the section the --set changed), named ``SOURCE: FIELD: ...`` as kdctl names a recipe's fields, says that
    --set, since the file holds another value there (validation, and the run's own checks: a device this machine
    lacks, a resume of another recipe). One about a field the recipe took from a ``base`` (``inherited``: field ->
    base file) names that base, the file to edit."""
    from kdctl.recipe.bases import inherited_error

    try:
        yield
    except KdctlError as e:
        rest = str(e).removeprefix(f"{source}: ")
        if rest == str(e):  # not about the recipe's fields
            raise
        at_base = inherited_error(str(e), source, inherited or {})
        where = rest.split(": ", 1)[0]  # the field the error names
        for text in reversed(list(overrides)):  # the last one that set the field is the one that counts
            field = _override_field(parse_override(text)[0])
            # the field itself, a field inside it, or the section it is in (which the --set changed or made)
            if where == field or where.startswith((f"{field}.", f"{field}[")) or \
                    field.startswith((f"{where}.", f"{where}[")):
                raise type(e)(f"{source}: --set {text}: {rest}", exit_code=e.exit_code) from None
        if at_base:
            raise type(e)(at_base, exit_code=e.exit_code) from None
        raise


def _mark_bare_bundle_dirs(raw, base: Path) -> None:
    """``teacher: {model: my-teacher}``, a bundle folder beside the recipe (or in the working directory) named
    without a slash: the schema reads a bare word as a mistyped model name, so such a folder is written
    ``./my-teacher`` before validation (a word that is no folder keeps the schema's error)."""
    from kdctl.recipe.bases import expand_short_forms

    if not isinstance(raw, dict):
        return
    expand_short_forms(raw)  # teacher: my-teacher
    for key in ("teacher", "student"):
        spec = raw.get(key)
        m = spec.get("model") if isinstance(spec, dict) else None
        if (isinstance(m, str) and m.strip() and "/" not in m and "\\" not in m and ":" not in m
                and not m.strip().lower().endswith((".yaml", ".yml", ".pt", ".pth"))
                and any((d / m.strip()).is_dir() for d in (base, Path.cwd()))):
            spec["model"] = f"./{m.strip()}"


def _check_losses(recipe: Recipe, source: str) -> None:
    from kdctl.distill.losses import LOSSES
    from kdctl.distill.losses.registry import param_problem

    for i, spec in enumerate(recipe.distill.losses):
        if spec.name not in LOSSES:
            raise RecipeError(f"{source}: distill.losses[{i}].name: unknown loss '{spec.name}'; "
                              f"valid: {', '.join(sorted(LOSSES))}")
        entry = LOSSES[spec.name]
        unknown = sorted(set(spec.params) - set(entry.params))
        if unknown:
            raise RecipeError(f"{source}: distill.losses[{i}].params: unknown parameter '{unknown[0]}' for "
                              f"'{spec.name}'; valid: {', '.join(sorted(entry.params)) or 'none'}")
        for key, value in spec.params.items():
            problem = param_problem(entry, key, value)
            if problem:
                raise RecipeError(f"{source}: distill.losses[{i}].params.{key}: {problem}")
        if spec.level is not None and spec.level not in entry.levels:
            raise RecipeError(f"{source}: distill.losses[{i}].level: '{spec.name}' applies at "
                              f"{', '.join(entry.levels)}, not '{spec.level}'")
        if spec.strides is not None and entry.kind != "feature":
            feature = sorted(n for n, e in LOSSES.items() if e.kind == "feature")
            raise RecipeError(f"{source}: distill.losses[{i}].strides: '{spec.name}' is not a feature-map loss; "
                              f"strides picks the map pairs of {', '.join(feature)}")
    if recipe.distill.losses and recipe.teacher is None:
        raise RecipeError(f"{source}: teacher: required field is missing (distill.losses needs a teacher)")
    stop = recipe.distill.stop_epoch
    if stop is not None and not recipe.distill.losses:
        raise RecipeError(f"{source}: distill.stop_epoch: set without distill.losses (there is no KD term to stop)")
    if stop is not None and stop >= recipe.train.epochs:
        raise RecipeError(f"{source}: distill.stop_epoch: {stop} must be below train.epochs ({recipe.train.epochs}); "
                          "leave it unset to distill every epoch")
    warm = recipe.distill.warmup_epochs
    if warm is not None and not recipe.distill.losses:
        raise RecipeError(f"{source}: distill.warmup_epochs: set without distill.losses (there is no KD term to ramp)")
    end, what = (stop, "distill.stop_epoch") if stop is not None else (recipe.train.epochs, "train.epochs")
    if warm is not None and warm >= end:  # KD must reach its full weight while it runs
        raise RecipeError(f"{source}: distill.warmup_epochs: {warm} must be below {what} ({end}), or KD never "
                          "reaches its full weight")
    if recipe.distill.init and recipe.teacher is None:
        raise RecipeError(f"{source}: teacher: required field is missing (distill.init: "
                          f"{recipe.distill.init} needs a teacher)")


def _check_target(recipe: Recipe, path: Path) -> None:
    from kdctl.export.targets import available_targets

    t = recipe.export.target
    if t.endswith((".yaml", ".yml")):
        if not (path.parent / t).is_file() and not Path(t).is_file():
            raise RecipeError(f"{path}: export.target: preset file '{t}' not found")
    elif t not in available_targets():
        raise RecipeError(f"{path}: export.target: '{t}' does not exist; valid: {', '.join(available_targets())}")


def _resolve_paths(recipe: Recipe, base: Path, source: str) -> Recipe:
    def fix(p: str, field: str) -> str:
        """Relative to the recipe's folder first, then the working directory; bare model names stay names."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return str(q)
        for cand in (base / q, Path.cwd() / q):
            _no_link_loop(cand, f"{source}: {field}")
            if cand.exists():
                return str(cand.resolve())
        # Model YAML names like 'yolov8n.yaml' are Ultralytics/kdctl built-ins, not paths.
        return str((base / q).resolve()) if len(q.parts) > 1 else p

    data = recipe.model_dump()
    for key in ("teacher", "student"):
        if data.get(key):
            data[key]["model"] = fix(data[key]["model"], f"{key}.model")
    if data["data"]["yolo"]:
        data["data"]["yolo"] = fix(data["data"]["yolo"], "data.yolo")
    if data["data"]["coco"]:
        data["data"]["coco"] = {k: fix(v, f"data.coco.{k}") for k, v in data["data"]["coco"].items()}
    cache = (data.get("distill") or {}).get("cache")
    if cache and cache.get("path"):
        q = Path(cache["path"]).expanduser()
        if not q.is_absolute():
            _no_link_loop(base / q, f"{source}: distill.cache.path")
        cache["path"] = str(q if q.is_absolute() else (base / q).resolve())
    return Recipe.model_validate(data)


def _no_link_loop(path: Path, where: str) -> None:
    """A loop of symbolic links a recipe names is one line naming the field (pathlib's resolve() raised on it). A
    link to a file not there yet stays a missing file, as any other: an earlier stage may write it."""
    if not path.is_symlink() or path.exists():
        return
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return
    except (RuntimeError, OSError):
        raise RecipeError(f"{where}: '{path}' is {LINK_LOOP}") from None


def recipe_json_schema() -> str:
    from kdctl.recipe.bases import BASE_KEY

    schema = Recipe.model_json_schema()
    for key, inner in SHORT_FORMS.items():  # data: data.yaml, teacher: best.pt (read by the sections' validators)
        schema["properties"][key] = {"anyOf": [schema["properties"][key], {
            "type": "string", "description": f"Short for {{{inner}: VALUE}}"}]}
    schema["properties"][BASE_KEY] = {  # read before validation (kdctl.recipe.bases), so not a field of Recipe
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        "title": "Base", "description": "Recipe file(s) this one starts from, relative to its folder: mappings merge "
                                        "key by key, a list or value replaces the base's, null removes it"}
    return json.dumps(schema, indent=2)
