"""``/health`` and ``/metrics``: what systemd, monitoring and Prometheus read without a token."""

from __future__ import annotations

from typing import Any

from twisted.web import server

from gatewayd.api.base import JsonResource
from gatewayd.api.common import encode_json, respond
from gatewayd.health import health_report


class HealthResource(JsonResource):
    """``GET /health``: 200 ``ok`` or ``warning`` while everything is stored durably, 503
    ``degraded`` otherwise: what a load balancer should read. ``/health/strict`` answers 503 for
    ``warning`` too, for a monitor that only looks at the HTTP status."""

    def __init__(self, api: Any, strict: bool = False) -> None:
        super().__init__(api)
        self.strict = strict
        if not strict:
            self.putChild(b"strict", HealthResource(api, strict=True))

    def render_GET(self, request: server.Request) -> bytes:
        healthy, report = health_report(self.api.daemon, self.api.now())
        ok = healthy and not (self.strict and report["status"] != "ok")
        return respond(request, 200 if ok else 503, encode_json(report))


class MetricsResource(JsonResource):
    """``GET /metrics``: Prometheus text exposition, computed at scrape time."""

    def render_GET(self, request: server.Request) -> bytes:
        body = self.api.metrics.render()
        request.setHeader(b"content-type", self.api.metrics.content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
