"""Queue files shrink back after a drained backlog (``gatewayd.queue.compact``): real SQLite
files, the real writer thread and reactor, a compaction step every 50 ms instead of every second."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gatewayd.queue import DurableQueue, QueueStore
from gatewayd.queue.compact import INCREMENTAL, Compactor, space
from gatewayd.queue.file import _SCHEMA
from gatewayd.testing import wait_until

BIG = 1 << 40
MIB = 1024 * 1024
#: "Near the empty size": a drained queue ends within this of it (Compactor.almost_empty_*).
NEAR = Compactor.almost_empty_free_bytes + 64 * 1024
PAYLOAD = '{"type":"heartbeat","data":"' + "p" * 970 + '"}'  # about 1 KB, as a busy event


def on_disk(path: Path) -> tuple[int, int]:
    """Sizes of the file and of its WAL."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


@pytest.fixture(autouse=True)
def fast_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Compactor, "interval", 0.05)


async def fill(queue: DurableQueue, megabytes: int) -> None:
    """A backlog of ``megabytes`` of 1 KB events, committed in rounds of 2,000."""
    for _ in range(megabytes):
        await defer.gatherResults([queue.put(PAYLOAD) for _ in range(1000)])


async def drain(queue: DurableQueue, keep: int = 0) -> None:
    """Read and acknowledge everything but the newest ``keep`` entries."""
    upto = queue.last_seq - keep
    after = 0
    while after < upto:
        batch = await queue.read_batch(5000, after=after)
        after = batch[-1][0]
        await queue.ack(min(after, upto))


@pytest_twisted.ensureDeferred
async def test_a_drained_backlog_gives_its_file_and_wal_back(tmp_path: Path) -> None:
    store = QueueStore(tmp_path, reactor, housekeeping_interval=0.05)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        empty = sum(on_disk(queue.path))
        await fill(queue, 24)
        full = sum(on_disk(queue.path))
        assert full > 24 * MIB
        await drain(queue)
        assert queue.depth == 0
        await wait_until(lambda: sum(on_disk(queue.path)) < empty + NEAR, timeout=10)
        size, wal = on_disk(queue.path)
        assert wal == 0  # checkpointed and truncated: the queue was idle
        compactor = queue._compactor
        assert compactor.steps <= full // Compactor.step_bytes + 2  # bounded steps, few of them
        assert compactor.returned_bytes > 20 * MIB and compactor.error is None
        await wait_until(lambda: queue.disk_bytes == size, timeout=2)  # the metric follows
        # The file still works, and grows and shrinks again.
        await fill(queue, 6)
        await drain(queue)
        await wait_until(lambda: sum(on_disk(queue.path)) < empty + NEAR, timeout=10)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_compaction_step_never_holds_puts_up_long(tmp_path: Path) -> None:
    """The worst case: the newest entries sit at the end of the file, so every step moves live
    pages. Puts go on meanwhile; none waits more than a bound for its commit."""
    store = QueueStore(tmp_path, reactor, housekeeping_interval=0.05)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        queue._compactor._next = float("inf")  # no step until the backlog is drained
        await fill(queue, 24)
        await drain(queue, keep=2000)
        waits = []
        deadline = time.monotonic() + 8
        queue._compactor._next = 0.0
        while queue._compactor.steps < 3 and time.monotonic() < deadline:
            started = time.monotonic()
            await queue.put(PAYLOAD)
            waits.append(time.monotonic() - started)
        assert queue._compactor.steps >= 3 and queue.depth >= 2000
        print(f"puts: {len(waits)}, longest wait {max(waits) * 1000:.1f} ms")
        assert max(waits) < 0.5, f"a put waited {max(waits):.3f} s"
        await wait_until(lambda: on_disk(queue.path)[0] < 4 * MIB, timeout=10)
        batch = await queue.read_batch(10_000)
        assert len(batch) == queue.depth and all(p == PAYLOAD for _, p in batch)
    finally:
        await store.stop()


def make_old_file(path: Path, megabytes: int) -> None:
    """A queue file as versions before compaction made it (auto_vacuum none), with a drained
    backlog of ``megabytes``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO queue (ts, size, payload) VALUES (0, ?, ?)",
        [(len(PAYLOAD), PAYLOAD)] * (megabytes * 1000),
    )
    conn.execute("COMMIT")
    conn.execute("DELETE FROM queue")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_file_from_an_older_version_is_converted_and_shrinks(tmp_path: Path) -> None:
    make_old_file(tmp_path / "q.db", 8)
    conn = sqlite3.connect(tmp_path / "q.db")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    assert on_disk(tmp_path / "q.db")[0] > 7 * MIB
    store = QueueStore(tmp_path, reactor, housekeeping_interval=0.05)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        await wait_until(lambda: sum(on_disk(queue.path)) < 256 * 1024, timeout=10)
        assert queue._compactor.converted
        await queue.put(PAYLOAD)
        assert [p for _, p in await queue.read_batch(10)] == [PAYLOAD]
    finally:
        await store.stop()
    conn = sqlite3.connect(tmp_path / "q.db")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == INCREMENTAL
    conn.close()


def test_an_old_file_with_much_content_waits_to_be_converted(tmp_path: Path) -> None:
    """VACUUM rewrites the whole content: not while it is larger than convert_max_bytes."""
    path = tmp_path / "q.db"
    make_old_file(path, 8)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO queue (ts, size, payload) VALUES (0, ?, ?)", [(1, "x" * 1000)] * 6000
    )
    conn.execute("COMMIT")
    compactor = Compactor()
    assert compactor.step(conn, 0.0, idle=True) == 0
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0 and not compactor.converted
    conn.execute("DELETE FROM queue")
    assert compactor.step(conn, 10.0, idle=True) > 7 * MIB and compactor.converted
    conn.close()


def test_below_the_thresholds_free_pages_stay_for_reuse(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 12_000)
    conn.execute("COMMIT")
    conn.execute("DELETE FROM t WHERE rowid <= 2000")  # ~2 MB free: under min_free_bytes
    compactor = Compactor()
    assert compactor.step(conn, 0.0, idle=True) == 0 and not compactor.running
    conn.execute("DELETE FROM t WHERE rowid <= 3000")  # ~3 MB of 12: under min_free_share
    assert compactor.step(conn, 10.0, idle=True) == 0
    conn.execute("DELETE FROM t WHERE rowid <= 8000")  # ~8 MB of 12: a run, step by step
    first = compactor.step(conn, 20.0, idle=True)  # step_bytes, and a pointer-map page or so
    assert Compactor.step_bytes <= first < Compactor.step_bytes + 3 * 4096
    assert compactor.step(conn, 20.01, idle=True) == 0  # not due yet
    compactor.step(conn, 30.0, idle=True)
    assert space(conn)[2] == 0 and not compactor.running
    conn.close()


@pytest_twisted.ensureDeferred
async def test_an_idle_queue_cuts_a_large_wal_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL grows to an eighth of max_bytes between checkpoints; idle, it is cut to nothing
    at the next chore, with the entries kept."""
    monkeypatch.setattr(DurableQueue, "chores_interval", 0.1)
    store = QueueStore(tmp_path, reactor, housekeeping_interval=0.05)
    store.start()
    try:
        queue = store.queue("q", max_bytes=BIG, max_age=1e9, overflow="drop_oldest")
        await queue.when_open()
        await fill(queue, 8)
        await wait_until(lambda: on_disk(queue.path)[1] == 0, timeout=5)
        await wait_until(lambda: queue.disk_bytes == on_disk(queue.path)[0], timeout=2)
        assert queue.depth == 8000
    finally:
        await store.stop()
