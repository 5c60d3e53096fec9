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

from gatewayd.events import encode_json
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
"""

#: A batch of payloads as one JSON array, inserted in array order by a single statement.
_INSERT_BATCH = (
    "INSERT INTO queue (ts, size, payload)"
    " SELECT ?1, length(CAST(value AS BLOB)), value FROM json_each(?2) ORDER BY key"
)
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
    or crash, counted when the file was opened).
    """

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
        self._failed_log = LogThrottle(store._clock)
        self._open_outcome: Failure | None = None  # set once the open was tried
        self._open_waiters: list[defer.Deferred] = []
        self._open_tried = False
        self._store = store
        self._listeners: list[Callable[[], None]] = []
        # Guarded by store._cond: work handed from the reactor to the writer thread.
        self._puts: list[tuple[str, Any]] = []
        self._commands: list[tuple[Any, ...]] = [("open",)]
        # Writer-thread state.
        self._conn: sqlite3.Connection | None = None
        self._open_error: QueueError | None = None
        self._handed = 0
        self._next_expiry = 0.0
        # Reactor-thread state: rate-limited drop logging.
        self._unlogged: dict[str, int] = {}
        self._last_drop_log = float("-inf")
        self._drop_log_call: Any = None

    def __repr__(self) -> str:
        return f"<DurableQueue {self.name} depth={self.depth} bytes={self.bytes}>"

    # --- reactor-thread API ---------------------------------------------------------------

    def put(self, payload: str) -> defer.Deferred:
        """Store ``payload``; fires with None once committed, or with ``Refused`` if the queue is
        full under ``drop_newest``. Errbacks with QueueClosed after ``stop()``, QueueError on a
        disk error, UnicodeEncodeError for text that is not valid Unicode."""
        d = defer.Deferred()
        self.put_waiting(payload, d)
        return d

    def put_waiting(self, payload: str, waiter: Any) -> None:
        """Like ``put`` but reports to ``waiter`` (anything with ``callback``/``errback``).

        The pipeline uses it to fire one Deferred per event for several queues without building
        a Deferred per queue.
        """
        store = self._store
        with store._lock:  # the condition's own lock, entered without the Python-level wrapper
            if not store._stopping:
                self._puts.append((payload, waiter))
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
        for waiter, exc in failed:
            try:
                waiter.errback(Failure(exc))
            except Exception:
                _log.failure("queue {queue}: a put waiter failed", queue=self.name)
            d = getattr(waiter, "deferred", waiter)  # the pipeline's _Join reports to one
            if isinstance(d, defer.Deferred) and _quiet_unhandled(d):
                unheard += 1
        self.failed_puts += len(failed)
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

    # --- writer thread ----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL needed")
                conn.execute(f"PRAGMA synchronous={_SYNC_PRAGMA[self._store.sync]}")
                conn.execute("PRAGMA journal_size_limit=67108864")
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
                self.depth, self.bytes = depth, int(size)
                self.backlog_at_open, self.last_seq_at_open = depth, self.last_seq
                self.oldest_ts = self._first_ts(conn)
                self.possible_duplicates = duplicates
            except BaseException:
                conn.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._open_error = QueueError(f"queue {self.name}: cannot open {self.path}: {exc}")
            return
        self._conn = conn

    @staticmethod
    def _first_ts(conn: sqlite3.Connection) -> float | None:
        row = conn.execute("SELECT ts FROM queue ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    def _process(
        self, puts: list[tuple[str, Any]], commands: list[tuple[Any, ...]], fire: list
    ) -> None:
        """One round: commit ``puts`` and run ``commands`` in one transaction; queue results."""
        if commands and commands[0][0] == "open":
            commands = commands[1:]
            if self._conn is None and self._open_error is None:
                self._open()
                fire.append((self._opened, self._open_error))
        if self._conn is None:
            error = self._open_error or QueueClosed(f"queue {self.name} is closed")
            fire.append(
                (self._fail, [(w, error) for _, w in puts] + [(c[-1], error) for c in commands])
            )
            return
        if not puts and not commands:
            return
        store = self._store
        conn = self._conn
        now = store._clock()
        saved = (self.depth, self.bytes, self.oldest_ts, self._handed, self.last_seq)
        drops: dict[str, int] = {}
        accepted: list[Any] = []
        refused: list[Any] = []
        invalid: list[tuple[Any, BaseException]] = []
        results: list[tuple[defer.Deferred, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if puts:
                self._insert(conn, puts, now, accepted, refused, invalid, drops)
            for command in commands:
                if command[0] == "read":
                    _, limit, after, ack_upto, d = command
                    if ack_upto is not None:
                        self._ack(conn, ack_upto)
                    results.append((d, self._read(conn, limit, after)))
                else:  # ack
                    results.append((command[-1], self._ack(conn, command[1])))
            conn.execute("COMMIT")
        except Exception as exc:  # sqlite3.Error mostly; whatever it is, nobody is left waiting
            _rollback(conn)
            self.depth, self.bytes, self.oldest_ts, self._handed, self.last_seq = saved
            error = QueueError(f"queue {self.name}: {exc}")
            failed = [(w, error) for _, w in puts] + [(c[-1], error) for c in commands]
            fire.append((self._fail, failed))
            return
        store.commits += 1
        store.committed += len(accepted)
        for reason, count in drops.items():
            self.dropped[reason] += count
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
        puts: list[tuple[str, Any]],
        now: float,
        accepted: list[Any],
        refused: list[Any],
        invalid: list[tuple[Any, BaseException]],
        drops: dict[str, int],
    ) -> None:
        rows = []
        total = self.bytes
        keep_newest = self.overflow == "drop_newest"
        limit = self.max_bytes
        for payload, waiter in puts:
            try:
                size = _utf8_size(payload)
            except (UnicodeEncodeError, AttributeError) as exc:
                invalid.append((waiter, exc))
                continue
            if keep_newest and total + size > limit:
                refused.append(waiter)
                continue
            total += size
            rows.append((now, size, payload))
            accepted.append(waiter)
        if refused:
            drops["overflow_newest"] = len(refused)
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

    def _read(self, conn: sqlite3.Connection, limit: int, after: int) -> list[tuple[int, str]]:
        # The batch comes back as one JSON row (see _insert on why not one step per row).
        (text,) = conn.execute(_READ_BATCH, (after, limit)).fetchone()
        rows = sorted((seq, payload) for seq, payload in orjson.loads(text))
        if rows and rows[-1][0] > self._handed:
            self._handed = rows[-1][0]
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('handed', ?)", (self._handed,)
            )
        return rows

    def _ack(self, conn: sqlite3.Connection, upto: int) -> int:
        count, size = conn.execute(
            "SELECT count(*), total(size) FROM queue WHERE seq <= ?", (upto,)
        ).fetchone()
        if count:
            conn.execute("DELETE FROM queue WHERE seq <= ?", (upto,))
            self.depth -= count
            self.bytes -= int(size)
            self.oldest_ts = self._first_ts(conn) if self.depth else None
        return count

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


class QueueStore:
    """Owns the writer thread; one SQLite file per sink queue: ``<directory>/<sink>.db``.

    ``directory`` is the queue directory itself (the daemon passes ``<state_dir>/queues``).
    ``sync`` is SQLite's ``synchronous``: ``full`` (survives power loss) or ``normal`` (survives
    a process crash). ``clock`` gives the POSIX time stamped on entries (tests replace it).

    Queues can be created before or after ``start()``; their files are opened by the writer
    thread (``DurableQueue.when_open()``, or ``ready()`` for all). Puts made before ``start()`` wait
    for it. ``commits`` and ``committed`` count transactions and the entries they stored.
    """

    def __init__(
        self,
        directory: Path,
        reactor: Any,
        sync: str = "full",
        *,
        clock: Callable[[], float] = time.time,
        housekeeping_interval: float = 1.0,
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
                if queue._puts or queue._commands:
                    work.append((queue, queue._puts, queue._commands))
                    queue._puts = []
                    queue._commands = []
            return work, self._stopping

    def _run(self) -> None:
        try:
            while True:
                work, stopping = self._take_work()
                fire: list = []
                for queue, puts, commands in work:
                    queue._process(puts, commands, fire)
                now = self._clock()
                for queue in self._queues.values():
                    queue._expire(now, fire)
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
            failed = [(w, error) for _, w in puts] + [
                (c[-1], error) for c in commands if len(c) > 1
            ]
            if failed:
                fire.append((queue._fail, failed))
            if any(c[0] == "open" for c in commands):  # stopped before the file was opened
                fire.append((queue._opened, error))
            queue._close()
        fire.append((self._stopped_callback, None))
        self._reactor.callFromThread(_fire, fire)

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
