"""Device commands, whoever asks: one command path for the control API and the MQTT command topic.

- ``dispatch``: ``CommandDispatcher`` finds a plugin's command, validates its arguments, runs it
  under ``api.command_timeout``, counts its outcome and turns it into ``(status, body)``: the
  HTTP status and the JSON body the control API answers (the MQTT channel answers the same, plus
  ``id`` and ``status``). Both channels call it, so they give the same answers and errors.
- ``idempotency``: ``IdempotencyStore``, a small SQLite file (``<state_dir>/commands.db``) that
  remembers request ids (MQTT ``id``, HTTP ``Idempotency-Key``) so that a repeated request is
  answered from the record instead of executed again, across restarts and ``kill -9``.
- ``mqtt``: ``CommandsConfig`` and ``CommandChannel``, the MQTT command topic
  (``gatewayd/{gateway}/commands/{plugin}/{command}``) on top of any MQTT client; it does not
  depend on the MQTT sink, which only hands it a ``publish`` function and its messages.
- ``writer``: the store's writer thread (blocking SQLite writes off the reactor).

Nothing here imports the web package: the control API imports this package, not the reverse.
"""

from __future__ import annotations

from gatewayd.commands.dispatch import CommandDispatcher, Refusal, Target
from gatewayd.commands.idempotency import Attempt, IdempotencyStore
from gatewayd.commands.mqtt import CommandChannel, CommandsConfig

__all__ = [
    "Attempt",
    "CommandChannel",
    "CommandDispatcher",
    "CommandsConfig",
    "IdempotencyStore",
    "Refusal",
    "Target",
]
