"""The last hour of the daemon in memory: event and frame rates per plugin, queue depth and
delivery rate per sink, sampled every ``interval`` seconds into fixed-size rings.

Placeholder: the interface the daemon wires (``start``, ``stop``, ``snapshot``); the sampling
itself is written next.
"""

from __future__ import annotations

from typing import Any


class History:
    """Samples the daemon's counters every ``interval`` seconds, keeping ``points`` samples."""

    def __init__(
        self, daemon: Any, reactor: Any, interval: float = 10.0, points: int = 360
    ) -> None:
        self.daemon = daemon
        self.reactor = reactor
        self.interval = interval
        self.points = points

    def start(self) -> None:
        """Start sampling (the daemon calls it once everything runs)."""

    def stop(self) -> None:
        """Stop sampling."""

    def snapshot(self) -> dict[str, Any]:
        """The samples so far, as ``GET /api/v1/history`` answers them."""
        return {"interval": self.interval, "t": [], "plugins": {}, "sinks": {}}
