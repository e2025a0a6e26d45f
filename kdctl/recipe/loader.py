"""Load a recipe YAML into a validated :class:`Recipe`, turning every problem into one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdctl.errors import RecipeError
from kdctl.recipe.schema import Recipe

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("list[int]", "literal['backbone','neck','head']", "function-after[_exactly_one(), DataSpec]"):
            continue  # union-branch tags pydantic adds; they are not fields the user wrote
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "<root>"


def _first_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """The most useful error: unknown fields list the valid ones; union noise is collapsed."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p)))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        msg = f"unknown field '{loc[-1]}'" + (f"; valid fields: {', '.join(fields)}" if fields else "")
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "literal_error":
        msg = f"got {err.get('input')!r}; {msg[0].lower()}{msg[1:]}"
    return f"{_field_path(loc)}: {msg}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model reached by ``loc`` (list indices skipped)."""
    current: Any = model
    for p in loc:
        if isinstance(p, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or p not in fields:
            return []
        ann = fields[p].annotation
        current = _model_in(ann)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        found = _model_in(a)
        if found is not None:
            return found
    return None


def read_yaml(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None


def validate(data: Any, model: type[M], source: str) -> M:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e, model)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; relative data/model paths are resolved against the recipe's folder."""
    path = Path(path)
    recipe = validate(read_yaml(path, "recipe"), Recipe, str(path))
    _check_losses(recipe, str(path))
    _check_target(recipe, path)
    return _resolve_paths(recipe, path.parent)


def _check_losses(recipe: Recipe, source: str) -> None:
    from kdctl.distill.losses import LOSSES

    for i, spec in enumerate(recipe.distill.losses):
        if spec.name not in LOSSES:
            raise RecipeError(f"{source}: distill.losses[{i}].name: unknown loss '{spec.name}'; "
                              f"valid: {', '.join(sorted(LOSSES))}")
        entry = LOSSES[spec.name]
        unknown = sorted(set(spec.params) - set(entry.params))
        if unknown:
            raise RecipeError(f"{source}: distill.losses[{i}].params: unknown parameter '{unknown[0]}' for "
                              f"'{spec.name}'; valid: {', '.join(sorted(entry.params)) or 'none'}")
        if spec.level is not None and spec.level not in entry.levels:
            raise RecipeError(f"{source}: distill.losses[{i}].level: '{spec.name}' applies at "
                              f"{', '.join(entry.levels)}, not '{spec.level}'")
    if recipe.distill.losses and recipe.teacher is None:
        raise RecipeError(f"{source}: teacher: required field is missing (distill.losses needs a teacher)")


def _check_target(recipe: Recipe, path: Path) -> None:
    from kdctl.export.targets import available_targets

    t = recipe.export.target
    if t.endswith((".yaml", ".yml")):
        if not (path.parent / t).is_file() and not Path(t).is_file():
            raise RecipeError(f"{path}: export.target: preset file '{t}' not found")
    elif t not in available_targets():
        raise RecipeError(f"{path}: export.target: '{t}' does not exist; valid: {', '.join(available_targets())}")


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def fix(p: str) -> str:
        """Relative to the recipe's folder first, then the working directory; bare model names stay names."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return str(q)
        for cand in (base / q, Path.cwd() / q):
            if cand.exists():
                return str(cand.resolve())
        # Model YAML names like 'yolov8n.yaml' are Ultralytics/kdctl built-ins, not paths.
        return str((base / q).resolve()) if len(q.parts) > 1 else p

    data = recipe.model_dump()
    for key in ("teacher", "student"):
        if data.get(key):
            data[key]["model"] = fix(data[key]["model"])
    if data["data"]["yolo"]:
        data["data"]["yolo"] = fix(data["data"]["yolo"])
    if data["data"]["coco"]:
        data["data"]["coco"] = {k: fix(v) for k, v in data["data"]["coco"].items()}
    return Recipe.model_validate(data)


def recipe_json_schema() -> str:
    return json.dumps(Recipe.model_json_schema(), indent=2)
