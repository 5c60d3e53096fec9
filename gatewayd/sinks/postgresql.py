"""The ``postgresql`` sink: one row per event in a PostgreSQL (or TimescaleDB) table.

Columns as the sqlite sink's, typed: ``id text`` (primary key), ``ts timestamptz``, ``gateway``,
``plugin``, ``protocol``, ``device``, ``type``, ``data jsonb``, ``raw``; indexed on ts, device
and type. ``create_table`` creates a missing table; ``timescaledb`` makes it a hypertable on
``ts`` (its key is then ``(id, ts)``: TimescaleDB wants the time column in every unique key).

A batch is one transaction. Its rows are parsed once from the queued JSON texts (orjson) and
COPY-ed straight into the table: the fast path, about as fast as a bare COPY. A replayed batch
(the daemon died before the queue recorded its delivery) breaks the primary key; that
transaction is rolled back and the batch goes through a temporary table and ``INSERT ... ON
CONFLICT DO NOTHING``, the rows already there counted in ``duplicates``. A row PostgreSQL
refuses (a ``ts`` it cannot read) is left out and reported, so it cannot block the queue.

The connection is made on the sink's thread and made again by the next write after it broke
(server restart, network): a failed write is retried by the core with backoff. Timeouts follow
``write_timeout``: connecting, each statement and unanswered TCP all give up well before it.
The password (``password``/``password_file``, inside ``dsn``, or libpq's ``PGPASSWORD`` and
``.pgpass``) never appears in a log line or error: messages show the DSN without it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ValidationInfo, field_validator

from gatewayd.events import Event, encode_json
from gatewayd.schema import Secret, SinkConfig
from gatewayd.sinks.base import BlockingSink

__all__ = ["PostgresqlSink", "COLUMNS"]

COLUMNS = ("id", "ts", "gateway", "plugin", "protocol", "device", "type", "data", "raw")
_TABLE_NAME = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_]{0,62})\.)?([A-Za-z_][A-Za-z0-9_]{0,54})")
_REDACTED = "**********"
_TS = "timescaledb"  # the extension
#: A NUL character as it appears in an event's JSON text (PostgreSQL text cannot hold one).
_NUL_ESCAPE = "\\u0000"

_CREATE = """
CREATE TABLE {table} (
    id text NOT NULL,
    ts timestamptz NOT NULL,
    gateway text,
    plugin text,
    protocol text,
    device text,
    type text NOT NULL,
    data jsonb,
    raw text,
    PRIMARY KEY ({key})
)"""
#: Is there a unique index (not partial) on ``id`` alone, or on ``id`` and ``ts``?
_HAS_ID_KEY = """
SELECT EXISTS (
    SELECT FROM pg_index i
    WHERE i.indrelid = %(table)s::regclass AND i.indisunique AND i.indpred IS NULL
      AND (SELECT array_agg(a.attname::text) FROM pg_attribute a
           WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) <@ ARRAY['id', 'ts']
      AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = i.indrelid
                  AND a.attnum = ANY (i.indkey) AND a.attname = 'id'))"""


class PostgresqlSink(BlockingSink):
    """Writes events into a PostgreSQL table with COPY, on the sink's own thread."""

    class Config(SinkConfig):
        type: str = "postgresql"
        #: libpq connection string (``host=db.example port=5432 dbname=iot user=gatewayd``) or
        #: URI (``postgresql://gatewayd@db.example/iot``); empty: libpq's PG* variables.
        dsn: str
        #: Give it as ``password_file: PATH``; else libpq's PGPASSWORD or ``~/.pgpass`` apply.
        password: Secret | None = None
        #: The table, ``name`` or ``schema.name``; used as written (case included).
        table: str = "events"
        #: Create the table and its indexes when it does not exist.
        create_table: bool = True
        #: Make the table a TimescaleDB hypertable on ``ts`` when the extension is there.
        timescaledb: bool = False

        @field_validator("dsn")
        @classmethod
        def _parses(cls, value: str) -> str:
            """A DSN libpq cannot parse is a config error; its text (a password?) is not shown."""
            try:
                conninfo_to_dict(value)
            except psycopg.ProgrammingError as exc:
                reason = re.sub(r'after "[^"]*"', "after a word", str(exc).strip())
                raise ValueError(f"not a libpq connection string or URI: {reason}") from None
            return value

        @field_validator("table")
        @classmethod
        def _identifier(cls, value: str) -> str:
            if not _TABLE_NAME.fullmatch(value):
                raise ValueError(
                    "expected a table name such as events or iot.events: letters, digits and "
                    f"_, not starting with a digit, at most 55 characters; got {value!r}"
                )
            return value

        @field_validator("password")
        @classmethod
        def _one_password(cls, value: Any, info: ValidationInfo) -> Any:
            if value is not None and "password" in conninfo_to_dict(info.data.get("dsn") or ""):
                raise ValueError("dsn holds a password already: give it in one place only")
            return value

    config: Config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self._conn: psycopg.Connection | None = None
        params = conninfo_to_dict(config.dsn)
        self._secrets = [s for s in (params.get("password"), _secret(config.password)) if s]
        shown = {key: value for key, value in params.items() if key != "password"}
        #: The DSN as it may be shown: without its password.
        self.target = make_conninfo(**shown) or "libpq defaults"
        timeout = config.write_timeout
        defaults = {
            "connect_timeout": max(2, min(10, int(timeout / 3))),
            "application_name": f"gatewayd-{self.name}"[:63],
            "keepalives": 1,
            "keepalives_idle": max(1, int(timeout / 3)),
            "keepalives_interval": max(1, int(timeout / 10)),
            "keepalives_count": 3,
            "tcp_user_timeout": int(timeout * 500),  # ms: unacknowledged data, half the budget
        }
        self._connect_args = {k: v for k, v in defaults.items() if k not in params}
        if config.password is not None:
            self._connect_args["password"] = config.password.get_secret_value()
        self._statement_timeout = f"{max(1, int(timeout * 500))}ms"
        schema, _, name = config.table.rpartition(".")
        self._name = name
        self._table = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        self._copy = sql.SQL("COPY {} ({}) FROM STDIN").format(self._table, columns)
        self._copy_replay = sql.SQL("COPY gatewayd_replay ({}) FROM STDIN").format(columns)
        self._insert_replay = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM gatewayd_replay ON CONFLICT DO NOTHING"
        ).format(self._table, columns, columns)
        values = sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
        self._insert_one = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING")
        self._insert_one = self._insert_one.format(self._table, columns, values)
        self.rejected = 0  # rows PostgreSQL refused (left out, reported)

    # --- lifecycle (the sink's thread) -----------------------------------------------------------

    def open_blocking(self) -> None:
        self.close_blocking()  # an open retried after a timeout may find a connection
        try:
            conn = self._connection()
            self._prepare_table(conn)
            conn.commit()
        except psycopg.Error as exc:
            raise self._failed(exc) from None
        self._say("info", "sink {sink}: writing to table {table} at {target}")

    def write_blocking(self, events: Sequence[Event]) -> None:
        rows = self._rows(events)
        try:
            conn = self._connection()
            try:
                try:
                    self._copy_rows(conn, self._copy, rows)
                    conn.commit()
                    written = len(rows)
                except psycopg.errors.UniqueViolation:  # a replay: some rows are there already
                    conn.rollback()
                    written = self._insert_new(conn, rows)
            except psycopg.DataError:  # a row PostgreSQL cannot take: find it
                conn.rollback()
                written = self._insert_one_by_one(conn, rows, events)
        except psycopg.Error as exc:
            raise self._failed(exc) from None
        self.duplicates += len(rows) - written - self._rejected_now

    def close_blocking(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- helpers -------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        """The open connection, or a new one (after a failure dropped the last)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(self.config.dsn, **self._connect_args)
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false), "
                "set_config('TimeZone', 'UTC', false)",
                [self._statement_timeout],
            )
            conn.commit()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _prepare_table(self, conn: psycopg.Connection) -> None:
        """Create the table (and hypertable) if asked; check that it exists and has a key."""
        quoted = self._table.as_string(conn)
        if _value(conn, "SELECT to_regclass(%s)", [quoted]) is None:
            if not self.config.create_table:
                raise psycopg.ProgrammingError(
                    f"table {self.config.table} does not exist (and create_table is false)"
                )
            key = sql.SQL("id, ts" if self.config.timescaledb else "id")
            conn.execute(sql.SQL(_CREATE).format(table=self._table, key=key))
            for column in ("ts", "device", "type"):
                index = sql.Identifier(f"{self._name}_{column}")
                conn.execute(
                    sql.SQL("CREATE INDEX {} ON {} ({})").format(
                        index, self._table, sql.Identifier(column)
                    )
                )
            self._say("info", "sink {sink}: created table {table}")
        if self.config.timescaledb:
            self._make_hypertable(conn, quoted)
        if not _value(conn, _HAS_ID_KEY, {"table": quoted}):
            self._say(
                "warn",
                "sink {sink}: table {table} has no primary key or unique index on id: "
                "a batch replayed after a crash will be stored twice",
            )

    def _make_hypertable(self, conn: psycopg.Connection, quoted: str) -> None:
        """Turn the table into a hypertable, or say why not (the plain table works as well)."""
        if not _value(conn, "SELECT count(*) FROM pg_available_extensions WHERE name = %s", [_TS]):
            self._say(
                "warn",
                "sink {sink}: timescaledb: true, but the server has no TimescaleDB extension; "
                "events go to table {table} as a plain table",
            )
            return
        conn.execute("SAVEPOINT gatewayd_hypertable")  # a refusal leaves the table as it is
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            conn.execute(
                "SELECT create_hypertable(%s::regclass, 'ts', "
                "if_not_exists => TRUE, migrate_data => TRUE)",
                [quoted],
            )
        except psycopg.Error as exc:
            conn.execute("ROLLBACK TO SAVEPOINT gatewayd_hypertable")
            self._say(
                "warn",
                "sink {sink}: timescaledb: true, but table {table} is not a hypertable "
                "({reason}); events go to it as a plain table",
                reason=self._redact(str(exc).strip()),
            )
        else:
            self._say("info", "sink {sink}: table {table} is a TimescaleDB hypertable on ts")

    def _rows(self, events: Sequence[Event]) -> list[tuple]:
        """The batch's rows: parsed from the queued texts, else (rare) from decoded events."""
        self._rejected_now = 0
        payloads = getattr(events, "payloads", None)
        if payloads is not None and not any(_NUL_ESCAPE in p for p in payloads):
            rows = _rows_of(payloads)
            if rows is not None:
                return rows
        # Entries that are not events (listed in ``events.invalid`` by decoding), or NULs.
        return [_row(e) for e in events]

    @staticmethod
    def _copy_rows(conn: psycopg.Connection, statement: sql.Composed, rows: list[tuple]) -> None:
        with conn.cursor().copy(statement) as copy:
            write = copy.write_row
            for row in rows:
                write(row)

    def _insert_new(self, conn: psycopg.Connection, rows: list[tuple]) -> int:
        """Insert the rows not yet in the table, in one transaction; returns how many."""
        table = self._table
        conn.execute(
            sql.SQL("CREATE TEMP TABLE gatewayd_replay (LIKE {}) ON COMMIT DROP").format(table)
        )
        self._copy_rows(conn, self._copy_replay, rows)
        inserted = conn.execute(self._insert_replay).rowcount
        conn.commit()
        return inserted

    def _insert_one_by_one(
        self, conn: psycopg.Connection, rows: list[tuple], events: Sequence[Event]
    ) -> int:
        """The batch a row at a time, in one transaction; rows PostgreSQL refuses are left out
        and reported."""
        inserted = 0
        refused: list[str] = []
        for row in rows:
            conn.execute("SAVEPOINT gatewayd_row")
            try:
                inserted += conn.execute(self._insert_one, row).rowcount
            except psycopg.DataError as exc:
                conn.execute("ROLLBACK TO SAVEPOINT gatewayd_row")
                reason = exc.diag.message_primary or str(exc).strip()
                refused.append(f"event {row[0]}: PostgreSQL refused it: {reason}")
        conn.commit()
        self._rejected_now = len(refused)
        self.rejected += len(refused)
        invalid = getattr(events, "invalid", None)
        if isinstance(invalid, list):
            invalid.extend(refused)  # the core counts and logs them as entries left out
        for reason in refused[:1] if isinstance(invalid, list) else refused:
            self._say("error", "sink {sink}: {reason}", reason=self._redact(reason))
        return inserted

    def _failed(self, exc: psycopg.Error) -> Exception:
        """Drop the connection (the next write makes a new one); the error, password-free."""
        self.close_blocking()
        message = str(exc).strip()
        redacted = self._redact(message)
        return exc if redacted == message else type(exc)(redacted)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    def _say(self, level: str, text: str, **fields: Any) -> None:
        """Log from the sink's thread through the reactor."""
        log = getattr(self.context.log, level)
        fields.setdefault("target", self.target)
        fields.setdefault("table", self.config.table)
        self.context.reactor.callFromThread(log, text, sink=self.name, **fields)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _value(conn: psycopg.Connection, query: Any, params: Any) -> Any:
    """The first column of the first row of a query (None without rows)."""
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _rows_of(payloads: Sequence[str]) -> list[tuple] | None:
    """Rows parsed from the queued JSON texts; None if one is not an event (the caller then
    decodes the batch the slow way, which names the bad entries)."""
    loads, dumps = orjson.loads, orjson.dumps
    rows = []
    append = rows.append
    try:
        for payload in payloads:
            event = loads(payload)
            id_, ts, type_ = event["id"], event["ts"], event["type"]
            if type(id_) is not str or type(ts) is not str or type(type_) is not str:
                return None
            data = event.get("data")
            append(
                (
                    id_,
                    ts,
                    event.get("gateway"),
                    event.get("plugin"),
                    event.get("protocol"),
                    event.get("device"),
                    type_,
                    dumps(data).decode() if data is not None else "{}",
                    event.get("raw"),
                )
            )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return rows


def _row(e: Event) -> tuple:
    """The table row of a decoded event; NUL characters (which PostgreSQL text and jsonb cannot
    hold) become U+FFFD."""
    row = (e.id, e.ts, e.gateway, e.plugin, e.protocol, e.device, e.type, e.data, e.raw)
    row = tuple(_without_nul(value) for value in row)
    return row[:7] + (encode_json(row[7]),) + row[8:]


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
