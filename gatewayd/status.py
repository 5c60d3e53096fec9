"""The box at a glance: what ``GET /api/v1/status``, the status page and ``gatewayd status`` show.

A pure function of the daemon view, outside the web package like ``gatewayd.health`` (whose
report it extends, so ``status`` here is always the body status of ``/health``): per plugin its
state, restarts, devices online, event and frame rates over the last sample interval and totals;
per sink its state, queue and delivery rate.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import gatewayd
from gatewayd.health import health_report
from gatewayd.history import PLUGIN_COUNTERS

__all__ = ["status_report"]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _devices_online(host: Any) -> int | None:
    """The plugin's count, or None when there is no plugin or counting fails (a broken plugin
    costs its own figure only; ``/metrics`` logs the failure)."""
    plugin = getattr(host, "plugin", None)
    if plugin is None:
        return None
    try:
        return int(plugin.devices_online())
    except Exception:
        return None


def _latest_rates(daemon: Any) -> dict[str, dict[str, Any]]:
    history = getattr(daemon, "history", None)
    if history is None or not hasattr(history, "latest_rates"):
        return {"plugins": {}, "sinks": {}}
    return history.latest_rates()


def _plugin_status(host: Any, rates: dict[str, Any] | None) -> dict[str, Any]:
    metrics = getattr(getattr(host, "context", None), "metrics", None)
    return {
        "type": getattr(host, "type_name", None),
        "state": host.state,
        "error": getattr(host, "error", None),
        "restarts": getattr(host, "restarts", 0),
        "devices_online": _devices_online(host),
        "rates": {key: (rates or {}).get(key) for key in PLUGIN_COUNTERS},
        "totals": {key: getattr(metrics, key, None) for key in PLUGIN_COUNTERS},
    }


def _sink_status(runner: Any, health: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """The sink as ``/health`` reports it, with its type, delivered count and rate."""
    return {
        "type": getattr(getattr(runner, "config", None), "type", None),
        "state": runner.state,
        **health,
        "delivered": getattr(runner, "delivered", None),
        "delivery_rate": rate,
    }


def status_report(daemon: Any, now: float) -> dict[str, Any]:
    """The body of ``GET /api/v1/status`` at wall-clock time ``now`` (POSIX seconds).

    A view without ``started_at``, ``config_status`` or ``history`` (a test's fake daemon) gets
    nulls there rather than an error.
    """
    _, health = health_report(daemon, now)
    rates = _latest_rates(daemon)
    started_at = getattr(daemon, "started_at", None)
    config_status = getattr(daemon, "config_status", None)
    plugins = {
        name: _plugin_status(host, rates["plugins"].get(name))
        for name, host in sorted(daemon.plugins.items())
    }
    sinks = {
        name: _sink_status(
            runner,
            health["sinks"].get(name, {}),
            rates["sinks"].get(name, {}).get("delivered"),
        )
        for name, runner in sorted(daemon.sinks.items())
    }
    return {
        "gateway": daemon.gateway_id,
        "version": gatewayd.__version__,
        "status": health["status"],
        "warnings": health.get("warnings", []),
        "started_at": _iso(started_at),
        "uptime_seconds": round(max(0.0, now - started_at), 1) if started_at is not None else None,
        "config": config_status() if callable(config_status) else None,
        "plugins": plugins,
        "sinks": sinks,
    }
