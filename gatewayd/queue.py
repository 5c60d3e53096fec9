"""Durable per-sink queues: one SQLite file (WAL) per sink, written by one thread with group commit.

Why: an event handed to a sink's queue must survive ``kill -9`` and a sink outage, yet the reactor
must never wait on disk. So ``put()`` only appends to an in-memory list and wakes the store's
writer thread; the thread commits everything put while its previous commit ran in one transaction
per queue file (group commit), then fires the ``put`` Deferreds on the reactor thread.

Queue file ``<directory>/<sink>.db``::

    queue(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, size INTEGER, payload TEXT)
    meta(key TEXT PRIMARY KEY, value)          -- 'handed': highest seq ever handed to the sink

``read_batch`` returns the oldest entries (or those after a given ``seq``, to read ahead) and
commits the highest ``seq`` handed out *before* the batch reaches the reactor; ``ack`` deletes up
to a ``seq`` (it can also travel with a read, in the same transaction). Entries that were handed
out but not acknowledged when the process died are counted as ``possible_duplicates`` when the
file is opened again (the sink may already have written them).

Bounds: ``max_bytes`` (sum of the payloads' UTF-8 sizes) and ``max_age`` (seconds since the entry
was committed). ``overflow: drop_oldest`` deletes the oldest entries to make room;
``drop_newest`` refuses new entries while the queue is full (their Deferred fires with a
``Refused``). ``max_age`` expiry applies under both policies. Entries handed to the sink and not
yet acknowledged (at most two batches: the one being written and the one read ahead) are never
dropped: the delivery loop is still working on them. Every drop is counted in
``DurableQueue.dropped`` and logged at most once per 10 s per queue.

Durability (``sync``): WAL with ``synchronous=full`` fsyncs the log at every commit, so a fired
``put`` survives a power loss; ``normal`` survives a process crash (``kill -9``) but the last
commits may be lost on a power loss or kernel crash. Either way the file stays consistent.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.dedupe import KeyMemory
from gatewayd.diskspace import Reserve, is_disk_full, size_bounds
from gatewayd.events import encode_json
from gatewayd.files import create_private_file
from gatewayd.logsetup import LogThrottle

__all__ = [
    "DROP_REASONS",
    "DurableQueue",
    "QueueClosed",
    "QueueError",
    "QueueStore",
    "Refused",
    "stranded_queues",
]

#: Keys of ``DurableQueue.dropped``.
DROP_REASONS = ("overflow_oldest", "overflow_newest", "max_age")
#: Seconds between two log lines about drops from one queue.
DROP_LOG_INTERVAL = 10.0

_SYNC_PRAGMA = {"full": "FULL", "normal": "NORMAL"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    size INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, expires REAL NOT NULL);
"""

#: A batch of payloads as one JSON array, inserted in array order by a single statement.
_INSERT_BATCH = (
    "INSERT INTO queue (ts, size, payload)"
    " SELECT ?1, length(CAST(value AS BLOB)), value FROM json_each(?2) ORDER BY key"
)
#: Keys of this round's keyed puts that the file already holds (and that have not expired).
_KNOWN_KEYS = "SELECT key FROM keys WHERE expires > ?1 AND key IN (SELECT value FROM json_each(?2))"
_INSERT_KEYS = (
    "INSERT OR REPLACE INTO keys (key, expires) SELECT value->>0, value->>1 FROM json_each(?1)"
)
#: Keys kept per queue file at most; the soonest to expire go first beyond it.
MAX_KEYS = 200_000
#: Up to ``limit`` entries after ``seq`` as one JSON array of ``[seq, payload]``.
_READ_BATCH = (
    "SELECT coalesce(json_group_array(json_array(seq, payload)), '[]') FROM"
    " (SELECT seq, payload FROM queue WHERE seq > ? ORDER BY seq LIMIT ?)"
)

_log = Logger(namespace="gatewayd.queue")


class QueueError(Exception):
    """A queue operation that could not be carried out (file not openable, disk error...)."""


class QueueClosed(QueueError):
    """The queue's store is stopped (or stopping): nothing more can be put or read."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Result of a put (or an emit) that a full ``drop_newest`` queue did not store."""

    queues: tuple[str, ...]
    reason: str = "overflow_newest"


def _utf8_size(payload: str) -> int:
    """Size of ``payload`` in UTF-8; raises UnicodeEncodeError for unencodable text."""
    return len(payload) if payload.isascii() else len(payload.encode("utf-8"))


class DurableQueue:
    """The queue in front of one sink. Its public methods are called on the reactor thread.

    Figures for ``/metrics`` are plain attributes, updated by the writer thread after each commit
    (reading them does no I/O): ``depth`` (entries stored), ``bytes`` (their payload bytes),
    ``oldest_ts`` (POSIX time the oldest entry was committed, None when empty), ``pending``
    (puts not yet committed, a method), ``dropped`` (by reason, see ``DROP_REASONS``) and
    ``possible_duplicates`` (entries handed out but not acknowledged before the last shutdown
    or crash, counted when the file was opened), ``deduplicated`` (keyed puts not stored again),
    ``error`` and ``error_since`` (why the queue cannot store or hand out events right now, None
    when it can: see ``failing``), ``disk_bytes`` (the file and its WAL on disk).
    """

    #: Seconds between the chores of ``_housekeep`` (held-back deletes, key expiry, the probe
    #: that clears ``error`` once the disk takes writes again, ``disk_bytes``).
    chores_interval = 10.0

    def __init__(
        self,
        store: QueueStore,
        name: str,
        path: Path,
        *,
        max_bytes: int,
        max_age: float,
        overflow: str,
    ) -> None:
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow must be drop_oldest or drop_newest, got {overflow!r}")
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.overflow = overflow
        self.depth = 0
        self.bytes = 0
        self.oldest_ts: float | None = None
        #: Highest seq committed so far (the delivery loop uses it to know where a backlog ends).
        self.last_seq = 0
        #: Entries found in the file when it was opened, and the highest seq among them.
        self.backlog_at_open = 0
        self.last_seq_at_open = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.possible_duplicates = 0
        self.failed_puts = 0  # events a commit round could not store
        self.unheard_failures = 0  # ... of which no emitter was waiting on
        self.deduplicated = 0
        self.error: str | None = None
        self.error_since: float | None = None
        self.disk_bytes = 0
        self._failed_log = LogThrottle(store._clock)
        self._open_outcome: Failure | None = None  # set once the open was tried
        self._open_waiters: list[defer.Deferred] = []
        self._open_tried = False
        self._store = store
        self._listeners: list[Callable[[], None]] = []
        # Guarded by store._cond: work handed from the reactor to the writer thread.
        self._puts: list[tuple[str, Any, tuple[str, float] | None]] = []
        self._forgets: list[str] = []
        self._commands: list[tuple[Any, ...]] = [("open",)]
        # Writer-thread state.
        self._conn: sqlite3.Connection | None = None
        self._open_error: QueueError | None = None
        self._handed = 0
        # Acknowledged up to here (never handed out again while running), and deleted up to here:
        # the two differ while a full disk keeps the delete from committing.
        self._acked = 0
        self._deleted = 0
        self._max_pages = 0
        self._wal_limit = 0
        self._next_expiry = 0.0
        self._next_chores = 0.0
        # Reactor-thread state: rate-limited drop logging.
        self._unlogged: dict[str, int] = {}
        self._last_drop_log = float("-inf")
        self._drop_log_call: Any = None

    def __repr__(self) -> str:
        return f"<DurableQueue {self.name} depth={self.depth} bytes={self.bytes}>"

    # --- reactor-thread API ---------------------------------------------------------------

    def put(self, payload: str, key: tuple[str, float] | None = None) -> defer.Deferred:
        """Store ``payload``; fires with None once committed, or with ``Refused`` if the queue is
        full under ``drop_newest``. Errbacks with QueueClosed after ``stop()``, QueueError on a
        disk error, UnicodeEncodeError for text that is not valid Unicode.

        ``key``: ``(idempotency key, seconds)``. The key is committed with the entry and kept
        that long; a put with a key the file still holds is not stored again (it fires with
        None: what it carries is already durable), and counts in ``deduplicated``.
        """
        d = defer.Deferred()
        self.put_waiting(payload, d, key)
        return d

    def put_waiting(self, payload: str, waiter: Any, key: tuple[str, float] | None = None) -> None:
        """Like ``put`` but reports to ``waiter`` (anything with ``callback``/``errback``).

        The pipeline uses it to fire one Deferred per event for several queues without building
        a Deferred per queue.
        """
        store = self._store
        with store._lock:  # the condition's own lock, entered without the Python-level wrapper
            if not store._stopping:
                self._puts.append((payload, waiter, key))
                if not store._has_work:
                    store._has_work = True
                    store._cond.notify()
                return
        waiter.errback(Failure(QueueClosed(f"queue {self.name}: the queue store is stopped")))

    def read_batch(
        self, limit: int, *, after: int | None = None, ack_upto: int | None = None
    ) -> defer.Deferred:
        """The oldest ``limit`` entries as ``[(seq, payload), ...]`` (empty when none).

        ``after``: only entries with a greater seq (to read ahead of a batch not yet
        acknowledged). ``ack_upto``: acknowledge (``ack``) in the same transaction first.
        The highest seq returned is committed as handed out before the Deferred fires.
        """
        return self._command("read", max(1, int(limit)), after or 0, ack_upto)

    def ack(self, upto_seq: int) -> defer.Deferred:
        """Delete every entry with ``seq <= upto_seq`` (the sink has them); fires with the count."""
        return self._command("ack", int(upto_seq))

    def when_open(self) -> defer.Deferred:
        """A new Deferred firing (None) once the file is open, or failing with its QueueError."""
        if not self._open_tried:
            d: defer.Deferred = defer.Deferred()
            self._open_waiters.append(d)
            return d
        if self._open_outcome is not None:
            return defer.fail(self._open_outcome)
        return defer.succeed(None)

    @property
    def failing(self) -> bool:
        """True while the queue cannot store or hand out events (``error`` says why)."""
        return self.error is not None

    def pending(self) -> int:
        """Puts not yet committed (a snapshot)."""
        return len(self._puts)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on the reactor thread after each commit that added entries."""
        self._listeners.append(listener)

    def _command(self, *command: Any) -> defer.Deferred:
        d = defer.Deferred()
        store = self._store
        with store._cond:
            if not store._stopping:
                self._commands.append((*command, d))
                if not store._has_work:
                    store._has_work = True
                    store._cond.notify()
                return d
        return defer.fail(QueueClosed(f"queue {self.name}: the queue store is stopped"))

    # --- reactor thread: results of a round ------------------------------------------------

    def _complete(self, waiters: list[Any]) -> None:
        for waiter in waiters:
            try:
                waiter.callback(None)
            except Exception:
                _log.failure("queue {queue}: a put waiter failed", queue=self.name)

    def _refuse(self, waiters: list[Any]) -> None:
        refused = Refused((self.name,))
        for waiter in waiters:
            try:
                waiter.callback(refused)
            except Exception:
                _log.failure("queue {queue}: a put waiter failed", queue=self.name)

    def _fail(self, failed: list[tuple[Any, BaseException]]) -> None:
        unheard = 0
        self.failed_puts += len(failed)  # counted before an emitter that hears it looks
        for waiter, exc in failed:
            try:
                waiter.errback(Failure(exc))
            except Exception:
                _log.failure("queue {queue}: a put waiter failed", queue=self.name)
            d = getattr(waiter, "deferred", waiter)  # the pipeline's _Join reports to one
            if isinstance(d, defer.Deferred) and _quiet_unhandled(d):
                unheard += 1
        self.unheard_failures += unheard
        if failed and self._failed_log.due():
            _log.error(
                "queue {queue}: {count} events not stored ({total} so far): {error}",
                queue=self.name,
                count=len(failed),
                total=self.failed_puts,
                error=str(failed[-1][1]),
            )

    def _notify(self, _: Any = None) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                _log.failure("queue {queue}: a listener failed", queue=self.name)

    def _note_drops(self, counts: dict[str, int]) -> None:
        """Log drops, at most one line per DROP_LOG_INTERVAL with the counts since the last."""
        for reason, count in counts.items():
            self._unlogged[reason] = self._unlogged.get(reason, 0) + count
        reactor = self._store._reactor
        wait = self._last_drop_log + DROP_LOG_INTERVAL - reactor.seconds()
        if wait <= 0:
            self._log_drops()
        elif self._drop_log_call is None:
            self._drop_log_call = reactor.callLater(wait, self._log_drops)

    def _log_drops(self) -> None:
        self._drop_log_call = None
        if not self._unlogged:
            return
        self._last_drop_log = self._store._reactor.seconds()
        counts, self._unlogged = self._unlogged, {}
        text = ", ".join(f"{count} by {reason}" for reason, count in sorted(counts.items()))
        _log.warn(
            "queue {queue}: dropped events ({counts}); now {depth} queued, {bytes} bytes",
            queue=self.name,
            counts=text,
            depth=self.depth,
            bytes=self.bytes,
        )

    # --- reactor thread: the queue's state ----------------------------------------------------

    def _set_error(self, error: str) -> None:
        """The queue cannot store or hand out events: say so once (the 10 s log covers the rest)."""
        if self.error is None:
            self.error_since = self._store._reactor.seconds()
            _log.error(
                "queue {queue}: cannot store or hand out events: {error}",
                queue=self.name,
                error=error,
            )
        self.error = error

    def _clear_error(self, _: Any = None) -> None:
        if self.error is None:
            return
        since = self.error_since if self.error_since is not None else 0.0
        _log.info(
            "queue {queue}: works again after {seconds:.1f}s ({failed} events were refused so far)",
            queue=self.name,
            seconds=self._store._reactor.seconds() - since,
            failed=self.failed_puts,
        )
        self.error = None
        self.error_since = None

    # --- writer thread ----------------------------------------------------------------------

    def _open(self) -> list[tuple[str, float]]:
        """Open the file; returns the keys it holds that have not expired."""
        keys: list[tuple[str, float]] = []
        try:
            create_private_file(self.path)  # 0600 (dirs 0700) whatever the umask; -wal/-shm too
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL needed")
                conn.execute(f"PRAGMA synchronous={_SYNC_PRAGMA[self._store.sync]}")
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                self._max_pages, self._wal_limit = size_bounds(self.max_bytes, page_size)
                conn.execute(f"PRAGMA max_page_count={self._max_pages}")
                conn.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
                conn.execute(
                    f"PRAGMA wal_autocheckpoint={max(16, self._wal_limit // page_size // 2)}"
                )
                conn.execute("PRAGMA busy_timeout=5000")  # an operator's tool holding a lock
                conn.executescript(_SCHEMA)
                row = conn.execute("SELECT value FROM meta WHERE key='handed'").fetchone()
                self._handed = int(row[0]) if row else 0
                row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='queue'").fetchone()
                self.last_seq = int(row[0]) if row else 0
                depth, size = conn.execute("SELECT count(*), total(size) FROM queue").fetchone()
                duplicates = conn.execute(
                    "SELECT count(*) FROM queue WHERE seq <= ?", (self._handed,)
                ).fetchone()[0]
                keys = conn.execute(
                    "SELECT key, expires FROM keys WHERE expires > ? ORDER BY expires",
                    (self._store._clock(),),
                ).fetchall()
                self.depth, self.bytes = depth, int(size)
                self.backlog_at_open, self.last_seq_at_open = depth, self.last_seq
                self.oldest_ts = self._first_ts(conn)
                self.possible_duplicates = duplicates
            except BaseException:
                conn.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._open_error = QueueError(f"queue {self.name}: cannot open {self.path}: {exc}")
            return []
        self._conn = conn
        self._measure()
        return keys

    def _first_ts(self, conn: sqlite3.Connection) -> float | None:
        row = conn.execute(
            "SELECT ts FROM queue WHERE seq > ? ORDER BY seq LIMIT 1", (self._acked,)
        ).fetchone()
        return row[0] if row else None

    def _measure(self) -> None:
        """``disk_bytes``: the file and its WAL as they are on disk now."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        self.disk_bytes = total

    def _process(
        self,
        puts: list[tuple[str, Any, Any]],
        commands: list[tuple[Any, ...]],
        forgets: list[str],
        fire: list,
    ) -> None:
        """Commit ``puts`` and run ``commands`` in one transaction; queue the results in ``fire``.

        When that transaction fails, the work is split so that a full disk never stops what
        frees it: acknowledgements and reads go alone (and reads are answered even when nothing
        can be written), then the puts go alone and fail by themselves.
        """
        if commands and commands[0][0] == "open":
            commands = commands[1:]
            if self._conn is None and self._open_error is None:
                keys = self._open()
                if keys:  # known before anyone hears the file is open
                    fire.append((self._store._keys.add_many, keys))
                fire.append((self._opened, self._open_error))
        if self._conn is None:
            error = self._open_error or QueueClosed(f"queue {self.name} is closed")
            fire.append(
                (self._fail, [(w, error) for _, w, _ in puts] + [(c[-1], error) for c in commands])
            )
            return
        if not puts and not commands and not forgets:
            return
        commands = self._note_acks(commands)  # in memory first: an ack outlives a failed round
        try:
            self._round(puts, commands, forgets, fire)
            return
        except Exception as exc:  # sqlite3.Error mostly; whatever it is, nobody is left waiting
            first: BaseException = exc
        if puts and is_disk_full(first) and self._at_size_bound(puts):
            # max_bytes on disk is reached, not the disk: the overflow policy decides.
            if self.overflow == "drop_oldest" and self._make_room(puts, fire):
                try:
                    self._round(puts, commands, forgets, fire)
                    return
                except Exception as exc:
                    first = exc
            else:
                fire.append((self._refuse, [w for _, w, _ in puts]))
                self.dropped["overflow_newest"] += len(puts)
                fire.append((self._note_drops, {"overflow_newest": len(puts)}))
                puts = []
        elif is_disk_full(first):
            self._store._release_reserve(fire)
        if commands or forgets:
            try:
                self._round([], commands, forgets, fire)
            except Exception as exc:
                self._answer_without_writing(commands, exc, fire)
        if puts:
            try:
                self._round(puts, [], [], fire)
            except Exception as exc:
                error = QueueError(f"queue {self.name}: {exc}")
                fire.append((self._set_error, str(error)))  # known before the emitters hear
                fire.append((self._fail, [(w, error) for _, w, _ in puts]))

    def _note_acks(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Record the acknowledgements among ``commands`` in memory; ack commands become their
        answer (``("acked", count, d)``), reads lose the ack they carried."""
        noted = []
        for command in commands:
            if command[0] == "ack":
                noted.append(("acked", self._note_ack(command[1]), command[-1]))
            elif command[0] == "read" and command[3] is not None:
                self._note_ack(command[3])
                noted.append((command[0], command[1], command[2], None, command[-1]))
            else:
                noted.append(command)
        return noted

    def _note_ack(self, upto: int) -> int:
        """Acknowledge up to ``upto`` in memory: those entries are never handed out again."""
        if upto <= self._acked:
            return 0
        conn = self._conn
        assert conn is not None
        try:
            count, size = conn.execute(
                "SELECT count(*), total(size) FROM queue WHERE seq > ? AND seq <= ?",
                (self._acked, upto),
            ).fetchone()
        except sqlite3.Error:
            count, size = 0, 0.0
        self._acked = upto
        self.depth = max(0, self.depth - count)
        self.bytes = max(0, self.bytes - int(size))
        if self.depth:
            with contextlib.suppress(sqlite3.Error):
                self.oldest_ts = self._first_ts(conn)
        else:
            self.oldest_ts = None
        return count

    def _round(
        self,
        puts: list[tuple[str, Any, Any]],
        commands: list[tuple[Any, ...]],
        forgets: list[str],
        fire: list,
    ) -> None:
        """One transaction; on failure the figures are restored and the error raised."""
        store = self._store
        conn = self._conn
        assert conn is not None
        now = store._clock()
        saved = (self.depth, self.bytes, self.oldest_ts, self._handed, self.last_seq)
        drops: dict[str, int] = {}
        accepted: list[Any] = []
        refused: list[Any] = []
        invalid: list[tuple[Any, BaseException]] = []
        keys: list[tuple[str, float]] = []
        results: list[tuple[defer.Deferred, Any]] = []
        acked = self._acked
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self._deleted < acked:
                conn.execute("DELETE FROM queue WHERE seq <= ?", (acked,))
            if forgets:
                conn.execute(
                    "DELETE FROM keys WHERE key IN (SELECT value FROM json_each(?))",
                    (encode_json(forgets),),
                )
            if puts:
                self._insert(conn, puts, now, accepted, refused, invalid, drops, keys)
            for command in commands:
                if command[0] == "read":
                    _, limit, after, _, d = command
                    results.append((d, self._read(conn, limit, after)))
                else:  # acked: noted before the round
                    results.append((command[-1], command[1]))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            self.depth, self.bytes, self.oldest_ts, self._handed, self.last_seq = saved
            raise
        freed = self._deleted < acked
        self._deleted = max(self._deleted, acked)
        store.commits += 1
        store.committed += len(accepted)
        if freed and (self.error is not None or store._reserve.released):
            self._give_back_wal(conn)
        for reason, count in drops.items():
            self.dropped[reason] += count
        if puts and (accepted or refused):
            fire.append((self._clear_error, None))  # first: the emitters may look at it
        if keys:
            fire.append((store._keys.add_many, keys))
        if accepted:
            fire.append((self._complete, accepted))
        if refused:
            fire.append((self._refuse, refused))
        if invalid:
            fire.append((self._fail, invalid))
        for d, result in results:
            fire.append((d.callback, result))
        if accepted:
            fire.append((self._notify, None))
        if drops:
            fire.append((self._note_drops, drops))

    def _answer_without_writing(
        self, commands: list[tuple[Any, ...]], exc: BaseException, fire: list
    ) -> None:
        """Reads and acks when nothing can be written: reads skip the 'handed' record (only the
        count of possible duplicates after a crash suffers), acks stay in memory."""
        conn = self._conn
        assert conn is not None
        for command in commands:
            d = command[-1]
            if command[0] == "acked":
                fire.append((d.callback, command[1]))
                continue
            try:
                rows = self._select(conn, command[1], command[2])
            except Exception as read_exc:
                error = QueueError(f"queue {self.name}: {read_exc}")
                fire.append((self._set_error, str(error)))
                fire.append((self._fail, [(d, error)]))
                continue
            if rows:
                self._handed = max(self._handed, rows[-1][0])
            fire.append((d.callback, rows))
        if not is_disk_full(exc):
            fire.append((self._set_error, f"queue {self.name}: {exc}"))

    def _at_size_bound(self, puts: list[tuple[str, Any, Any]]) -> bool:
        """True when ``puts`` do not fit in the pages ``max_bytes`` allows: the failed round hit
        the queue's own bound, not a full disk."""
        conn = self._conn
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0] if conn else 0
            free = conn.execute("PRAGMA freelist_count").fetchone()[0] if conn else 0
            page_size = conn.execute("PRAGMA page_size").fetchone()[0] if conn else 4096
        except sqlite3.Error:
            return False
        size = sum(_utf8_size(p) for p, _, _ in puts if isinstance(p, str))
        needed = size * 5 // (4 * page_size) + 2  # rows and their b-tree pages, generously
        return pages - free + needed >= self._max_pages

    def _make_room(self, puts: list[tuple[str, Any, Any]], fire: list) -> bool:
        """drop_oldest at the size bound: delete the oldest entries not handed out, about twice
        what ``puts`` bring; False if there was nothing to delete."""
        conn = self._conn
        assert conn is not None
        need = 2 * sum(_utf8_size(p) for p, _, _ in puts if isinstance(p, str)) + 4096
        saved = (self.depth, self.bytes, self.oldest_ts)
        try:
            conn.execute("BEGIN IMMEDIATE")
            dropped = self._drop_front(conn, lambda seq, ts, size, freed: freed < need)
            conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            self.depth, self.bytes, self.oldest_ts = saved
            return False
        if dropped:
            self.dropped["overflow_oldest"] += dropped
            fire.append((self._note_drops, {"overflow_oldest": dropped}))
        return dropped > 0

    def _give_back_wal(self, conn: sqlite3.Connection) -> None:
        """After deletes on a full disk: checkpoint and truncate the WAL to free its room."""
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _opened(self, error: QueueError | None) -> None:
        self._open_tried = True
        if error is not None:
            self._open_outcome = Failure(error)
            _log.error("{error}", error=str(error))
        waiters, self._open_waiters = self._open_waiters, []
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(Failure(error))

    def _insert(
        self,
        conn: sqlite3.Connection,
        puts: list[tuple[str, Any, Any]],
        now: float,
        accepted: list[Any],
        refused: list[Any],
        invalid: list[tuple[Any, BaseException]],
        drops: dict[str, int],
        keys: list[tuple[str, float]],
    ) -> None:
        rows = []
        total = self.bytes
        keep_newest = self.overflow == "drop_newest"
        limit = self.max_bytes
        known = self._known_keys(conn, puts, now)
        for payload, waiter, key in puts:
            try:
                size = _utf8_size(payload)
            except (UnicodeEncodeError, AttributeError) as exc:
                invalid.append((waiter, exc))
                continue
            if key is not None:
                if key[0] in known:  # already durable: stored once, acknowledged again
                    self.deduplicated += 1
                    accepted.append(waiter)
                    continue
                known.add(key[0])
            if keep_newest and total + size > limit:
                refused.append(waiter)
                continue
            total += size
            rows.append((now, size, payload))
            accepted.append(waiter)
            if key is not None:
                keys.append((key[0], now + key[1]))
        if refused:
            drops["overflow_newest"] = len(refused)
        if keys:
            conn.execute(_INSERT_KEYS, (encode_json(keys),))
        if not rows:
            return
        # One statement for the whole batch: executemany would step (and give up and take back
        # the GIL) once per row, and a busy reactor thread starves such a thread for a long time.
        conn.execute(_INSERT_BATCH, (now, encode_json([payload for _, _, payload in rows])))
        if self.depth == 0:
            self.oldest_ts = now
        self.depth += len(rows)
        self.last_seq += len(rows)  # AUTOINCREMENT, and this thread is the only writer
        self.bytes = total
        if total > limit:  # drop_oldest: make room, never touching the batch in flight
            dropped = self._drop_front(conn, lambda seq, ts, size, freed: freed < total - limit)
            if dropped:
                drops["overflow_oldest"] = dropped

    @staticmethod
    def _known_keys(conn: sqlite3.Connection, puts: list[tuple[str, Any, Any]], now: float) -> set:
        """The keys among ``puts`` that the file already holds, unexpired."""
        wanted = [key[0] for _, _, key in puts if key is not None]
        if not wanted:
            return set()
        return {row[0] for row in conn.execute(_KNOWN_KEYS, (now, encode_json(wanted)))}

    def _drop_front(self, conn: sqlite3.Connection, keep_going: Callable[..., bool]) -> int:
        """Delete the oldest entries not handed out while ``keep_going(seq, ts, size, freed)``."""
        last = None
        count = freed = 0
        cursor = conn.execute(
            "SELECT seq, ts, size FROM queue WHERE seq > ? ORDER BY seq", (self._handed,)
        )
        while True:
            rows = cursor.fetchmany(256)
            if not rows:
                break
            for seq, ts, size in rows:
                if not keep_going(seq, ts, size, freed):
                    break
                last = seq
                count += 1
                freed += size
            else:
                continue
            break
        cursor.close()
        if last is None:
            return 0
        conn.execute("DELETE FROM queue WHERE seq > ? AND seq <= ?", (self._handed, last))
        self.depth -= count
        self.bytes -= freed
        self.oldest_ts = self._first_ts(conn)
        return count

    def _select(self, conn: sqlite3.Connection, limit: int, after: int) -> list[tuple[int, str]]:
        """Up to ``limit`` entries after ``after`` and after everything acknowledged."""
        # The batch comes back as one JSON row (see _insert on why not one step per row).
        (text,) = conn.execute(_READ_BATCH, (max(after, self._acked), limit)).fetchone()
        return sorted((seq, payload) for seq, payload in orjson.loads(text))

    def _read(self, conn: sqlite3.Connection, limit: int, after: int) -> list[tuple[int, str]]:
        rows = self._select(conn, limit, after)
        if rows and rows[-1][0] > self._handed:
            self._handed = rows[-1][0]
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('handed', ?)", (self._handed,)
            )
        return rows

    def _housekeep(self, now: float, fire: list) -> None:
        """Periodic chores: ``max_age`` expiry (at most once a second); once every ten seconds,
        deletes a full disk held back, expired keys, a probe while failing, the size on disk."""
        if self._conn is None:
            return
        self._expire(now, fire)
        if now < self._next_chores:
            return
        self._next_chores = now + self.chores_interval
        conn = self._conn
        acked = self._acked
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self._deleted < acked:
                conn.execute("DELETE FROM queue WHERE seq <= ?", (acked,))
            conn.execute("DELETE FROM keys WHERE expires <= ?", (now,))
            conn.execute(
                "DELETE FROM keys WHERE key IN (SELECT key FROM keys ORDER BY expires"
                " LIMIT max(0, (SELECT count(*) FROM keys) - ?))",
                (MAX_KEYS,),
            )
            if self.error is not None:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (now,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            if is_disk_full(exc):
                self._store._release_reserve(fire)
        else:
            freed = self._deleted < acked
            self._deleted = max(self._deleted, acked)
            if freed or self.error is not None:
                self._give_back_wal(conn)
            if self.error is not None:
                fire.append((self._clear_error, None))
        self._measure()

    def _expire(self, now: float, fire: list) -> None:
        """Drop entries older than ``max_age`` (not the batch in flight); at most once a second."""
        if self._conn is None or self.oldest_ts is None or now < self._next_expiry:
            return
        cutoff = now - self.max_age
        if self.oldest_ts >= cutoff:
            return
        self._next_expiry = now + 1.0
        conn = self._conn
        saved = (self.depth, self.bytes, self.oldest_ts)
        try:
            conn.execute("BEGIN IMMEDIATE")
            dropped = self._drop_front(conn, lambda seq, ts, size, freed: ts < cutoff)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            self.depth, self.bytes, self.oldest_ts = saved
            fire.append((_log_error, f"queue {self.name}: max_age expiry failed: {exc}"))
            return
        if dropped:
            self.dropped["max_age"] += dropped
            fire.append((self._note_drops, {"max_age": dropped}))

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def stranded_queues(directory: Path, names: set[str]) -> list[tuple[Path, int | None]]:
    """Queue files in ``directory`` of no sink in ``names``, with the events each still holds
    (None when it cannot be read): a sink removed or renamed in the config leaves its
    undelivered events there."""
    found = []
    for path in sorted(directory.glob("*.db")):
        if path.stem in names:
            continue
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                depth = conn.execute("SELECT count(*) FROM queue").fetchone()[0]
        except sqlite3.Error:
            depth = None
        found.append((path, depth))
    return found


def _quiet_unhandled(d: defer.Deferred) -> bool:
    """If ``d`` ends in a failure nobody handled yet, keep it for a late ``addErrback`` but
    drop Twisted's note that would log it as a traceback when ``d`` is collected: the queue
    has counted and logged it. (Whoever waits on an emit normally attached its callbacks long
    before the commit round that failed it, so this is an emit nobody kept.)"""
    if d.paused or not isinstance(getattr(d, "result", None), Failure):
        return False
    debug = getattr(d, "_debugInfo", None)  # Twisted's unhandled-error note
    if debug is not None:
        debug.failResult = None
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any, after a failed statement."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _log_error(message: str) -> None:
    _log.error("{message}", message=message)


def _log_warn(message: str) -> None:
    _log.warn("{message}", message=message)


class QueueStore:
    """Owns the writer thread; one SQLite file per sink queue: ``<directory>/<sink>.db``.

    ``directory`` is the queue directory itself (the daemon passes ``<state_dir>/queues``).
    ``sync`` is SQLite's ``synchronous``: ``full`` (survives power loss) or ``normal`` (survives
    a process crash). ``clock`` gives the POSIX time stamped on entries (tests replace it).

    Queues can be created before or after ``start()``; their files are opened by the writer
    thread (``DurableQueue.when_open()``, or ``ready()`` for all). Puts made before ``start()`` wait
    for it. ``commits`` and ``committed`` count transactions and the entries they stored.
    """

    #: Seconds between checks whether a released reserve can be made again.
    reserve_check_interval = 10.0

    def __init__(
        self,
        directory: Path,
        reactor: Any,
        sync: str = "full",
        *,
        clock: Callable[[], float] = time.time,
        housekeeping_interval: float = 1.0,
        reserve: Reserve | None = None,
    ) -> None:
        if sync not in _SYNC_PRAGMA:
            raise ValueError(f"sync must be full or normal, got {sync!r}")
        self.directory = Path(directory)
        self.sync = sync
        self.commits = 0
        self.committed = 0
        self._reactor = reactor
        self._clock = clock
        self._housekeeping_interval = housekeeping_interval
        self._queues: dict[str, DurableQueue] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._has_work = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stop_waiters: list[defer.Deferred] = []
        self._stop_done = False
        self._next_reserve_check = 0.0
        self._reserve = reserve or Reserve(self.directory / ".reserve")
        #: The idempotency keys every queue holds (see ``gatewayd.dedupe``).
        self._keys = KeyMemory(clock)

    def queue(self, name: str, *, max_bytes: int, max_age: float, overflow: str) -> DurableQueue:
        """The queue of sink ``name`` (created on first call; later calls return the same one)."""
        if name in self._queues:
            return self._queues[name]
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad queue name {name!r}")
        queue = DurableQueue(
            self,
            name,
            self.directory / f"{name}.db",
            max_bytes=max_bytes,
            max_age=max_age,
            overflow=overflow,
        )
        with self._cond:
            if self._stopping:
                raise QueueClosed("the queue store is stopped")
            self._queues = {**self._queues, name: queue}
            self._has_work = True
            self._cond.notify()
        return queue

    @property
    def queues(self) -> dict[str, DurableQueue]:
        return dict(self._queues)

    def seen(self, key: str) -> bool:
        """True if an event put with ``key`` is durable in some queue and the key is kept."""
        return self._keys.seen(key)

    def forget(self, key: str) -> None:
        """Let the next event with ``key`` be stored again (a new operation reuses the key);
        the keys are deleted from every queue file before any later put is committed."""
        self._keys.forget(key)
        with self._cond:
            if self._stopping:
                return
            for queue in self._queues.values():
                queue._forgets.append(key)
            self._has_work = True
            self._cond.notify()

    def ready(self) -> defer.Deferred:
        """Fires when every queue created so far is open; errbacks with the first QueueError."""
        opened = [q.when_open() for q in self._queues.values()]
        d = defer.gatherResults(opened, consumeErrors=True)
        d.addCallbacks(lambda _: None, lambda f: f.value.subFailure)
        return d

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gatewayd-queue", daemon=True)
        self._thread.start()

    def stop(self) -> defer.Deferred:
        """Refuse new puts, commit the pending ones, close the files; fires when done."""
        d: defer.Deferred = defer.Deferred()
        if self._stop_done:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            self.start()
        return d

    # --- writer thread ----------------------------------------------------------------------

    def _take_work(self) -> tuple[list, bool]:
        with self._cond:
            if not self._has_work and not self._stopping:
                self._cond.wait(self._housekeeping_interval)
            self._has_work = False
            work = []
            for queue in self._queues.values():
                if queue._puts or queue._commands or queue._forgets:
                    work.append((queue, queue._puts, queue._commands, queue._forgets))
                    queue._puts = []
                    queue._commands = []
                    queue._forgets = []
            return work, self._stopping

    def _run(self) -> None:
        try:
            self._keep_reserve(None)
            while True:
                work, stopping = self._take_work()
                fire: list = []
                for queue, puts, commands, forgets in work:
                    queue._process(puts, commands, forgets, fire)
                now = self._clock()
                for queue in self._queues.values():
                    queue._housekeep(now, fire)
                self._keep_reserve(now)
                if fire:
                    self._reactor.callFromThread(_fire, fire)
                if stopping and not work:
                    break
        except BaseException:
            self._reactor.callFromThread(_log.failure, "queue writer thread died", Failure())
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        """Writer thread, last: refuse work, fail what is left (only after a crash), close."""
        with self._cond:
            self._stopping = True
            left = []
            for queue in self._queues.values():
                left.append((queue, queue._puts, queue._commands))
                queue._puts, queue._commands = [], []
        fire: list = []
        for queue, puts, commands in left:
            error = QueueClosed(f"queue {queue.name}: the queue store stopped")
            failed = [(w, error) for _, w, _ in puts] + [
                (c[-1], error) for c in commands if len(c) > 1
            ]
            if failed:
                fire.append((queue._fail, failed))
            if any(c[0] == "open" for c in commands):  # stopped before the file was opened
                fire.append((queue._opened, error))
            queue._close()
        fire.append((self._stopped_callback, None))
        self._reactor.callFromThread(_fire, fire)

    def _release_reserve(self, fire: list) -> None:
        """Writer thread: the disk is full; free the reserve so deletes and checkpoints can run."""
        if self._reserve.release():
            fire.append(
                (
                    _log_warn,
                    f"queue store: the disk is full; released {self._reserve.path}"
                    f" ({self._reserve.size} bytes) so that delivered events can be deleted",
                )
            )
        self._next_reserve_check = self._clock() + self.reserve_check_interval

    def _keep_reserve(self, now: float | None) -> None:
        """Writer thread: make the reserve at start, and again (checked every 10 s) once the
        disk has room after it was released."""
        if now is not None and (not self._reserve.released or now < self._next_reserve_check):
            return
        self._next_reserve_check = (now or self._clock()) + self.reserve_check_interval
        if self._reserve.ensure() and now is not None:
            self._reactor.callFromThread(
                _log.info, "queue store: the disk has room again; the reserve is back"
            )

    def _stopped_callback(self, _: Any = None) -> None:
        self._stop_done = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)


def _fire(calls: list[tuple[Callable[[Any], Any], Any]]) -> None:
    """Run the results of one writer round on the reactor thread."""
    for function, argument in calls:
        try:
            function(argument)
        except Exception:
            _log.failure("queue: delivering a result failed")
