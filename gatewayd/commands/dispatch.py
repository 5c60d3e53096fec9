"""The one command path: find a plugin's command, run it, answer ``(status, body)``.

The control API (``POST /api/v1/plugins/{plugin}/commands/{command}``) and the MQTT command
channel both go through ``CommandDispatcher``, so a command gets the same validation, the same
errors, the same timeout, the same metrics and the same ``command.result`` event whichever way
it came. ``body`` is the control API's JSON body as plain JSON values (dicts, lists, strings,
numbers): ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``;
``status`` is its HTTP status:

- 404 ``not_found``: unknown plugin or command (the message lists the choices); not counted in
  ``gatewayd_plugin_commands_total`` (unknown names must not become metric labels).
- 503 ``unavailable``: the plugin is not running (counted once the command is known).
- 400 ``bad_arguments`` (named), 404, 409, 502 (the device's own code), 504: what the plugin's
  ``CommandError`` says; 504 ``timeout`` also after ``command_timeout`` (the command's Deferred is
  cancelled); 500 ``internal`` for anything unexpected (details only in the log).

Refusals before the plugin sees the command (404, 503) are ``Refusal`` exceptions from ``find``
and ``check_running`` and failures of ``run``'s Deferred, so that a caller that records request
ids (``gatewayd.commands.idempotency``) can tell "not executed" from an answer; ``call`` turns
them into answers for callers that do not care.

While a command's handler runs, the plugin's ``context.invocation`` says who asked
(``source``, ``request_id``): plugins put it into their ``command.result`` events.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.plugin import Command, CommandError, Invocation

__all__ = [
    "CommandDispatcher",
    "Refusal",
    "Target",
    "encode_json",
    "error_body",
    "json_default",
]

log = Logger(namespace="gatewayd.commands")


# --- JSON of answers ---------------------------------------------------------------------------


def json_default(value: Any) -> Any:
    """JSON for what command handlers commonly return besides plain values."""
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
    return json.dumps(body, default=json_default, ensure_ascii=False).encode("utf-8")


def error_body(code: str | int, message: str) -> dict[str, Any]:
    """The error body every channel answers: ``{"ok": false, "error": {code, message}}``."""
    return {"ok": False, "error": {"code": code, "message": message}}


def _listing(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


# --- refusals and targets ----------------------------------------------------------------------


class Refusal(Exception):
    """A command refused before its plugin saw it (so it was not executed): status, code, text."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def answer(self) -> tuple[int, dict[str, Any]]:
        return self.status, error_body(self.code, self.message)


@dataclass(frozen=True)
class Target:
    """A plugin's command, found: the plugin instance name, its host and the command."""

    plugin: str
    host: Any
    command: Command

    @property
    def name(self) -> str:
        return self.command.name


# --- the dispatcher ----------------------------------------------------------------------------


class CommandDispatcher:
    """Runs plugin commands for every channel (HTTP, MQTT) and answers ``(status, body)``.

    ``daemon`` is the duck-typed daemon view the control API reads (``plugins``: name →
    host with ``plugin``, ``context``, ``state``, ``error``, ``type_name``; ``reactor``).
    ``command_timeout`` (seconds, 0: none) is ``api.command_timeout``. ``store`` is the
    ``IdempotencyStore`` the channels share (None: request ids are not remembered).
    """

    def __init__(self, daemon: Any, *, command_timeout: float = 60.0, store: Any = None) -> None:
        self.daemon = daemon
        self.command_timeout = command_timeout
        self.store = store

    @property
    def reactor(self) -> Any:
        return self.daemon.reactor

    # --- finding ---------------------------------------------------------------------------

    def host(self, plugin: str) -> Any:
        """The host of plugin instance ``plugin``; Refusal 404 listing the configured ones."""
        host = self.daemon.plugins.get(plugin)
        if host is None:
            raise Refusal(
                404,
                "not_found",
                f"unknown plugin {plugin!r} (configured: {_listing(self.daemon.plugins)})",
            )
        return host

    def find(self, plugin: str, command: str) -> Target:
        """The command ``command`` of plugin ``plugin``; Refusal 404 (or 503 while the plugin
        is not even constructed, so its commands are unknown) otherwise. Not counted."""
        host = self.host(plugin)
        if host.plugin is None:
            raise self._unavailable(plugin, host)
        commands = host.plugin.commands()
        found = commands.get(command)
        if found is None:
            raise Refusal(
                404,
                "not_found",
                f"plugin {plugin!r} has no command {command!r} (available: {_listing(commands)})",
            )
        return Target(plugin, host, found)

    def check_running(self, target: Target) -> None:
        """Refusal 503 ``unavailable`` (counted) unless the plugin is running."""
        if target.host.state != "running":
            self.count(target, "unavailable")
            raise self._unavailable(target.plugin, target.host)

    @staticmethod
    def _unavailable(plugin: str, host: Any) -> Refusal:
        reason = f" ({host.error})" if host.error else ""
        return Refusal(503, "unavailable", f"plugin {plugin!r} is {host.state}{reason}")

    def count(self, target: Target, outcome: str) -> None:
        """Count one outcome in ``gatewayd_plugin_commands_total{plugin,command,outcome}``."""
        context = target.host.context
        if context is not None:
            context.metrics.count_command(target.name, outcome)

    # --- running ---------------------------------------------------------------------------

    def call(
        self,
        plugin: str,
        command: str,
        arguments: dict[str, Any],
        *,
        source: str,
        request_id: str | None = None,
    ) -> defer.Deferred:
        """Find and run a command; fires with ``(status, body)``, never fails."""
        try:
            target = self.find(plugin, command)
        except Refusal as refusal:
            return defer.succeed(refusal.answer())
        d = self.run(target, arguments, source=source, request_id=request_id)
        d.addErrback(lambda failure: failure.trap(Refusal) and failure.value.answer())
        return d

    def run(
        self,
        target: Target,
        arguments: dict[str, Any],
        *,
        source: str,
        request_id: str | None = None,
    ) -> defer.Deferred:
        """Run a found command with ``arguments`` (a JSON object's dict).

        Fires with ``(status, body)`` once the command has an outcome (or ``command_timeout``
        passed); fails with ``Refusal`` (503) only when the plugin is not running, in which case
        nothing was executed. A caller that goes away does not cancel the command.
        """
        try:
            self.check_running(target)
        except Refusal as refusal:
            return defer.fail(refusal)
        invocation = Invocation(source, request_id)
        context = target.host.context
        invoked = getattr(context, "invoked", None)
        if invoked is None:  # a host view without a real PluginContext
            result = defer.maybeDeferred(target.command.call, arguments)
        else:
            with invoked(invocation):  # the handler runs synchronously inside
                result = defer.maybeDeferred(target.command.call, arguments)
        if self.command_timeout > 0:
            result.addTimeout(self.command_timeout, self.reactor)
        result.addCallbacks(self._succeeded, self._failed, (target,), None, (target,), None)
        return result

    def _succeeded(self, result: Any, target: Target) -> tuple[int, dict[str, Any]]:
        try:  # through JSON and back: the body is plain JSON values, ready to store or publish
            body = json.loads(encode_json({"ok": True, "result": result}))
        except (TypeError, ValueError):
            log.failure(
                "command {plugin}.{command} returned a result that is not JSON",
                plugin=target.plugin,
                command=target.name,
            )
            self.count(target, "internal")
            return 500, error_body("internal", "the command's result is not JSON; see the log")
        self.count(target, "ok")
        return 200, body

    def _failed(self, failure: Failure, target: Target) -> tuple[int, dict[str, Any]]:
        if failure.check(defer.TimeoutError):
            self.count(target, "timeout")
            message = (
                f"no answer from {target.plugin}.{target.name} within "
                f"{self.command_timeout:g} s (api.command_timeout)"
            )
            return 504, error_body("timeout", message)
        error = failure.check(CommandError) and failure.value
        if error:
            self.count(target, str(error.code))
            status = error.status if 400 <= error.status <= 599 else 500
            return status, error_body(error.code, error.message)
        self.count(target, "internal")
        log.failure(
            "command {plugin}.{command} failed", failure, plugin=target.plugin, command=target.name
        )
        return 500, error_body("internal", "the command failed unexpectedly; see the log")
