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
    """``(healthy, body)`` of ``/health`` for the daemon's current state."""
    plugins = {
        name: {
            "type": host.type_name,
            "state": host.state,
            "error": host.error,
            "restarts": getattr(host, "restarts", 0),
        }
        for name, host in sorted(daemon.plugins.items())
    }
    sinks = {}
    for name, runner in sorted(daemon.sinks.items()):
        queue = getattr(runner, "queue", None)
        age = oldest_age_seconds(queue, now) if queue is not None else None
        queue_error = getattr(queue, "error", None)
        since = getattr(queue, "error_since", None)
        sinks[name] = {
            "state": runner.state,
            "last_error": runner.last_error,
            "queued": queue.depth if queue is not None else None,
            "oldest_age_seconds": round(age, 3) if age is not None else None,
            "queue": {
                "state": "failing" if queue_error is not None else "ok",
                "error": queue_error,
                "failing_seconds": round(now - since, 3) if since is not None else None,
            },
        }
    # A queue that cannot store (a full disk) refuses every new event: as bad as a dead plugin.
    healthy = all(p["state"] == "running" for p in plugins.values()) and all(
        s["state"] != "stopped" and s["queue"]["state"] == "ok" for s in sinks.values()
    )
    body = {
        "status": "ok" if healthy else "degraded",
        "gateway": daemon.gateway_id,
        "plugins": plugins,
        "sinks": sinks,
    }
    config_status = getattr(daemon, "config_status", None)
    if config_status is not None:  # when loaded, and how the last reload went
        body["config"] = config_status()
    return healthy, body


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
