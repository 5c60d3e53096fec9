"""``/health`` in three states: ok, warning (a sink failing too long or holding old events;
still 200, nothing is lost) and degraded (503); ``/health/strict`` and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest_twisted
from twisted.internet import task

from gatewayd.health import health_report
from gatewayd.schema import SinkConfig
from gatewayd.testing import ApiServer, DaemonView


@dataclass
class Queue:
    depth: int = 0
    bytes: int = 0
    oldest_ts: float | None = None
    dropped: dict = field(default_factory=dict)
    possible_duplicates: int = 0
    error: str | None = None
    error_since: float | None = None


@dataclass
class Runner:
    config: Any
    queue: Queue = field(default_factory=Queue)
    state: str = "ok"
    last_error: str | None = None
    last_error_at: float | None = None
    recovered_at: float | None = None
    failing_since: float | None = None
    delivered: int = 0
    failures: int = 0


def daemon(clock: task.Clock, **runner: Any) -> DaemonView:
    view = DaemonView(clock)
    view.sinks["store"] = Runner(
        SinkConfig(type="sqlite", warn_after="60s", warn_age="10m"), **runner
    )
    return view


def test_a_sink_failing_longer_than_warn_after_is_a_warning_not_a_failure():
    clock = task.Clock()
    clock.advance(1000)
    failing = {"state": "retrying", "last_error": "OperationalError: database or disk is full"}
    view = daemon(clock, failing_since=950.0, **failing)
    healthy, body = health_report(view, clock.seconds())
    assert healthy and body["status"] == "ok"  # 50 s: not yet
    clock.advance(11)
    view.sinks["store"].queue.depth = 222_291
    healthy, body = health_report(view, clock.seconds())
    assert healthy and body["status"] == "warning"
    assert body["warnings"] == [
        "sink store: failing for 61 s (OperationalError: database or disk is full); "
        "222291 events wait"
    ]
    assert body["sinks"]["store"]["failing_seconds"] == 61.0


def test_an_old_queued_event_is_a_warning_and_a_full_queue_disk_is_degraded():
    clock = task.Clock()
    clock.advance(10_000)
    view = daemon(clock)
    view.sinks["store"].queue = Queue(depth=5, oldest_ts=10_000 - 601)
    healthy, body = health_report(view, clock.seconds())
    assert healthy and body["warnings"] == [
        "sink store: the oldest of 5 queued events is 601 s old"
    ]
    view.sinks["store"].queue.error = "database or disk is full"
    healthy, body = health_report(view, clock.seconds())
    assert not healthy and body["status"] == "degraded"


def test_a_healed_sink_keeps_its_last_error_with_when_it_recovered():
    clock = task.Clock()
    view = daemon(
        clock, last_error="OperationalError: disk full", last_error_at=100.0, recovered_at=160.0
    )
    _, body = health_report(view, clock.seconds())
    sink = body["sinks"]["store"]
    assert body["status"] == "ok" and sink["warning"] is None and sink["failing_seconds"] is None
    assert (sink["last_error_at"], sink["recovered_at"]) == (
        "1970-01-01T00:01:40+00:00",
        "1970-01-01T00:02:40+00:00",
    )


@pytest_twisted.ensureDeferred
async def test_health_is_200_on_warning_and_strict_is_503():
    from twisted.internet import reactor

    now = reactor.seconds()
    view = daemon(reactor, state="retrying", last_error="boom", failing_since=now - 120)
    server = ApiServer(view)
    try:
        status, body = await server.request("GET", "/health")
        assert (status, body["status"]) == (200, "warning")
        status, body = await server.request("GET", "/health/strict")
        assert (status, body["status"]) == (503, "warning")
        status, text = await server.request("GET", "/metrics")
        line = next(x for x in text.splitlines() if x.startswith("gatewayd_sink_failing_seconds"))
        assert line.startswith('gatewayd_sink_failing_seconds{sink="store"} 12')
    finally:
        await server.close()
