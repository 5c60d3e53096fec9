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


# --- handling: one message's bug costs that message only ---------------------------------------


def test_handling_turns_an_exception_into_frame_invalid_and_runs_on():
    events = []
    ctx, _ = context(lambda event: events.append(event) or defer.succeed(None))
    with ctx.handling("cab1", "raw line", address="10.0.0.1:4000") as handled:
        {}["slot"]
    assert handled.failed and ctx.metrics.internal_errors == 1
    (event,) = events
    assert (event.type, event.device, event.raw) == ("frame.invalid", "cab1", "raw line")
    assert event.data == {
        "reason": "internal_error",
        "message": "KeyError: 'slot'",
        "address": "10.0.0.1:4000",
    }
    results = []
    handled.deferred.addCallback(results.append)
    assert results == [None]  # durable: a device may be answered


def test_handling_without_an_exception_emits_nothing_and_renders_no_raw():
    events, rendered = [], []
    ctx, _ = context(lambda event: events.append(event) or defer.succeed(None))
    with ctx.handling("d", lambda: rendered.append(1) or "x") as handled:
        pass
    assert not handled.failed and handled.deferred is None and events == [] and rendered == []


def test_handling_logs_a_traceback_at_most_once_per_interval():
    logged = []

    def observe(event):
        if "handling a message failed" in (event.get("log_format") or ""):
            logged.append(event)

    ctx, clock = context(lambda event: defer.succeed(None))
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(500):
            with ctx.handling(raw=lambda: "frame"):
                raise ValueError("bug")
        clock.advance(10)
        with ctx.handling():
            raise ValueError("bug")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert ctx.metrics.internal_errors == 501 and len(logged) == 2
    assert logged[1]["count"] == 501 and logged[0].get("log_failure") is not None


def test_handling_hands_a_storage_failure_to_a_caller_that_reads_the_deferred():
    pending = defer.Deferred()
    ctx, _ = context(lambda event: pending)
    with ctx.handling() as handled:
        raise RuntimeError("bug")
    failures = []
    handled.deferred.addErrback(failures.append)  # as the MQTT link does before a PUBACK
    pending.errback(OSError("disk full"))
    assert len(failures) == 1 and ctx.not_stored == 0


def test_handling_counts_a_storage_failure_nobody_waits_for():
    pending = defer.Deferred()
    ctx, _ = context(lambda event: pending)
    with ctx.handling():
        raise RuntimeError("bug")
    pending.errback(OSError("disk full"))
    assert ctx.not_stored == 1
