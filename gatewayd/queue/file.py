"""The writer thread's side of one queue file: the SQL that stores, hands out, acknowledges,
de-duplicates and drops entries, and what it does when the disk fills.

Why apart: everything here runs on the store's writer thread and touches the SQLite connection;
``DurableQueue`` (``gatewayd.queue.durable``) adds the reactor-thread API on top of this mixin. The
file's layout and the queue's semantics are described in ``gatewayd.queue``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import defer
from twisted.logger import Logger

from gatewayd.diskspace import is_disk_full, size_bounds
from gatewayd.events import encode_json
from gatewayd.files import create_private_file
from gatewayd.queue.compact import prepare
from gatewayd.queue.errors import QueueClosed, QueueError

__all__ = ["MAX_KEYS", "QueueFile"]

_log = Logger(namespace="gatewayd.queue")

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


def _utf8_size(payload: str) -> int:
    """Size of ``payload`` in UTF-8; raises UnicodeEncodeError for unencodable text."""
    return len(payload) if payload.isascii() else len(payload.encode("utf-8"))


def _waiters(puts: list[tuple[Any, Any, Any]]) -> list[Any]:
    """The waiters of ``puts``, leaving out the forgets that travel among them."""
    return [waiter for payload, waiter, _ in puts if payload is not None]


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any, after a failed statement."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _log_error(message: str) -> None:
    _log.error("{message}", message=message)


class QueueFile:
    """Writer-thread methods of ``DurableQueue`` (a mixin: the state lives on the queue)."""

    def _open(self) -> list[tuple[str, float]]:
        """Open the file; returns the keys it holds that have not expired."""
        keys: list[tuple[str, float]] = []
        try:
            create_private_file(self.path)  # 0600 (dirs 0700) whatever the umask; -wal/-shm too
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                prepare(conn)  # a new file gives its free pages back (gatewayd.queue.compact)
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
        sizes = []
        for suffix in ("", "-wal"):
            try:
                sizes.append(os.stat(f"{self.path}{suffix}").st_size)
            except OSError:
                sizes.append(0)
        self.disk_bytes = sum(sizes)
        self._wal_bytes = sizes[1]

    def _process(
        self,
        puts: list[tuple[str, Any, Any]],
        commands: list[tuple[Any, ...]],
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
                (
                    self._fail,
                    [(w, error) for w in _waiters(puts)] + [(c[-1], error) for c in commands],
                )
            )
            return
        if not puts and not commands:
            return
        commands = self._note_acks(commands)  # in memory first: an ack outlives a failed round
        try:
            self._round(puts, commands, fire)
            return
        except Exception as exc:  # sqlite3.Error mostly; whatever it is, nobody is left waiting
            first: BaseException = exc
        if puts and is_disk_full(first) and self._at_size_bound(puts):
            # max_bytes on disk is reached, not the disk: the overflow policy decides.
            if self.overflow == "drop_oldest" and self._make_room(puts, fire):
                try:
                    self._round(puts, commands, fire)
                    return
                except Exception as exc:
                    first = exc
            else:
                refused = _waiters(puts)
                self.dropped["overflow_newest"] += len(refused)
                fire.append((self._refuse, refused))
                fire.append((self._note_drops, {"overflow_newest": len(refused)}))
                puts = [put for put in puts if put[0] is None]  # forgets still apply
        elif is_disk_full(first):
            self._store._release_reserve(fire)
        if commands:
            try:
                self._round([], commands, fire)
            except Exception as exc:
                self._answer_without_writing(commands, exc, fire)
        if puts:
            try:
                self._round(puts, [], fire)
            except Exception as exc:
                error = QueueError(f"queue {self.name}: {exc}")
                fire.append((self._set_error, str(error)))  # known before the emitters hear
                fire.append((self._fail, [(w, error) for w in _waiters(puts)]))

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
        forgotten: list[str] = []
        for payload, waiter, key in puts:
            if payload is None:  # a forget, in its place among the puts
                known.discard(key)
                forgotten.append(key)
                keys[:] = [k for k in keys if k[0] != key]  # put before it: forgotten too
                continue
            try:
                size = _utf8_size(payload)
            except (UnicodeEncodeError, AttributeError) as exc:
                invalid.append((waiter, exc))
                continue
            if key is not None and key[0] in known:  # already durable: acknowledged again
                self.deduplicated += 1
                accepted.append(waiter)
                continue
            if keep_newest and total + size > limit:
                refused.append(waiter)
                continue
            if key is not None:
                known.add(key[0])  # only once stored: a refused put's repeat is refused too
            total += size
            rows.append((now, size, payload))
            accepted.append(waiter)
            if key is not None:
                keys.append((key[0], now + key[1], key[2] if len(key) > 2 else None))
        if refused:
            drops["overflow_newest"] = len(refused)
        if forgotten:
            conn.execute(
                "DELETE FROM keys WHERE key IN (SELECT value FROM json_each(?))",
                (encode_json(forgotten),),
            )
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
        wanted = [key[0] for payload, _, key in puts if key is not None and payload is not None]
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
        """Periodic chores: ``max_age`` expiry (at most once a second), a compaction step when
        due (``_compact``); once every ten seconds, deletes a full disk held back, expired keys,
        a probe while failing, the WAL cut back when nothing waits and it is over
        ``wal_idle_bytes``, the size on disk."""
        if self._conn is None:
            return
        self._expire(now, fire)
        self._compact(now)
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
            idle = not self._puts and not self._commands  # a hint, read without the lock
            if freed or self.error is not None or (idle and self._wal_bytes > self.wal_idle_bytes):
                self._give_back_wal(conn)
            if self.error is not None:
                fire.append((self._clear_error, None))
        self._measure()

    def _compact(self, now: float) -> None:
        """Give free pages back to the filesystem, a bounded step at a time (the thresholds are
        ``Compactor``'s): after a drained backlog the file and its WAL shrink back. The WAL is
        truncated after a step only when no put waits; on a full disk steps are small, so
        they do not take the room the reserve freed for deletes."""
        conn = self._conn
        assert conn is not None
        idle = not self._puts and not self._commands  # a hint, read without the lock
        full = self._store._reserve.released or self.error is not None
        compactor = self._compactor
        truncating = compactor.wal_to_truncate and idle
        if compactor.step(conn, now, idle=idle, disk_full=full) or truncating:
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
