"""Turning pydantic's validation errors into messages an operator can act on.

Split off ``gatewayd.config`` (which reads and checks a file): here a value is described for a
message (never a secret's), a pydantic error becomes ``expected X, got Y`` (branches of a union
merged, a typo's likely key suggested), and a pydantic error location is walked back to the
model field and the YAML key path it came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from inspect import isclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr

from gatewayd.yamlnodes import KeyPath

# --- describing values and pydantic errors -------------------------------------------------------


def describe(value: Any) -> str:
    """A short, YAML-flavoured rendering of a config value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return str(value)


_EXPECTED = {
    **dict.fromkeys(
        ["int_type", "int_parsing", "int_from_float", "int_parsing_size"], "an integer"
    ),
    **dict.fromkeys(["float_type", "float_parsing", "decimal_type", "decimal_parsing"], "a number"),
    "finite_number": "a finite number",
    **dict.fromkeys(["bool_type", "bool_parsing"], "true or false"),
    **dict.fromkeys(["string_type", "string_sub_type", "bytes_type"], "a string"),
    **dict.fromkeys(
        ["dict_type", "mapping_type", "model_type", "model_attributes_type", "dataclass_type"],
        "a mapping",
    ),
    **dict.fromkeys(
        ["list_type", "tuple_type", "set_type", "frozen_set_type", "iterable_type"], "a list"
    ),
    "path_type": "a file path",
    "none_required": "null",
    **dict.fromkeys(["url_type", "url_parsing", "url_scheme"], "a URL"),
}

_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}

_NOT_SHOWN = "the value is secret and not shown"
MISSING = "required key missing"


@dataclass
class Problem:
    """One message in two parts so that union branches can be merged (``expected A or B``)."""

    head: str
    got: str | None = None
    #: For an unknown key: the known key it probably is a typo of.
    suggestion: str | None = None

    def text(self) -> str:
        return self.head if self.got is None else f"{self.head}, got {self.got}"


def _expected_and_got(expected: str, value: Any, secret: bool) -> Problem:
    if secret:
        return Problem(f"expected {expected} ({_NOT_SHOWN})")
    return Problem(f"expected {expected}", describe(value))


def explain(error: Mapping[str, Any], secret: bool, choices: Sequence[str]) -> Problem:
    """A readable message for one pydantic error; never includes the value when ``secret``."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return Problem(MISSING)
    if kind == "extra_forbidden":
        key = str(error["loc"][-1]) if error["loc"] else ""
        close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
        if close:
            return Problem(f"unknown key (did you mean {close[0]!r}?)", suggestion=close[0])
        return Problem("unknown key")
    if kind in ("value_error", "assertion_error"):
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if secret and isinstance(value, str | int | float) and str(value) in message:
            return Problem(f"invalid value ({_NOT_SHOWN})")
        return Problem(message)
    if kind == "string_type" and isinstance(value, int | float) and not secret:
        return Problem("expected a string", f"{describe(value)} (put it in quotes)")
    if kind in _EXPECTED:
        return _expected_and_got(_EXPECTED[kind], value, secret)
    if kind in ("literal_error", "enum"):
        options = str(ctx.get("expected", "")).rsplit(" or ", 1)
        problem = _expected_and_got("one of " + ", ".join(options), value, secret)
        if isinstance(value, bool) and not secret:  # ``synchronous: off`` is YAML for false
            problem.got = f"{describe(value)} (put it in quotes)"
        return problem
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return _expected_and_got(f"a value {sign} {ctx.get(name)}", value, secret)
    if kind in ("string_too_short", "too_short"):
        unit = "character" if isinstance(value, str | SecretStr) else "item"
        count = ctx.get("min_length")
        return _expected_and_got(f"at least {count} {unit}{'s' * (count != 1)}", value, secret)
    if kind in ("string_too_long", "too_long"):
        unit = "character" if isinstance(value, str | SecretStr) else "item"
        count = ctx.get("max_length")
        return _expected_and_got(f"at most {count} {unit}{'s' * (count != 1)}", value, secret)
    if kind == "string_pattern_mismatch":
        return _expected_and_got(f"a value matching {ctx.get('pattern')}", value, secret)
    if kind == "multiple_of":
        return _expected_and_got(f"a multiple of {ctx.get('multiple_of')}", value, secret)
    message = str(error["msg"])
    return Problem(message) if secret else Problem(message, describe(value))


def merge(problems: list[Problem]) -> str:
    """One message for several errors at one key (the branches of a union type)."""
    if len(problems) == 1:
        return problems[0].text()
    gots = {p.got for p in problems}
    if len(gots) == 1 and all(p.head.startswith("expected ") for p in problems):
        heads = list(dict.fromkeys(p.head.removeprefix("expected ") for p in problems))
        return Problem("expected " + " or ".join(heads), problems[0].got).text()
    return "; ".join(dict.fromkeys(p.text() for p in problems))


# --- walking pydantic models along a key path ----------------------------------------------------


def alternatives(annotation: Any) -> list[Any]:
    """The concrete types an annotation allows: ``Annotated`` unwrapped, unions flattened."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return alternatives(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return [alt for arg in get_args(annotation) for alt in alternatives(arg)]
    return [annotation]


def is_model(annotation: Any) -> bool:
    return isclass(annotation) and issubclass(annotation, BaseModel)


def field_keys(model: type[BaseModel]) -> dict[str, str]:
    """Key as written in the file → field name (aliases included)."""
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        keys[name] = name
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                keys[alias] = name
    return keys


_NO_STEP = object()


def _step(annotation: Any, element: Any) -> Any:
    """The annotation one key or index below ``annotation``, or _NO_STEP (a union branch tag)."""
    for alternative in alternatives(annotation):
        if is_model(alternative) and isinstance(element, str):
            name = field_keys(alternative).get(element)
            if name is not None:
                return alternative.model_fields[name].annotation
        origin, args = get_origin(alternative), get_args(alternative)
        if origin in (list, tuple, set, frozenset, Sequence) and isinstance(element, int) and args:
            return args[0]
        if origin in (dict, Mapping) and len(args) == 2 and isinstance(element, str):
            return args[1]
    return _NO_STEP


def annotation_at(model: type[BaseModel], loc: Sequence[Any]) -> Any:
    annotation: Any = model
    for element in loc:
        below = _step(annotation, element)
        if below is not _NO_STEP:
            annotation = below
    return annotation


def holds_secret(annotation: Any) -> bool:
    return any(
        isclass(alt) and issubclass(alt, SecretStr | SecretBytes)
        for alt in alternatives(annotation)
    )


def data_path(data: Any, loc: Sequence[Any], missing: bool) -> KeyPath:
    """The key path of a pydantic ``loc`` within ``data``: union branch tags are dropped, and
    for a missing key the path ends with that key."""
    path: list[Any] = []
    current = data
    for index, element in enumerate(loc):
        if _has(current, element):
            path.append(element)
            current = current[element]
        elif missing and index == len(loc) - 1:
            path.append(element)
    return tuple(path)


def _has(container: Any, element: Any) -> bool:
    if isinstance(container, dict):
        return element in container
    return (
        isinstance(container, list) and isinstance(element, int) and 0 <= element < len(container)
    )


def value_at(data: Any, path: KeyPath) -> Any:
    for element in path:
        if not _has(data, element):
            return None
        data = data[element]
    return data
