"""The sqlite sink's file shrinks after retention removed most of its rows (the sink's thread
gives free pages back in bounded steps, ``gatewayd.queue.compact``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import Logger

from gatewayd.events import Event
from gatewayd.queue.compact import INCREMENTAL, Compactor
from gatewayd.sinks.base import SinkContext
from gatewayd.sinks.sqlite import SqliteSink

MIB = 1024 * 1024


def events(count: int, ts: str | None = None) -> list[Event]:
    made = [
        Event(type="meter.reading", device=f"m{n % 50}", data={"pad": "p" * 900})
        for n in range(count)
    ]
    for event in made:
        if ts is not None:
            event.ts = ts
    return made


def on_disk(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def sink(tmp_path: Path, **config: object) -> SqliteSink:
    context = SinkContext("store", "gw", reactor, tmp_path, Logger())
    return SqliteSink("store", SqliteSink.Config(type="sqlite", **config), context)


@pytest_twisted.ensureDeferred
async def test_the_file_shrinks_after_retention_removed_most_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Compactor, "interval", 0.0)  # a step after every write
    path = tmp_path / "events.db"
    keeper = sink(tmp_path)  # no retention: an outage's worth of old events piles up
    await keeper.open()
    try:
        for _ in range(10):
            await keeper.write(events(2000, ts="2020-01-01T00:00:00.000000+00:00"))
    finally:
        await keeper.close()
    peak = on_disk(path)
    assert peak > 20 * MIB
    store = sink(tmp_path, retention="1d")
    await store.open()
    try:
        for _ in range(12):  # 10,000 old rows expire per write; then the steps go on
            await store.write(events(10))
        assert store.expired == 20_000
    finally:
        await store.close()
    assert on_disk(path) < peak // 4
    compactor = store._compactor
    assert compactor.returned_bytes > 15 * MIB and compactor.error is None
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 120
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == INCREMENTAL
    conn.close()
