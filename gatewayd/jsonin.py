"""JSON from outside the daemon: HTTP bodies, ``key:=JSON`` arguments, (later) MQTT commands.

``loads_external`` is the one parser for such input. Whatever the input, it returns a value or
raises ``JsonInputError`` (a ValueError) naming the problem; never RecursionError. The standard
library's parser recurses once per ``[``/``{`` and hits Python's recursion limit near 1,000
levels, which 60 KB of brackets reaches; so the nesting is measured first, without recursion, and
anything deeper than ``MAX_DEPTH`` is refused before parsing. (orjson has its own limit of 1,024
levels but turns integers beyond 64 bits into floats, so it is not used for input.)
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JsonInputError", "loads_external", "nesting_depth"]

#: Levels of arrays and objects accepted: far more than any command argument needs, few enough
#: that nothing downstream (validation, encoding, logging) recurses deeply on such a value.
MAX_DEPTH = 64

#: A JSON string, escapes included (all of it, for a valid document).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Whatever is not a bracket, once the strings are gone.
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonInputError(ValueError):
    """Input that is not acceptable JSON; the message names the problem."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, brackets in strings not counted:
    linear time, no recursion, no Python loop per character (~4 ms for 64 KB of brackets)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def loads_external(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON: bytes must be UTF-8 without a byte order mark; NaN and Infinity are
    refused (RFC 8259); more than ``max_depth`` levels of nesting is refused before parsing."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonInputError("not UTF-8 text") from None
        if text.startswith("\ufeff"):
            raise JsonInputError("not UTF-8 text without a byte order mark (BOM)")
    else:
        text = data
    openings = text.count("[") + text.count("{")  # a cheap bound first: most input is shallow
    if openings > max_depth and nesting_depth(text) > max_depth:
        raise JsonInputError(
            f"JSON nested too deeply (more than {max_depth} levels of arrays and objects)"
        )
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of > 4300 digits
        raise JsonInputError(f"not valid JSON: {exc}") from None
