"""The ``jsonl`` sink: events appended to a file, one JSON object per line, rotated by size.

Each batch is written and ``fsync``-ed before it is acknowledged, so an acknowledged event is on
disk. When the next line would take the file past ``rotate_bytes`` the file is renamed
``<path>.1`` (older ones shift to ``.2`` ... ``.<keep>``; beyond that they are deleted) and a new
one is started. After a crash the last batch may be appended again: readers de-duplicate by
``id``. A line cut short by a crash is closed with a newline at the next start, so every later
line parses. A file (or directory) the sink creates is private to the daemon's user: 0600 (0700).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pydantic import Field

from gatewayd.events import Event
from gatewayd.files import ends_with_newline, fsync_directory, private_dir, private_opener
from gatewayd.schema import ByteSize, LocalSinkConfig
from gatewayd.sinks.base import BlockingSink

__all__ = ["JsonlSink"]


class JsonlSink(BlockingSink):
    """Appends events to a JSON Lines file on the sink's own thread."""

    class Config(LocalSinkConfig):
        type: str = "jsonl"
        #: The file; relative paths are relative to ``gateway.state_dir``.
        path: Path = Path("events.jsonl")
        #: Start a new file when the current one would grow past this size.
        rotate_bytes: ByteSize = 64 * 1024 * 1024
        #: Rotated files kept (``<path>.1`` is the newest); 0 deletes the full file.
        keep: int = Field(5, ge=0, le=1000)

    config: Config

    def open_blocking(self) -> None:
        self.close_blocking()  # an open retried after a timeout may find the file open
        self.path = self.resolve_path(self.config.path)
        private_dir(self.path.parent)
        self._file: IO[bytes] | None = open(self.path, "ab", opener=private_opener)  # noqa: SIM115
        self._size = self._file.tell()
        if self._size and not ends_with_newline(self.path):
            self._file.write(b"\n")
            self._size += 1

    def write_blocking(self, events: Sequence[Event]) -> None:
        assert self._file is not None, "write before open"
        limit = self.config.rotate_bytes
        chunk: list[bytes] = []
        size = self._size
        payloads = getattr(events, "payloads", None)  # the queued JSON texts, when given
        texts = payloads if payloads is not None else [event.to_json() for event in events]
        for text in texts:
            line = (text + "\n").encode("utf-8")
            if size and size + len(line) > limit:
                self._append(chunk)
                chunk = []
                self._rotate()
                size = 0
            chunk.append(line)
            size += len(line)
        self._append(chunk)

    def _append(self, chunk: list[bytes]) -> None:
        """Write and fsync; on failure cut the file back so a retry leaves no partial line."""
        assert self._file is not None
        if not chunk:
            return
        data = b"".join(chunk)
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            with contextlib.suppress(OSError, ValueError):
                self._file.truncate(self._size)
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        """Shift ``path.N`` → ``path.N+1`` (oldest deleted), ``path`` → ``path.1``, reopen."""
        assert self._file is not None
        self._file.close()
        self._file = None
        keep = self.config.keep
        if keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._numbered(keep).unlink(missing_ok=True)
            for n in range(keep - 1, 0, -1):
                if self._numbered(n).exists():
                    os.replace(self._numbered(n), self._numbered(n + 1))
            os.replace(self.path, self._numbered(1))
        self._file = open(self.path, "ab", opener=private_opener)  # noqa: SIM115 (kept open)
        self._size = 0
        fsync_directory(self.path.parent)

    def _numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def close_blocking(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
