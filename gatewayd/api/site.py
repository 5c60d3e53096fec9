"""Assembling and starting the control API: the resource tree, the site, the listening port."""

from __future__ import annotations

from typing import Any

from twisted.web import server

from gatewayd.api import page
from gatewayd.api.base import ApiState, JsonResource, ProtectedResource
from gatewayd.api.channel import ApiRequest, ApiSite
from gatewayd.api.common import encode_json, log, respond
from gatewayd.api.devices import DevicesResource
from gatewayd.api.events import EventsResource
from gatewayd.api.health import HealthResource, MetricsResource
from gatewayd.api.plugins import PluginsResource
from gatewayd.api.reload import ReloadResource
from gatewayd.api.status import HistoryResource, StatusResource
from gatewayd.config_model import ApiSection
from gatewayd.schema import is_loopback, split_host_port


class ApiSetupError(Exception):
    """The control API cannot start as configured (open to the network without a token...)."""


def build_site(daemon: Any, config: ApiSection) -> server.Site:
    """The twisted.web site of the control API over ``daemon``; ``site.api`` is its ApiState
    (``site.api.close_streams()`` ends the open event streams)."""
    state = ApiState(daemon, config)
    site = ApiSite(RootResource(state), requestFactory=ApiRequest)
    site.max_body_bytes = config.max_body_bytes
    site.api = state
    return site


def listen_api(daemon: Any, config: ApiSection, reactor: Any) -> Any:
    """Listen on ``api.listen``; returns the IListeningPort (``.getHost().port`` when port 0).

    Raises ApiSetupError rather than open device commands to the network without a token.
    """
    host, port = split_host_port(config.listen)
    if not is_loopback(host) and not daemon.api_token:
        raise ApiSetupError(
            f"api.listen: refusing to serve the control API on {config.listen} without a token "
            "(anyone who can reach it could send device commands); set api.token_file, "
            'or listen on loopback such as "127.0.0.1:8720"'
        )
    site = build_site(daemon, config)
    interface = "127.0.0.1" if host.lower() == "localhost" else host
    listening = reactor.listenTCP(port, site, interface=interface)
    log.info("control API listening on {host}:{port}", host=host, port=listening.getHost().port)
    return listening


class RootResource(JsonResource):
    """``/``: an index of the endpoints, and the parent of the others."""

    def __init__(self, api: ApiState) -> None:
        super().__init__(api)
        self.putChild(b"health", HealthResource(api))
        self.putChild(b"metrics", MetricsResource(api))
        v1 = ProtectedResource(api)  # the token, when set, for every request below it
        v1.putChild(b"devices", DevicesResource(api))
        v1.putChild(b"plugins", PluginsResource(api))
        v1.putChild(b"status", StatusResource(api))
        v1.putChild(b"history", HistoryResource(api))
        v1.putChild(b"events", EventsResource(api))
        v1.putChild(b"reload", ReloadResource(api))
        api_root = JsonResource(api)
        api_root.putChild(b"v1", v1)
        self.putChild(b"api", api_root)
        self.putChild(b"ui", page.static_files())

    def render_GET(self, request: server.Request) -> bytes:
        if page.wants_html(request):  # a browser: the status page
            return page.render_index(request)
        endpoints = [
            "GET /health",
            "GET /metrics",
            "GET /api/v1/status",
            "GET /api/v1/history",
            "GET /api/v1/devices[?plugin=NAME&online=BOOL&search=TEXT&limit=N&offset=N]",
            "GET /api/v1/events/stream[?plugin=GLOB&type=GLOB&device=GLOB]",
            "GET /api/v1/plugins",
            "POST /api/v1/plugins/{plugin}/commands/{command}",
        ]
        return respond(request, 200, encode_json({"endpoints": endpoints}))
