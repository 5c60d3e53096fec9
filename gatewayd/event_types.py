"""The event types every plugin uses, and their shapes as JSON Schemas shipped in the package.

``device.online``, ``device.offline``, ``frame.invalid`` and ``command.result`` mean the same
whichever plugin emits them, so a backend can handle them once. Their schemas live in
``gatewayd/event_schemas/<type>.schema.json`` (JSON Schema 2020-12, over the event envelope);
``shape_problems`` checks an event against them. The built-in plugins' tests check every such
event they emit (``tests/conftest.py``); a plugin author's tests can do the same. Checking needs
the ``jsonschema`` package (a test dependency, not one of the daemon's).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from gatewayd.events import Event

__all__ = ["COMMON_TYPES", "schema", "shape_problems"]

COMMON_TYPES = ("device.online", "device.offline", "frame.invalid", "command.result")


@functools.cache
def schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of a common event type (KeyError for another type)."""
    if event_type not in COMMON_TYPES:
        raise KeyError(f"{event_type!r} is not a common event type ({', '.join(COMMON_TYPES)})")
    text = (resources.files("gatewayd") / "event_schemas" / f"{event_type}.schema.json").read_text()
    return json.loads(text)


@functools.cache
def _validator(event_type: str) -> Any:
    from jsonschema import Draft202012Validator  # a test dependency

    return Draft202012Validator(schema(event_type))


def shape_problems(event: Event | dict[str, Any]) -> list[str]:
    """What is wrong with a common-type event's shape (``[]`` when nothing is, or when the type
    is not a common one): one line per problem, naming the event type and the path."""
    envelope = event if isinstance(event, dict) else event.to_dict()
    event_type = envelope.get("type")
    if event_type not in COMMON_TYPES:
        return []
    problems = []
    for error in _validator(event_type).iter_errors(envelope):
        where = ".".join(str(part) for part in error.absolute_path) or "event"
        problems.append(f"{event_type}: {where}: {error.message}")
    return problems
