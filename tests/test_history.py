"""The in-memory history: rates per plugin, queue depth and delivery rate per sink, on a Clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from twisted.internet import task

from gatewayd.history import History
from gatewayd.plugin import PluginMetrics


def plugin_host() -> Any:
    return SimpleNamespace(context=SimpleNamespace(metrics=PluginMetrics()))


@dataclass
class Runner:
    delivered: int = 0
    queue: Any = field(default_factory=lambda: SimpleNamespace(depth=0))


@dataclass
class Daemon:
    plugins: dict[str, Any] = field(default_factory=dict)
    sinks: dict[str, Any] = field(default_factory=dict)


def started(points: int = 360) -> tuple[task.Clock, Daemon, History]:
    clock = task.Clock()
    clock.advance(1000.0)
    daemon = Daemon(plugins={"cab": plugin_host()}, sinks={"store": Runner()})
    history = History(daemon, clock, interval=10.0, points=points)
    history.start()  # the first sample at once
    return clock, daemon, history


def test_rates_per_second_between_samples_and_null_before_two():
    clock, daemon, history = started()
    assert history.latest_rates()["plugins"]["cab"]["events"] is None
    metrics = daemon.plugins["cab"].context.metrics
    metrics.events, metrics.frames_in, metrics.frames_invalid = 50, 20, 1
    daemon.sinks["store"].delivered = 30
    daemon.sinks["store"].queue.depth = 7
    clock.advance(10.0)
    snap = history.snapshot()
    assert snap["interval"] == 10.0 and snap["points"] == 360
    assert snap["t"] == [1000.0, 1010.0]
    assert snap["plugins"]["cab"] == {
        "events": [None, 5.0],
        "frames_in": [None, 2.0],
        "frames_out": [None, 0.0],
        "frames_invalid": [None, 0.1],
    }
    assert snap["sinks"]["store"] == {"queued": [0, 7], "delivered": [None, 3.0]}
    rates = history.latest_rates()
    assert rates["plugins"]["cab"]["events"] == 5.0
    assert rates["sinks"]["store"] == {"delivered": 3.0}


def test_the_ring_keeps_the_last_points_samples():
    clock, daemon, history = started(points=3)
    for _ in range(5):
        clock.advance(10.0)
    snap = history.snapshot()
    assert snap["t"] == [1030.0, 1040.0, 1050.0]
    assert all(len(ring) == 3 for ring in snap["plugins"]["cab"].values())
    assert all(len(ring) == 3 for ring in snap["sinks"]["store"].values())


def test_names_that_come_and_go_are_null_where_missing_and_stay_aligned():
    clock, daemon, history = started(points=4)
    clock.advance(10.0)
    daemon.plugins["new"] = plugin_host()
    del daemon.sinks["store"]
    clock.advance(10.0)
    snap = history.snapshot()
    assert snap["plugins"]["new"]["events"] == [None, None, None]  # before it existed, then first
    assert snap["sinks"]["store"]["queued"] == [0, 0, None]
    assert "store" not in history.latest_rates()["sinks"]
    daemon.plugins["new"].context.metrics.events = 20
    clock.advance(10.0)
    assert history.snapshot()["plugins"]["new"]["events"] == [None, None, None, 2.0]
    for _ in range(4):  # absent for a whole ring: forgotten
        clock.advance(10.0)
    snap = history.snapshot()
    assert "store" not in snap["sinks"]
    assert all(len(ring) == len(snap["t"]) == 4 for ring in snap["plugins"]["new"].values())


def test_a_replaced_plugin_or_a_counter_going_down_is_null_not_a_rate():
    clock, daemon, history = started()
    daemon.plugins["cab"].context.metrics.events = 100
    clock.advance(10.0)
    replaced = plugin_host()
    replaced.context.metrics.events = 500  # more than before, but a different counter
    daemon.plugins["cab"] = replaced
    clock.advance(10.0)
    replaced.context.metrics.events = 510
    clock.advance(10.0)
    daemon.sinks["store"].delivered = 40
    clock.advance(10.0)
    daemon.sinks["store"].delivered = 10  # went down: never a negative rate
    clock.advance(10.0)
    snap = history.snapshot()
    assert snap["plugins"]["cab"]["events"] == [None, 10.0, None, 1.0, 0.0, 0.0]
    assert snap["sinks"]["store"]["delivered"] == [None, 0.0, 0.0, 0.0, 4.0, None]


def test_a_host_without_metrics_and_a_runner_without_queue_are_null():
    clock = task.Clock()
    daemon = Daemon(
        plugins={"bare": SimpleNamespace(context=None)},
        sinks={"odd": SimpleNamespace(state="ok")},
    )
    history = History(daemon, clock)
    history.start()
    clock.advance(10.0)
    snap = history.snapshot()
    assert snap["plugins"]["bare"]["events"] == [None, None]
    assert snap["sinks"]["odd"] == {"queued": [None, None], "delivered": [None, None]}


def test_stop_stops_sampling_and_keeps_the_samples():
    clock, daemon, history = started()
    history.stop()
    history.stop()  # idempotent
    clock.advance(100.0)
    assert history.snapshot()["t"] == [1000.0]
    assert clock.getDelayedCalls() == []
