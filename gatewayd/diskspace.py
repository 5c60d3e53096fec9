"""What a queue needs to live on a disk that fills: a reserve to free, and a size bound.

Why: on a full disk SQLite cannot even delete (a delete appends to the WAL, a checkpoint may
grow the database file), so a queue whose disk filled could never free itself. The store keeps
a small reserve file beside the queues and deletes it the moment a write fails for lack of
space; the room it frees lets acknowledged entries be deleted and the WAL be checkpointed and
truncated. The reserve comes back once the disk has room again.

``max_bytes`` bounds the queue on disk, WAL included: the database file may hold at most
``max_bytes - wal_limit`` bytes of pages (SQLite's ``max_page_count``), and the WAL is
checkpointed and truncated back to ``wal_limit``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

__all__ = ["Reserve", "is_disk_full", "size_bounds"]

#: Bytes the store keeps in reserve for deletes and checkpoints on a full disk.
RESERVE_BYTES = 1024 * 1024
#: The reserve is made again only when this many times its size is free (no flapping).
RESERVE_HEADROOM = 4
#: WAL allowance: an eighth of max_bytes, within these bounds.
WAL_MIN = 256 * 1024
WAL_MAX = 64 * 1024 * 1024
#: A queue file may always grow to this many pages (a tiny max_bytes still needs its tables).
MIN_PAGES = 64
#: SQLite's largest max_page_count.
_MAX_PAGES = 4294967294


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's 'database or disk is full' (SQLITE_FULL) and the OS's ENOSPC."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF == sqlite3.SQLITE_FULL
        return "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == 28


def size_bounds(max_bytes: int, page_size: int) -> tuple[int, int]:
    """``(max_page_count, wal_limit)`` that keep a queue file and its WAL within ``max_bytes``."""
    wal_limit = max(WAL_MIN, min(WAL_MAX, max_bytes // 8))
    pages = (max_bytes - wal_limit) // page_size
    return max(MIN_PAGES, min(_MAX_PAGES, pages)), wal_limit


class Reserve:
    """A file of ``size`` bytes kept on the queues' filesystem, released when the disk fills.

    Used from the writer thread only. ``free_bytes`` is injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        size: int = RESERVE_BYTES,
        *,
        free_bytes: Callable[[Path], int] | None = None,
    ) -> None:
        self.path = path
        self.size = size
        self.released = False
        self._free_bytes = free_bytes or _free_bytes

    def ensure(self) -> bool:
        """Create (or re-create) the reserve if the disk has room for it; True if it exists."""
        if self.size <= 0:
            return False
        try:
            if self.path.exists() and self.path.stat().st_size >= self.size:
                self.released = False
                return True
            if self._free_bytes(self.path.parent) < self.size * RESERVE_HEADROOM:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return False
        self.released = False
        return True

    def release(self) -> bool:
        """Delete the reserve to give its room to the queues; True if there was one."""
        if self.released:
            return False
        self.released = True
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True


def _free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize
