"""Pipeline benchmark: events/s from ``emit()`` to durable in the queue(s) and on to sqlite sinks.

Usage: ``python bench/pipeline.py [--events N] [--sync full|normal] [--batch-size N]``

Measured in one process, on one real reactor:

* baseline: the same JSON payloads inserted with ``executemany`` in batches of ``--batch-size``
  rows, one transaction per batch, into a bare SQLite file with the queues' journal and
  ``synchronous`` settings (WAL);
* ``durable``: from the first ``Pipeline.emit()`` until every emit Deferred has fired, i.e.
  every event is committed in every queue it was routed to;
* ``end-to-end``: until every event is also in every ``sqlite`` sink's table (and acknowledged).

Events are built before timing (that is the plugin's share) and emitted in chunks of 1,000 per
reactor turn, as traffic from many devices would arrive; the sinks deliver while events are
emitted, as in the daemon. The ratio is each rate divided by the baseline rate.
Goal: >= 30,000 events/s durable and a ratio >= 0.4. The machine is shared: run it a few times.
"""

from __future__ import annotations

import argparse
import gc
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.config_model import RouteConfig  # noqa: E402
from gatewayd.delivery import SinkRunner  # noqa: E402
from gatewayd.events import Event  # noqa: E402
from gatewayd.pipeline import Pipeline, encode_event  # noqa: E402
from gatewayd.queue import QueueStore  # noqa: E402
from gatewayd.sinks.base import SinkContext  # noqa: E402
from gatewayd.sinks.sqlite import SqliteSink  # noqa: E402

CHUNK = 1000


def make_events(count: int) -> list[Event]:
    """Realistic events: a few hundred devices, data dicts of about five keys, a raw frame."""
    rng = random.Random(1)
    types = ["lend.succeeded", "return.succeeded", "slot.status", "device.online", "meter.reading"]
    events = []
    for i in range(count):
        device = f"8600000000{rng.randrange(300):05d}"
        events.append(
            Event(
                type=types[i % len(types)],
                device=device,
                data={
                    "slot": rng.randrange(12),
                    "bank": f"{rng.randrange(10**10):010d}",
                    "battery": rng.randrange(101),
                    "temperature": round(rng.uniform(10, 40), 1),
                    "charging": bool(i & 1),
                },
                raw=rng.randbytes(24).hex(),
                gateway="edge-01",
                plugin="cabinets",
                protocol="powerbank",
            )
        )
    return events


def baseline(payloads: list[str], directory: Path, sync: str, batch_size: int) -> float:
    """Seconds to executemany the payloads into a bare WAL SQLite file, batch by batch."""
    conn = sqlite3.connect(directory / "baseline.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync.upper()}")
    conn.execute(
        "CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
        " size INTEGER NOT NULL, payload TEXT NOT NULL)"
    )
    started = time.perf_counter()
    for start in range(0, len(payloads), batch_size):
        now = time.time()
        rows = [(now, len(p), p) for p in payloads[start : start + batch_size]]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO queue (ts, size, payload) VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


async def run_pipeline(
    reactor, events: list[Event], directory: Path, sinks: int, sync: str, batch_size: int
) -> tuple[float, float, float]:
    """(durable seconds, end-to-end seconds, average entries per queue commit)."""
    store = QueueStore(directory / "queues", reactor, sync=sync)
    store.start()
    runners = {}
    queues = {}
    for i in range(sinks):
        name = f"store{i}"
        config = SqliteSink.Config(type="sqlite", path=f"events{i}.db", batch_size=batch_size)
        queue = store.queue(
            name, max_bytes=config.max_bytes, max_age=config.max_age, overflow=config.overflow
        )
        context = SinkContext(name, "edge-01", reactor, directory, Logger())
        runners[name] = SinkRunner(SqliteSink(name, config, context), queue, config, reactor)
        queues[name] = queue
    await store.ready()
    for runner in runners.values():
        runner.start()
    pipeline = Pipeline([RouteConfig(match={"type": "*"}, sinks=list(queues))], queues, runners)

    total = len(events)
    emit = pipeline.emit
    started = time.perf_counter()
    for start in range(0, total - 1, CHUNK):
        for event in events[start : min(start + CHUNK, total - 1)]:
            emit(event)
        await task.deferLater(reactor, 0, lambda: None)
    # Each queue commits and fires in put order, so the last emit fires last.
    await emit(events[-1])
    durable_at = time.perf_counter()
    assert store.committed == total * sinks, (store.committed, total, sinks)
    while any(r.delivered < total for r in runners.values()) or any(
        q.depth for q in queues.values()
    ):
        await task.deferLater(reactor, 0.002, lambda: None)
    delivered_at = time.perf_counter()

    for runner in runners.values():
        await runner.stop()
    await store.stop()
    for i in range(sinks):
        conn = sqlite3.connect(directory / f"events{i}.db")
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        conn.close()
        assert rows == total, f"sink {i} holds {rows} rows, expected {total}"
    per_commit = store.committed / max(1, store.commits)
    return durable_at - started, delivered_at - started, per_commit


async def main(reactor, options: argparse.Namespace) -> None:
    events = make_events(options.events)
    payloads = [encode_event(e) for e in events]
    # The pre-built input is not the pipeline's garbage: keep the collector from rescanning it.
    gc.collect()
    gc.freeze()
    n = len(events)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        base = baseline(payloads, Path(tmp), options.sync, options.batch_size)
        base_rate = n / base
        rows.append(("baseline executemany", n, base, base_rate))
        for sinks in (1, 3):
            directory = Path(tmp) / f"run{sinks}"
            directory.mkdir()
            durable, e2e, per_commit = await run_pipeline(
                reactor, events, directory, sinks, options.sync, options.batch_size
            )
            label = "1 sink" if sinks == 1 else f"{sinks} sinks"
            rows.append((f"{label}: durable", n, durable, n / durable))
            rows.append((f"{label}: end-to-end", n, e2e, n / e2e))
            note = f"  ({per_commit:.0f} entries per queue commit"
            note += f"; each event is a row in {sinks} queue files)" if sinks > 1 else ")"
            rows.append((note, None, None, None))
    print(f"pipeline benchmark: {n} events, sync={options.sync}, batch_size={options.batch_size}")
    print(f"{'':40} {'events':>8} {'seconds':>8} {'events/s':>10} {'ratio':>6}")
    for label, count, seconds, rate in rows:
        if count is None:
            print(label)
            continue
        print(f"{label:40} {count:8d} {seconds:8.3f} {rate:10,.0f} {rate / base_rate:6.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sync", choices=["full", "normal"], default="full")
    parser.add_argument("--batch-size", type=int, default=500)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
