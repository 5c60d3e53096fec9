"""What a config reload changes: the plan, by name, from the running config to the new one.

Pure (no I/O, no reactor), so each rule is unit-tested on its own; ``Daemon.reload`` applies
the plan. The rules:

- A plugin or sink whose section (and class) is unchanged keeps running, its connections
  untouched. A changed one is stopped and started with the new section; a plugin whose section
  differs only in supervision keys (``restart``, ``restart_limit``, ``restart_window``) takes them
  without a restart. Added ones start; removed ones stop (a removed sink's queue file stays).
- Routes are swapped as a whole, between two events.
- What the running process cannot change (``gateway.id``, ``gateway.state_dir``,
  ``gateway.queue_sync``, ``gateway.log_format``, ``api.enabled``, ``api.listen``, and a sink's
  ``max_bytes``, which sizes its open queue file) keeps its running value and is reported as
  needing a restart. Everything else applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gatewayd.config_model import Config
from gatewayd.schema import PluginConfig

__all__ = ["RESTART_ONLY", "Changes", "ReloadPlan", "plan_reload", "reload_record"]

#: Keys of the core sections that only a restart changes: (section, key).
RESTART_ONLY = (
    ("gateway", "id"),
    ("gateway", "state_dir"),
    ("gateway", "queue_sync"),
    ("gateway", "log_format"),
    ("api", "enabled"),
    ("api", "listen"),
)


@dataclass
class Changes:
    """Instances of one kind (plugins or sinks) by what a reload does to them."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: Changed only in keys applied in place (a plugin's supervision keys).
    reconfigured: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "reconfigured": self.reconfigured,
        }

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.reconfigured)


@dataclass
class ReloadPlan:
    plugins: Changes
    sinks: Changes
    routes: bool
    #: ``"api.listen"``, ``"sinks.store.max_bytes"``...: changed in the file, kept as running.
    needs_restart: list[str]
    #: Core keys applied in place (``gateway.log_level``, ``api.command_timeout``...).
    settings: list[str]

    @property
    def empty(self) -> bool:
        return not (self.plugins or self.sinks or self.routes or self.settings)


def _same_section(old: Any, new: Any, old_class: Any, new_class: Any) -> bool:
    return old_class is new_class and old == new


def _diff(
    old: dict[str, Any],
    new: dict[str, Any],
    old_classes: dict[str, Any],
    new_classes: dict[str, Any],
    in_place: frozenset[str] = frozenset(),
) -> Changes:
    changes = Changes()
    for name, section in new.items():
        if name not in old:
            changes.added.append(name)
        elif _same_section(old[name], section, old_classes.get(name), new_classes.get(name)):
            continue
        elif (
            in_place
            and old_classes.get(name) is new_classes.get(name)
            and _equal_but(old[name], section, in_place)
        ):
            changes.reconfigured.append(name)
        else:
            changes.changed.append(name)
    changes.removed = [name for name in old if name not in new]
    return changes


def _equal_but(old: Any, new: Any, keys: frozenset[str]) -> bool:
    """The two models are equal once ``keys`` are left out."""
    return old.model_dump(exclude=set(keys)) == new.model_dump(exclude=set(keys))


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """What reloading from ``old`` to ``new`` does (neither is changed)."""
    plugins = _diff(
        old.plugins,
        new.plugins,
        old.plugin_classes,
        new.plugin_classes,
        PluginConfig.SUPERVISION_KEYS,
    )
    sinks = _diff(old.sinks, new.sinks, old.sink_classes, new.sink_classes)
    needs_restart = [
        f"{section}.{key}"
        for section, key in RESTART_ONLY
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]
    needs_restart += [
        f"sinks.{name}.max_bytes"
        for name in sinks.changed
        if old.sinks[name].max_bytes != new.sinks[name].max_bytes
    ]
    restart_only = {f"{section}.{key}" for section, key in RESTART_ONLY}
    settings = [
        f"{section}.{key}"
        for section in ("gateway", "api")
        for key in type(getattr(new, section)).model_fields
        if f"{section}.{key}" not in restart_only
        and getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]
    routes = [r.model_dump() for r in old.routes] != [r.model_dump() for r in new.routes]
    return ReloadPlan(plugins, sinks, routes, needs_restart, settings)


def keep_running_values(old: Config, new: Config) -> None:
    """Give ``new`` the running values of what needs a restart (it is the config from now on,
    and must describe what actually runs)."""
    for section, key in RESTART_ONLY:
        setattr(getattr(new, section), key, getattr(getattr(old, section), key))


def reload_record(
    at: float,
    plan: ReloadPlan | None = None,
    errors: list[str] | None = None,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``last_reload`` of ``/health`` and the answer of ``POST /api/v1/reload``."""
    applied = None
    if plan is not None:
        applied = {
            "plugins": plan.plugins.as_dict(),
            "sinks": plan.sinks.as_dict(),
            "routes": plan.routes,
            "settings": plan.settings,
        }
    return {
        "ok": not errors,
        "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
        "errors": list(errors or []),
        "applied": applied,
        "needs_restart": plan.needs_restart if plan is not None else [],
        "failed": dict(failed or {}),
    }
