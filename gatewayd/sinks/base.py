"""The sink base class: small on purpose, so a new sink (MQTT, HTTP) is a page.

The core's delivery loop reads batches from the sink's durable queue and calls ``write(events)``.
When the returned Deferred fires, the batch is acknowledged and deleted from the queue; when it
fails (or does not fire within ``write_timeout``), the same batch is retried with capped,
jittered backoff. A sink therefore never needs its own buffering or retry logic, and it must be
idempotent per event ``id``: after a crash the last batch may be written again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.logger import Logger

from gatewayd.events import Event
from gatewayd.schema import SinkConfig
from gatewayd.worker import Worker as _Worker  # the blocking sinks' thread


@dataclass
class SinkContext:
    """What a sink gets from the core.

    ``commands`` is the daemon's ``gatewayd.commands.CommandDispatcher`` (its ``store`` the
    shared ``IdempotencyStore``), for a sink that also takes commands from its backend (the MQTT
    sink's command channel, ``gatewayd.commands.CommandChannel``); None where there is none.
    ``status(online)`` builds the box's status (``gatewayd.health.box_status``) for a sink that
    publishes it (the MQTT sink's status topic); None outside the daemon.
    ``presence(plugin, device, gateway, since)`` tells the daemon another box announced a device
    online (the MQTT sink's ``watch_presence``); None outside the daemon.
    ``fleet`` is the daemon's ``gatewayd.fleet.membership.Membership`` when a plugin runs with
    ``fleet: true`` and this sink is the one that feeds it the fleet's box statuses (None
    otherwise).
    ``retry_now()`` cuts the delivery loop's backoff short: call it when the sink learns its
    destination is back (a reconnected link), so recovery does not wait up to ``retry_max``.
    """

    name: str
    gateway_id: str
    reactor: Any
    state_dir: Path
    log: Logger
    commands: Any = None
    status: Callable[[bool], dict[str, Any]] | None = None
    presence: Callable[[str, str, str, float], None] | None = None
    retry_now: Callable[[], None] = lambda: None
    fleet: Any = None


class Sink:
    """Subclass and set ``Config``; implement ``write``, and ``open``/``close`` when needed."""

    Config: ClassVar[type[SinkConfig]] = SinkConfig

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.log = context.log
        #: Rows the sink recognised as already written (replays after a crash); shown in /metrics.
        self.duplicates = 0

    def open(self) -> defer.Deferred | None:
        """Prepare the destination; a failure here is retried like a failed write."""
        return None

    def write(self, events: Sequence[Event]) -> defer.Deferred | None:
        """Write a batch, in order. Return (a Deferred of) anything once it is safely written.

        From the delivery loop ``events`` is a ``gatewayd.delivery.EventBatch``: events decoded
        on first use, and ``events.payloads``, their JSON texts, for sinks that send the text
        as it is (``getattr(events, "payloads", None)``; tests may pass a plain list).
        """
        raise NotImplementedError

    def close(self) -> defer.Deferred | None:
        """Release the destination at shutdown."""
        return None

    def resolve_path(self, path: str | Path) -> Path:
        """A path from the sink's config: relative paths are relative to ``gateway.state_dir``."""
        path = Path(path)
        return path if path.is_absolute() else Path(self.context.state_dir) / path


class SinkBusy(Exception):
    """A blocking sink's previous write is still running on its thread (retried later)."""


class BlockingSink(Sink):
    """A sink whose destination is blocking I/O (a file, SQLite): it runs on its own thread.

    Implement ``open_blocking``, ``write_blocking(events)`` and ``close_blocking``. They run in
    call order on one thread per sink, so they need no locks and never block the reactor. A write
    abandoned after ``write_timeout`` keeps the thread: until it returns, each retry fails at once
    (``SinkBusy``) rather than queueing behind it, so a day-long stall does not end in hundreds
    of copies of one batch.
    """

    _write_running = False  # set by write(), cleared on the sink's thread when it returns

    def open_blocking(self) -> None:
        """Prepare the destination (runs on the sink's thread)."""

    def write_blocking(self, events: Sequence[Event]) -> None:
        """Write a batch durably, in order (runs on the sink's thread)."""
        raise NotImplementedError

    def close_blocking(self) -> None:
        """Release the destination (runs on the sink's thread)."""

    def open(self) -> defer.Deferred:
        if getattr(self, "_worker", None) is None:
            self._worker = _Worker(self.context.reactor, f"gatewayd-sink-{self.name}")
        return self._worker.call(self.open_blocking)

    def write(self, events: Sequence[Event]) -> defer.Deferred:
        if self._write_running:
            return defer.fail(
                SinkBusy(f"sink {self.name}: the previous write has not returned (blocked I/O?)")
            )
        worker = self._worker  # AttributeError before open(), with the flag still clear
        self._write_running = True

        def run() -> None:
            try:
                self.write_blocking(events)
            finally:
                self._write_running = False

        return worker.call(run)

    def close(self) -> defer.Deferred | None:
        worker, self._worker = getattr(self, "_worker", None), None
        if worker is None:
            return None
        d = worker.call(self.close_blocking)
        worker.stop()
        return d
