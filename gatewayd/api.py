"""The control API: health, metrics, device listing and device commands over HTTP (twisted.web).

Endpoints (``api.listen``, ``127.0.0.1:8720`` by default):

- ``GET /health``: 200 when every plugin runs and no sink is stopped, else 503
- ``GET /metrics``: Prometheus text (``gatewayd.metrics``)
- ``GET /api/v1/devices[?plugin=NAME&online=BOOL&limit=N&offset=N]``: known devices with plugin,
  id, online, last seen; a page at a time (1,000 unless ``limit`` says otherwise)
- ``GET /api/v1/plugins[/NAME[/commands[/CMD]]]``: plugins, commands and argument schemas
- ``POST /api/v1/plugins/{plugin}/commands/{command}``: run a command; JSON object body = arguments

Authentication: when ``api.token_file`` is set, POST requests need ``Authorization: Bearer
<token>`` (401 without it, 403 with a wrong one). GET requests are open on purpose: systemd,
monitoring and Prometheus read ``/health`` and ``/metrics`` without credentials. The daemon refuses
to listen on a non-loopback address when no token is configured.

Every answer is JSON except ``/metrics``; every error is
``{"ok": false, "error": {"code": "...", "message": "..."}}`` with the HTTP status as the code's
category (400 bad arguments, 401/403 auth, 404 unknown, 405 method, 408 request head too slow,
409 busy, 413 body too large, 414 request line too long, 431 request head too large, 500 internal,
502 device refused, 503 plugin not running, 504 no answer in time).

The daemon is read through a duck-typed view (``daemon.plugins``, ``daemon.sinks``,
``daemon.pipeline``, ``daemon.reactor_lag``, ``daemon.api_token``, ``daemon.reactor``,
``daemon.gateway_id``); see ``gatewayd.service`` for the real one.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from gatewayd.config_model import ApiSection
from gatewayd.jsonin import JsonInputError, loads_external
from gatewayd.metrics import MetricsRenderer, oldest_age_seconds
from gatewayd.plugin import Command, CommandError, Device
from gatewayd.schema import is_loopback, split_host_port

__all__ = [
    "ApiChannel",
    "ApiSetupError",
    "HttpError",
    "build_site",
    "is_loopback",
    "listen_api",
]

log = Logger(namespace="gatewayd.api")

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


class ApiSetupError(Exception):
    """The control API cannot start as configured (open to the network without a token...)."""


class HttpError(Exception):
    """An error answer: HTTP status, a stable ``code`` and a message naming the problem."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# --- starting the API ---------------------------------------------------------------------------


def build_site(daemon: Any, config: ApiSection) -> server.Site:
    """The twisted.web site of the control API over ``daemon``."""
    state = ApiState(daemon, config)
    site = ApiSite(RootResource(state), requestFactory=ApiRequest)
    site.max_body_bytes = config.max_body_bytes
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


class ApiRequest(server.Request):
    """A request that stops storing its body past the site's ``max_body_bytes`` (answered 413)."""

    body_too_large = False
    _received = 0

    def _limit(self) -> int | None:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", None)

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and limit is not None and length > limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


#: Reason phrases (RFC 9110) of the answers the channel itself sends; Python 3.11's HTTPStatus
#: still calls 414 "Request-URI Too Long".
CHANNEL_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


class ApiChannel(HTTPChannel):
    """An HTTP/1.1 connection that answers an oversized or slow request head with a status.

    Twisted alone drops the connection without a word when one line exceeds ``MAX_LENGTH``,
    answers a bare 400 to a head above ``totalHeadersSize`` or ``maxHeaders``, and restarts its
    idle timeout (``timeOut``, 60 s) with every byte, so one byte every few seconds keeps a
    half-sent head open forever. Here such a head gets 414, 431 or 408 with the API's JSON error
    body; the channel then stops reading requests, lingers ``linger_seconds`` and closes.
    """

    #: Longest request line (method, target, version), in bytes: longer is 414.
    max_request_line = 8192
    #: Most bytes in a request head (request line and header lines, without line ends): more
    #: is 431. Twisted's own default, enforced here first so the answer is 431, not 400.
    totalHeadersSize = 16384
    #: Longest line buffered while waiting for its end: no line may exceed the whole head.
    MAX_LENGTH = totalHeadersSize
    #: Most header fields in one request (Twisted allows 500): more is 431.
    maxHeaders = 100
    #: Seconds a head may take, from the connection (first request) or from its first byte (later
    #: requests on a kept-alive connection): then 408, or a silent close when nothing came. An idle
    #: kept-alive connection is left to ``timeOut``. 0 or None: no limit.
    header_timeout: float | None = 10.0
    #: Seconds the channel keeps reading, and discarding, after a refusal before it closes: closing
    #: with the client's data unread would send a TCP reset that can destroy the answer in flight.
    linger_seconds = 2.0

    _awaiting_head = True  # between requests, or inside a request head
    _in_headers = False  # the current head's request line has arrived
    _head_started = False  # a byte of the current head has arrived
    _head_bytes = 0
    _header_fields = 0
    _head_timer: Any = None
    _linger_timer: Any = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_head_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after an answer: the rest of the request is not read
        if self._awaiting_head and data:
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not self._in_headers:
            if len(line) > self.max_request_line:
                return self._refuse_line()
            self._in_headers = bool(line)  # Twisted skips one empty line before a request
        self._head_bytes += len(line)
        if self._head_bytes > self.totalHeadersSize:
            return self._refuse_head()
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than ``MAX_LENGTH`` (no end in sight): 414 or 431, not a silent close."""
        if self._in_headers:
            self._refuse_head()
        else:
            self._refuse_line()

    def headerReceived(self, line: bytes) -> bool:
        self._header_fields += 1
        if self._header_fields > self.maxHeaders:
            self._refuse(
                431,
                "headers_too_large",
                f"the request has more than {self.maxHeaders} header fields",
            )
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = self._in_headers = self._head_started = False
        self._head_bytes = self._header_fields = 0
        self._cancel_head_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:  # before Twisted replays any pipelined bytes of the next request
            self._awaiting_head = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        super().connectionLost(reason)

    def _arm_head_timer(self) -> None:
        if self.header_timeout:
            self._head_timer = self.callLater(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_started:
            self._refuse(
                408,
                "request_timeout",
                f"the request head was not complete within {self.header_timeout:g} s",
            )
        else:
            log.debug("control API: closing a connection that sent nothing")
            self.loseConnection()

    def _refuse_line(self) -> None:
        self._refuse(
            414, "uri_too_long", f"the request line is longer than {self.max_request_line} bytes"
        )

    def _refuse_head(self) -> None:
        self._refuse(
            431,
            "headers_too_large",
            f"the request head is larger than {self.totalHeadersSize} bytes",
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body, stop reading requests, linger, close."""
        self._refused = True
        self._cancel_head_timer()
        self.setTimeout(None)
        self.clearLineBuffer()
        body = error_payload(code, message)
        head = (
            f"HTTP/1.1 {status} {CHANNEL_REASONS[status]}\r\n"
            f"Content-Type: {JSON_CONTENT_TYPE.decode('ascii')}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        log.debug("control API: answered {status}: {message}", status=status, message=message)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
            return
        half_close()  # FIN after the answer; what the client still sends is read and dropped
        self._linger_timer = self.callLater(self.linger_seconds, self.transport.abortConnection)


class ApiSite(server.Site):
    """The site: no tracebacks to clients, access lines at debug level (scrapes are frequent)."""

    protocol = ApiChannel
    noisy = False
    displayTracebacks = False
    max_body_bytes = 65536

    def log(self, request: server.Request) -> None:
        log.debug(
            "{method} {uri} -> {code}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            code=request.code,
        )


# --- shared state and helpers -------------------------------------------------------------------


class ApiState:
    """What every resource needs: the daemon view, the api config and the metrics renderer."""

    def __init__(self, daemon: Any, config: ApiSection) -> None:
        self.daemon = daemon
        self.config = config
        self.metrics = MetricsRenderer(daemon)

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
        host = self.daemon.plugins.get(name)
        if host is None:
            raise HttpError(
                404,
                "not_found",
                f"unknown plugin {name!r} (configured: {_listing(self.daemon.plugins)})",
            )
        return host

    def now(self) -> float:
        return self.daemon.reactor.seconds()


def _listing(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


def _json_default(value: Any) -> Any:
    """JSON for what handlers commonly return besides plain values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_json(body: Any) -> bytes:
    """UTF-8 JSON; raises TypeError/ValueError for what JSON cannot represent."""
    return json.dumps(body, default=_json_default, ensure_ascii=False).encode("utf-8")


def respond(request: server.Request, status: int, payload: bytes) -> bytes:
    """Set status and JSON headers; returns the body for a render method to return or write."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return payload


def error_payload(code: str | int, message: str) -> bytes:
    return encode_json({"ok": False, "error": {"code": code, "message": message}})


def respond_error(request: server.Request, error: HttpError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return respond(request, error.status, error_payload(error.code, error.message))


def iso_utc(timestamp: float | None) -> str | None:
    """POSIX seconds as ISO 8601 UTC with microseconds, like event ``ts``."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")


def plugin_commands(host: Any) -> dict[str, Command]:
    """The commands of a plugin instance ({} before the plugin is constructed)."""
    plugin = host.plugin
    return {} if plugin is None else plugin.commands()


def describe_command(command: Command) -> dict[str, Any]:
    """Name, one-line doc and JSON schema of the arguments (``None`` when it takes none)."""
    schema = None
    if command.args is not None:
        try:
            schema = command.args.model_json_schema()
        except Exception:
            log.failure("cannot build the argument schema of command {name}", name=command.name)
    return {"name": command.name, "doc": command.doc, "arguments": schema}


def describe_plugin(name: str, host: Any) -> dict[str, Any]:
    commands = plugin_commands(host)
    return {
        "name": name,
        "type": host.type_name,
        "state": host.state,
        "error": host.error,
        "commands": [describe_command(commands[c]) for c in sorted(commands)],
    }


# --- resources ----------------------------------------------------------------------------------


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


class RootResource(JsonResource):
    """``/``: an index of the endpoints, and the parent of the others."""

    def __init__(self, api: ApiState) -> None:
        super().__init__(api)
        self.putChild(b"health", HealthResource(api))
        self.putChild(b"metrics", MetricsResource(api))
        v1 = JsonResource(api)
        v1.putChild(b"devices", DevicesResource(api))
        v1.putChild(b"plugins", PluginsResource(api))
        api_root = JsonResource(api)
        api_root.putChild(b"v1", v1)
        self.putChild(b"api", api_root)

    def render_GET(self, request: server.Request) -> bytes:
        endpoints = [
            "GET /health",
            "GET /metrics",
            "GET /api/v1/devices[?plugin=NAME&online=BOOL&limit=N&offset=N]",
            "GET /api/v1/plugins",
            "POST /api/v1/plugins/{plugin}/commands/{command}",
        ]
        return respond(request, 200, encode_json({"endpoints": endpoints}))


class HealthResource(JsonResource):
    """``GET /health``: 200 ``ok`` when every plugin is running and no sink stopped, else 503."""

    def render_GET(self, request: server.Request) -> bytes:
        healthy, report = health_report(self.api.daemon, self.api.now())
        return respond(request, 200 if healthy else 503, encode_json(report))


def health_report(daemon: Any, now: float) -> tuple[bool, dict[str, Any]]:
    """``(healthy, body)`` of ``/health`` for the daemon's current state."""
    plugins = {
        name: {"type": host.type_name, "state": host.state, "error": host.error}
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
    return healthy, body


class MetricsResource(JsonResource):
    """``GET /metrics``: Prometheus text exposition, computed at scrape time."""

    def render_GET(self, request: server.Request) -> bytes:
        body = self.api.metrics.render()
        request.setHeader(b"content-type", self.api.metrics.content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


#: Devices in one page of ``GET /api/v1/devices`` when ``limit`` is not given, and the most a
#: page may hold: a heating plugin can know half a million meters, and one answer for all of them
#: would be ~100 MB built while the reactor waits.
DEVICES_PAGE = 1000
DEVICES_PAGE_MAX = 10_000
DEVICES_ARGUMENTS = ("plugin", "online", "limit", "offset")


class DevicesResource(JsonResource):
    """``GET /api/v1/devices[?plugin=NAME][&online=true|false][&limit=N][&offset=N]``.

    Known devices, online or not, by plugin name and then in each plugin's own order, a page at a
    time: ``next_offset`` is the offset of the next page, null on the last one.
    """

    def render_GET(self, request: server.Request) -> bytes:
        unknown = sorted(
            name
            for name in (k.decode("utf-8", "replace") for k in request.args)
            if name not in DEVICES_ARGUMENTS
        )
        if unknown:
            raise HttpError(
                400,
                "bad_request",
                f"unknown query argument(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(DEVICES_ARGUMENTS)})",
            )
        wanted = [v.decode("utf-8", "replace") for v in request.args.get(b"plugin", [])]
        for name in wanted:
            self.api.plugin_host(name)  # 404 for an unknown name
        online = query_bool(request, "online")
        limit = query_int(request, "limit", DEVICES_PAGE, 1, DEVICES_PAGE_MAX)
        offset = query_int(request, "offset", 0, 0, None)
        errors: dict[str, str] = {}
        page = list(
            itertools.islice(self._devices(wanted, online, errors), offset, offset + limit + 1)
        )
        more = len(page) > limit
        body = {
            "devices": [_device_json(name, device) for name, device in page[:limit]],
            "errors": errors,
            "offset": offset,
            "next_offset": offset + limit if more else None,
        }
        return respond(request, 200, encode_json(body))

    def _devices(
        self, wanted: list[str], online: bool | None, errors: dict[str, str]
    ) -> Iterator[tuple[str, Device]]:
        """(plugin, device) for every listed device, plugin after plugin, as consumed: the
        answer is built only for the page, though the devices before it are still walked."""
        for name, host in sorted(self.api.daemon.plugins.items()):
            if (wanted and name not in wanted) or host.plugin is None:
                continue
            try:
                for device in host.plugin.devices():
                    if online is None or bool(device.online) is online:
                        yield name, device
            except Exception:
                log.failure("devices() of plugin {plugin} failed", plugin=name)
                errors[name] = "listing the devices failed; see the daemon log"


def _device_json(plugin: str, device: Device) -> dict[str, Any]:
    return {
        "plugin": plugin,
        "id": device.id,
        "online": bool(device.online),
        "last_seen": iso_utc(device.last_seen),
        "details": device.details,
    }


def _query_value(request: server.Request, name: str) -> str | None:
    """The one value of query argument ``name`` (None when absent); 400 when given twice."""
    values = request.args.get(name.encode("ascii"), [])
    if len(values) > 1:
        raise HttpError(400, "bad_request", f"query argument {name!r} is given more than once")
    return values[0].decode("utf-8", "replace") if values else None


def query_int(request: server.Request, name: str, default: int, low: int, high: int | None) -> int:
    """Query argument ``name`` as a whole number from ``low`` (to ``high``); 400 naming it."""
    text = _query_value(request, name)
    if text is None:
        return default
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low}" if high is None else f"from {low} to {high}"
        raise HttpError(
            400,
            "bad_request",
            f"query argument {name!r} must be a whole number {bounds}, got {text!r}",
        )
    return value


def query_bool(request: server.Request, name: str) -> bool | None:
    """Query argument ``name`` as true/false (None when absent); 400 naming it otherwise."""
    text = _query_value(request, name)
    if text is None:
        return None
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise HttpError(
        400, "bad_request", f"query argument {name!r} must be true or false, got {text!r}"
    )


class PluginsResource(JsonResource):
    """``GET /api/v1/plugins``: every plugin with its state and commands."""

    def render_GET(self, request: server.Request) -> bytes:
        listed = [describe_plugin(n, h) for n, h in sorted(self.api.daemon.plugins.items())]
        return respond(request, 200, encode_json({"plugins": listed}))

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return PluginResource(self.api, path.decode("utf-8", "replace"))


class PluginResource(JsonResource):
    """``GET /api/v1/plugins/{plugin}``: one plugin; parent of its ``commands``."""

    def __init__(self, api: ApiState, plugin: str) -> None:
        super().__init__(api)
        self.plugin = plugin
        self.putChild(b"commands", CommandsResource(api, plugin))

    def render_GET(self, request: server.Request) -> bytes:
        host = self.api.plugin_host(self.plugin)
        return respond(request, 200, encode_json(describe_plugin(self.plugin, host)))


class CommandsResource(JsonResource):
    """``GET /api/v1/plugins/{plugin}/commands``: the commands of one plugin."""

    def __init__(self, api: ApiState, plugin: str) -> None:
        super().__init__(api)
        self.plugin = plugin

    def render_GET(self, request: server.Request) -> bytes:
        commands = plugin_commands(self.api.plugin_host(self.plugin))
        listed = [describe_command(commands[c]) for c in sorted(commands)]
        return respond(request, 200, encode_json({"plugin": self.plugin, "commands": listed}))

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return CommandResource(self.api, self.plugin, path.decode("utf-8", "replace"))


class CommandResource(JsonResource):
    """``POST /api/v1/plugins/{plugin}/commands/{command}``: run a command, answer its result.

    Order of checks: token (401/403), plugin and command exist (404), plugin running (503),
    body (413 too large, 400 not a JSON object), arguments (400 naming the argument), then the
    command's own answer or 504 after ``api.command_timeout`` (the command's Deferred is
    cancelled). A client that disconnects does not cancel the command: it runs to its end (or
    the timeout) and its outcome is still counted and logged.
    """

    isLeaf = True

    def __init__(self, api: ApiState, plugin: str, command: str) -> None:
        super().__init__(api)
        self.plugin = plugin
        self.command = command

    def _find(self) -> tuple[Any, Command]:
        host = self.api.plugin_host(self.plugin)
        if host.plugin is None:
            raise self._unavailable(host)
        commands = plugin_commands(host)
        command = commands.get(self.command)
        if command is None:
            raise HttpError(
                404,
                "not_found",
                f"plugin {self.plugin!r} has no command {self.command!r} "
                f"(available: {_listing(commands)})",
            )
        return host, command

    def _unavailable(self, host: Any) -> HttpError:
        reason = f" ({host.error})" if host.error else ""
        return HttpError(503, "unavailable", f"plugin {self.plugin!r} is {host.state}{reason}")

    def render_GET(self, request: server.Request) -> bytes:
        _, command = self._find()
        return respond(request, 200, encode_json(describe_command(command)))

    def render_POST(self, request: server.Request) -> Any:
        self.api.authorize(request)
        host, command = self._find()
        metrics = host.context.metrics
        try:
            if host.state != "running":
                raise self._unavailable(host)
            arguments = read_json_object(request, self.api.config.max_body_bytes)
        except HttpError as error:
            metrics.count_command(command.name, error.code)
            raise
        return CommandCall(self.api, request, self.plugin, command, metrics).start(arguments)


def read_json_object(request: server.Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (empty body = ``{}``); 413 / 400 naming the problem."""
    content = request.content
    body = content.read(max_bytes + 1) if content is not None else b""
    if getattr(request, "body_too_large", False) or len(body) > max_bytes:
        raise HttpError(413, "too_large", f"the body is larger than {max_bytes} bytes")
    if not body.strip():
        return {}
    try:  # UTF-8 without BOM, standard JSON, nesting bounded: never a RecursionError
        arguments = loads_external(body)
    except JsonInputError as exc:
        raise HttpError(400, "bad_request", f"body: {exc}") from None
    if not isinstance(arguments, dict):
        raise HttpError(
            400,
            "bad_request",
            f"the body must be a JSON object of arguments, got a JSON {_json_kind(arguments)}",
        )
    return arguments


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


class CommandCall:
    """One running command: timeout, outcome counting, and the answer (unless the client left)."""

    def __init__(
        self, api: ApiState, request: server.Request, plugin: str, command: Command, metrics: Any
    ) -> None:
        self.api = api
        self.request = request
        self.plugin = plugin
        self.command = command
        self.metrics = metrics
        self.client_gone = False

    def start(self, arguments: dict[str, Any]) -> Any:
        """Run the command with ``arguments``; returns NOT_DONE_YET for the render method."""
        self.request.notifyFinish().addErrback(self._client_left)
        result = defer.maybeDeferred(self.command.call, arguments)
        timeout = self.api.config.command_timeout
        if timeout > 0:
            result.addTimeout(timeout, self.api.daemon.reactor)
        result.addCallbacks(self._succeeded, self._failed)
        result.addCallback(self._answer)
        result.addErrback(self._last_resort)
        return server.NOT_DONE_YET

    def _client_left(self, reason: Failure) -> None:
        self.client_gone = True

    def _succeeded(self, result: Any) -> tuple[int, bytes]:
        try:
            payload = encode_json({"ok": True, "result": result})
        except (TypeError, ValueError):
            log.failure(
                "command {plugin}.{command} returned a result that is not JSON",
                plugin=self.plugin,
                command=self.command.name,
            )
            self.metrics.count_command(self.command.name, "internal")
            return 500, error_payload("internal", "the command's result is not JSON; see the log")
        self.metrics.count_command(self.command.name, "ok")
        return 200, payload

    def _failed(self, failure: Failure) -> tuple[int, bytes]:
        name = self.command.name
        if failure.check(defer.TimeoutError):
            self.metrics.count_command(name, "timeout")
            message = (
                f"no answer from {self.plugin}.{name} within "
                f"{self.api.config.command_timeout:g} s (api.command_timeout)"
            )
            return 504, error_payload("timeout", message)
        error = failure.check(CommandError) and failure.value
        if error:
            self.metrics.count_command(name, str(error.code))
            status = error.status if 400 <= error.status <= 599 else 500
            return status, error_payload(error.code, error.message)
        self.metrics.count_command(name, "internal")
        log.failure("command {plugin}.{command} failed", failure, plugin=self.plugin, command=name)
        return 500, error_payload("internal", "the command failed unexpectedly; see the log")

    def _answer(self, outcome: tuple[int, bytes]) -> None:
        status, payload = outcome
        if self.client_gone:
            log.info(
                "client left before the answer of {plugin}.{command} ({status})",
                plugin=self.plugin,
                command=self.command.name,
                status=status,
            )
            return
        self.request.write(respond(self.request, status, payload))
        self.request.finish()

    def _last_resort(self, failure: Failure) -> None:
        log.failure("control API: answering a command failed", failure)
