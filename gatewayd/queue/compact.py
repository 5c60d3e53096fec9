"""Giving a SQLite file's free pages back to the filesystem, in bounded steps.

Why: SQLite reuses the pages a delete frees but never returns them, so a queue that held a
117 MB backlog stays a 117 MB file once it is empty; on an edge box with a few GB of flash that
is space gone after every outage. A file made with ``auto_vacuum=INCREMENTAL`` can give free
pages back with ``PRAGMA incremental_vacuum(N)``: it moves up to N pages from the end of the file
into free slots and cuts the file shorter (in WAL mode the cut lands on disk at the next
checkpoint). ``Compactor.step`` does that a bounded number of pages at a time, on the thread that
owns the connection (the queue's writer thread, the sqlite sink's own thread), never the reactor.

``auto_vacuum`` only takes effect before the first table is created (``prepare``); a file made
by an older version (``auto_vacuum=NONE``) is converted by one ``VACUUM``, done only while its
content is small (``convert_max_bytes``), since VACUUM rewrites all of it and needs room for a
copy.
"""

from __future__ import annotations

import contextlib
import sqlite3

__all__ = ["INCREMENTAL", "Compactor", "prepare"]

MIB = 1024 * 1024
#: ``PRAGMA auto_vacuum`` value of a file that can give pages back.
INCREMENTAL = 2


def prepare(conn: sqlite3.Connection) -> None:
    """Ask for ``auto_vacuum=INCREMENTAL``; call it first on a connection, before anything
    creates the file's first page (``journal_mode=WAL`` does). An existing file is unchanged."""
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")


def auto_vacuum(conn: sqlite3.Connection) -> int:
    """The file's ``auto_vacuum`` mode (0 none, 1 full, 2 incremental)."""
    return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])


def space(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """``(page_size, page_count, freelist_count)`` of the main database."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(page_size), int(pages), int(free)


class Compactor:
    """When and how far one file gives its free pages back: one bounded step at a time.

    A run starts when free pages are more than ``min_free_share`` of the file and more than
    ``min_free_bytes`` (or, for a file nearly all free, as a drained queue is, more than
    ``almost_empty_share`` and ``almost_empty_free_bytes``), and goes on, ``step_bytes`` per step
    and a step at most every ``interval`` seconds, until no free page is left; then it waits
    for the next trigger. Below the trigger, free pages stay in the file for SQLite to reuse:
    a busy file does not churn.
    Figures: ``returned_bytes`` (given back so far), ``steps``, ``converted`` (an older file
    VACUUMed to incremental mode), ``error`` (the last step's failure, None after a good one).
    """

    #: Free pages must be more than this share of the file to start a run...
    min_free_share = 0.25
    #: ... and more than this many bytes.
    min_free_bytes = 4 * MIB
    #: A file this much free (a drained queue) starts a run from a smaller size...
    almost_empty_share = 0.9
    #: ... this many free bytes: an empty queue ends within 1 MiB of its empty size.
    almost_empty_free_bytes = 1 * MIB
    #: Bytes of pages one step gives back at most (4 MiB: 10-50 ms of I/O on flash).
    step_bytes = 4 * MIB
    #: Step size while the caller says its disk is full: the WAL room a step takes stays small.
    full_disk_step_bytes = 256 * 1024
    #: Seconds between two steps of a run (and between two checks whether a run is due).
    interval = 1.0
    #: An older file is converted (one VACUUM) only while its content is at most this.
    convert_max_bytes = 4 * MIB

    def __init__(self) -> None:
        self.running = False
        self.returned_bytes = 0
        self.steps = 0
        self.converted = False
        self.error: str | None = None
        self._next = 0.0
        self.wal_to_truncate = False  # a step ran while the connection was busy

    def step(
        self, conn: sqlite3.Connection, now: float, *, idle: bool, disk_full: bool = False
    ) -> int:
        """One step if due at ``now``: returns the bytes the file shrank by (0 if none).

        ``idle``: nothing waits on the connection, so the WAL is checkpointed and truncated
        after the step (else the next automatic checkpoint cuts the file). Never raises:
        a failed step is rolled back and kept in ``error``; the next run tries again.
        """
        if now < self._next:
            return 0
        self._next = now + self.interval
        try:
            if idle and self.wal_to_truncate:
                self.wal_to_truncate = False
                _truncate_wal(conn)
            page_size, pages, free = space(conn)
            if not self.running:
                if not self._due(page_size, pages, free):
                    return 0
                self.running = True
            if free == 0:
                self.running = False
                return 0
            if auto_vacuum(conn) != INCREMENTAL:
                if (pages - free) * page_size > self.convert_max_bytes:
                    self.running = False  # too much to rewrite now; checked again next time
                    return 0
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("VACUUM")
                self.converted = True
            else:
                limit = self.full_disk_step_bytes if disk_full else self.step_bytes
                # executescript steps the pragma to the end; execute() frees one page only.
                conn.executescript(f"PRAGMA incremental_vacuum({max(1, limit // page_size)})")
            if idle:
                _truncate_wal(conn)
            else:
                self.wal_to_truncate = True
            _, after, left = space(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self.error = str(exc)
            self.running = False
            return 0
        self.error = None
        self.steps += 1
        if left == 0:
            self.running = False
        returned = max(0, pages - after) * page_size
        self.returned_bytes += returned
        return returned

    def _due(self, page_size: int, pages: int, free: int) -> bool:
        """Whether ``free`` of ``pages`` free pages are enough to start a run."""
        free_bytes = free * page_size
        if free_bytes > self.min_free_bytes and free > pages * self.min_free_share:
            return True
        return free_bytes > self.almost_empty_free_bytes and free > pages * self.almost_empty_share


def _truncate_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint and cut the WAL to nothing, waiting at most 0.1 s for another process's
    reader (an operator's tool): if it is busy, the next checkpoint does it."""
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout=100")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(timeout)}")
