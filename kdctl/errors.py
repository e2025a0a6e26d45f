"""User-facing errors: each becomes one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations


class KdctlError(Exception):
    """An error caused by the user's input or environment (bad file, missing runtime, ...).

    ``exit_code`` follows the CLI convention: 2 for usage/input errors, 1 for a failed check.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RecipeError(KdctlError):
    """A recipe or preset file that does not validate."""


class ResumeMismatch(RecipeError):
    """``--resume`` with a recipe other than the interrupted run's (its checkpoint belongs to the recipe it began)."""


class BundleError(KdctlError):
    """A bundle that is missing, of the wrong stage, or fails verification."""


class DataError(KdctlError):
    """A dataset that cannot be found or parsed."""


class BackendUnavailable(KdctlError):
    """An optional runtime (OpenVINO, TensorRT, CUDA) that is not installed or has no device."""


class CheckFailed(KdctlError):
    """A verification (parity, accuracy budget, gate) that ran and failed."""

    exit_code = 1


def shown(value, limit: int = 80) -> str:
    """A value as the user wrote it in YAML/JSON (``true``, ``null``, ``"2"``, ``[1, 2]``), not as Python prints it
    (``True``, ``None``, ``'2'``), for errors that quote a field's value; cut to ``limit`` characters."""
    text = _shown(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _shown(value) -> str:
    import json
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, nan (JSON has no word for them)
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def distinct(fmt: str, value: float, budget: float) -> tuple[str, str]:
    """``value`` and ``budget`` in ``fmt`` (e.g. ``{:.4f}``), with more decimals where the two would read the same
    but differ: a gate that fails mAP50-95 0.29996 against 0.3 does not say "0.3000 below budget 0.3000"."""
    import re

    a, b = fmt.format(value), fmt.format(budget)
    for more in range(1, 9):
        if a != b or value == budget:
            break
        finer = re.sub(r"\.(\d+)([fg%])", lambda m: f".{int(m.group(1)) + more}{m.group(2)}", fmt)
        a, b = finer.format(value), finer.format(budget)
    return a, b


def given_by(flag: str, typed: bool, bundle, field: str) -> str:
    """Where a value an error quotes came from: the flag, where the user typed it, else the recipe field of the
    bundle it was read from (``<bundle>: recipe profile.threads``), which may have been written for another device."""
    return flag if typed else f"{bundle}: recipe {field}"


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut to ``limit`` characters), for one-line errors about a library's
    exception."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


# the one wording for a path that is a loop of symbolic links (pathlib's resolve() raises on it)
LINK_LOOP = "a loop of symbolic links (each points on to another, never to a file); give the file itself"


def not_utf8(path) -> str | None:
    """The path as an error can show it (its bytes that are not UTF-8 as ``\\udcXX``) when it has such bytes, which
    the model writers and runtimes (ONNX, ONNX Runtime, OpenVINO, TensorRT) cannot take; None for a UTF-8 path."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return str(path).encode("utf-8", "backslashreplace").decode()
    return None


def parse_json(text: str):
    """``json.loads`` whose every failure is a ``ValueError`` with a short reason (bad syntax; nesting too deep for
    Python's parser, which otherwise raises RecursionError)."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_kind(value) -> str:
    """What a parsed JSON/YAML value is, in the file's words: "a list", "a string", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    for kinds, word in (((dict,), "an object"), ((list, tuple), "a list"), ((str,), "a string"),
                        ((int, float), "a number")):
        if isinstance(value, kinds):
            return word
    return type(value).__name__
