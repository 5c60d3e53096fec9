"""Request ids remembered durably, so that a repeated command is answered, not executed again.

A backend that retries a ``lend`` after a lost answer must not eject two power banks. Every
request with an id (the MQTT payload's ``id``, the HTTP ``Idempotency-Key``; one namespace for
both) goes through ``IdempotencyStore.once``:

1. A known id (within its window) is not executed again. Answered: its stored answer. Still
   running in this process: the repeat waits for the same answer. Started by an earlier run of
   the daemon that died (``kill -9``, power loss) before its answer was recorded: the outcome is
   unknown, so it is answered 500 ``outcome_unknown`` and still not executed (the device may
   have acted: check it, with a ``query`` for example, and send a new id). Used before for
   another command or other arguments: 422 ``id_reused`` (the record keeps a ``fingerprint``).
2. A new id is first checked (``check``: unknown command, plugin not running, expired); such a
   refusal is answered and not remembered, so the id may be sent again. Then it is recorded as
   *started*, durably (committed; fsynced with ``sync="full"``), and only then executed; its
   answer is recorded next. A crash between the two leaves it *started*: see 1.

Records live ``window`` seconds from their start (``commands.dedupe_window``; HTTP keys the
store's default; both 10 min by default); expired ones are deleted at most every
``purge_interval`` s, and beyond ``max_entries`` a new id is answered 429 ``too_many_requests``.
The file is ``<state_dir>/commands.db``: SQLite in WAL mode, created 0600. Reads come from memory
(every unexpired record is loaded at ``open``; commands are rare); writes run in order on the
store's own writer thread, so the reactor never waits on disk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.commands.dispatch import Refusal, error_body
from gatewayd.commands.writer import Writer
from gatewayd.files import create_private_file

__all__ = ["Attempt", "IdempotencyStore", "Record", "StoreError", "check_request_id", "fingerprint"]

log = Logger(namespace="gatewayd.commands.idempotency")

#: Longest request id accepted (characters).
REQUEST_ID_MAX = 200
#: Default window: how long an id is remembered from its start (seconds).
DEFAULT_WINDOW = 600.0

Answer = tuple[int, dict[str, Any]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    started REAL NOT NULL,
    expires REAL NOT NULL,
    status INTEGER,
    body TEXT
);
CREATE INDEX IF NOT EXISTS requests_expires ON requests (expires);
"""


def check_request_id(value: Any) -> str:
    """``value`` if it is a usable request id: a string of 1 to 200 printable characters;
    ValueError saying what is wrong otherwise."""
    if not isinstance(value, str) or not 1 <= len(value) <= REQUEST_ID_MAX:
        raise ValueError(f"must be a string of 1 to {REQUEST_ID_MAX} characters")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


def fingerprint(plugin: str, command: str, arguments: Any) -> str:
    """A hash of what a request asks for: the same id must always ask for the same."""
    text = json.dumps([plugin, command, arguments], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class StoreError(Exception):
    """The store could not record a request id durably (so the request was not executed)."""


@dataclass
class Record:
    """One remembered request: started at ``started``; answered once ``status`` is set."""

    request_id: str
    fingerprint: str
    started: float
    expires: float
    status: int | None = None
    body: dict[str, Any] | None = None

    @property
    def answered(self) -> bool:
        return self.status is not None


@dataclass
class Attempt:
    """What ``once`` did with a request.

    ``recorded`` fires once the request is durably recorded as started (or at once when it was
    a repeat or refused); it fails (``StoreError``) when it could not be recorded, so a caller
    that acknowledges its transport (an MQTT PUBACK) should not. ``answer`` fires with
    ``(status, body)`` and never fails. ``repeat`` is True when the id was known. Consume a
    failure of ``recorded`` (an errback) even when it does not matter to you.
    """

    recorded: defer.Deferred
    answer: defer.Deferred
    repeat: bool


class IdempotencyStore:
    """The durable record of request ids; ``open()`` before use, ``close()`` at the end.

    ``reactor`` runs the writer thread's results (``callFromThread``); ``clock`` (default: the
    reactor) gives the time, wall-clock seconds since they are kept in the file across restarts
    (a test passes a ``Clock`` set to a realistic time). ``window`` is the default lifetime of
    a record, ``sync`` SQLite's ``synchronous`` (``full``: a record survives a power loss).
    """

    purge_interval = 60.0

    def __init__(
        self,
        path: str | Path,
        reactor: Any,
        *,
        window: float = DEFAULT_WINDOW,
        sync: Literal["full", "normal"] = "full",
        max_entries: int = 100_000,
        clock: Any = None,
    ) -> None:
        self.path = Path(path)
        self.reactor = reactor  # results of the writer thread come back through it
        self.clock = clock or reactor  # seconds(): wall time, kept in the file across restarts
        self.window = window
        self.sync = sync
        self.max_entries = max_entries
        self.records: dict[str, Record] = {}
        self.error: str | None = "not open"  # why ids cannot be recorded (None: they can)
        self.repeats = 0  # requests answered from the record
        self.unknown_outcomes = 0  # repeats of requests a crash left started
        self.write_failures = 0
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._next_purge = 0.0
        self._conn: sqlite3.Connection | None = None
        self._writer: Writer | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> defer.Deferred:
        """Open (create) the file on the writer thread and load the unexpired records; fires
        when done. A file that cannot be opened is logged and leaves ``error`` set: requests
        with an id are then answered 503, requests without one are not affected."""
        self._writer = Writer(self.reactor, "gatewayd-commands")
        d = self._writer.call(self._open_blocking, self.clock.seconds())
        d.addCallbacks(self._opened, self._open_failed)
        return d

    def _open_blocking(self, now: float) -> list[tuple[Any, ...]]:
        create_private_file(self.path)  # 0600 (and -wal/-shm after it) whatever the umask
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL needed")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            conn.execute("DELETE FROM requests WHERE expires <= ?", (now,))
            rows = conn.execute(
                "SELECT id, fingerprint, started, expires, status, body FROM requests"
            ).fetchall()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return rows

    def _opened(self, rows: list[tuple[Any, ...]]) -> None:
        for request_id, print_, started, expires, status, body in rows:
            loaded = json.loads(body) if body is not None else None
            self.records[request_id] = Record(request_id, print_, started, expires, status, loaded)
        self.error = None
        self._next_purge = self.clock.seconds() + self.purge_interval
        unanswered = sum(1 for r in self.records.values() if not r.answered)
        if unanswered:
            log.warn(
                "{count} command requests were started but not answered before the daemon "
                "stopped; a repeat of one is answered 500 outcome_unknown, not executed again",
                count=unanswered,
            )

    def _open_failed(self, failure: Failure) -> None:
        self.error = f"cannot open {self.path}: {failure.getErrorMessage()}"
        log.error("command request ids cannot be recorded: {error}", error=self.error)

    def close(self) -> defer.Deferred:
        """Finish the writes already asked for, close the file and end the thread."""
        writer, self._writer = self._writer, None
        self.error = "closed"
        if writer is None:
            return defer.succeed(None)
        d = writer.call(self._close_blocking)
        writer.stop()
        return d

    def _close_blocking(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- reading ---------------------------------------------------------------------------

    def get(self, request_id: str) -> Record | None:
        """The record of ``request_id`` if it is remembered and not expired."""
        record = self.records.get(request_id)
        if record is None:
            return None
        if record.expires <= self.clock.seconds() and request_id not in self._inflight:
            return None  # (one still running stays known: its repeats wait for its answer)
        return record

    # --- once ------------------------------------------------------------------------------

    def once(
        self,
        request_id: str,
        print_: str,
        run: Callable[[], defer.Deferred],
        *,
        check: Callable[[], Answer | None] | None = None,
        window: float | None = None,
    ) -> Attempt:
        """Run ``run()`` (a Deferred of ``(status, body)``, failing with ``Refusal`` when it did
        not execute) at most once for ``request_id``; see the module docstring.

        ``print_`` is the request's ``fingerprint``; ``check()`` is called for a new id only
        and returns a refusal answer (not remembered) or None; ``window`` defaults to the
        store's.
        """
        now = self.clock.seconds()
        if now >= self._next_purge:
            self._purge(now)
        known = self.get(request_id)
        if known is not None:
            return Attempt(defer.succeed(None), self._repeat(known, print_), True)
        refusal = (check() if check is not None else None) or self._full()
        if refusal is not None:
            return Attempt(defer.succeed(None), defer.succeed(refusal), False)
        record = Record(request_id, print_, now, now + (window or self.window))
        self.records[request_id] = record
        self._inflight[request_id] = []
        recorded = self._write(
            "INSERT OR REPLACE INTO requests (id, fingerprint, started, expires) VALUES (?,?,?,?)",
            (request_id, print_, record.started, record.expires),
        )
        answer: defer.Deferred = defer.Deferred()
        durable: defer.Deferred = defer.Deferred()

        def recorded_(_: Any) -> None:
            self._execute(record, run, answer)
            durable.callback(None)  # the caller may acknowledge its transport now

        def not_recorded(failure: Failure) -> None:
            durable.errback(StoreError(failure.getErrorMessage()))
            self._not_recorded(record, failure, answer)

        recorded.addCallbacks(recorded_, not_recorded)
        return Attempt(durable, answer, False)

    def _full(self) -> Answer | None:
        """503 while ids cannot be recorded, 429 while ``max_entries`` are remembered."""
        if self.error is not None:
            return 503, error_body("unavailable", f"request ids cannot be recorded: {self.error}")
        if len(self.records) >= self.max_entries:
            message = f"{self.max_entries} request ids are remembered already; try again later"
            return 429, error_body("too_many_requests", message)
        return None

    def _repeat(self, record: Record, print_: str) -> defer.Deferred:
        if record.fingerprint != print_:
            message = (
                f"request id {record.request_id!r} was used for another command or other "
                "arguments; use a new id for a new request"
            )
            return defer.succeed((422, error_body("id_reused", message)))
        self.repeats += 1
        if record.answered:
            return defer.succeed((record.status, record.body))
        waiters = self._inflight.get(record.request_id)
        if waiters is not None:  # still running in this process: the same answer, when it comes
            waiting: defer.Deferred = defer.Deferred()
            waiters.append(waiting)
            return waiting
        self.unknown_outcomes += 1
        message = (
            f"request {record.request_id!r} was started but the daemon stopped before its "
            "outcome was recorded; it is not executed again: check the device's state and "
            "send a new request id"
        )
        return defer.succeed((500, error_body("outcome_unknown", message)))

    def _execute(self, record: Record, run: Callable[[], defer.Deferred], answer: Any) -> None:
        d = defer.maybeDeferred(run)
        d.addCallbacks(self._answered, self._run_failed, (record,), None, (record,), None)
        d.addCallback(lambda outcome: self._settle(record, outcome, answer))

    def _answered(self, outcome: Answer, record: Record) -> Answer:
        record.status, record.body = outcome
        self._write(
            "UPDATE requests SET status = ?, body = ? WHERE id = ?",
            (record.status, json.dumps(record.body, ensure_ascii=False), record.request_id),
        ).addErrback(self._write_failed, record)
        return outcome

    def _run_failed(self, failure: Failure, record: Record) -> Answer:
        if failure.check(Refusal):  # not executed after all (the plugin stopped meanwhile)
            self._drop(record)
            return failure.value.answer()
        log.failure("command request {id} failed", failure, id=record.request_id)
        return self._answered(
            (500, error_body("internal", "the command failed; see the log")), record
        )

    def _not_recorded(self, record: Record, failure: Failure, answer: defer.Deferred) -> None:
        self.write_failures += 1
        self._drop(record, on_disk=False)
        log.error(
            "command request {id} not executed: it could not be recorded: {error}",
            id=record.request_id,
            error=failure.getErrorMessage(),
        )
        message = (
            f"the request id could not be recorded ({failure.getErrorMessage()}); not executed"
        )
        self._settle(record, (503, error_body("unavailable", message)), answer)

    def _settle(self, record: Record, outcome: Answer, answer: defer.Deferred) -> None:
        for waiting in self._inflight.pop(record.request_id, []):
            waiting.callback(outcome)
        answer.callback(outcome)

    def _drop(self, record: Record, on_disk: bool = True) -> None:
        if self.records.get(record.request_id) is record:
            del self.records[record.request_id]
        if on_disk:
            self._write("DELETE FROM requests WHERE id = ?", (record.request_id,)).addErrback(
                self._write_failed, record
            )

    def _write_failed(self, failure: Failure, record: Record) -> None:
        self.write_failures += 1
        log.error(
            "command request {id}: its record could not be updated: {error}",
            id=record.request_id,
            error=failure.getErrorMessage(),
        )

    # --- writing ---------------------------------------------------------------------------

    def _write(self, sql: str, parameters: tuple[Any, ...]) -> defer.Deferred:
        if self._writer is None:
            return defer.fail(StoreError("the request id store is closed"))
        return self._writer.call(self._write_blocking, sql, parameters)

    def _write_blocking(self, sql: str, parameters: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise StoreError(f"{self.path} is not open")
        try:
            self._conn.execute(sql, parameters)  # autocommit: one durable transaction
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    def _purge(self, now: float) -> None:
        """Forget expired records (not those still running), in memory and on disk."""
        self._next_purge = now + self.purge_interval
        expired = [
            key
            for key, record in self.records.items()
            if record.expires <= now and key not in self._inflight
        ]
        for key in expired:
            del self.records[key]
        if expired:
            deleted = self._write("DELETE FROM requests WHERE expires <= ?", (now,))
            deleted.addErrback(lambda f: log.warn("cannot delete expired requests: {f}", f=f))
