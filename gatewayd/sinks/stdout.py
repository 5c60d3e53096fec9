"""The ``stdout`` sink: one JSON event per line on standard output (demo, debugging, pipes).

Writes go straight to the stream on the reactor thread and are flushed per batch; a terminal or a
pipe reader keeps up with that. ``pretty: true`` indents each event for people reading along
(several lines per event then).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import IO, Any

from gatewayd.events import Event
from gatewayd.schema import LocalSinkConfig
from gatewayd.sinks.base import Sink

__all__ = ["StdoutSink"]


class StdoutSink(Sink):
    """Prints every event as JSON; ``stream`` may be set to another text stream (tests)."""

    class Config(LocalSinkConfig):
        type: str = "stdout"
        #: Indented, multi-line JSON instead of one compact line per event.
        pretty: bool = False

    config: Config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream: IO[str] | None = None

    def write(self, events: Sequence[Event]) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        if self.config.pretty:
            text = "".join(
                json.dumps(e.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n"
                for e in events
            )
        else:
            payloads = getattr(events, "payloads", None)  # the queued JSON texts, when given
            texts = payloads if payloads is not None else [e.to_json() for e in events]
            text = "".join(t + "\n" for t in texts)
        stream.write(text)
        stream.flush()
