"""The durable queue: real SQLite files, the real writer thread and the real reactor."""

from __future__ import annotations

import os
import queue as queue_module
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from gatewayd.queue import QueueClosed, QueueError, QueueStore, Refused, stranded_queues
from gatewayd.testing import wait_until

BIG = 1 << 40


def rows(path: Path) -> list[tuple[int, str]]:
    """The queue file's entries, read through a fresh connection (as after a restart)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT seq, payload FROM queue ORDER BY seq").fetchall()
    finally:
        conn.close()


async def open_queue(store: QueueStore, name: str = "q", **bounds: Any):
    limits = {"max_bytes": BIG, "max_age": 1e9, "overflow": "drop_oldest", **bounds}
    queue = store.queue(name, **limits)
    await queue.when_open()
    return queue


@pytest_twisted.ensureDeferred
async def test_put_is_durable_when_its_deferred_fires(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        result = await queue.put('{"n":1}')
        assert result is None
        assert rows(tmp_path / "q.db") == [(1, '{"n":1}')]
        conn = sqlite3.connect(tmp_path / "q.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        assert (queue.depth, queue.bytes, queue.last_seq) == (1, 7, 1)
        assert queue.oldest_ts is not None and abs(queue.oldest_ts - time.time()) < 5
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_puts_into_few_transactions(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        commits_before = store.commits
        puts = [queue.put(f"event {i}") for i in range(2000)]  # all in one reactor turn
        await defer.gatherResults(puts)
        assert store.commits - commits_before <= 4
        assert [p for _, p in rows(tmp_path / "q.db")] == [f"event {i}" for i in range(2000)]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_read_oldest_first_and_ack_deletes(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        await defer.gatherResults([queue.put(f"e{i}") for i in range(10)])
        batch = await queue.read_batch(4)
        assert batch == [(1, "e0"), (2, "e1"), (3, "e2"), (4, "e3")]
        assert await queue.read_batch(4) == batch  # not acknowledged: read again
        ahead = await queue.read_batch(3, after=4)
        assert [p for _, p in ahead] == ["e4", "e5", "e6"]
        assert await queue.ack(4) == 4
        assert (queue.depth, queue.bytes) == (6, 12)
        assert [s for s, _ in rows(tmp_path / "q.db")] == [5, 6, 7, 8, 9, 10]
        # acknowledge and read in one transaction
        rest = await queue.read_batch(100, ack_upto=7)
        assert [p for _, p in rest] == ["e7", "e8", "e9"]
        assert queue.depth == 3
        await queue.ack(10)
        assert (queue.depth, queue.bytes, queue.oldest_ts) == (0, 0, None)
        assert await queue.read_batch(10) == []
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_reopen_resumes_where_it_stopped(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    queue = await open_queue(store)
    await defer.gatherResults([queue.put(f"e{i}") for i in range(5)])
    await queue.ack(2)
    oldest = queue.oldest_ts
    await store.stop()

    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        assert (queue.depth, queue.bytes, queue.oldest_ts) == (3, 6, oldest)
        assert (queue.backlog_at_open, queue.last_seq_at_open, queue.last_seq) == (3, 5, 5)
        await queue.put("e5")
        assert await queue.read_batch(10) == [(3, "e2"), (4, "e3"), (5, "e4"), (6, "e5")]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_seq_never_reused_after_the_queue_empties(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    queue = await open_queue(store)
    await queue.put("a")
    await queue.read_batch(1)
    await queue.ack(1)
    await store.stop()
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        await queue.put("b")
        assert await queue.read_batch(1) == [(2, "b")]
        assert queue.possible_duplicates == 0
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_possible_duplicates_after_handing_out_without_ack(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    queue = await open_queue(store)
    await defer.gatherResults([queue.put(f"e{i}") for i in range(5)])
    await queue.read_batch(3)  # handed to the sink ...
    await store.stop()  # ... and the process ends before the sink acknowledged

    store = QueueStore(tmp_path, reactor)
    store.start()
    queue = await open_queue(store)
    assert queue.possible_duplicates == 3
    assert queue.depth == 5
    batch = await queue.read_batch(10)
    assert [p for _, p in batch] == [f"e{i}" for i in range(5)]  # nothing lost, in order
    await queue.ack(batch[-1][0])
    await store.stop()

    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        assert (queue.possible_duplicates, queue.depth) == (0, 0)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_max_bytes_drop_oldest_spares_the_batch_in_flight(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store, max_bytes=1000)
        await defer.gatherResults([queue.put(f"{i:03d}" + "x" * 97) for i in range(10)])
        assert (queue.depth, queue.bytes) == (10, 1000)
        await queue.read_batch(3)  # entries 1..3 are with the sink
        results = await defer.gatherResults([queue.put(f"{i:03d}" + "y" * 97) for i in range(5)])
        assert results == [None] * 5  # accepted
        assert queue.dropped == {"overflow_oldest": 5, "overflow_newest": 0, "max_age": 0}
        assert (queue.depth, queue.bytes) == (10, 1000)
        assert [s for s, _ in rows(tmp_path / "q.db")] == [1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_max_bytes_drop_newest_refuses_until_there_is_room(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store, max_bytes=1000, overflow="drop_newest")
        await defer.gatherResults([queue.put("x" * 100) for i in range(10)])
        refused = await queue.put("new")
        assert refused == Refused(("q",), "overflow_newest")
        assert queue.dropped["overflow_newest"] == 1
        assert queue.depth == 10 and "new" not in [p for _, p in rows(tmp_path / "q.db")]
        await queue.ack(1)
        assert await queue.put("new") is None
        assert queue.depth == 10
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_max_age_drops_old_entries_but_not_the_batch_in_flight(tmp_path: Path) -> None:
    now = [1000.0]
    store = QueueStore(tmp_path, reactor, clock=lambda: now[0], housekeeping_interval=0.01)
    store.start()
    try:
        queue = await open_queue(store, max_age=60.0, overflow="drop_newest")
        await defer.gatherResults([queue.put(f"old{i}") for i in range(4)])
        await queue.read_batch(1)
        now[0] = 1030.0
        await queue.put("young")
        now[0] = 1061.0
        await wait_until(lambda: queue.dropped["max_age"] == 3, step=0.01)
        assert [p for _, p in rows(tmp_path / "q.db")] == ["old0", "young"]
        assert (queue.depth, queue.oldest_ts) == (2, 1000.0)
        await queue.ack(1)
        assert queue.oldest_ts == 1030.0
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_put_after_stop_fails_at_once(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    queue = await open_queue(store)
    pending = queue.put("flushed at stop")
    stopped = store.stop()
    late = queue.put("too late")
    assert late.called
    with pytest.raises(QueueClosed):
        await late
    with pytest.raises(QueueClosed):
        await queue.read_batch(1)
    await stopped
    assert await pending is None
    assert [p for _, p in rows(tmp_path / "q.db")] == ["flushed at stop"]
    await store.stop()  # idempotent


@pytest_twisted.ensureDeferred
async def test_text_that_is_not_unicode_fails_alone(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        good, bad = queue.put("good"), queue.put("bad \ud800")
        assert await good is None
        with pytest.raises(UnicodeEncodeError):
            await bad
        assert rows(tmp_path / "q.db") == [(1, "good")]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_unopenable_queue_reports_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    store = QueueStore(tmp_path / "not-a-dir", reactor)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        with pytest.raises(QueueError, match="queue q: cannot open"):
            await store.ready()
        with pytest.raises(QueueError):
            await queue.put("x")
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_disk_error_fails_the_waiting_puts_and_the_writer_lives_on(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)
        await queue.put("before")
        conn = sqlite3.connect(tmp_path / "q.db")
        conn.execute("DROP TABLE queue")  # the file is damaged under the store's feet
        conn.commit()
        conn.close()
        with pytest.raises(QueueError, match="queue q: no such table"):
            await queue.put("lost")
        with pytest.raises(QueueError):
            await queue.read_batch(1)
        assert queue.depth == 1  # the figures are those of the last good commit
    finally:
        await store.stop()


def test_drop_logging_is_rate_limited() -> None:
    clock = Clock()
    store = QueueStore(Path("/nonexistent"), clock)  # never started: no file, no thread
    queue = store.queue("north", max_bytes=1, max_age=1, overflow="drop_oldest")
    lines: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace") == "gatewayd.queue" and "dropped" in event["log_format"]:
            lines.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        clock.advance(100)
        queue._note_drops({"overflow_oldest": 2})
        assert len(lines) == 1 and lines[0]["counts"] == "2 by overflow_oldest"
        clock.advance(1)
        queue._note_drops({"overflow_oldest": 3})
        queue._note_drops({"max_age": 4})
        assert len(lines) == 1
        clock.advance(9)
        assert len(lines) == 2
        assert lines[1]["counts"] == "4 by max_age, 3 by overflow_oldest"
        clock.advance(60)
        assert len(lines) == 2
    finally:
        globalLogPublisher.removeObserver(observer)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from twisted.internet import reactor
    from gatewayd.queue import QueueStore

    store = QueueStore(Path(sys.argv[1]), reactor, sync=sys.argv[2])
    store.start()
    queue = store.queue("q", max_bytes=1 << 40, max_age=1e9, overflow="drop_oldest")
    count = 0
    unconfirmed = 0

    def confirmed(_, n):
        global unconfirmed
        unconfirmed -= 1
        sys.stdout.write(f"{n}\\n")
        sys.stdout.flush()

    def burst():
        # Like devices waiting for their acks: at most 2000 puts unconfirmed at a time.
        global count, unconfirmed
        for _ in range(min(200, 2000 - unconfirmed)):
            queue.put(f"event {count}").addCallback(confirmed, count)
            count += 1
            unconfirmed += 1
        reactor.callLater(0.001, burst)

    reactor.callWhenRunning(burst)
    reactor.run()
    """
)


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_kill_9_loses_no_confirmed_put(tmp_path: Path, sync: str) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), sync],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    confirmed = []
    lines: queue_module.SimpleQueue = queue_module.SimpleQueue()
    assert child.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in child.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    try:
        while len(confirmed) < 3000:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_module.Empty:
                raise AssertionError(f"only {len(confirmed)} puts confirmed in 60 s") from None
            confirmed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    stored = {p for _, p in rows(tmp_path / "q.db")}
    assert {f"event {n}" for n in confirmed} <= stored
    seqs = [s for s, _ in rows(tmp_path / "q.db")]
    assert seqs == list(range(1, len(seqs) + 1))  # consistent and gap-free
    conn = sqlite3.connect(tmp_path / "q.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest_twisted.ensureDeferred
async def test_stranded_queues_are_the_files_of_no_configured_sink(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        for name, count in (("archive", 3), ("store", 1)):
            queue = await open_queue(store, name)
            await defer.gatherResults([queue.put(f"event {i}") for i in range(count)])
    finally:
        await store.stop()
    (tmp_path / "broken.db").write_bytes(b"not a database")
    assert stranded_queues(tmp_path, {"store"}) == [
        (tmp_path / "archive.db", 3),
        (tmp_path / "broken.db", None),
    ]
    assert stranded_queues(tmp_path, {"store", "archive", "broken"}) == []


@pytest_twisted.ensureDeferred
async def test_failed_puts_nobody_waits_on_are_counted_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fails every commit: emits whose Deferred nobody kept (QoS 0 reports,
    device.online) cost one log line per 10 s, not one traceback each at garbage collection."""
    import gc

    from gatewayd.queue import DurableQueue

    logged = []
    globalLogPublisher.addObserver(logged.append)
    store = QueueStore(tmp_path, reactor)
    store.start()
    try:
        queue = await open_queue(store)

        def disk_error(*args: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(DurableQueue, "_insert", disk_error)
        for n in range(50):
            queue.put_waiting(f"event {n}", defer.Deferred())  # nobody keeps these
        kept = defer.Deferred()
        queue.put_waiting("kept", kept)
        kept_failure = []
        kept.addErrback(kept_failure.append)  # this one is waited on: it sees the error
        late = defer.Deferred()
        queue.put_waiting("late", late)  # its waiter attaches only after the round failed
        await wait_until(lambda: queue.failed_puts == 52)
        late_outcome = []
        late.addBoth(late_outcome.append)
        gc.collect()
        await task.deferLater(reactor, 0, lambda: None)
    finally:
        globalLogPublisher.removeObserver(logged.append)
        await store.stop()
    assert queue.unheard_failures == 51  # the 50 and the late one, when the round failed
    assert kept_failure and "disk I/O error" in kept_failure[0].getErrorMessage()
    assert "disk I/O error" in late_outcome[0].getErrorMessage()  # still a failure, not None
    texts = [e.get("log_format") or "" for e in logged]
    assert sum("events not stored" in t for t in texts) == 1
    assert not any(e.get("isError") or "Unhandled error" in str(e.get("why")) for e in logged)
