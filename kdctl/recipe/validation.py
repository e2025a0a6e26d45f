"""Reading YAML and validating it against a pydantic model, every problem as one line naming the file and field.
Shared by recipes (:mod:`kdctl.recipe.loader`) and target presets (:mod:`kdctl.export.targets`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdctl.errors import BundleError, RecipeError, shown

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
    if err["type"] == "missing":  # `teacher: {bundle: X}`: the unknown key, with the valid ones, says more than the
        err = next((e for e in errors  # field it left missing beside it
                    if e["type"] == "extra_forbidden" and e["loc"][:-1] == err["loc"][:-1]), err)
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p)))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        msg = f"unknown field '{loc[-1]}'" + (f"; valid fields: {', '.join(fields)}" if fields else "")
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "model_type":  # pydantic names its class ('instance of CacheSpec'), not what to write
        from kdctl.recipe.schema import SHORT_FORMS, Recipe

        fields = _fields_at(model, loc)
        short = SHORT_FORMS.get(loc[-1]) if model is Recipe and len(loc) == 1 else None
        msg = ("Input should be a valid dictionary" + (f" of its fields ({', '.join(fields)})" if fields else "")
               + (f" or one string, short for its '{short}'" if short else "") + f", got {shown(err.get('input'))}")
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


# YAML 1.2's floats without a decimal point (`1e-4`, `2E-5`): PyYAML follows YAML 1.1 and reads them as strings, so
# `alpha: 1e-3` in a loss's params was refused as "must be a number, got '1e-3'" (a schema field took it as a
# string that pydantic converts). The standard resolver is tried first; this one only adds what it misses.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_value(text: str) -> Any:
    """One value as a recipe file would hold it (``--set KEY=VALUE``'s VALUE)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


YAML_MAX_BYTES = 16 * 2**20  # recipes, presets, dataset and model YAMLs are a few KB
YAML_MAX_VALUES = 1_000_000  # after aliases: a "billion laughs" file of 1 KB expands to 10^10 values


class YamlProblem(ValueError):
    """Why a YAML file cannot be read (one line, without the file name: each caller names it with its field)."""


def parse_yaml(path: Path, loader: type = yaml.SafeLoader) -> Any:
    """The YAML at ``path`` parsed with ``loader``; a file too large, too deeply nested, or whose aliases expand
    too far (or refer to themselves) is a :class:`YamlProblem`, as are invalid YAML and non-UTF-8 text."""
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise YamlProblem(f"is {size / 2**20:.0f} MB; a YAML file kdctl reads is a few KB (at most "
                          f"{YAML_MAX_BYTES // 2**20} MB)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (loader: a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlProblem(f"invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise YamlProblem("not a UTF-8 text file") from None
    except RecursionError:
        raise YamlProblem("invalid YAML: nested too deeply") from None
    _expanded_size(data)
    return data


def _expanded_size(data: Any) -> int:
    """How many values ``data`` holds once every alias is expanded (shared lists and mappings counted each time
    they are used), without expanding them: at most :data:`YAML_MAX_VALUES`, and no value inside itself."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(v: Any, depth: int) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) in sizes:
            return sizes[id(v)]
        if id(v) in open_:
            raise YamlProblem("invalid YAML: an alias refers to the value it is in (a value inside itself)")
        if depth > 200:
            raise YamlProblem("invalid YAML: nested too deeply")
        open_.add(id(v))
        n = 1 + sum(size(c, depth + 1) for c in (list(v.keys()) + list(v.values()) if isinstance(v, dict) else v))
        open_.discard(id(v))
        if n > YAML_MAX_VALUES:
            raise YamlProblem(f"invalid YAML: its aliases expand to more than {YAML_MAX_VALUES:,} values")
        sizes[id(v)] = n
        return n

    return size(data, 0)


def read_yaml(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: " + (f"is a directory; give a {what} YAML file" if path.is_dir() else
                                         f"not a regular file (a device, pipe or socket); give a {what} YAML file"
                                         if path.exists() else f"{what} not found"))
    try:
        return parse_yaml(path, _UniqueKeyLoader)
    except YamlProblem as e:
        raise RecipeError(f"{path}: {e}") from None


# what a file of each kind kdctl reads is, and how it is given instead, where it was given in another's place
_KIND_USE = {
    "a kdctl recipe": "give it to kdctl train or distill; its dataset is the YAML its data: names",
    "a dataset YAML": "a recipe names it as data: PATH, a command takes it as --data",
    "a COCO annotation file": "a recipe names a COCO dataset as data.coco: train_images, train_annotations, "
                              "val_images, val_annotations; eval and export take that recipe as --data",
    "a target preset": "kdctl export takes it as --target PATH, a recipe as export.target",
    "an Ultralytics model YAML": "a recipe names it as student: PATH or teacher: PATH",
}


def file_kind(data: Any) -> str | None:
    """Which kind of file kdctl reads a parsed YAML/JSON mapping is, by the keys only that kind has; None where it
    is none of them (or a broken one: the reader's own error says what is wrong)."""
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if "student" in keys or "base" in keys or {"data", "distill"} <= keys:  # base: a recipe's student may be there
        return "a kdctl recipe"
    if "names" in keys and keys & {"train", "val", "test"}:
        return "a dataset YAML"
    if {"images", "annotations"} <= keys:
        return "a COCO annotation file"
    if {"runtime", "artifacts"} <= keys:
        return "a target preset"
    if {"backbone", "head"} <= keys:
        return "an Ultralytics model YAML"
    return None


def refuse_other_kind(data: Any, path: Path | str, expected: str, error: type[Exception] = RecipeError) -> None:
    """One line where the file at ``path`` is plainly another kind than ``expected`` (a dataset YAML given as the
    recipe, a recipe as --data): what it is and how that kind is given, instead of the first field it lacks."""
    kind = file_kind(data)
    if kind is not None and kind != expected:
        raise error(f"{path}: {kind}, not {expected}; {_KIND_USE[kind]}")


def validate(data: Any, model: type[M], source: str) -> M:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of fields at the top level, got "
                          f"{'nothing (the file is empty)' if data is None else type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e, model)}") from None


def bundle_section(recipe: Any, key: str, model: type[M], manifest: Path | None = None, *,
                   known_only: bool = False) -> M:
    """``recipe[key]`` of the recipe a bundle's manifest carries, checked again as the schema checks it (the bundle
    may come from another kdctl version, or be edited): a bad field is one :class:`BundleError` naming the manifest
    and ``recipe.KEY.FIELD``. ``known_only``: fields this kdctl does not know (another version's) are left out."""
    where = f"{manifest}: " if manifest is not None else ""
    section = (recipe if isinstance(recipe, dict) else {}).get(key) or {}
    if not isinstance(section, dict):
        raise BundleError(f"{where}recipe.{key}: must be a mapping, got {shown(section)}")
    if known_only:
        section = {k: v for k, v in section.items() if k in model.model_fields}
    try:
        return model.model_validate(section)
    except ValidationError as e:
        raise BundleError(f"{where}recipe.{key}.{_first_error(e, model)}") from None
