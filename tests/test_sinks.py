"""The built-in sinks: sqlite (idempotent rows), jsonl (fsync, rotation), stdout (JSON lines)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import Logger

from gatewayd.delivery import EventBatch
from gatewayd.events import Event
from gatewayd.registry import SINK_GROUP, load
from gatewayd.schema import SinkConfig
from gatewayd.sinks.base import BlockingSink, SinkBusy, SinkContext
from gatewayd.sinks.jsonl import JsonlSink
from gatewayd.sinks.sqlite import SqliteSink
from gatewayd.sinks.stdout import StdoutSink


def make_events(count: int, start: int = 0) -> list[Event]:
    return [
        Event(
            type="lend.succeeded" if n % 2 else "device.online",
            device=f"86000000000000{n % 3}",
            data={"slot": n, "name": "Grüße", "ok": True},
            raw=None if n % 3 else f"{n:04x}",
            gateway="edge-01",
            plugin="cabinets",
            protocol="powerbank",
        )
        for n in range(start, start + count)
    ]


def context(state_dir: Path, name: str = "s") -> SinkContext:
    return SinkContext(name, "edge-01", reactor, state_dir, Logger())


def table(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


def as_row(e: Event) -> tuple:
    data = json.dumps(e.data, separators=(",", ":"), ensure_ascii=False)
    return (e.id, e.ts, e.gateway, e.plugin, e.protocol, e.device, e.type, data, e.raw)


def test_entry_points_name_the_builtin_sinks() -> None:
    assert load(SINK_GROUP, "sqlite") is SqliteSink
    assert load(SINK_GROUP, "jsonl") is JsonlSink
    assert load(SINK_GROUP, "stdout") is StdoutSink


def test_configs_refuse_unknown_keys_and_keep_the_queue_keys() -> None:
    config = JsonlSink.Config(type="jsonl", rotate_bytes="1MiB", keep=2, overflow="drop_newest")
    assert (config.rotate_bytes, config.keep, config.overflow) == (1 << 20, 2, "drop_newest")
    with pytest.raises(ValueError, match="extra"):
        SqliteSink.Config(type="sqlite", paht="x.db")


@pytest.mark.parametrize("as_batch", [False, True], ids=["events", "payloads"])
@pytest_twisted.ensureDeferred
async def test_sqlite_rows_and_idempotent_replays(tmp_path: Path, as_batch: bool) -> None:
    sink = SqliteSink("store", SqliteSink.Config(type="sqlite"), context(tmp_path))
    events = make_events(6)

    def batch(items: list[Event]):
        return EventBatch([e.to_json() for e in items]) if as_batch else items

    await sink.open()
    try:
        await sink.write(batch(events[:4]))
        await sink.write(batch(events[2:]))  # replay after a crash: 2 already written
        await sink.write(batch([events[0]]))
    finally:
        await sink.close()
    assert table(tmp_path / "events.db") == [as_row(e) for e in events]
    assert sink.duplicates == 3
    conn = sqlite3.connect(tmp_path / "events.db")
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
    assert {"events_ts", "events_device", "events_type"} <= indexes
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_retention_deletes_events_older_than_it(tmp_path: Path) -> None:
    config = SqliteSink.Config(type="sqlite", retention="1d")
    sink = SqliteSink("store", config, context(tmp_path))
    old, recent = make_events(3), make_events(2, start=3)
    for event in old:
        event.ts = "2020-01-01T00:00:00.000000+00:00"
    await sink.open()
    try:
        await sink.write(old + recent)  # the first write also expires
    finally:
        await sink.close()
    assert table(tmp_path / "events.db") == sorted(as_row(e) for e in recent)
    assert sink.expired == 3
    with pytest.raises(ValueError, match="more than 0"):
        SqliteSink.Config(type="sqlite", retention=0)


@pytest_twisted.ensureDeferred
async def test_a_failing_retention_run_does_not_fail_the_committed_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = SqliteSink("store", SqliteSink.Config(type="sqlite", retention="1d"), context(tmp_path))

    def locked(now=None):
        raise sqlite3.OperationalError("database is locked")

    await sink.open()
    try:
        monkeypatch.setattr(sink, "expire_blocking", locked)
        await sink.write(make_events(2))  # no exception: the batch is in
    finally:
        await sink.close()
    assert len(table(tmp_path / "events.db")) == 2
    assert sink.expiry_error == "database is locked"


@pytest_twisted.ensureDeferred
async def test_a_retention_longer_than_the_epoch_deletes_nothing(tmp_path: Path) -> None:
    config = SqliteSink.Config(type="sqlite", retention="1000000d")
    sink = SqliteSink("store", config, context(tmp_path))
    await sink.open()
    try:
        await sink.write(make_events(2))
        await sink.write(make_events(1, start=2))
    finally:
        await sink.close()
    assert len(table(tmp_path / "events.db")) == 3 and sink.expiry_error is None


def test_a_write_before_open_does_not_wedge_the_sink(tmp_path: Path) -> None:
    sink = _StuckSink("stuck", SinkConfig(type="stuck"), context(tmp_path))
    with pytest.raises(AttributeError):
        sink.write(make_events(1))
    assert sink._write_running is False


@pytest_twisted.ensureDeferred
async def test_sqlite_retention_keeps_up_while_batches_come_back_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gatewayd.sinks.sqlite.EXPIRY_BATCH", 2)
    sink = SqliteSink("store", SqliteSink.Config(type="sqlite", retention="1d"), context(tmp_path))
    old = make_events(5)
    for event in old:
        event.ts = "2020-01-01T00:00:00.000000+00:00"
    await sink.open()
    try:
        await sink.write(old)
        assert sink.expired == 2
        for n, expected in ((10, 4), (11, 5), (12, 5)):  # 2 and 2 more, 1 more, then a pause
            await sink.write(make_events(1, start=n))
            assert sink.expired == expected
    finally:
        await sink.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_keeps_nul_characters_whole(tmp_path: Path) -> None:
    """SQLite's json_extract ends a string at a NUL; such events are taken apart in Python."""
    sink = SqliteSink("store", SqliteSink.Config(type="sqlite"), context(tmp_path))
    events = make_events(3)
    events[1].raw = "\x00\x01\x02\xff\xfe"
    events[2].data = {"text": "ab\x00cd"}
    await sink.open()
    try:
        await sink.write(EventBatch([e.to_json() for e in events]))
        await sink.write(EventBatch([events[1].to_json()]))  # a replay: still a duplicate
    finally:
        await sink.close()
    assert table(tmp_path / "events.db") == [as_row(e) for e in events]
    assert sink.duplicates == 1
    with sqlite3.connect(tmp_path / "events.db") as conn:  # the batch's order is kept
        ids = [row[0] for row in conn.execute("SELECT id FROM events ORDER BY rowid")]
    assert ids == [e.id for e in events]


@pytest_twisted.ensureDeferred
async def test_sqlite_skips_entries_that_are_not_events(tmp_path: Path) -> None:
    sink = SqliteSink("store", SqliteSink.Config(type="sqlite", path="sub/x.db"), context(tmp_path))
    good = make_events(2)
    batch = EventBatch([good[0].to_json(), "not json", '{"data": {}}', good[1].to_json()])
    await sink.open()
    try:
        await sink.write(batch)
    finally:
        await sink.close()
    assert table(tmp_path / "sub" / "x.db") == [as_row(e) for e in good]
    assert (sink.duplicates, len(batch.invalid)) == (0, 2)


@pytest_twisted.ensureDeferred
async def test_sqlite_absolute_path_and_writes_off_the_reactor_thread(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "events.db"
    sink = SqliteSink(
        "store", SqliteSink.Config(type="sqlite", path=path), context(tmp_path / "sd")
    )
    threads = []
    original = sink.write_blocking

    def spy(events):
        threads.append(threading.current_thread())
        return original(events)

    sink.write_blocking = spy
    await sink.open()
    await sink.write(make_events(1))
    await sink.close()
    assert threads and threads[0] is not threading.main_thread()
    assert threads[0].name == "gatewayd-sink-store"
    assert len(table(path)) == 1


@pytest_twisted.ensureDeferred
async def test_jsonl_writes_lines_and_rotates_by_size(tmp_path: Path) -> None:
    events = make_events(40)
    line_size = max(len(e.to_json().encode()) + 1 for e in events)
    config = JsonlSink.Config(
        type="jsonl", path="out/events.jsonl", rotate_bytes=line_size * 7, keep=3
    )
    sink = JsonlSink("file", config, context(tmp_path))
    await sink.open()
    try:
        for start in range(0, 40, 6):
            chunk = events[start : start + 6]
            await sink.write(EventBatch([e.to_json() for e in chunk]) if start % 12 else chunk)
    finally:
        await sink.close()
    base = tmp_path / "out" / "events.jsonl"
    files = [base.with_name(f"events.jsonl.{n}") for n in (3, 2, 1)] + [base]
    assert all(f.exists() for f in files)
    assert not base.with_name("events.jsonl.4").exists()
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    written = [Event.from_json(line) for line in lines]
    assert written == events[-len(written) :]  # the newest, in order, the oldest rotated away
    assert len(written) >= 3 * 7 - 3
    for f in files:
        assert f.stat().st_size <= line_size * 7


@pytest_twisted.ensureDeferred
async def test_jsonl_keep_zero_and_partial_line_repair(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"cut short by a crash')
    events = make_events(5)
    size = max(len(e.to_json().encode()) + 1 for e in events)
    config = JsonlSink.Config(type="jsonl", path=path, rotate_bytes=size * 2 + 30, keep=0)
    sink = JsonlSink("file", config, context(tmp_path))
    await sink.open()
    await sink.write(events[:1])
    text = path.read_text(encoding="utf-8").splitlines()
    assert text[0] == '{"cut short by a crash' and Event.from_json(text[1]) == events[0]
    await sink.write(events[1:])
    await sink.close()
    kept = [Event.from_json(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert kept == events[-len(kept) :] and 1 <= len(kept) <= 2
    assert path.stat().st_size <= config.rotate_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]  # keep 0: no old files


@pytest.fixture
def loose_umask():
    """The usual shell umask (0022): files would be 0644 unless created private on purpose."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    """``relative path: permission bits`` of ``root``'s directories below it and its files."""
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in sorted(root.rglob("*"))
    }


@pytest_twisted.ensureDeferred
async def test_sqlite_creates_its_file_wal_shm_and_directories_private(
    tmp_path: Path, loose_umask: None
) -> None:
    state_dir = tmp_path / "state"
    config = SqliteSink.Config(type="sqlite", path="data/events.db")
    sink = SqliteSink("store", config, context(state_dir))
    await sink.open()
    try:
        await sink.write(make_events(3))
        modes = modes_under(tmp_path)  # while open: the -wal and -shm files exist
    finally:
        await sink.close()
    assert modes == {
        "state": 0o700,
        "state/data": 0o700,
        "state/data/events.db": 0o600,
        "state/data/events.db-shm": 0o600,
        "state/data/events.db-wal": 0o600,
    }


@pytest_twisted.ensureDeferred
async def test_jsonl_creates_its_files_and_directories_private(
    tmp_path: Path, loose_umask: None
) -> None:
    events = make_events(10)
    line_size = max(len(e.to_json().encode()) + 1 for e in events)
    config = JsonlSink.Config(type="jsonl", path="out/e.jsonl", rotate_bytes=line_size * 3, keep=2)
    sink = JsonlSink("file", config, context(tmp_path / "state"))
    await sink.open()
    try:
        await sink.write(events)  # rotates: e.jsonl.1 and e.jsonl.2 too
    finally:
        await sink.close()
    assert modes_under(tmp_path) == {
        "state": 0o700,
        "state/out": 0o700,
        "state/out/e.jsonl": 0o600,
        "state/out/e.jsonl.1": 0o600,
        "state/out/e.jsonl.2": 0o600,
    }


def test_stdout_prints_one_json_event_per_line() -> None:
    sink = StdoutSink("out", StdoutSink.Config(type="stdout"), context(Path(".")))
    sink.stream = io.StringIO()
    events = make_events(3)
    sink.write(events[:2])
    sink.write(EventBatch([events[2].to_json()]))
    lines = sink.stream.getvalue().splitlines()
    assert [Event.from_json(line) for line in lines] == events
    assert lines[0] == events[0].to_json()


def test_stdout_pretty_and_default_stream(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink("out", StdoutSink.Config(type="stdout", pretty=True), context(Path(".")))
    event = make_events(1)[0]
    sink.write([event])
    out = capsys.readouterr().out
    assert out.count("\n") > 5 and json.loads(out) == event.to_dict()


class _StuckSink(BlockingSink):
    """write_blocking waits until the test lets it go."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.writes = 0

    def write_blocking(self, events) -> None:
        self.writes += 1
        self.release.wait(10)


@pytest_twisted.ensureDeferred
async def test_a_blocking_write_that_has_not_returned_is_not_queued_again(tmp_path: Path) -> None:
    sink = _StuckSink("stuck", SinkConfig(type="stuck"), context(tmp_path))
    await sink.open()
    try:
        first = sink.write(make_events(1))
        for _ in range(3):  # the delivery loop's retries after write_timeout
            with pytest.raises(SinkBusy, match="previous write has not returned"):
                await sink.write(make_events(1))
        sink.release.set()
        await first
        await sink.write(make_events(1))  # free again
        assert sink.writes == 2
    finally:
        sink.release.set()
        await sink.close()
