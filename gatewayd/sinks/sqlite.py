"""The ``sqlite`` sink: the embedded default store, one row per event in a local SQLite file.

Table ``events(id TEXT PRIMARY KEY, ts, gateway, plugin, protocol, device, type, data JSON,
raw)``, indexed on ts, device and type. Rows are inserted with ``INSERT OR IGNORE``: an event
delivered again after a crash (same ``id``) is skipped and counted in ``duplicates``, so replays
never duplicate rows. WAL mode lets other processes read while the gateway writes; each batch is
one transaction, ``synchronous`` as configured (``full`` by default: an acknowledged event is on
disk even after a power loss, since the queue deletes it once the sink acknowledged it).

``retention`` (a duration; default: keep everything) deletes events older than that, in batches
of ``EXPIRY_BATCH`` rows after a write: at most once a minute, or after every write while a batch
comes back full, so it keeps up with any event rate (a sink that receives nothing deletes
nothing until its next write). The file stops growing at the size of one
retention period (SQLite reuses the freed pages).

Free pages go back to the filesystem (``gatewayd.queue.compact``): after a write, on the sink's
own thread, once free pages are more than a quarter of the file and more than 4 MiB (after
retention deleted an outage's worth, say), a bounded ``incremental_vacuum`` step gives up to
4 MiB back, one step a second at most, until none is left. A file made by an older version
(``auto_vacuum`` off) is converted by one VACUUM once its content is at most
``SinkCompactor.convert_max_bytes``; a bigger one is converted by hand (logged at open).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from gatewayd.events import Event, EventDecodeError, encode_json
from gatewayd.files import create_private_file
from gatewayd.queue.compact import INCREMENTAL, Compactor, auto_vacuum, prepare, space
from gatewayd.schema import LocalSinkConfig, PositiveDuration
from gatewayd.sinks.base import BlockingSink

__all__ = ["SqliteSink", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY NOT NULL,
    ts TEXT NOT NULL,
    gateway TEXT,
    plugin TEXT,
    protocol TEXT,
    device TEXT,
    type TEXT NOT NULL,
    data JSON,
    raw TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_device ON events (device);
CREATE INDEX IF NOT EXISTS events_type ON events (type);
"""

_INSERT = "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: The same row taken apart by SQLite's JSON functions from the queued text: no decoding in
#: Python. Text that is not JSON, or lacks id/ts/type, is skipped (OR IGNORE, NOT NULL).
_INSERT_JSON = """
INSERT OR IGNORE INTO events
SELECT json_extract(j, '$.id'), json_extract(j, '$.ts'), json_extract(j, '$.gateway'),
       json_extract(j, '$.plugin'), json_extract(j, '$.protocol'), json_extract(j, '$.device'),
       json_extract(j, '$.type'), json_extract(j, '$.data'), json_extract(j, '$.raw')
FROM (SELECT ? AS j) WHERE json_valid(j)
"""
_encode_data = encode_json
#: Old events go in batches (one short transaction each) so a first run on a big file is gentle.
_EXPIRE = "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE ts < ? LIMIT ?)"
EXPIRY_INTERVAL = 60.0
EXPIRY_BATCH = 10_000


class SinkCompactor(Compactor):
    """The sink's thresholds: a file of an older version is converted while its content is
    at most 64 MiB (one VACUUM of that takes about a second on the sink's thread, and needs as
    much free room again; delivery waits meanwhile, the reactor does not)."""

    convert_max_bytes = 64 * 1024 * 1024


class SqliteSink(BlockingSink):
    """Writes events into a SQLite table on the sink's own thread."""

    class Config(LocalSinkConfig):
        type: str = "sqlite"
        #: The database file; relative paths are relative to ``gateway.state_dir``.
        path: Path = Path("events.db")
        #: SQLite ``synchronous``: ``full`` survives power loss, ``normal`` a process crash.
        synchronous: Literal["full", "normal"] = "full"
        #: Delete events older than this (by ``ts``); null keeps every event.
        retention: PositiveDuration | None = None

    config: Config

    def open_blocking(self) -> None:
        self.close_blocking()  # an open retried after a timeout may find the file open
        self.path = self.resolve_path(self.config.path)
        create_private_file(self.path)  # 0600; SQLite gives its -wal and -shm the same mode
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            prepare(conn)  # a new file can give its free pages back
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA journal_size_limit=67108864")  # a WAL once large shrinks back
            conn.executescript(SCHEMA)
            self._note_old_file(conn)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        self._compactor = SinkCompactor()
        self._next_expiry = 0.0
        self.expired = 0
        self.expiry_error: str | None = None  # the last retention run's error, if it failed

    def write_blocking(self, events: Sequence[Event]) -> None:
        conn = self._conn
        assert conn is not None, "write before open"
        payloads = getattr(events, "payloads", None)
        if payloads is None:
            statement, rows = _INSERT, [_row(e) for e in events]
        elif any(_NUL_ESCAPE in payload for payload in payloads):
            # json_extract would cut strings at the NUL: this (rare) batch, in order, in Python.
            statement, rows = _INSERT, [row for p in payloads for row in _rows_of(p)]
        else:
            statement, rows = _INSERT_JSON, [(payload,) for payload in payloads]
        count = len(payloads) if payloads is not None else len(rows)
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(statement, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        ignored = count - (conn.total_changes - before)
        if self.config.retention is not None and time.monotonic() >= self._next_expiry:
            self._expire_after_write()
        self._compactor.step(conn, time.monotonic(), idle=True)
        if ignored and payloads is not None:
            # Rare (replays after a crash): tell duplicates from entries that are not events;
            # decoding the batch lists the latter in ``events.invalid`` for the delivery loop.
            len(events)
            ignored -= len(getattr(events, "invalid", ()))
        self.duplicates += ignored

    def _note_old_file(self, conn: sqlite3.Connection) -> None:
        """Log once at open when the file cannot give pages back until it is converted by hand."""
        if auto_vacuum(conn) == INCREMENTAL:
            return
        page_size, pages, free = space(conn)
        if (pages - free) * page_size <= SinkCompactor.convert_max_bytes:
            return  # converted by the compactor when pages are to be given back
        self.context.reactor.callFromThread(
            self.context.log.info,
            "sink {sink}: {path} was made without incremental vacuum; it gives free pages"
            " back once converted: sqlite3 {path} 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM'"
            " with the daemon stopped (needs free room the size of the file)",
            sink=self.name,
            path=str(self.path),
        )

    def _expire_after_write(self) -> None:
        """One retention run; it never fails the batch just committed. A full batch means more
        are due: again after the next write, else in a minute."""
        try:
            full = self.expire_blocking() >= EXPIRY_BATCH
        except Exception as exc:
            full = False
            if self.expiry_error is None:  # said once per run of failures
                self.context.reactor.callFromThread(
                    self.context.log.warn,
                    "sink {sink}: retention failed: {error}",
                    sink=self.name,
                    error=str(exc),
                )
            self.expiry_error = str(exc)
        else:
            self.expiry_error = None
        self._next_expiry = time.monotonic() + (0.0 if full else EXPIRY_INTERVAL)

    def expire_blocking(self, now: float | None = None) -> int:
        """Delete events older than ``retention`` (a bounded batch per call); returns how many."""
        conn = self._conn
        assert conn is not None and self.config.retention is not None
        cutoff = (now if now is not None else time.time()) - self.config.retention
        if cutoff <= 0:  # a retention longer than the epoch: nothing is that old
            return 0
        cutoff_text = datetime.fromtimestamp(cutoff, UTC).isoformat(timespec="microseconds")
        deleted = conn.execute(_EXPIRE, (cutoff_text, EXPIRY_BATCH)).rowcount
        self.expired += deleted
        return deleted

    def close_blocking(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            conn.close()


#: A NUL character as it appears in an event's JSON text.
_NUL_ESCAPE = "\\u0000"


def _rows_of(payload: str) -> list[tuple]:
    """The row of a queued event decoded in Python (none if it is not an event)."""
    try:
        return [_row(Event.from_json(payload))]
    except EventDecodeError:
        return []


def _row(e: Event) -> tuple:
    """The table row of an event."""
    return (
        e.id,
        e.ts,
        e.gateway,
        e.plugin,
        e.protocol,
        e.device,
        e.type,
        _encode_data(e.data),
        e.raw,
    )
