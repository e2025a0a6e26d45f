"""Reading YAML and validating it against a pydantic model, every problem as one line naming the file and field.
Shared by recipes (:mod:`kdctl.recipe.loader`) and target presets (:mod:`kdctl.export.targets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdctl.errors import RecipeError, shown

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("list[int]", "literal['backbone','neck','head']", "function-after[_exactly_one(), DataSpec]",
                   "int", "float", "bool", "str"):
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
        msg = f"got {shown(err.get('input'))}; {msg[0].lower()}{msg[1:]}"
    elif err["type"].endswith(("_type", "_parsing")) and "input" in err:
        msg = f"{msg}, got {shown(err['input'])}"
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    ``train:`` section would replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: " + (f"is a directory; give a {what} YAML file" if path.is_dir() else
                                         f"not a regular file (a device, pipe or socket); give a {what} YAML file"
                                         if path.exists() else f"{what} not found"))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
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
