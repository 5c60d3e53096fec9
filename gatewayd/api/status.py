"""``GET /api/v1/status`` and ``GET /api/v1/history``: the box at a glance, and its last hour.

The status is ``gatewayd.status.status_report`` (the ``/health`` report plus uptime, config,
restarts, devices online, rates and totals); the history is the daemon's in-memory ``History``
(``gatewayd.history``). Both sit under ``/api/v1`` and so need the token when one is set.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server

from gatewayd.api.base import JsonResource
from gatewayd.api.common import check_arguments, encode_json, respond
from gatewayd.status import status_report


class StatusResource(JsonResource):
    """``GET /api/v1/status``: what ``gatewayd status`` and the status page show."""

    def render_GET(self, request: server.Request) -> bytes:
        check_arguments(request, ())
        return respond(request, 200, encode_json(status_report(self.api.daemon, self.api.now())))


class HistoryResource(JsonResource):
    """``GET /api/v1/history``: ``{"interval", "points", "t": [...], "plugins": {name: {counter:
    [rate...]}}, "sinks": {name: {"queued": [...], "delivered": [...]}}}``, every array aligned
    with ``t``; empty series for a daemon view without a history."""

    def render_GET(self, request: server.Request) -> bytes:
        check_arguments(request, ())
        history = getattr(self.api.daemon, "history", None)
        body: dict[str, Any]
        if history is None:
            body = {"interval": None, "points": 0, "t": [], "plugins": {}, "sinks": {}}
        else:
            body = history.snapshot()
        return respond(request, 200, encode_json(body))
