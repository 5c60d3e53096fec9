"""The ``command.result`` event: the core emits one for every command a plugin runs.

Why in the core: every plugin used to write its own, each with another shape. Now
``Command.call`` (the one way a command runs: the control API, the MQTT command topic, a test's
``harness.call``) reports each call when its outcome is known, in one documented shape:

``{"command", "arguments", "source", "request_id", "ok", "outcome", "result" | "error",
"seconds", ...}``

- ``arguments``: as the caller sent them; ``source``/``request_id``: who asked (``http``,
  ``mqtt``, ``thingsboard``; null for a direct call) and the caller's id for the request.
- ``outcome``: ``ok`` (or the result's own ``outcome`` when the result is an object that has
  one, as the power bank's ``lend`` says ``succeeded`` or ``reconciled``), ``rejected`` (refused
  before reaching a device: 400 bad arguments, 404 unknown or offline device, 409 busy),
  ``failed`` (the device refused: 502), ``timeout`` (the device or ``api.command_timeout``: 504),
  ``error`` (anything else; the message says "see the log" for an unexpected exception).
- ``result`` on success, ``error: {"code", "message"}`` otherwise; ``seconds`` the time taken.
- A command declared ``private`` (the ESAM plugin's: cryptograms and one-time values belong to
  the meter and the master station, not to event sinks) gets ``arguments: {}`` and no
  ``result``.
- The event's ``device`` is the argument the ``@command(device=...)`` names (``imei``,
  ``gw_id``), or what the handler set with ``context.annotate(device=...)``; annotations add
  keys of the plugin's own (the heating plugin's ``msg_id``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["CommandReport", "describe_outcome"]

#: The outcome of a CommandError by its HTTP status class.
_OUTCOME_BY_STATUS = {
    400: "rejected",
    404: "rejected",
    409: "rejected",
    502: "failed",
    504: "timeout",
}


def describe_outcome(outcome: Any) -> dict[str, Any]:
    """``ok``, ``outcome`` and ``result`` or ``error`` for a command's result or Failure."""
    if not isinstance(outcome, Failure):
        own = outcome.get("outcome") if isinstance(outcome, dict) else None
        return {
            "ok": True,
            "outcome": own if isinstance(own, str) else "ok",
            "result": _plain(outcome),
        }
    error = outcome.value
    if isinstance(error, defer.CancelledError | defer.TimeoutError):
        message = "no answer in time (api.command_timeout); the command was cancelled"
        return {"ok": False, "outcome": "timeout", "error": {"code": "timeout", "message": message}}
    status = getattr(error, "status", None)
    message = getattr(error, "message", None)
    if status is None or message is None:  # not a CommandError: a bug, details in the log only
        return {
            "ok": False,
            "outcome": "error",
            "error": {
                "code": "internal",
                "message": "the command failed unexpectedly; see the log",
            },
        }
    return {
        "ok": False,
        "outcome": _OUTCOME_BY_STATUS.get(status, "error"),
        "error": {"code": error.code, "message": message},
    }


def _plain(result: Any) -> Any:
    """The result as plain JSON values (what the control API answers), or its text."""
    from gatewayd.commands.dispatch import encode_json  # the command path's own JSON

    try:
        return json.loads(encode_json(result))
    except (TypeError, ValueError):
        return repr(result)


class CommandReport:
    """One running command, reported as ``command.result`` by ``finish``."""

    __slots__ = (
        "name",
        "arguments",
        "context",
        "device",
        "details",
        "asked",
        "started",
        "private",
    )

    def __init__(
        self,
        name: str,
        arguments: Any,
        context: Any,
        device_argument: str | None = None,
        private: bool = False,
    ) -> None:
        self.name = name
        self.private = private
        self.arguments = arguments
        self.context = context
        given = arguments.get(device_argument) if isinstance(arguments, dict) else None
        self.device: str | None = str(given) if device_argument and given is not None else None
        self.details: dict[str, Any] = {}
        self.asked = context.invocation.as_data()  # read now: the dispatcher sets it for the call
        self.started = context.reactor.seconds()

    def annotate(self, device: str | None = None, **details: Any) -> None:
        if device is not None:
            self.device = device
        self.details.update(details)

    def finish(self, outcome: Any) -> Any:
        """Emit the event; the outcome passes through unchanged (a callback for addBoth)."""
        described = describe_outcome(outcome)
        arguments = self.arguments if isinstance(self.arguments, dict) else {}
        if self.private:  # arguments and result withheld; the outcome and error stay
            described.pop("result", None)
            arguments = {}
        data: dict[str, Any] = {
            "command": self.name,
            "arguments": arguments,
            **self.asked,
            **described,
            "seconds": round(self.context.reactor.seconds() - self.started, 3),
            **self.details,
        }
        self.context.record("command.result", self.device, data)
        return outcome
