"""The sink base class: small on purpose, so a new sink (MQTT, HTTP) is a page.

The core's delivery loop reads batches from the sink's durable queue and calls ``write(events)``.
When the returned Deferred fires, the batch is acknowledged and deleted from the queue; when it
fails (or does not fire within ``write_timeout``), the same batch is retried with capped,
jittered backoff. A sink therefore never needs its own buffering or retry logic, and it must be
idempotent per event ``id``: after a crash the last batch may be written again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.logger import Logger

from gatewayd.events import Event
from gatewayd.schema import SinkConfig


@dataclass
class SinkContext:
    """What a sink gets from the core."""

    name: str
    gateway_id: str
    reactor: Any
    state_dir: Path
    log: Logger


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
        """Write a batch, in order. Return (a Deferred of) anything once it is safely written."""
        raise NotImplementedError

    def close(self) -> defer.Deferred | None:
        """Release the destination at shutdown."""
        return None
