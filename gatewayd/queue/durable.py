"""``DurableQueue``: the queue in front of one sink, as the reactor thread uses it.

``put`` and ``read_batch`` only hand work to the store's writer thread (``gatewayd.queue.store``);
the SQL runs there (``gatewayd.queue.file``) and the results come back here, on the reactor.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.logsetup import LogThrottle
from gatewayd.queue.compact import Compactor
from gatewayd.queue.errors import DROP_REASONS, QueueClosed, QueueError, Refused
from gatewayd.queue.file import QueueFile

if TYPE_CHECKING:
    from gatewayd.queue.store import QueueStore

__all__ = ["DROP_LOG_INTERVAL", "DurableQueue"]

#: Seconds between two log lines about drops from one queue.
DROP_LOG_INTERVAL = 10.0

_log = Logger(namespace="gatewayd.queue")


class DurableQueue(QueueFile):
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
    #: At a chore with nothing waiting, a WAL larger than this is checkpointed and cut to
    #: nothing (it grows to an eighth of ``max_bytes`` between checkpoints when busy).
    wal_idle_bytes = 4 * 1024 * 1024

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
        self._wal_bytes = 0  # the WAL's part of disk_bytes
        self._failed_log = LogThrottle(store._clock)
        self._open_outcome: Failure | None = None  # set once the open was tried
        self._open_waiters: list[defer.Deferred] = []
        self._open_tried = False
        self._store = store
        self._listeners: list[Callable[[], None]] = []
        # Guarded by store._cond: work handed from the reactor to the writer thread.
        self._puts: list[tuple[str, Any, tuple[str, float] | None]] = []
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
        #: Gives free pages back after a drained backlog (thresholds: ``Compactor``).
        self._compactor = Compactor()
        # Reactor-thread state: rate-limited drop logging.
        self._unlogged: dict[str, int] = {}
        self._last_drop_log = float("-inf")
        self._drop_log_call: Any = None

    def __repr__(self) -> str:
        return f"<DurableQueue {self.name} depth={self.depth} bytes={self.bytes}>"

    # --- reactor-thread API ---------------------------------------------------------------

    def put(self, payload: str, key: tuple[Any, ...] | None = None) -> defer.Deferred:
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

    def put_waiting(self, payload: str, waiter: Any, key: tuple[Any, ...] | None = None) -> None:
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

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (a sink runner that stopped: a reload replaces it)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

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
