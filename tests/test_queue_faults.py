"""The queue on a disk that fills: it says so, never hands a delivered batch out again, stays
within ``max_bytes`` on disk, and recovers by itself. Real SQLite files and the real writer
thread; a full disk is simulated with SQLite's ``max_page_count`` (no mounts)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.logger import Logger

from gatewayd.api import health_report
from gatewayd.config_model import RouteConfig
from gatewayd.delivery import SinkRunner
from gatewayd.diskspace import Reserve, is_disk_full, size_bounds
from gatewayd.events import Event
from gatewayd.metrics import DaemonCollector
from gatewayd.pipeline import Pipeline
from gatewayd.queue import DurableQueue, QueueError, QueueStore
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.sqlite import SqliteSink
from gatewayd.testing import wait_until

BIG = 1 << 40


def fill_disk(queue: DurableQueue) -> None:
    """No new page for the queue file from now on: its disk is 'full'."""
    conn = queue._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")


def free_disk(queue: DurableQueue) -> None:
    conn = queue._conn
    assert conn is not None
    conn.execute(f"PRAGMA max_page_count={queue._max_pages}")


def in_one_round(store: QueueStore, queue: DurableQueue, payload: str, ack_upto: int):
    """A put and a read that acknowledges, handed to the writer together (one round)."""
    put: defer.Deferred = defer.Deferred()
    read: defer.Deferred = defer.Deferred()
    with store._cond:
        queue._puts.append((payload, put, None))
        queue._commands.append(("read", 500, 0, ack_upto, read))
        store._has_work = True
        store._cond.notify()
    put.addErrback(lambda failure: failure.value)  # examined by the test
    return put, read


@pytest_twisted.ensureDeferred
async def test_an_acknowledged_batch_is_never_handed_out_again_when_the_disk_is_full(
    tmp_path: Path,
) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        await defer.gatherResults([queue.put("x" * 1000) for _ in range(124)])
        batch = await queue.read_batch(500)
        assert len(batch) == 124
        fill_disk(queue)
        for _ in range(5):  # the fault run: the same 124 events were handed out ~100 times
            put, read = in_one_round(store, queue, "y" * 400_000, ack_upto=batch[-1][0])
            outcome = await put
            assert isinstance(outcome, QueueError) and "disk is full" in str(outcome)
            assert await read == []
        assert queue.depth == 0 and queue.bytes == 0
        assert queue.failing and "full" in (queue.error or "")
        # The delete committed (deletes need no new page): the room is there for new events.
        await queue.put("z" * 1000)
        await wait_until(lambda: not queue.failing, timeout=5)
        assert [p for _, p in await queue.read_batch(500)] == ["z" * 1000]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_queue_disk_shows_in_health_and_metrics_and_clears_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DurableQueue, "chores_interval", 0.2)
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = store.queue("store", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        runner = SimpleNamespace(state="ok", last_error=None, queue=queue, delivered=0)
        runner.failures = 0
        daemon = SimpleNamespace(
            gateway_id="gw", plugins={}, sinks={"store": runner}, reactor=reactor
        )
        healthy, body = health_report(daemon, reactor.seconds())
        assert healthy and body["sinks"]["store"]["queue"]["state"] == "ok"

        fill_disk(queue)
        refused = [queue.put("e" * 5000) for _ in range(40)]
        results = await defer.DeferredList(refused, consumeErrors=True)
        assert not any(ok for ok, _ in results)
        healthy, body = health_report(daemon, reactor.seconds())
        assert not healthy and body["status"] == "degraded"
        entry = body["sinks"]["store"]["queue"]
        assert entry["state"] == "failing" and "database or disk is full" in entry["error"]
        text = scrape(daemon)
        assert 'gatewayd_queue_up{queue="store"} 0.0' in text
        assert 'gatewayd_queue_put_failures_total{queue="store"} 40.0' in text

        free_disk(queue)  # space returns; no event arrives: the probe clears the state
        await wait_until(lambda: not queue.failing, timeout=5)
        healthy, body = health_report(daemon, reactor.seconds())
        assert healthy and body["sinks"]["store"]["queue"] == {
            "state": "ok",
            "error": None,
            "failing_seconds": None,
        }
        assert 'gatewayd_queue_up{queue="store"} 1.0' in scrape(daemon)
    finally:
        await store.stop()


class SinkFamilies:
    """The sink and queue families of ``/metrics`` alone (the daemon here has nothing else)."""

    def __init__(self, daemon: Any) -> None:
        self.collector = DaemonCollector(daemon)

    def collect(self) -> Any:
        return self.collector._sink_families()


def scrape(daemon: Any) -> str:
    registry = CollectorRegistry()
    registry.register(SinkFamilies(daemon))
    return generate_latest(registry).decode()


@pytest_twisted.ensureDeferred
async def test_events_through_a_full_queue_disk_reach_the_sink_once_and_delivery_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault run end to end: the queue's disk fills while events arrive and the sink
    delivers; every event whose emit succeeded reaches the sink exactly once."""
    monkeypatch.setattr(DurableQueue, "chores_interval", 0.2)
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    config = SqliteSink.Config(path="events.db", batch_size=50, replay_rate=None)
    queue = store.queue("store", max_bytes=BIG, max_age=3600, overflow="drop_oldest")
    sink = SqliteSink("store", config, SinkContext("store", "gw", reactor, tmp_path, Logger()))
    runner = SinkRunner(sink, queue, config, reactor)
    pipeline = Pipeline([RouteConfig(sinks=["store"])], {"store": queue}, {"store": runner})
    runner.start()
    stored: list[Event] = []
    refused = 0

    async def emit_some(count: int) -> None:
        """A burst of ``count`` events, as many devices reporting at once."""
        nonlocal refused
        events = [
            Event(type="meter.reading", device=f"m{n % 7}", data={"pad": "p" * 900})
            for n in range(count)
        ]
        results = await defer.DeferredList([pipeline.emit(e) for e in events], consumeErrors=True)
        for event, (ok, outcome) in zip(events, results, strict=True):
            if ok:
                stored.append(event)
            else:
                assert outcome.check(QueueError)
                refused += 1

    try:
        await queue.when_open()
        await emit_some(124)
        fill_disk(queue)
        await emit_some(300)  # the sink keeps taking events; the queue's deletes go on
        assert refused > 0
        await wait_until(lambda: runner.delivered >= len(stored), timeout=10)
        free_disk(queue)
        await emit_some(100)
        await wait_until(lambda: runner.delivered >= len(stored), timeout=10)
        await wait_until(lambda: not queue.failing, timeout=5)
    finally:
        await runner.stop()
        await store.stop()
    conn = sqlite3.connect(tmp_path / "events.db")
    ids = [row[0] for row in conn.execute("SELECT id FROM events")]
    conn.close()
    assert sorted(ids) == sorted(e.id for e in stored)
    assert sink.duplicates == 0 and runner.delivered == len(stored)
    assert queue.depth == 0


@pytest_twisted.ensureDeferred
async def test_max_bytes_bounds_the_queue_on_disk_wal_included(tmp_path: Path) -> None:
    max_bytes = 2 * 1024 * 1024
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = store.queue("q", max_bytes=max_bytes, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        for _ in range(40):  # 40 rounds of 100 KB: twice max_bytes in all
            results = await defer.gatherResults([queue.put("d" * 1000) for _ in range(100)])
            assert all(r is None for r in results)  # drop_oldest: every put is taken
            on_disk = sum(
                os.path.getsize(p) for p in tmp_path.glob("q.db*") if not p.name.endswith("-shm")
            )
            assert on_disk <= max_bytes
        assert queue.dropped["overflow_oldest"] > 0
        newest = await queue.read_batch(100_000)
        assert newest and newest[-1][0] == queue.last_seq  # the newest survive
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_drop_newest_queue_at_its_size_bound_refuses(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = store.queue("q", max_bytes=600 * 1024, max_age=1e9, overflow="drop_newest")
        await queue.when_open()
        outcomes = []
        for _ in range(30):
            outcomes += await defer.gatherResults([queue.put("d" * 1000) for _ in range(50)])
        assert outcomes[0] is None and outcomes[-1] is not None  # Refused, not an error
        assert not queue.failing and queue.dropped["overflow_newest"] > 0
    finally:
        await store.stop()


def test_size_bounds_leave_room_for_the_wal() -> None:
    pages, wal = size_bounds(256 * 1024 * 1024, 4096)
    assert wal == 32 * 1024 * 1024 and pages * 4096 + wal <= 256 * 1024 * 1024
    pages, wal = size_bounds(1 << 40, 4096)
    assert wal == 64 * 1024 * 1024
    assert size_bounds(1000, 4096)[0] == 64  # a tiny bound still leaves the tables room


def test_reserve_is_released_on_a_full_disk_and_made_again_with_room(tmp_path: Path) -> None:
    free = {"bytes": 100 * 1024 * 1024}
    reserve = Reserve(tmp_path / ".reserve", 1024 * 1024, free_bytes=lambda _: free["bytes"])
    assert reserve.ensure()
    info = (tmp_path / ".reserve").stat()
    assert info.st_size == 1024 * 1024 and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_blocks * 512 >= 1024 * 1024  # allocated, not sparse
    assert reserve.release() and not (tmp_path / ".reserve").exists()
    assert not reserve.release()  # once
    free["bytes"] = 3 * 1024 * 1024  # some room, but not four times the reserve
    assert not reserve.ensure() and reserve.released
    free["bytes"] = 5 * 1024 * 1024
    assert reserve.ensure() and not reserve.released


@pytest_twisted.ensureDeferred
async def test_the_store_frees_its_reserve_when_the_disk_fills(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        await wait_until(lambda: (tmp_path / ".reserve").exists(), timeout=5)
        fill_disk(queue)
        with pytest.raises(QueueError):
            await queue.put("x" * 50_000)
        assert not (tmp_path / ".reserve").exists()
    finally:
        await store.stop()


def test_disk_full_is_recognised() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA max_page_count=2")
    with pytest.raises(sqlite3.Error) as caught:
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    assert is_disk_full(caught.value)
    assert is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(sqlite3.OperationalError("no such table: queue"))


@pytest_twisted.ensureDeferred
async def test_a_backlog_after_a_full_sink_disk_is_replayed_at_replay_rate(
    tmp_path: Path,
) -> None:
    """The fault run of item 1: the sink's disk is full for a while, then has room again. The
    batch read ahead before the failure was short; the whole backlog must still be paced."""
    store = QueueStore(tmp_path / "queues", reactor)
    store.start()
    config = SqliteSink.Config(
        path="events.db", batch_size=100, replay_rate=400.0, retry_initial=0.1, retry_max=0.2
    )
    queue = store.queue("store", max_bytes=BIG, max_age=3600, overflow="drop_oldest")
    sink = SqliteSink("store", config, SinkContext("store", "gw", reactor, tmp_path, Logger()))
    lines: list[dict] = []
    log = Logger(namespace="test.sink", observer=lines.append)
    runner = SinkRunner(sink, queue, config, reactor, log=log)
    pipeline = Pipeline([RouteConfig(sinks=["store"])], {"store": queue}, {"store": runner})
    runner.start()
    try:
        await queue.when_open()
        await wait_until(lambda: runner.state == "ok", timeout=5)
        conn = sink._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")  # the sink's disk is full
        first = [Event(type="t", device="d", data={"pad": "p" * 500}) for _ in range(130)]
        await defer.gatherResults([pipeline.emit(e) for e in first])  # one batch + a short one
        await wait_until(lambda: runner.state == "retrying", timeout=5)
        backlog = [Event(type="t", device="d", data={"pad": "p" * 500}) for _ in range(1200)]
        await defer.gatherResults([pipeline.emit(e) for e in backlog])
        conn.execute("PRAGMA max_page_count=1073741823")  # room again
        await wait_until(lambda: runner.state == "ok", timeout=5)
        recovered = reactor.seconds()
        await wait_until(lambda: runner.delivered >= 1330, timeout=15)
        took = reactor.seconds() - recovered
    finally:
        await runner.stop()
        await store.stop()
    # 1,330 events at 400/s, the first batch and one bucket (100) at once: about 2.8 s.
    assert took >= 2.0, f"replayed in {took:.2f}s: not paced"
    drained = [e for e in lines if "backlog drained" in e.get("log_format", "")]
    assert drained and drained[0]["count"] == 1330
