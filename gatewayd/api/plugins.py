"""``/api/v1/plugins/...``: plugins, their commands and argument schemas, and running a command."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gatewayd.api.base import ApiState, JsonResource
from gatewayd.api.common import (
    HttpError,
    _listing,
    encode_json,
    error_payload,
    log,
    read_json_object,
    respond,
)
from gatewayd.plugin import Command, CommandError


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
