"""The last hour of the daemon in memory: event and frame rates per plugin, queue depth and
delivery rate per sink, sampled every ``interval`` seconds into fixed-size rings.

Why in memory and sampled: the status page draws an hour of charts without Prometheus, and a
sample costs O(plugins + sinks) every ten seconds whatever the event rate (the counters are
read, never pushed). Nothing survives a restart; ``/metrics`` is for long-term history.

Names come and go with config reloads: a plugin or sink that is missing at a sample gets null
there, one that appears is padded with nulls before its first sample, and one missing for a whole
ring is forgotten. A counter that restarts (a replaced plugin, a new ``SinkRunner``) is detected
by the identity of the object that holds it, and a negative delta is never a rate: both are null.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import task

#: Counters of a plugin (``PluginMetrics``), sampled as per-second rates.
PLUGIN_COUNTERS = ("events", "frames_in", "frames_out", "frames_invalid")
#: Series of a sink: queue depth (a gauge) and delivered events (a rate).
SINK_SERIES = ("queued", "delivered")


class _Series:
    """The rings of one plugin or sink, aligned with the time ring, and the previous sample."""

    __slots__ = ("rings", "source", "previous", "absent")

    def __init__(self, keys: Iterable[str], points: int, fill: int) -> None:
        self.rings = {key: deque([None] * fill, maxlen=points) for key in keys}
        self.source: Any = None  # the object holding the counters at the previous sample
        self.previous: dict[str, int] | None = None
        self.absent = 0  # consecutive samples without this name

    def append(self, values: Mapping[str, float | int | None]) -> None:
        for key, ring in self.rings.items():
            ring.append(values.get(key))

    def latest(self) -> dict[str, float | int | None]:
        return {key: (ring[-1] if ring else None) for key, ring in self.rings.items()}


def _rate(previous: int | None, current: int | None, elapsed: float | None) -> float | None:
    """Per-second rate between two counter readings; None when unknown or the counter went down."""
    if previous is None or current is None or not elapsed or elapsed <= 0:
        return None
    delta = current - previous
    return round(delta / elapsed, 3) if delta >= 0 else None


def _plugin_reading(host: Any) -> tuple[Any, dict[str, int] | None]:
    """(the metrics object, its counters) of one plugin host; (None, None) without metrics."""
    metrics = getattr(getattr(host, "context", None), "metrics", None)
    if metrics is None:
        return None, None
    return metrics, {key: getattr(metrics, key, None) for key in PLUGIN_COUNTERS}


class History:
    """Samples the daemon's counters every ``interval`` seconds, keeping ``points`` samples.

    ``daemon.plugins`` (name → host, counters in ``host.context.metrics``) and ``daemon.sinks``
    (name → ``SinkRunner``: ``queue.depth``, ``delivered``) are read at each sample.
    """

    def __init__(
        self, daemon: Any, reactor: Any, interval: float = 10.0, points: int = 360
    ) -> None:
        self.daemon = daemon
        self.reactor = reactor
        self.interval = interval
        self.points = points
        self.t: deque[float] = deque(maxlen=points)
        self._plugins: dict[str, _Series] = {}
        self._sinks: dict[str, _Series] = {}
        self._last_t: float | None = None
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = reactor

    def start(self) -> None:
        """Start sampling now and every ``interval`` seconds (the daemon calls it once running)."""
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop sampling; the samples taken stay readable."""
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        """Take one sample of every plugin and sink (the loop calls it; tests may too)."""
        now = float(self.reactor.seconds())
        elapsed = now - self._last_t if self._last_t is not None else None
        self._last_t = now
        self.t.append(now)
        seen: set[str] = set()
        for name, host in list(getattr(self.daemon, "plugins", {}).items()):
            series = self._series(self._plugins, name, PLUGIN_COUNTERS)
            source, counters = _plugin_reading(host)
            previous = series.previous if source is series.source else None
            series.append(
                {
                    key: _rate(
                        previous and previous.get(key), counters and counters.get(key), elapsed
                    )
                    for key in PLUGIN_COUNTERS
                }
            )
            series.source, series.previous = source, counters
            seen.add(name)
        self._forget_absent(self._plugins, seen)
        seen = set()
        for name, runner in list(getattr(self.daemon, "sinks", {}).items()):
            series = self._series(self._sinks, name, SINK_SERIES)
            queue = getattr(runner, "queue", None)
            delivered = getattr(runner, "delivered", None)
            previous = series.previous if runner is series.source else None
            series.append(
                {
                    "queued": getattr(queue, "depth", None),
                    "delivered": _rate(previous and previous.get("delivered"), delivered, elapsed),
                }
            )
            series.source = runner
            series.previous = {"delivered": delivered} if delivered is not None else None
            seen.add(name)
        self._forget_absent(self._sinks, seen)

    def _series(self, table: dict[str, _Series], name: str, keys: Iterable[str]) -> _Series:
        series = table.get(name)
        if series is None:  # new: null for the samples taken before it existed
            series = table[name] = _Series(keys, self.points, len(self.t) - 1)
        series.absent = 0
        return series

    def _forget_absent(self, table: dict[str, _Series], seen: set[str]) -> None:
        """Null for every name not seen at this sample; forget one absent for a whole ring."""
        for name in [name for name in table if name not in seen]:
            series = table[name]
            series.append({})
            series.source = series.previous = None
            series.absent += 1
            if series.absent >= self.points:
                del table[name]

    def snapshot(self) -> dict[str, Any]:
        """The samples so far, as ``GET /api/v1/history`` answers them: every array is aligned
        with ``t`` (POSIX seconds of each sample); rates are per second, null where unknown."""
        return {
            "interval": self.interval,
            "points": self.points,
            "t": list(self.t),
            "plugins": {
                name: {key: list(ring) for key, ring in series.rings.items()}
                for name, series in sorted(self._plugins.items())
            },
            "sinks": {
                name: {key: list(ring) for key, ring in series.rings.items()}
                for name, series in sorted(self._sinks.items())
            },
        }

    def latest_rates(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """Rates over the last interval: ``{"plugins": {name: {counter: rate}}, "sinks": {name:
        {"delivered": rate}}}``; a name not sampled yet is absent, a rate unknown is None."""
        return {
            "plugins": {
                name: series.latest()
                for name, series in self._plugins.items()
                if series.absent == 0
            },
            "sinks": {
                name: {"delivered": series.latest()["delivered"]}
                for name, series in self._sinks.items()
                if series.absent == 0
            },
        }
