"""``/health`` and ``/metrics``: what systemd, monitoring and Prometheus read without a token."""

from __future__ import annotations

from twisted.web import server

from gatewayd.api.base import JsonResource
from gatewayd.api.common import encode_json, respond
from gatewayd.health import health_report


class HealthResource(JsonResource):
    """``GET /health``: 200 ``ok`` when every plugin is running and no sink stopped, else 503."""

    def render_GET(self, request: server.Request) -> bytes:
        healthy, report = health_report(self.api.daemon, self.api.now())
        return respond(request, 200 if healthy else 503, encode_json(report))


class MetricsResource(JsonResource):
    """``GET /metrics``: Prometheus text exposition, computed at scrape time."""

    def render_GET(self, request: server.Request) -> bytes:
        body = self.api.metrics.render()
        request.setHeader(b"content-type", self.api.metrics.content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
