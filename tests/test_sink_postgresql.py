"""The postgresql sink against a private PostgreSQL (``postgresql`` fixture: initdb in a temporary
directory, a free port; never a server that happens to run): schema, values, one transaction
per batch, replays as duplicates, a refused row, timeouts, a server restart under a stream, and
a password that never shows."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import pytest_twisted
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer, reactor, threads
from twisted.logger import Logger, formatEvent

from gatewayd.config import ConfigError, load_config
from gatewayd.config_model import RouteConfig
from gatewayd.delivery import EventBatch, SinkRunner
from gatewayd.events import Event
from gatewayd.metrics import DaemonCollector
from gatewayd.pipeline import Pipeline
from gatewayd.queue import QueueStore
from gatewayd.registry import SINK_GROUP, load
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.postgresql import PostgresqlSink
from gatewayd.testing import PostgresCluster, free_port, sleep, wait_until

SECRET = "hunter2-s3cr3t"


def make_events(count: int, start: int = 0) -> list[Event]:
    return [
        Event(
            type="meter.reading" if n % 2 else "device.online",
            device=f"m{n % 3}",
            data={"n": n, "name": "Grüße", "ok": True, "flow": 0.25, "nested": {"a": [1, 2]}},
            raw=None if n % 3 else f"{n:04x}",
            gateway="edge-01",
            plugin="meters",
            protocol="heating",
        )
        for n in range(start, start + count)
    ]


def batch(events: list[Event]) -> EventBatch:
    """The events as the delivery loop hands them over: their queued JSON texts."""
    return EventBatch([e.to_json() for e in events])


class Lines(list):
    """A log observer keeping every event; ``text()`` is them formatted, one per line."""

    def __call__(self, event: dict) -> None:
        self.append(event)

    def text(self) -> str:
        return "\n".join(formatEvent(event) for event in self)


class SinkFamilies:
    """The sink families of ``/metrics`` alone (the daemon view here has nothing else)."""

    def __init__(self, daemon: Any) -> None:
        self.collector = DaemonCollector(daemon)

    def collect(self) -> Any:
        return self.collector._sink_families()


def make_sink(dsn: str, tmp_path: Path, lines: Lines | None = None, **keys: Any) -> PostgresqlSink:
    config = PostgresqlSink.Config(type="postgresql", dsn=dsn, **keys)
    log = Logger(namespace="test.pg", observer=lines if lines is not None else Lines())
    return PostgresqlSink("pg", config, SinkContext("pg", "edge-01", reactor, tmp_path, log))


def ids_in(pg: PostgresCluster, table: str = "events") -> list[str]:
    with pg.connect() as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


# --- config ---------------------------------------------------------------------------------------


def test_the_entry_point_names_the_sink_and_the_defaults() -> None:
    assert load(SINK_GROUP, "postgresql") is PostgresqlSink
    config = PostgresqlSink.Config(type="postgresql", dsn="host=db.example dbname=iot")
    assert (config.table, config.create_table, config.timescaledb) == ("events", True, False)
    assert config.password is None and config.batch_size == 500 and config.write_timeout == 30
    with pytest.raises(ValueError, match="dsn"):
        PostgresqlSink.Config(type="postgresql")  # no default: say where the events go


@pytest.mark.parametrize("table", ["events", "iot.events", "_Raw_2", "a" * 55, "s" * 63 + ".t"])
def test_table_names_that_are_identifiers_are_taken(table: str) -> None:
    assert PostgresqlSink.Config(type="postgresql", dsn="", table=table).table == table


@pytest.mark.parametrize(
    "table", ["1events", "events; DROP TABLE x", "a.b.c", '"events"', "ev-ents", "", "a" * 56]
)
def test_table_names_that_are_not_identifiers_are_refused(table: str) -> None:
    with pytest.raises(ValueError, match="expected a table name such as events or iot.events"):
        PostgresqlSink.Config(type="postgresql", dsn="", table=table)


def test_config_errors_name_file_and_line_and_never_the_password(tmp_path: Path) -> None:
    (tmp_path / "pg.pw").write_text(SECRET + "\n")
    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        "sinks:\n"
        "  a:\n"
        "    type: postgresql\n"
        f'    dsn: "host=db password={SECRET} dbname"\n'
        '    table: "events; DROP TABLE users"\n'
        "  b:\n"
        "    type: postgresql\n"
        f'    dsn: "postgresql://gw:{SECRET}@db/iot"\n'
        "    password_file: pg.pw\n"
        "routes:\n"
        "  - sinks: [a, b]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.errors == [
        f"{path}:4: sinks.a.dsn: not a libpq connection string or URI: "
        'missing "=" after a word in connection info string',
        f"{path}:5: sinks.a.table: expected a table name such as events or iot.events: "
        "letters, digits and _, not starting with a digit, at most 55 characters; "
        "got 'events; DROP TABLE users'",
        f"{path}:9: sinks.b.password: dsn holds a password already: give it in one place only",
    ]
    assert SECRET not in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_password_file_gives_the_password_and_no_message_shows_it(tmp_path: Path) -> None:
    with PostgresCluster(password=SECRET) as pg:
        (tmp_path / "pg.pw").write_text(SECRET + "\n")
        path = tmp_path / "gatewayd.yaml"
        path.write_text(
            "sinks:\n"
            f"  pg: {{type: postgresql, dsn: '{pg.dsn}', password_file: pg.pw}}\n"
            "routes:\n"
            "  - sinks: [pg]\n"
        )
        config = load_config(path, environ={}).sinks["pg"]
        assert isinstance(config, PostgresqlSink.Config)
        assert config.password is not None and config.password.get_secret_value() == SECRET
        assert SECRET not in repr(config)
        lines = Lines()
        log = Logger(namespace="test.pg", observer=lines)
        sink = PostgresqlSink("pg", config, SinkContext("pg", "edge-01", reactor, tmp_path, log))
        await sink.open()
        await sink.write(batch(make_events(3)))
        await sink.close()
        assert len(ids_in(pg)) == 3

        # In the DSN itself: the sink shows the DSN without it.
        sink = make_sink(f"{pg.dsn} password={SECRET}", tmp_path, lines, table="other")
        await sink.open()
        await sink.write(make_events(2))
        await sink.close()
        assert "writing to table other at" in lines.text() and SECRET not in sink.target

        # Without it (or a wrong one) the open fails, saying why, and not what was tried.
        for dsn in (pg.dsn, f"{pg.dsn} password=wrong-{SECRET}"):
            sink = make_sink(dsn, tmp_path, lines)
            with pytest.raises(psycopg.OperationalError) as caught:
                await sink.open()
            await sink.close()
            assert "password" in str(caught.value) and SECRET not in str(caught.value)
    assert SECRET not in lines.text()


@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_there_fails_the_open_without_the_password(
    tmp_path: Path,
) -> None:
    port = free_port()
    sink = make_sink(f"postgresql://gw:{SECRET}@127.0.0.1:{port}/iot", tmp_path)
    assert sink.target == f"user=gw dbname=iot host=127.0.0.1 port={port}"
    with pytest.raises(psycopg.OperationalError) as caught:
        await sink.open()
    await sink.close()
    assert "Connection refused" in str(caught.value) and SECRET not in str(caught.value)
    # Were libpq ever to quote it, the sink's error would not.
    failure = sink._failed(psycopg.OperationalError(f"bad password {SECRET!r} for gw"))
    assert isinstance(failure, psycopg.OperationalError)
    assert str(failure) == "bad password '**********' for gw"


# --- schema and rows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "schema", "name"),
    [("events", "public", "events"), ("iot.Readings", "iot", "Readings")],
)
@pytest_twisted.ensureDeferred
async def test_create_table_makes_the_typed_columns_key_and_indexes(
    postgresql: PostgresCluster, tmp_path: Path, table: str, schema: str, name: str
) -> None:
    with postgresql.connect() as conn:
        conn.execute("CREATE SCHEMA iot")
    lines = Lines()
    sink = make_sink(postgresql.dsn, tmp_path, lines, table=table)
    await sink.open()
    await sink.close()
    await sink.open()  # again: the table is there, nothing to do
    await sink.close()
    with postgresql.connect() as conn:
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            [schema, name],
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            [schema, name],
        ).fetchall()
    assert columns == [
        ("id", "text", "NO"),
        ("ts", "timestamp with time zone", "NO"),
        ("gateway", "text", "YES"),
        ("plugin", "text", "YES"),
        ("protocol", "text", "YES"),
        ("device", "text", "YES"),
        ("type", "text", "NO"),
        ("data", "jsonb", "YES"),
        ("raw", "text", "YES"),
    ]
    defs = {index: definition.split(" USING ")[1] for index, definition in indexes}
    assert defs == {
        f"{name}_pkey": "btree (id)",
        f"{name}_ts": "btree (ts)",
        f"{name}_device": "btree (device)",
        f"{name}_type": "btree (type)",
    }
    assert lines.text().count(f"created table {table}") == 1
    assert "warn" not in {str(event["log_level"].name) for event in lines}


@pytest.mark.parametrize("as_batch", [True, False], ids=["payloads", "events"])
@pytest_twisted.ensureDeferred
async def test_a_batch_is_one_transaction_with_every_value_right(
    postgresql: PostgresCluster, tmp_path: Path, as_batch: bool
) -> None:
    sink = make_sink(postgresql.dsn, tmp_path)
    events = make_events(60)
    events[5].data = {"quote": 'a"b', "backslash": "c\\d", "tab\t": "x\ny", "empty": {}}
    events[6].raw = "line\\nbreak\ttab"
    await sink.open()
    await sink.write(batch(events) if as_batch else events)
    await sink.close()
    with postgresql.connect() as conn:
        rows = conn.execute(
            "SELECT id, ts, gateway, plugin, protocol, device, type, data, raw FROM events "
            "ORDER BY id"
        ).fetchall()
        transactions = conn.execute("SELECT count(DISTINCT xmin::text) FROM events").fetchone()
    assert rows == [
        (
            e.id,
            datetime.fromisoformat(e.ts),
            e.gateway,
            e.plugin,
            e.protocol,
            e.device,
            e.type,
            e.data,
            e.raw,
        )
        for e in sorted(events, key=lambda e: e.id)
    ]
    assert transactions == (1,)
    assert sink.duplicates == 0


@pytest_twisted.ensureDeferred
async def test_a_replayed_batch_is_counted_as_duplicates_and_not_stored_twice(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    sink = make_sink(postgresql.dsn, tmp_path)
    first, second = make_events(10), make_events(5, start=10)
    await sink.open()
    await sink.write(batch(first))
    replay = batch(first[4:] + second)  # the daemon died before the queue recorded the first
    await sink.write(replay)
    await sink.write(first)  # decoded events take the same way
    await sink.close()
    assert ids_in(postgresql) == sorted(e.id for e in first + second)
    assert sink.duplicates == 6 + 10 and replay.invalid == []
    runner = SimpleNamespace(state="ok", delivered=25, failures=0, sink=sink, queue=None)
    registry = CollectorRegistry()
    registry.register(SinkFamilies(SimpleNamespace(sinks={"pg": runner}, reactor=reactor)))
    assert 'gatewayd_sink_duplicates_total{sink="pg"} 16.0' in generate_latest(registry).decode()


@pytest_twisted.ensureDeferred
async def test_rows_postgresql_refuses_are_left_out_and_reported_and_nul_is_replaced(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    lines = Lines()
    sink = make_sink(postgresql.dsn, tmp_path, lines)
    good, bad_ts, nul, later = make_events(4)
    bad_ts.ts = "yesterday at noon"
    nul.data, nul.raw = {"k\x00": ["v\x00"]}, "r\x00"
    entries = batch([good, bad_ts, nul, later])
    entries.payloads.insert(2, "not json")  # a damaged queue entry
    await sink.open()
    await sink.write(entries)
    await sink.close()
    assert ids_in(postgresql) == sorted([good.id, nul.id, later.id])
    assert entries.invalid[0].startswith("not JSON")
    assert entries.invalid[1] == (
        f"event {bad_ts.id}: PostgreSQL refused it: "
        'invalid input syntax for type timestamp with time zone: "yesterday at noon"'
    )
    assert sink.rejected == 1 and sink.duplicates == 0
    assert f"event {bad_ts.id}: PostgreSQL refused it" in lines.text()
    with postgresql.connect() as conn:
        stored = conn.execute("SELECT data, raw FROM events WHERE id = %s", [nul.id]).fetchone()
    assert stored == ({"k\ufffd": ["v\ufffd"]}, "r\ufffd")


@pytest_twisted.ensureDeferred
async def test_an_existing_table_is_used_as_it_is_and_a_missing_one_is_an_error(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    lines = Lines()
    sink = make_sink(postgresql.dsn, tmp_path, lines, table="mine", create_table=False)
    with pytest.raises(psycopg.ProgrammingError, match=r"table mine does not exist \(and"):
        await sink.open()
    await sink.close()
    with postgresql.connect() as conn:  # no key on id, an extra column with a default
        conn.execute(
            "CREATE TABLE mine (id text, ts timestamptz, gateway text, plugin text, "
            "protocol text, device text, type text, data jsonb, raw text, "
            "seen timestamptz DEFAULT now())"
        )
    await sink.open()
    await sink.write(batch(make_events(3)))
    await sink.close()
    assert len(ids_in(postgresql, "mine")) == 3
    assert "table mine has no primary key or unique index on id" in lines.text()


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["restart", "kill"])
@pytest_twisted.ensureDeferred
async def test_a_broken_connection_fails_the_write_and_the_next_write_reconnects(
    postgresql: PostgresCluster, tmp_path: Path, outage: str
) -> None:
    sink = make_sink(postgresql.dsn, tmp_path)
    one, two, three = make_events(5), make_events(5, 5), make_events(5, 10)
    await sink.open()
    await sink.write(batch(one))
    if outage == "restart":
        postgresql.restart()
        with pytest.raises(psycopg.OperationalError):  # the connection of before is gone
            await sink.write(batch(two))
    else:
        postgresql.kill()
        with pytest.raises(psycopg.OperationalError):  # the connection of before is gone
            await sink.write(batch(two))
        with pytest.raises(psycopg.OperationalError, match="refused"):  # no server for a new one
            await sink.write(batch(two))
        postgresql.start()
    await sink.write(batch(two))  # on a new connection
    await sink.write(batch(three))
    await sink.close()
    assert ids_in(postgresql) == sorted(e.id for e in one + two + three)
    assert sink.duplicates == 0


@pytest_twisted.ensureDeferred
async def test_a_statement_gives_up_before_the_write_timeout(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    sink = make_sink(postgresql.dsn, tmp_path, write_timeout=2)
    await sink.open()
    locker = postgresql.connect(autocommit=False)
    locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
        await sink.write(batch(make_events(3)))
    assert 0.9 < time.monotonic() - started < 2.0  # half the write_timeout
    locker.rollback()
    locker.close()
    events = make_events(3, 3)
    await sink.write(batch(events))
    await sink.close()
    assert ids_in(postgresql) == sorted(e.id for e in events)


@pytest_twisted.ensureDeferred
async def test_timescaledb_without_the_extension_says_so_and_a_plain_table_works(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    lines = Lines()
    sink = make_sink(postgresql.dsn, tmp_path, lines, timescaledb=True)
    await sink.open()
    events = make_events(4)
    await sink.write(batch(events))
    await sink.write(batch(events))
    await sink.close()
    assert (
        "sink pg: timescaledb: true, but the server has no TimescaleDB extension; "
        "events go to table events as a plain table"
    ) in lines.text()
    assert ids_in(postgresql) == sorted(e.id for e in events) and sink.duplicates == 4
    with postgresql.connect() as conn:  # the key a hypertable needs, ready for the extension
        key = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'events_pkey'"
        ).fetchone()
    assert key is not None and key[0].endswith("(id, ts)")


# --- the runner: a stream across a server restart ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stream_across_a_server_restart_is_stored_exactly_once(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    """~500 events/s for ~10 s through the real pipeline, queue and runner; the server restarts
    half-way. Every event ends in the table once, and the runner counted each delivered."""
    store = QueueStore(tmp_path, reactor)
    store.start()
    config = PostgresqlSink.Config(
        type="postgresql",
        dsn=postgresql.dsn,
        batch_size=200,
        write_timeout=5,
        retry_initial=0.05,
        retry_max=0.5,
        replay_rate=None,
    )
    queue = store.queue("pg", max_bytes=1 << 30, max_age=3600, overflow="drop_oldest")
    lines = Lines()
    log = Logger(namespace="test.pg", observer=lines)
    sink = PostgresqlSink("pg", config, SinkContext("pg", "edge-01", reactor, tmp_path, log))
    runner = SinkRunner(sink, queue, config, reactor, log=log)
    pipeline = Pipeline([RouteConfig(sinks=["pg"])], {"pg": queue}, {"pg": runner})
    runner.start()
    emitted: list[Event] = []
    durable: list[defer.Deferred] = []
    restarted: defer.Deferred | None = None
    try:
        await wait_until(lambda: runner.state == "ok", timeout=10)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 10:
            for event in make_events(int(500 * elapsed) - len(emitted), start=len(emitted)):
                emitted.append(event)
                durable.append(pipeline.emit(event))
            if restarted is None and elapsed >= 5:
                assert runner.delivered > 1000  # it was writing all along
                restarted = threads.deferToThread(postgresql.restart)
            await sleep(0.02)
        await defer.gatherResults(durable)
        await restarted
        await wait_until(lambda: runner.delivered >= len(emitted), timeout=20)
    finally:
        await runner.stop()
        await store.stop()
    ids = ids_in(postgresql)
    assert len(emitted) >= 4500
    assert ids == sorted(e.id for e in emitted)  # every event, each once (the key says so)
    assert runner.delivered == len(emitted) and queue.depth == 0
    assert runner.failures >= 1 and "write failed" in lines.text()
    assert "ok again after" in lines.text()
