"""Id lists from the config or from a file that is re-read when it changes (allow_imei, banks).

Why: operators add cabinets and power banks while the daemon runs; a file they edit (or a job
rewrites) takes effect within ``check_interval`` seconds without a restart. The file holds one id
per line (several per line separated by spaces or commas also work); ``#`` starts a comment.
If the file cannot be read later, the last list read stays in force and a warning is logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

__all__ = ["IdList", "read_id_file"]

log = Logger(namespace="gatewayd.plugins.powerbank.idlists")

_SEPARATORS = re.compile(r"[\s,;]+")


def read_id_file(path: Path, pattern: re.Pattern[str]) -> tuple[set[str], list[str]]:
    """The ids in ``path`` and the entries that do not match ``pattern`` (skipped)."""
    ids: set[str] = set()
    bad: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for entry in _SEPARATORS.split(line.split("#", 1)[0].strip()):
            if not entry:
                continue
            if pattern.fullmatch(entry):
                ids.add(entry)
            else:
                bad.append(entry)
    return ids, bad


def _signature(path: Path) -> tuple[int, int, int]:
    """What tells a changed file: mtime, size and inode (a file replaced by rename)."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class IdList:
    """Membership test over fixed ``ids`` plus the ids of ``path`` (re-read when it changes).

    ``clock.seconds()`` throttles the ``stat`` of the file to one per ``check_interval``. The
    first read happens in ``load()`` and raises ``OSError`` if the file cannot be read.
    """

    def __init__(
        self,
        name: str,
        pattern: re.Pattern[str],
        ids: Iterable[str] = (),
        path: Path | None = None,
        *,
        clock: Any,
        check_interval: float = 1.0,
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.fixed = frozenset(ids)
        self.path = path
        self.clock = clock
        self.check_interval = check_interval
        self.from_file: set[str] = set()
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._failing = False

    def load(self) -> None:
        """Read the file now (at start); raises OSError when it cannot be read."""
        if self.path is not None:
            self._read(_signature(self.path))

    def __contains__(self, item: str) -> bool:
        if item in self.fixed:
            return True
        if self.path is None:
            return False
        self._refresh()
        return item in self.from_file

    def __len__(self) -> int:
        return len(self.fixed | self.from_file)

    def _refresh(self) -> None:
        now = self.clock.seconds()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval
        try:
            signature = _signature(self.path)
            if signature != self._signature:
                self._read(signature)
            self._failing = False
        except (OSError, UnicodeDecodeError) as exc:
            if not self._failing:
                log.warn(
                    "{name}: cannot read {path} ({error}); keeping the {count} ids read before",
                    name=self.name,
                    path=str(self.path),
                    error=exc,
                    count=len(self.from_file),
                )
            self._failing = True

    def _read(self, signature: tuple[int, int, int]) -> None:
        assert self.path is not None
        ids, bad = read_id_file(self.path, self.pattern)
        self.from_file = ids
        self._signature = signature
        if bad:
            log.warn(
                "{name}: {path}: skipped {count} invalid entries, e.g. {example!r}",
                name=self.name,
                path=str(self.path),
                count=len(bad),
                example=bad[0],
            )
        log.info(
            "{name}: {count} ids from {path}", name=self.name, count=len(ids), path=str(self.path)
        )
