"""``/api/v1/plugins/...``: plugins, their commands and argument schemas, and running a command."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gatewayd.api.base import ApiState, JsonResource
from gatewayd.api.common import HttpError, encode_json, log, read_json_object, respond
from gatewayd.commands.dispatch import Refusal, Target, error_body
from gatewayd.commands.idempotency import check_request_id, fingerprint
from gatewayd.plugin import Command


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


#: The request header that makes a command idempotent (the MQTT payload's ``id``, over HTTP).
IDEMPOTENCY_HEADER = b"idempotency-key"


def idempotency_key(request: server.Request) -> str | None:
    """The ``Idempotency-Key`` header's value (None without one); 400 naming it when unusable."""
    values = request.requestHeaders.getRawHeaders(IDEMPOTENCY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, "bad_request", "header Idempotency-Key is given more than once")
    try:
        return check_request_id(values[0].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "must be UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise HttpError(400, "bad_request", f"header Idempotency-Key: {reason}") from None


class CommandResource(JsonResource):
    """``POST /api/v1/plugins/{plugin}/commands/{command}``: run a command, answer its result.

    A thin adapter of ``gatewayd.commands.CommandDispatcher``, the command path the MQTT command
    channel shares. Order of checks: token (401/403), plugin and command exist (404), the
    ``Idempotency-Key`` header (400), plugin running (503), body (413 too large, 400 not a JSON
    object), arguments (400 naming the argument), then the command's own answer or 504 after
    ``api.command_timeout`` (the command's Deferred is cancelled). A client that disconnects
    does not cancel the command: it runs to its end (or the timeout) and its outcome is still
    counted and logged.

    With ``Idempotency-Key: <id>`` the request is executed at most once per id within the
    idempotency store's window (10 min; the same ids as MQTT requests): a repeat is answered
    the stored status and body with ``Idempotent-Replayed: true``, without executing.
    """

    isLeaf = True

    def __init__(self, api: ApiState, plugin: str, command: str) -> None:
        super().__init__(api)
        self.plugin = plugin
        self.command = command

    def _find(self) -> Target:
        try:
            return self.api.commands.find(self.plugin, self.command)
        except Refusal as refusal:
            raise HttpError(refusal.status, refusal.code, refusal.message) from None

    def render_GET(self, request: server.Request) -> bytes:
        return respond(request, 200, encode_json(describe_command(self._find().command)))

    def render_POST(self, request: server.Request) -> Any:
        self.api.authorize(request)
        target = self._find()
        dispatcher = self.api.commands
        try:
            key = idempotency_key(request)
            if key is None:  # with a key, a repeat is answered even while the plugin is down
                dispatcher.check_running(target)
            arguments = read_json_object(request, self.api.config.max_body_bytes)
        except Refusal as refusal:  # counted by the dispatcher
            raise HttpError(refusal.status, refusal.code, refusal.message) from None
        except HttpError as error:
            dispatcher.count(target, error.code)
            raise
        return CommandCall(self.api, request, target).start(arguments, key)


class CommandCall:
    """One running command over HTTP: run it (once per idempotency key), answer unless the
    client left."""

    def __init__(self, api: ApiState, request: server.Request, target: Target) -> None:
        self.api = api
        self.request = request
        self.target = target
        self.client_gone = False

    def start(self, arguments: dict[str, Any], key: str | None = None) -> Any:
        """Run the command with ``arguments``; returns NOT_DONE_YET for the render method."""
        self.request.notifyFinish().addErrback(self._client_left)
        dispatcher, target = self.api.commands, self.target
        if key is None:
            result = dispatcher.run(target, arguments, source="http")
            result.addErrback(lambda failure: failure.trap(Refusal) and failure.value.answer())
        elif dispatcher.store is None:
            message = "this daemon keeps no idempotency store; send the request without the key"
            result = defer.succeed((503, error_body("unavailable", message)))
        else:
            attempt = dispatcher.store.once(
                key,
                fingerprint(target.plugin, target.name, arguments),
                lambda: dispatcher.run(target, arguments, source="http", request_id=key),
                check=lambda: self._refusal(target),
            )
            attempt.recorded.addErrback(lambda failure: None)  # the answer says it: 503
            if attempt.repeat:
                self.request.setHeader(b"idempotent-replayed", b"true")
            result = attempt.answer
        result.addCallback(self._answer)
        result.addErrback(self._last_resort)
        return server.NOT_DONE_YET

    def _refusal(self, target: Target) -> tuple[int, dict[str, Any]] | None:
        try:
            self.api.commands.check_running(target)
        except Refusal as refusal:
            return refusal.answer()
        return None

    def _client_left(self, reason: Failure) -> None:
        self.client_gone = True

    def _answer(self, outcome: tuple[int, dict[str, Any]]) -> None:
        status, body = outcome
        if self.client_gone:
            log.info(
                "client left before the answer of {plugin}.{command} ({status})",
                plugin=self.target.plugin,
                command=self.target.name,
                status=status,
            )
            return
        self.request.write(respond(self.request, status, encode_json(body)))
        self.request.finish()

    def _last_resort(self, failure: Failure) -> None:
        log.failure("control API: answering a command failed", failure)
