"""``GET /metrics``: the daemon's figures in the Prometheus text format, computed at scrape time.

A custom prometheus-client ``Collector`` reads the daemon view (plugins, sinks, pipeline,
reactor lag) each time it is scraped, so nothing has to be kept in sync between the counters the
core keeps and the exposition. It lives in a private ``CollectorRegistry``: the global one would
mix in process metrics of whatever else imported prometheus-client, and would clash between two
daemons in one test process.

The metric names below are a user-facing contract (dashboards and alerts are built on them);
``METRIC_NAMES`` lists them and the tests hold them fixed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.logger import Logger

import gatewayd

__all__ = [
    "CONTENT_TYPE_LATEST",
    "METRIC_NAMES",
    "DaemonCollector",
    "MetricsRenderer",
    "oldest_age_seconds",
]

log = Logger(namespace="gatewayd.metrics")

#: Every fixed metric name (counters without their ``_total`` suffix, as prometheus-client
#: names families). Per-plugin gauges add ``gatewayd_plugin_<gauge name>``.
METRIC_NAMES = (
    "gatewayd_info",
    "gatewayd_reactor_lag_seconds",
    "gatewayd_plugin_up",
    "gatewayd_plugin_frames_in",
    "gatewayd_plugin_frames_out",
    "gatewayd_plugin_frames_invalid",
    "gatewayd_plugin_devices_online",
    "gatewayd_plugin_commands",
    "gatewayd_plugin_events",
    "gatewayd_plugin_restarts",
    "gatewayd_plugin_internal_errors",
    "gatewayd_sink_up",
    "gatewayd_sink_failing_seconds",
    "gatewayd_sink_queued_events",
    "gatewayd_sink_queued_bytes",
    "gatewayd_sink_oldest_age_seconds",
    "gatewayd_sink_delivered",
    "gatewayd_sink_dropped",
    "gatewayd_sink_failures",
    "gatewayd_sink_duplicates",
    "gatewayd_sink_possible_duplicates",
    "gatewayd_sink_dead_letter",
    "gatewayd_queue_up",
    "gatewayd_queue_put_failures",
    "gatewayd_queue_deduplicated",
    "gatewayd_queue_disk_bytes",
    "gatewayd_events_routed",
    "gatewayd_events_unrouted",
    "gatewayd_events_dropped",
)

#: Sink gauge names that would collide with a fixed ``gatewayd_sink_*`` family.
_RESERVED_SINK_GAUGES = frozenset(
    name.removeprefix("gatewayd_sink_")
    for name in METRIC_NAMES
    if name.startswith("gatewayd_sink_")
) | {"delivered_total", "dropped_total", "failures_total", "duplicates_total", "dead_letter_total"}
#: Plugin gauge names that would collide with a fixed ``gatewayd_plugin_*`` family.
_RESERVED_PLUGIN_GAUGES = frozenset(
    name.removeprefix("gatewayd_plugin_")
    for name in METRIC_NAMES
    if name.startswith("gatewayd_plugin_")
) | {
    "frames_in_total",
    "frames_out_total",
    "frames_invalid_total",
    "commands_total",
    "events_total",
    "restarts_total",
    "internal_errors_total",
}


def oldest_age_seconds(queue: Any, now: float) -> float | None:
    """Age of the oldest queued event in seconds, ``None`` when the queue is empty."""
    oldest = getattr(queue, "oldest_ts", None)
    if oldest is None:
        return None
    return max(0.0, now - oldest)


def _metric_safe(name: str) -> str:
    """A gauge name as a Prometheus name fragment: anything but ``[A-Za-z0-9_]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class DaemonCollector:
    """A prometheus-client collector over the duck-typed daemon view (see ``gatewayd.api``).

    One broken plugin or sink (a ``devices()`` or gauge that raises) costs only its own samples:
    the error is logged once with its traceback and the scrape goes on.
    """

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self._reported: set[tuple[str, str]] = set()

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the plugins present at scrape time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every family from the daemon's current state."""
        daemon = self.daemon
        info = GaugeMetricFamily(
            "gatewayd_info", "gatewayd version and gateway id", labels=["gateway", "version"]
        )
        info.add_metric([str(daemon.gateway_id), gatewayd.__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "gatewayd_reactor_lag_seconds",
            "How late the reactor ran a timer at its last measurement (blocking shows here)",
            value=float(daemon.reactor_lag or 0.0),
        )
        yield from self._plugin_families()
        yield from self._sink_families()
        pipeline = daemon.pipeline
        for attr, help_text in (
            ("routed", "Events that matched at least one route"),
            ("unrouted", "Events no route matched"),
            ("dropped", "Events discarded by a route with drop: true"),
        ):
            yield CounterMetricFamily(
                f"gatewayd_events_{attr}_total", help_text, value=getattr(pipeline, attr, 0)
            )

    # --- plugins ----------------------------------------------------------------------------

    def _plugin_families(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "gatewayd_plugin_up",
            "1 when the plugin is running, 0 otherwise",
            labels=["plugin", "type"],
        )
        frames_in = CounterMetricFamily(
            "gatewayd_plugin_frames_in_total", "Frames received from devices", labels=["plugin"]
        )
        frames_out = CounterMetricFamily(
            "gatewayd_plugin_frames_out_total", "Frames sent to devices", labels=["plugin"]
        )
        frames_invalid = CounterMetricFamily(
            "gatewayd_plugin_frames_invalid_total",
            "Frames that failed to decode (frame.invalid events)",
            labels=["plugin"],
        )
        online = GaugeMetricFamily(
            "gatewayd_plugin_devices_online", "Devices currently online", labels=["plugin"]
        )
        commands = CounterMetricFamily(
            "gatewayd_plugin_commands_total",
            "Commands by outcome (ok, or the error code)",
            labels=["plugin", "command", "outcome"],
        )
        events = CounterMetricFamily(
            "gatewayd_plugin_events_total", "Events the plugin emitted", labels=["plugin"]
        )
        restarts = CounterMetricFamily(
            "gatewayd_plugin_restarts_total",
            "Restarts by the supervisor after a runtime failure",
            labels=["plugin"],
        )
        internal_errors = CounterMetricFamily(
            "gatewayd_plugin_internal_errors_total",
            "Messages whose handling raised (kept as frame.invalid internal_error)",
            labels=["plugin"],
        )
        gauges: dict[str, GaugeMetricFamily] = {}

        for name, host in sorted(self.daemon.plugins.items()):
            up.add_metric([name, str(host.type_name)], 1 if host.state == "running" else 0)
            restarts.add_metric([name], getattr(host, "restarts", 0))
            context = getattr(host, "context", None)
            metrics = getattr(context, "metrics", None)
            if metrics is not None:
                events.add_metric([name], metrics.events)
                internal_errors.add_metric([name], metrics.internal_errors)
                frames_in.add_metric([name], metrics.frames_in)
                frames_out.add_metric([name], metrics.frames_out)
                frames_invalid.add_metric([name], metrics.frames_invalid)
                for key, count in sorted(metrics.commands.items()):
                    command, _, outcome = key.partition(":")
                    commands.add_metric([name, command, outcome], count)
                self._plugin_gauges(name, metrics.gauges, gauges)
            count = self._devices_online(name, host.plugin)
            if count is not None:
                online.add_metric([name], count)

        yield from (up, frames_in, frames_out, frames_invalid, online, commands)
        yield from (events, restarts, internal_errors)
        yield from gauges.values()

    def _devices_online(self, name: str, plugin: Any) -> int | None:
        if plugin is None:
            return 0
        return self._guarded(name, "devices", plugin.devices_online)

    def _plugin_gauges(
        self,
        plugin: str,
        published: dict[str, tuple[str, Callable[[], float]]],
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
        kind_of_owner: str = "plugin",
    ) -> None:
        """``gatewayd_<plugin|sink>_<gauge>{<plugin|sink>=...}`` for each published gauge."""
        reserved = _RESERVED_PLUGIN_GAUGES if kind_of_owner == "plugin" else _RESERVED_SINK_GAUGES
        for gauge_name, (help_text, read) in sorted(published.items()):
            safe = _metric_safe(gauge_name)
            if safe in reserved:
                self._report_once(
                    plugin, f"gauge:{gauge_name}", f"gauge name {gauge_name!r} is reserved"
                )
                continue
            value = self._guarded(plugin, f"gauge:{gauge_name}", lambda read=read: float(read()))
            if value is None:
                continue
            family = families.get(safe)
            if family is None:  # a name ending in _total counts up: expose it as a counter
                kind = CounterMetricFamily if safe.endswith("_total") else GaugeMetricFamily
                family = families[safe] = kind(
                    f"gatewayd_{kind_of_owner}_{safe}",
                    help_text or gauge_name,
                    labels=[kind_of_owner],
                )
            family.add_metric([plugin], value)

    # --- sinks ------------------------------------------------------------------------------

    def _sink_families(self) -> Iterator[Metric]:
        now = self.daemon.reactor.seconds()
        up = GaugeMetricFamily(
            "gatewayd_sink_up", "1 when the sink delivers normally, 0 otherwise", labels=["sink"]
        )
        failing = GaugeMetricFamily(
            "gatewayd_sink_failing_seconds",
            "Seconds the sink has been failing (0 while it delivers)",
            labels=["sink"],
        )
        queued = GaugeMetricFamily(
            "gatewayd_sink_queued_events", "Events waiting in the sink's queue", labels=["sink"]
        )
        queued_bytes = GaugeMetricFamily(
            "gatewayd_sink_queued_bytes", "Bytes of events waiting in the queue", labels=["sink"]
        )
        oldest = GaugeMetricFamily(
            "gatewayd_sink_oldest_age_seconds",
            "Age of the oldest queued event (0 when the queue is empty)",
            labels=["sink"],
        )
        delivered = CounterMetricFamily(
            "gatewayd_sink_delivered_total", "Events the sink wrote", labels=["sink"]
        )
        dropped = CounterMetricFamily(
            "gatewayd_sink_dropped_total",
            "Events dropped from the queue, by reason (overflow policy, max_age...)",
            labels=["sink", "reason"],
        )
        failures = CounterMetricFamily(
            "gatewayd_sink_failures_total", "Failed or timed-out write attempts", labels=["sink"]
        )
        duplicates = CounterMetricFamily(
            "gatewayd_sink_duplicates_total",
            "Events the sink recognised as already written and skipped",
            labels=["sink"],
        )
        possible_duplicates = CounterMetricFamily(
            "gatewayd_sink_possible_duplicates_total",
            "Events delivered again after a crash or timeout (may have arrived twice)",
            labels=["sink"],
        )
        dead_letter = CounterMetricFamily(
            "gatewayd_sink_dead_letter_total",
            "Events the destination refused, kept in the sink's dead-letter file",
            labels=["sink"],
        )
        queue_up = GaugeMetricFamily(
            "gatewayd_queue_up",
            "1 when the sink's queue can store and hand out events, 0 while it cannot (disk full)",
            labels=["queue"],
        )
        put_failures = CounterMetricFamily(
            "gatewayd_queue_put_failures_total",
            "Events the queue could not store (disk full or disk error); their emitters were told",
            labels=["queue"],
        )
        deduplicated = CounterMetricFamily(
            "gatewayd_queue_deduplicated_total",
            "Keyed events a device sent again that the queue already held (stored once)",
            labels=["queue"],
        )
        disk_bytes = GaugeMetricFamily(
            "gatewayd_queue_disk_bytes",
            "Bytes the queue file and its WAL occupy on disk (bounded by max_bytes)",
            labels=["queue"],
        )
        published: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, runner in sorted(self.daemon.sinks.items()):
            gauges = getattr(getattr(runner, "sink", None), "gauges", None)
            if gauges:  # a sink's own figures: the mqtt sink's link and command channel
                self._plugin_gauges(name, gauges, published, "sink")
            up.add_metric([name], 1 if runner.state == "ok" else 0)
            since = getattr(runner, "failing_since", None)
            failing.add_metric([name], round(now - since, 3) if since is not None else 0.0)
            delivered.add_metric([name], runner.delivered)
            failures.add_metric([name], runner.failures)
            sink = getattr(runner, "sink", None)
            duplicates.add_metric([name], getattr(sink, "duplicates", 0))
            if getattr(sink, "dead_letters", None) is not None:  # sinks with a dead letter
                dead_letter.add_metric([name], sink.dead_letters)
            queue = getattr(runner, "queue", None)
            if queue is None:
                continue
            queued.add_metric([name], queue.depth)
            queued_bytes.add_metric([name], queue.bytes)
            oldest.add_metric([name], oldest_age_seconds(queue, now) or 0.0)
            for reason, count in sorted(queue.dropped.items()):
                dropped.add_metric([name, str(reason)], count)
            possible_duplicates.add_metric([name], queue.possible_duplicates)
            queue_up.add_metric([name], 0 if getattr(queue, "error", None) else 1)
            put_failures.add_metric([name], getattr(queue, "failed_puts", 0))
            deduplicated.add_metric([name], getattr(queue, "deduplicated", 0))
            disk_bytes.add_metric([name], getattr(queue, "disk_bytes", 0))
        yield from (up, failing, queued, queued_bytes, oldest, delivered, dropped, failures)
        yield from (duplicates, possible_duplicates, queue_up, put_failures, deduplicated)
        yield from (disk_bytes, dead_letter)
        yield from published.values()

    # --- error handling ---------------------------------------------------------------------

    def _guarded(self, owner: str, what: str, read: Callable[[], Any]) -> Any:
        """``read()``, or ``None`` after logging (once per owner and figure) when it raises."""
        try:
            value = read()
        except Exception:
            if (owner, what) not in self._reported:
                self._reported.add((owner, what))
                log.failure("metrics: reading {what} of {owner} failed", what=what, owner=owner)
            return None
        self._reported.discard((owner, what))
        return value

    def _report_once(self, owner: str, what: str, message: str) -> None:
        if (owner, what) not in self._reported:
            self._reported.add((owner, what))
            log.warn("metrics: {owner}: {message}", owner=owner, message=message)


class MetricsRenderer:
    """The ``/metrics`` body for one daemon: a private registry holding a ``DaemonCollector``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, daemon: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DaemonCollector(daemon)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The current figures in the Prometheus text exposition format."""
        return generate_latest(self.registry)
