"""What every resource builds on: the API state (daemon view, token check, open event streams), the
JSON resource, and the token-protected parent of ``/api/v1``."""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from twisted.web import server
from twisted.web.resource import Resource

from gatewayd.api.common import HttpError, error_payload, log, respond, respond_error
from gatewayd.commands.dispatch import CommandDispatcher, Refusal
from gatewayd.config_model import ApiSection
from gatewayd.metrics import MetricsRenderer


class OpenStream(Protocol):
    """An open long-lived answer (an event stream) the API can end when the daemon stops."""

    def close(self, reason: str) -> None: ...


class ApiState:
    """What every resource needs: the daemon view, the api config, the metrics renderer and the
    command dispatcher (the daemon's ``commands``, shared with the MQTT command channel; a
    daemon view without one gets its own, without an idempotency store).

    ``streams`` holds the open event streams: ``api.max_streams`` bounds it, and
    ``close_streams()`` ends them (stopping the listening port leaves open connections open).
    """

    def __init__(self, daemon: Any, config: ApiSection) -> None:
        self.daemon = daemon
        self.config = config
        self.metrics = MetricsRenderer(daemon)
        commands = getattr(daemon, "commands", None)
        if commands is None:
            commands = CommandDispatcher(daemon, command_timeout=config.command_timeout)
        self.commands: CommandDispatcher = commands
        self.streams: set[OpenStream] = set()

    def close_streams(self, reason: str = "gatewayd is stopping") -> None:
        """End every open event stream, telling each client ``reason`` (the daemon's stop)."""
        for stream in list(self.streams):
            stream.close(reason)
        self.streams.clear()

    def authorize(self, request: server.Request) -> None:
        """Raise 401/403 unless the request carries the configured bearer token (if any)."""
        token = self.daemon.api_token
        if not token:
            return
        header = request.getHeader(b"authorization")
        scheme, _, given = (header or b"").strip().partition(b" ")
        if header is None or scheme.lower() != b"bearer" or not given.strip():
            raise HttpError(
                401,
                "unauthorized",
                "this request needs an 'Authorization: Bearer <token>' header "
                "(the token is in the file api.token_file names)",
                {b"www-authenticate": b'Bearer realm="gatewayd"'},
            )
        if not hmac.compare_digest(given.strip(), token.encode("utf-8")):
            raise HttpError(403, "forbidden", "the bearer token is not valid")

    def plugin_host(self, name: str) -> Any:
        """The PluginHost called ``name``; 404 listing the configured plugins otherwise."""
        try:
            return self.commands.host(name)
        except Refusal as refusal:
            raise HttpError(refusal.status, refusal.code, refusal.message) from None

    def now(self) -> float:
        return self.daemon.reactor.seconds()


class JsonResource(Resource):
    """Base resource: JSON answers, JSON 404 for unknown children and JSON 405 for other methods.

    Subclasses define ``render_GET``/``render_POST`` returning bytes (see ``respond``) or
    NOT_DONE_YET, and raise HttpError for error answers. A trailing slash is accepted.
    """

    def __init__(self, api: ApiState) -> None:
        super().__init__()
        self.api = api

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return NotFoundResource(self.api)

    def allowed_methods(self) -> list[str]:
        methods = [m for m in ("GET", "POST") if callable(getattr(self, f"render_{m}", None))]
        return methods + (["HEAD"] if "GET" in methods else [])

    def render(self, request: server.Request) -> Any:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{'GET' if method == 'HEAD' else method}", None)
        try:
            if handler is None:
                allowed = self.allowed_methods()
                raise HttpError(
                    405,
                    "method_not_allowed",
                    f"{method} is not allowed on {request.path.decode('utf-8', 'replace')} "
                    f"(allowed: {', '.join(allowed) or 'none'})",
                    {b"allow": ", ".join(allowed).encode("ascii")},
                )
            return handler(request)
        except HttpError as error:
            return respond_error(request, error)
        except Exception:
            log.failure("control API: {method} {uri} failed", method=method, uri=request.uri)
            return respond(request, 500, error_payload("internal", "internal error; see the log"))


class NotFoundResource(JsonResource):
    """Any path the API does not have: 404 whatever the method."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return respond_error(request, HttpError(404, "not_found", f"no such endpoint: {path}"))


class ErrorResource(JsonResource):
    """A leaf that answers one error whatever the method (a refusal found during traversal)."""

    isLeaf = True

    def __init__(self, api: ApiState, error: HttpError) -> None:
        super().__init__(api)
        self.error = error

    def render(self, request: server.Request) -> bytes:
        return respond_error(request, self.error)


class ProtectedResource(JsonResource):
    """``/api/v1``: every request below it, GET included, needs the bearer token when one is
    configured (401 without, 403 wrong), checked before anything else so nothing (plugin names,
    device ids, events) can be probed without it. ``/health``, ``/metrics``, ``/`` and ``/ui``
    are outside it and stay open for systemd, monitoring and Prometheus."""

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        try:
            self.api.authorize(request)
        except HttpError as error:
            return ErrorResource(self.api, error)
        return super().getChildWithDefault(path, request)

    def render(self, request: server.Request) -> Any:
        try:
            self.api.authorize(request)
        except HttpError as error:
            return respond_error(request, error)
        return super().render(request)
