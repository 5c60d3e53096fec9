"""Idempotency keys: a keyed event is stored once per queue while the queue keeps its key,
across restarts too. Real SQLite files, the real writer thread and the real reactor."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor

from gatewayd.config_model import RouteConfig
from gatewayd.dedupe import KeyMemory
from gatewayd.events import Event
from gatewayd.pipeline import Pipeline
from gatewayd.plugin import PluginContext
from gatewayd.queue import QueueStore

BIG = 1 << 40


def payloads(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT payload FROM queue ORDER BY seq")]
    finally:
        conn.close()


async def started(directory: Path, clock=None) -> QueueStore:
    store = QueueStore(directory, reactor, **({"clock": clock} if clock else {}))
    store.start()
    return store


async def opened(store: QueueStore, name: str = "q"):
    queue = store.queue(name, max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
    await queue.when_open()
    return queue


@pytest_twisted.ensureDeferred
async def test_a_keyed_put_is_stored_once_and_answered_twice(tmp_path: Path) -> None:
    store = await started(tmp_path)
    try:
        queue = await opened(store)
        first = await queue.put("return 1", key=("cab:MC:3:B1", 60))
        again = await queue.put("return 1 again", key=("cab:MC:3:B1", 60))
        in_one_round = await defer.gatherResults(
            [queue.put("other", key=("k2", 60)), queue.put("other again", key=("k2", 60))]
        )
        unkeyed = await defer.gatherResults([queue.put("beat"), queue.put("beat")])
        assert first is None and again is None and in_one_round == [None, None]
        assert unkeyed == [None, None]
        assert payloads(tmp_path / "q.db") == ["return 1", "other", "beat", "beat"]
        assert queue.deduplicated == 2
        assert store.seen("cab:MC:3:B1") and store.seen("k2") and not store.seen("k3")
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_keys_survive_a_restart_and_are_loaded_before_the_queue_is_open(
    tmp_path: Path,
) -> None:
    store = await started(tmp_path)
    queue = await opened(store)
    await queue.put("lend result", key=("cab:MC:1:B7", 600))
    await store.stop()

    store = await started(tmp_path)  # as after kill -9 and a restart: the file is all there is
    try:
        queue = await opened(store)
        assert store.seen("cab:MC:1:B7")  # known as soon as the queue is open
        assert await queue.put("lend result resent", key=("cab:MC:1:B7", 600)) is None
        assert payloads(tmp_path / "q.db") == ["lend result"]
        assert queue.deduplicated == 1
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_key_is_kept_for_its_window_only(tmp_path: Path) -> None:
    now = {"t": 1_000_000.0}
    store = await started(tmp_path, clock=lambda: now["t"])
    try:
        queue = await opened(store)
        await queue.put("report", key=("gw:abc:0", 30))
        now["t"] += 29
        await queue.put("redelivered", key=("gw:abc:0", 30))
        assert store.seen("gw:abc:0")
        now["t"] += 2
        assert not store.seen("gw:abc:0")
        await queue.put("same payload, later", key=("gw:abc:0", 30))
        assert payloads(tmp_path / "q.db") == ["report", "same payload, later"]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_forget_lets_a_new_operation_reuse_its_key(tmp_path: Path) -> None:
    store = await started(tmp_path)
    try:
        queue = await opened(store)
        await queue.put("first return", key=("cab:RO:2:B9", 600))
        store.forget("cab:RO:2:B9")  # a new return of the bank begins
        assert not store.seen("cab:RO:2:B9")
        await queue.put("second return", key=("cab:RO:2:B9", 600))
        await queue.put("its resend", key=("cab:RO:2:B9", 600))
        assert payloads(tmp_path / "q.db") == ["first return", "second return"]
    finally:
        await store.stop()
    store = await started(tmp_path)  # the forget was durable
    try:
        await opened(store)
        assert store.seen("cab:RO:2:B9")
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_each_queue_stores_a_keyed_event_once_even_after_a_partial_commit(
    tmp_path: Path,
) -> None:
    """A crash after the event was committed in one queue but not yet in the other: the device
    re-sends, the queue that has it stores nothing, the other stores it once."""
    store = await started(tmp_path)
    try:
        north = await opened(store, "north")
        local = await opened(store, "local")
        pipeline = Pipeline(
            [RouteConfig(sinks=["north", "local"])], {"north": north, "local": local}
        )
        first = Event(type="return.succeeded", device="cab", key=("p:cab:RO:1:B1", 600))
        await north.put(first.to_json(), key=first.key)  # 'local' never saw it: the crash
        resent = Event(type="return.succeeded", device="cab", key=("p:cab:RO:1:B1", 600))
        assert await pipeline.emit(resent) is None
        assert await pipeline.emit(resent) is None  # and a second resend
        assert [Event.from_json(p).id for p in payloads(tmp_path / "north.db")] == [first.id]
        assert [Event.from_json(p).id for p in payloads(tmp_path / "local.db")] == [resent.id]
    finally:
        await store.stop()


def test_plugin_keys_are_scoped_per_instance() -> None:
    emitted: list[Event] = []
    memory = KeyMemory(lambda: 0.0)

    def sink(event: Event) -> defer.Deferred:
        emitted.append(event)
        return defer.succeed(None)

    context = PluginContext(
        name="cabinets",
        protocol="powerbank",
        gateway_id="gw",
        reactor=reactor,
        state_dir=Path("."),
        sink=sink,
        keys=memory,
    )
    context.emit("return.succeeded", "cab", {}, key="RO:1:B1", window=42.0)
    context.emit("heartbeat", "cab")
    assert emitted[0].key[:2] == ("cabinets:RO:1:B1", 42.0) and emitted[1].key is None
    assert "key" not in emitted[0].to_dict()  # never part of the envelope
    memory.add_many([("cabinets:RO:1:B1", 10.0)])
    assert context.seen("RO:1:B1") and not memory.seen("RO:1:B1")
    context.forget("RO:1:B1")
    assert not context.seen("RO:1:B1")


def test_key_memory_is_bounded_and_forgets_the_expired_first() -> None:
    now = {"t": 100.0}
    memory = KeyMemory(lambda: now["t"], limit=3)
    memory.add_many([("a", 101.0), ("b", 500.0), ("c", 500.0)])
    now["t"] = 200.0  # 'a' expired
    memory.add_many([("d", 500.0)])
    assert len(memory) == 3 and not memory.seen("a") and memory.seen("d")
    memory.add_many([("e", 500.0)])  # all live: the earliest noted goes
    assert len(memory) == 3 and not memory.seen("b") and memory.seen("e")


@pytest_twisted.ensureDeferred
async def test_queue_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = await started(tmp_path / "queues")
        try:
            queue = await opened(store)
            await queue.put("imei and meter data", key=("k", 60))
        finally:
            await store.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "queues").stat().st_mode) == 0o700
    for path in (tmp_path / "queues").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest_twisted.ensureDeferred
async def test_a_keyed_put_a_full_queue_refused_is_refused_again_not_deduplicated(
    tmp_path: Path,
) -> None:
    store = await started(tmp_path)
    try:
        queue = store.queue("q", max_bytes=100, max_age=1e9, overflow="drop_newest")
        await queue.when_open()
        await queue.put("x" * 80)
        first: defer.Deferred = defer.Deferred()
        again: defer.Deferred = defer.Deferred()
        with store._cond:  # both in one writer round
            queue._puts.append(("y" * 80, first, ("k", 60)))
            queue._puts.append(("y" * 80, again, ("k", 60)))
            store._has_work = True
            store._cond.notify()
        assert (await first) is not None and (await again) is not None  # both Refused
        assert queue.deduplicated == 0 and not store.seen("k")
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_forget_after_a_put_not_yet_committed_wins(tmp_path: Path) -> None:
    """A put of a key, then a forget of it, both before the writer takes them (a slow disk):
    the key must stay forgotten, on disk and in memory, and the next event with it is stored."""
    store = await started(tmp_path)
    try:
        queue = await opened(store)
        first: defer.Deferred = defer.Deferred()
        with store._cond:  # hold the writer: the put and the forget go in one round
            queue._puts.append(("return 1", first, ("K", 600, store._keys.stamp())))
            store._keys.forget("K")
            queue._puts.append((None, None, "K"))
            store._has_work = True
            store._cond.notify()
        await first
        await queue.put("ping")  # a later round: its results arrive after the first's
        assert not store.seen("K")
        await queue.put("return 2", key=("K", 600, store._keys.stamp()))
        assert payloads(tmp_path / "q.db") == ["return 1", "ping", "return 2"]
        assert queue.deduplicated == 0 and store.seen("K")
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_commit_reaching_the_reactor_after_a_forget_does_not_bring_the_key_back(
    tmp_path: Path,
) -> None:
    store = await started(tmp_path)
    try:
        queue = await opened(store)
        stamp = store._keys.stamp()
        put = queue.put("return 1", key=("K", 600, stamp))
        store._keys.forget("K")  # called on the reactor before the commit's results arrive
        await put
        assert not store.seen("K")
    finally:
        await store.stop()
