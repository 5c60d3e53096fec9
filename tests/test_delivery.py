"""The delivery loop: order, retries with backoff, timeouts, replay pacing, wake-up and stop.

Timing is driven by a Clock and an in-memory queue whose answers arrive on the next Clock turn
(as the writer thread's would); one integration test runs the real queue, pipeline and sqlite
sink on the real reactor.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.logger import Logger

from gatewayd.config_model import RouteConfig
from gatewayd.delivery import EventBatch, SinkRunner
from gatewayd.events import Event
from gatewayd.pipeline import Pipeline
from gatewayd.queue import QueueError, QueueStore
from gatewayd.schema import SinkConfig
from gatewayd.sinks.base import Sink, SinkContext
from gatewayd.sinks.sqlite import SqliteSink


def payload(n: int) -> str:
    return Event(type="t", device="d", data={"n": n}, id=f"id{n:06d}").to_json()


class MemoryQueue:
    """The DurableQueue interface in memory; answers come one Clock turn later."""

    def __init__(self, clock: Clock, count: int = 0) -> None:
        self.clock = clock
        self.entries: list[tuple[int, str]] = []
        self.last_seq = 0
        self.listeners: list[Any] = []
        self.reads: list[tuple[int, int | None, int | None]] = []
        self.acks: list[int] = []
        self.open_error: Exception | None = None
        for n in range(count):
            self.add(payload(n))
        self.backlog_at_open, self.last_seq_at_open = count, self.last_seq

    @property
    def depth(self) -> int:
        return len(self.entries)

    def add(self, text: str) -> None:
        self.last_seq += 1
        self.entries.append((self.last_seq, text))

    def put(self, text: str) -> None:
        """A committed put: the entry is stored and the listeners hear of it."""
        self.add(text)
        for listener in self.listeners:
            self.clock.callLater(0, listener)

    def _later(self, compute) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.clock.callLater(0, lambda: d.callback(compute()))
        return d

    def when_open(self) -> defer.Deferred:
        if self.open_error is not None:
            return defer.fail(self.open_error)
        return self._later(lambda: None)

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        self.listeners.remove(listener)

    def _ack(self, upto: int) -> None:
        self.entries = [e for e in self.entries if e[0] > upto]

    def read_batch(self, limit: int, *, after: int | None = None, ack_upto: int | None = None):
        self.reads.append((limit, after, ack_upto))

        def read() -> list[tuple[int, str]]:
            if ack_upto is not None:
                self._ack(ack_upto)
            return [e for e in self.entries if e[0] > (after or 0)][:limit]

        return self._later(read)

    def ack(self, upto: int) -> defer.Deferred:
        self.acks.append(upto)
        return self._later(lambda: self._ack(upto))


class RecordingSink(Sink):
    """Records every write attempt; can fail, hang or be completed by the test."""

    def __init__(self, clock: Clock, config: SinkConfig) -> None:
        super().__init__("north", config, SinkContext("north", "gw", clock, Path("."), Logger()))
        self.clock = clock
        self.attempts: list[tuple[float, list[int]]] = []
        self.delivered: list[int] = []
        self.fail_writes = 0
        self.fail_opens = 0
        self.hang = False
        self.closed = False

    def open(self) -> None:
        if self.fail_opens:
            self.fail_opens -= 1
            raise ConnectionRefusedError("backend down")

    def write(self, events):
        numbers = [e.data["n"] for e in events]
        self.attempts.append((self.clock.seconds(), numbers))
        if self.fail_writes:
            self.fail_writes -= 1
            raise ConnectionRefusedError("backend down")
        if self.hang:
            return defer.Deferred()
        self.delivered.extend(numbers)
        return None

    def close(self) -> None:
        self.closed = True


def settle(clock: Clock, seconds: float = 0.0) -> None:
    """Advance ``seconds`` and run everything that became due, including follow-up turns."""
    clock.advance(seconds)
    for _ in range(10_000):
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        if not due:
            return
        clock.advance(0)
    raise AssertionError("the loop never settles")


def run_for(clock: Clock, seconds: float, step: float = 0.01) -> None:
    """Let ``seconds`` pass in small steps, as real time would."""
    for _ in range(round(seconds / step)):
        settle(clock, step)


def setup(count: int, **config: Any) -> tuple[Clock, MemoryQueue, RecordingSink, SinkRunner]:
    clock = Clock()
    settings = {"type": "test", "batch_size": 10, "replay_rate": None, "write_timeout": 5.0}
    settings.update(config)
    sink_config = SinkConfig(**settings)
    queue = MemoryQueue(clock, count)
    sink = RecordingSink(clock, sink_config)
    delays = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    runner = SinkRunner(sink, queue, sink_config, clock, backoff=lambda attempt: delays[attempt])
    return clock, queue, sink, runner


def test_delivers_everything_in_order_and_acknowledges() -> None:
    clock, queue, sink, runner = setup(25)
    runner.start()
    settle(clock)
    assert sink.delivered == list(range(25))
    assert [len(numbers) for _, numbers in sink.attempts] == [10, 10, 5]
    assert queue.entries == []
    assert (runner.state, runner.delivered, runner.failures) == ("ok", 25, 0)
    # the next batch is read while one is written; acknowledgements ride along with reads
    assert (10, 10, None) in queue.reads and (10, 20, 10) in queue.reads
    assert clock.getDelayedCalls() == []  # idle: no polling


def test_wakes_up_on_commit_without_polling() -> None:
    clock, queue, sink, runner = setup(0)
    runner.start()
    settle(clock)
    assert clock.getDelayedCalls() == []
    queue.put(payload(7))
    settle(clock)
    assert sink.delivered == [7]
    queue.put(payload(8))
    queue.put(payload(9))
    runner.wake()  # the pipeline may also call it; harmless
    settle(clock)
    assert sink.delivered == [7, 8, 9] and queue.entries == []


def test_failed_write_is_retried_with_backoff_same_batch_in_order() -> None:
    clock, queue, sink, runner = setup(25)
    sink.fail_writes = 3
    runner.start()
    settle(clock)
    assert runner.state == "retrying"
    assert runner.last_error == "ConnectionRefusedError: backend down"
    assert len(sink.attempts) == 1
    settle(clock, 0.99)
    assert len(sink.attempts) == 1
    settle(clock, 0.01)  # backoff 1 s
    settle(clock, 2.0)  # then 2 s
    assert len(sink.attempts) == 3 and runner.state == "retrying"
    settle(clock, 3.99)
    assert len(sink.attempts) == 3
    settle(clock, 0.01)  # then 4 s: succeeds
    assert runner.state == "ok" and runner.last_error == "ConnectionRefusedError: backend down"
    settle(clock)
    assert [t for t, _ in sink.attempts[:4]] == [0.0, 1.0, 3.0, 7.0]
    assert all(numbers == list(range(10)) for _, numbers in sink.attempts[:4])
    assert sink.delivered == list(range(25))
    assert (runner.failures, runner.delivered) == (3, 25)


def test_replay_after_an_outage_is_paced() -> None:
    clock, queue, sink, runner = setup(0, replay_rate=20.0)
    runner.start()
    settle(clock)
    sink.fail_writes = 1
    for n in range(100):
        queue.put(payload(n))
    settle(clock)
    assert runner.state == "retrying" and not runner.replaying
    for n in range(100, 150):
        queue.put(payload(n))  # the backlog grows during the outage
    settle(clock, 1.0)  # the retry succeeds
    assert runner.state == "ok" and runner.replaying
    recovered_at = clock.seconds()
    for second in range(1, 8):
        run_for(clock, 1.0)
        assert len(sink.delivered) <= 10 + 20 * second  # at most 20/s after the retried batch
    run_for(clock, 1.0)
    assert sink.delivered == list(range(150))
    finished = max(t for t, _ in sink.attempts)
    assert 6.5 <= finished - recovered_at <= 7.5  # 140 events after it at 20/s: 7 s
    assert not runner.replaying


def test_replay_is_paced_even_when_the_batch_read_ahead_was_short() -> None:
    # The fault run: the batch read ahead before the outage held fewer entries than a batch;
    # after recovery that short batch ended the replay and the whole backlog went at once.
    clock, queue, sink, runner = setup(0, replay_rate=20.0)
    runner.start()
    settle(clock)
    sink.fail_writes = 1
    for n in range(14):
        queue.put(payload(n))  # one batch of 10 (fails) and a read-ahead of 4
    settle(clock)
    assert runner.state == "retrying"
    for n in range(14, 214):
        queue.put(payload(n))  # the backlog grows during the outage
    settle(clock, 1.0)  # the retry succeeds
    assert runner.state == "ok" and runner.replaying
    for second in range(1, 10):
        run_for(clock, 1.0)
        assert len(sink.delivered) <= 14 + 20 * second  # paced, whatever was read ahead
    run_for(clock, 2.0)
    assert sink.delivered == list(range(214)) and not runner.replaying


def test_replay_log_counts_the_whole_backlog() -> None:
    clock, queue, sink, runner = setup(0, replay_rate=50.0)
    lines: list[dict] = []
    runner.log.observer = lines.append
    runner.start()
    settle(clock)
    sink.fail_writes = 1
    for n in range(14):
        queue.put(payload(n))
    settle(clock)
    for n in range(14, 114):
        queue.put(payload(n))
    settle(clock, 1.0)
    run_for(clock, 5.0)
    drained = [e for e in lines if "backlog drained" in e.get("log_format", "")]
    assert [e["count"] for e in drained] == [114]


def test_live_events_after_the_backlog_are_not_throttled() -> None:
    clock, queue, sink, runner = setup(30, replay_rate=10.0)  # backlog from the previous run
    runner.start()
    settle(clock)
    assert runner.replaying and sink.delivered == list(range(10))  # a full bucket at once
    for n in range(30, 60):
        queue.put(payload(n))  # arrives during the replay: waits behind the backlog
    run_for(clock, 0.99)
    assert sink.delivered == list(range(10))
    run_for(clock, 0.02)
    assert sink.delivered == list(range(20))
    run_for(clock, 1.0)
    assert sink.delivered == list(range(60))  # once the backlog is through, no more pacing
    assert not runner.replaying


def test_write_timeout_counts_as_a_failure() -> None:
    clock, queue, sink, runner = setup(5)
    sink.hang = True
    runner.start()
    settle(clock)
    assert runner.state == "ok" and len(sink.attempts) == 1
    settle(clock, 5.0)
    assert runner.state == "retrying" and runner.last_error == "timed out after 5s"
    sink.hang = False
    settle(clock, 1.0)
    assert sink.delivered == list(range(5)) and runner.failures == 1


def test_failing_open_is_retried() -> None:
    clock, queue, sink, runner = setup(3)
    sink.fail_opens = 2
    runner.start()
    settle(clock)
    assert runner.state == "retrying" and sink.attempts == []
    settle(clock, 1.0)
    settle(clock, 2.0)
    assert runner.state == "ok" and sink.delivered == [0, 1, 2]
    assert runner.failures == 2


class RetryLater(Exception):
    """A failure that says when to come back, as an HTTP 503 with Retry-After."""

    def __init__(self, seconds: float) -> None:
        super().__init__("busy")
        self.retry_after = seconds


def test_retry_after_is_the_least_delay_of_a_failed_write() -> None:
    clock, queue, sink, runner = setup(3)
    errors = [RetryLater(5.0), RetryLater(0.5), RetryLater(float("inf"))]
    recording_write = sink.write

    def write(events):
        if errors:
            sink.attempts.append((clock.seconds(), []))
            raise errors.pop(0)
        return recording_write(events)

    sink.write = write  # type: ignore[method-assign]
    runner.start()
    settle(clock)
    assert runner.state == "retrying" and runner.last_error == "RetryLater: busy"
    settle(clock, 4.99)  # the backoff (1 s) is shorter than the 5 s asked for
    assert len(sink.attempts) == 1
    settle(clock, 0.01)
    assert len(sink.attempts) == 2
    settle(clock, 2.0)  # 0.5 s asked for, the backoff's 2 s wins
    assert len(sink.attempts) == 3
    settle(clock, 4.0)  # an infinite retry_after is ignored: the backoff's 4 s
    assert [t for t, _ in sink.attempts] == [0.0, 5.0, 7.0, 11.0]
    assert sink.delivered == [0, 1, 2] and runner.state == "ok"


def test_retry_after_is_the_least_delay_of_a_failed_open() -> None:
    clock, queue, sink, runner = setup(3)
    opens = [RetryLater(3.0)]

    def open_() -> None:
        if opens:
            raise opens.pop(0)

    sink.open = open_  # type: ignore[method-assign]
    runner.start()
    settle(clock)
    settle(clock, 2.99)
    assert runner.state == "retrying" and sink.attempts == []
    settle(clock, 0.01)
    assert runner.state == "ok" and sink.delivered == [0, 1, 2]


def test_stop_finishes_the_write_in_flight_then_closes() -> None:
    clock, queue, sink, runner = setup(5)
    gate: defer.Deferred = defer.Deferred()
    sink.write = lambda events: gate.addCallback(lambda _: sink.delivered.extend(len(events) * [0]))
    runner.start()
    settle(clock)
    stopped = runner.stop()
    settle(clock, 1.0)
    assert not stopped.called
    gate.callback(None)
    settle(clock)
    assert stopped.called and runner.state == "stopped" and sink.closed
    assert queue.entries == []  # the batch was acknowledged before the stop finished
    assert runner.stop().called


def test_stop_abandons_a_hung_write_within_write_timeout() -> None:
    clock, queue, sink, runner = setup(5)
    sink.hang = True
    runner.start()
    settle(clock)
    stopped = runner.stop()
    settle(clock, 5.0)
    settle(clock, 1.0)
    assert stopped.called and runner.state == "stopped" and sink.closed
    assert queue.depth == 5  # not acknowledged: delivered again after the restart


def test_stop_during_backoff_is_immediate() -> None:
    clock, queue, sink, runner = setup(5)
    sink.fail_writes = 10
    runner.start()
    settle(clock)
    stopped = runner.stop()
    settle(clock)
    assert stopped.called and clock.getDelayedCalls() == []
    assert queue.depth == 5


def test_entries_that_are_not_events_are_skipped_and_counted() -> None:
    clock, queue, sink, runner = setup(0)
    queue.add(payload(1))
    queue.add("not json")
    queue.add(json.dumps({"no": "event"}))
    queue.add(payload(2))
    runner.start()
    settle(clock)
    assert sink.delivered == [1, 2]
    assert (runner.invalid, runner.delivered, queue.depth) == (2, 2, 0)


def test_unusable_queue_stops_the_runner() -> None:
    clock, queue, sink, runner = setup(0)
    queue.open_error = QueueError("queue north: cannot open /x: disk I/O error")
    runner.start()
    settle(clock)
    assert runner.state == "stopped" and "disk I/O error" in (runner.last_error or "")


def test_event_batch_is_lazy_and_keeps_payloads() -> None:
    texts = [payload(1), "garbage", payload(2)]
    batch = EventBatch(texts)
    assert batch.payloads is texts and batch._events is None
    assert [e.data["n"] for e in batch] == [1, 2]
    assert len(batch) == 2 and batch[1].id == "id000002" and len(batch.invalid) == 1


@pytest_twisted.ensureDeferred
async def test_end_to_end_into_sqlite(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    config = SqliteSink.Config(path="events.db", batch_size=64)
    queue = store.queue("store", max_bytes=1 << 30, max_age=3600, overflow="drop_oldest")
    sink = SqliteSink("store", config, SinkContext("store", "gw", reactor, tmp_path, Logger()))
    runner = SinkRunner(sink, queue, config, reactor)
    pipeline = Pipeline([RouteConfig(sinks=["store"])], {"store": queue}, {"store": runner})
    runner.start()
    try:
        events = [
            Event(type="meter.reading", device=f"m{n % 7}", data={"n": n}) for n in range(500)
        ]
        await defer.gatherResults([pipeline.emit(e) for e in events])
        deadline = time.monotonic() + 10
        while runner.delivered < 500:
            assert time.monotonic() < deadline
            await task.deferLater(reactor, 0.01, lambda: None)
    finally:
        await runner.stop()
        await store.stop()
    conn = sqlite3.connect(tmp_path / "events.db")
    stored = conn.execute("SELECT id, device, data FROM events ORDER BY id").fetchall()
    conn.close()
    assert [(e.id, e.device, json.dumps(e.data, separators=(",", ":"))) for e in events] == stored
    assert queue.depth == 0 and runner.state == "stopped"


def test_retry_now_cuts_a_long_backoff_short_and_recovery_is_stamped() -> None:
    clock, queue, sink, runner = setup(5)
    sink.fail_writes = 1
    runner.start()
    settle(clock)
    assert runner.state == "retrying" and runner.failing_since == 0.0
    assert runner.last_error_at is not None and runner.recovered_at is None
    settle(clock, 0.5)
    assert len(sink.attempts) == 1  # waiting out its 1 s backoff
    runner.retry_now()  # the sink learned its destination is back
    settle(clock)
    assert runner.state == "ok" and sink.delivered == [0, 1, 2, 3, 4]
    assert [t for t, _ in sink.attempts] == [0.0, 0.5]
    assert runner.failing_since is None and runner.recovered_at >= runner.last_error_at
    assert runner.last_error == "ConnectionRefusedError: backend down"  # kept, with its time
    runner.retry_now()  # not retrying: nothing happens
    assert len(sink.attempts) == 2


def test_retry_now_during_a_failed_open_opens_at_once() -> None:
    clock, queue, sink, runner = setup(2)
    sink.fail_opens = 1
    runner.start()
    settle(clock)
    assert runner.state == "retrying"
    runner.retry_now()
    settle(clock)
    assert runner.state == "ok" and sink.delivered == [0, 1]
