"""Finding plugin and sink classes: installed entry points, or ``module:Class`` import paths.

Built-in and third-party plugins register under the entry-point group ``gatewayd.plugins``
(sinks under ``gatewayd.sinks``); the config names them by entry-point name (``type: powerbank``).
A ``type`` containing ``:`` is imported directly (``type: mypkg.mymod:MyPlugin``), which is handy
while developing a plugin that is not installed yet.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

PLUGIN_GROUP = "gatewayd.plugins"
SINK_GROUP = "gatewayd.sinks"


class RegistryError(LookupError):
    """A type name that no installed plugin or sink provides, or that failed to import."""


@cache
def available(group: str) -> dict[str, Any]:
    """Entry-point name → EntryPoint for ``group`` (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def load(group: str, type_name: str) -> Any:
    """The class behind ``type_name``; raises RegistryError with the installed choices."""
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"cannot import {type_name!r}: {exc}") from None
    entry = available(group).get(type_name)
    if entry is None:
        kind = "plugin" if group == PLUGIN_GROUP else "sink"
        choices = ", ".join(sorted(available(group))) or "none"
        raise RegistryError(f"no installed {kind} type {type_name!r} (installed: {choices})")
    try:
        return entry.load()
    except Exception as exc:  # a broken third-party plugin must not take the daemon's CLI down
        raise RegistryError(f"{type_name!r} failed to load: {exc!r}") from None


def load_all(group: str) -> dict[str, Any]:
    """Every installed class of ``group`` that loads; broken ones are skipped."""
    loaded = {}
    for name in sorted(available(group)):
        try:
            loaded[name] = load(group, name)
        except RegistryError:
            continue
    return loaded
