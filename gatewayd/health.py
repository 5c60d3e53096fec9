"""The health report of the daemon, outside the web package so other channels can share it.

``/health`` answers it over HTTP today; an MQTT status topic or the fleet client can send the same
report without importing twisted.web.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import gatewayd
from gatewayd.metrics import oldest_age_seconds


def health_report(daemon: Any, now: float) -> tuple[bool, dict[str, Any]]:
    """``(healthy, body)`` of ``/health`` for the daemon's current state.

    ``body["status"]`` is ``ok``; ``warning`` when everything still stores durably but a sink has
    been failing for longer than its ``warn_after`` or holds an event older than its
    ``warn_age`` (``body["warnings"]`` says which: worth an alert, not a reason to take the box
    out of a balancer, so ``healthy`` stays True); or ``degraded`` (``healthy`` False: a plugin
    is not running, a sink stopped, or a queue cannot store).
    """
    plugins = {
        name: {
            "type": host.type_name,
            "state": host.state,
            "error": host.error,
            "restarts": getattr(host, "restarts", 0),
        }
        for name, host in sorted(daemon.plugins.items())
    }
    sinks = {name: _sink_health(runner, now) for name, runner in sorted(daemon.sinks.items())}
    # A queue that cannot store (a full disk) refuses every new event: as bad as a dead plugin.
    healthy = all(p["state"] == "running" for p in plugins.values()) and all(
        s["state"] != "stopped" and s["queue"]["state"] == "ok" for s in sinks.values()
    )
    warnings = [f"sink {name}: {s['warning']}" for name, s in sinks.items() if s["warning"]]
    body = {
        "status": "degraded" if not healthy else "warning" if warnings else "ok",
        "gateway": daemon.gateway_id,
        "warnings": warnings,
        "plugins": plugins,
        "sinks": sinks,
    }
    config_status = getattr(daemon, "config_status", None)
    if config_status is not None:  # when loaded, and how the last reload went
        body["config"] = config_status()
    return healthy, body


def _sink_health(runner: Any, now: float) -> dict[str, Any]:
    queue = getattr(runner, "queue", None)
    age = oldest_age_seconds(queue, now) if queue is not None else None
    queue_error = getattr(queue, "error", None)
    since = getattr(queue, "error_since", None)
    failing_since = getattr(runner, "failing_since", None)
    failing = round(now - failing_since, 3) if failing_since is not None else None
    return {
        "state": runner.state,
        "last_error": runner.last_error,
        "last_error_at": _iso(getattr(runner, "last_error_at", None)),
        "recovered_at": _iso(getattr(runner, "recovered_at", None)),
        "failing_seconds": failing,
        "warning": _sink_warning(runner, failing, age, queue),
        "queued": queue.depth if queue is not None else None,
        "oldest_age_seconds": round(age, 3) if age is not None else None,
        "queue": {
            "state": "failing" if queue_error is not None else "ok",
            "error": queue_error,
            "failing_seconds": round(now - since, 3) if since is not None else None,
        },
    }


def _sink_warning(runner: Any, failing: float | None, age: float | None, queue: Any) -> str | None:
    """Why the sink needs attention though nothing is lost yet; None when it does not."""
    config = getattr(runner, "config", None)
    warn_after = getattr(config, "warn_after", 60.0)
    warn_age = getattr(config, "warn_age", 600.0)
    queued = queue.depth if queue is not None else 0
    if failing is not None and failing >= warn_after:
        return f"failing for {failing:.0f} s ({runner.last_error}); {queued} events wait"
    if warn_age is not None and age is not None and age >= warn_age:
        return f"the oldest of {queued} queued events is {age:.0f} s old"
    return None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def box_status(daemon: Any, now: float, online: bool = True) -> dict[str, Any]:
    """The box's status for the fleet (``gatewayd/{gateway}/status``, retained): version,
    plugins with their devices online, every queue's depth and oldest age, and when."""
    plugins = {}
    for name, host in sorted(daemon.plugins.items()):
        plugin = getattr(host, "plugin", None)
        try:
            count = plugin.devices_online() if plugin is not None else 0
        except Exception:  # a broken plugin costs its own figure only (logged by /metrics)
            count = None
        plugins[name] = {"type": host.type_name, "state": host.state, "devices_online": count}
    queues = {}
    for name, runner in sorted(daemon.sinks.items()):
        queue = getattr(runner, "queue", None)
        age = oldest_age_seconds(queue, now) if queue is not None else None
        queues[name] = {
            "queued": queue.depth if queue is not None else None,
            "oldest_age_seconds": round(age, 3) if age is not None else None,
        }
    return {
        "status": "online" if online else "offline",
        "gateway": daemon.gateway_id,
        "version": gatewayd.__version__,
        "plugins": plugins,
        "queues": queues,
        "updated": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    }
