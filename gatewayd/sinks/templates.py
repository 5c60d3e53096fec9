"""Templates over an event's fields (``{gateway} {plugin} {protocol} {device} {type}``), parsed
once and checked at config time: the mqtt sink's topic and the ThingsBoard device names."""

from __future__ import annotations

import difflib
import string
from collections.abc import Callable
from typing import Any

__all__ = ["PLACEHOLDERS", "fill", "parse_placeholders"]

#: The event fields a template may name.
PLACEHOLDERS = ("gateway", "plugin", "protocol", "device", "type")


def parse_placeholders(template: str) -> list[tuple[str, str | None]]:
    """``template`` as (literal text, placeholder or None) pairs; ValueError names an unknown
    placeholder (with a "did you mean"), a format spec or a conversion."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and name not in PLACEHOLDERS:
            known = " ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known}){hint}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion")
        parts.append((literal, name or None))
    return parts


def fill(
    parts: list[tuple[str, str | None]],
    event: Any,
    gateway: str,
    convert: Callable[[str | None], str],
) -> str:
    """The text of ``parts`` for ``event``, each field's value through ``convert``; ``gateway``
    stands in for an event without one."""
    out = []
    for literal, name in parts:
        out.append(literal)
        if name is not None:
            value = getattr(event, name)
            if name == "gateway":
                value = value or gateway
            out.append(convert(value))
    return "".join(out)
