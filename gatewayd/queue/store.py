"""``QueueStore``: the writer thread and the queue files it owns, one per sink.

Why one thread: group commit. Everything put while the previous round ran is committed in one
transaction per file, and the reactor never waits on disk.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.dedupe import KeyMemory
from gatewayd.diskspace import Reserve
from gatewayd.queue.durable import DurableQueue
from gatewayd.queue.errors import QueueClosed
from gatewayd.queue.file import _SYNC_PRAGMA

__all__ = ["QueueStore", "stranded_queues"]

_log = Logger(namespace="gatewayd.queue")


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
            for queue in self._queues.values():  # among the puts, in order: see QueueFile._insert
                queue._puts.append((None, None, key))
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
                if queue._puts or queue._commands:
                    work.append((queue, queue._puts, queue._commands))
                    queue._puts = []
                    queue._commands = []
            return work, self._stopping

    def _run(self) -> None:
        try:
            self._keep_reserve(None)
            while True:
                work, stopping = self._take_work()
                fire: list = []
                for queue, puts, commands in work:
                    queue._process(puts, commands, fire)
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
            failed = [(w, error) for p, w, _ in puts if p is not None] + [
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
