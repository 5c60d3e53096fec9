"""PluginContext.record: events nothing waits for, whose storage failures are counted, not
logged once per event."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from gatewayd.plugin import NOT_STORED_LOG_INTERVAL, PluginContext


def context(sink) -> tuple[PluginContext, task.Clock]:
    clock = task.Clock()
    made = PluginContext(
        name="p", protocol="x", gateway_id="g", reactor=clock, state_dir=".", sink=sink
    )
    return made, clock


def test_a_failing_store_is_counted_and_logged_at_most_once_per_interval():
    errors = []

    def observe(event):
        if "could not be stored" in (event.get("log_format") or ""):
            errors.append(event)

    ctx, clock = context(lambda event: defer.fail(OSError("No space left on device")))
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(1000):
            ctx.record("device.online", "d1")
        clock.advance(NOT_STORED_LOG_INTERVAL)
        ctx.record("device.online", "d1")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert ctx.not_stored == 1001
    assert len(errors) == 2 and errors[0]["error"] == "No space left on device"
    assert ctx.metrics.gauges["events_not_stored_total"][1]() == 1001


def test_a_stored_event_is_not_counted():
    ctx, _ = context(lambda event: defer.succeed(None))
    ctx.record("device.online", "d1")
    assert ctx.not_stored == 0
